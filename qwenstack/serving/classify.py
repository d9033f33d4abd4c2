"""POST /classify (vLLM's name; also /v1/classify): a sequence classifier's labels for texts, in vLLM's shape,
for checkpoints saved as Qwen3ForSequenceClassification (fine-tuned sentiment, intent or safety classifiers; a
Qwen3-Reranker converted to one label, which /v1/rerank and /score serve too).

Decisions:
- `input` takes the four forms /v1/embeddings takes (serving/embeddings.py: a string, a list of strings, token
  ids, token-id lists), encoded with the tokenizer's special tokens and nothing appended, as transformers'
  text-classification pipeline encodes; or vLLM's chat form, `messages`: one conversation rendered by the chat
  template as a chat request's prompt (no generation prompt unless add_generation_prompt). vLLM's truncate_prompt_tokens keeps each input's last k tokens. An input
  over the context is a 400, never cut silently.
- Each result is vLLM's: `label` (id2label of the most probable), `probs` (softmax over the labels in id order,
  sigmoid for a lone label, as vLLM's classify activation), `num_classes`. The logits are the classifier's at
  the last token that is not the pad token, as transformers pools (LLMEngine.classify).
- A model without a classification head answers 400 (code model_cannot_classify): a chat model's labels would
  be invented.
- The inputs run as one command in the engine's embedding passes (engine/embed.py): no KV cache, between two
  generation steps.
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from qwenstack.reranking import label_probabilities
from qwenstack.serving.embeddings import PoolingRequest, prompt_ids
from qwenstack.serving.errors import APIError
from qwenstack.serving.openapi import request_body
from qwenstack.serving.rerank import pooling_list
from qwenstack.serving.state import get_state, local_or_forwarded

router = APIRouter()


class ClassificationRequest(PoolingRequest):
    pass


class ClassificationData(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassificationUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ClassificationResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: ClassificationUsage


@router.post("/v1/classify", responses={200: {"model": ClassificationResponse}})
@router.post("/classify", include_in_schema=False)  # vLLM's name
@request_body(ClassificationRequest)
async def classify(request: Request) -> Response:
    local = await local_or_forwarded(request, ClassificationRequest, "/classify", generates=False)
    if isinstance(local, Response):
        return local
    body, served = local.body, local.served
    labels = served.labels
    if labels is None:
        raise APIError(400, f"'{served.name}' has no classification head: POST /classify needs a "
                            f"sequence-classification checkpoint (Qwen3ForSequenceClassification)", param="model",
                       code="model_cannot_classify")
    # 2,048 texts to encode: off the event loop
    prompts = await asyncio.to_thread(prompt_ids, served, body, False, None, get_state(request))
    probs = label_probabilities(await served.engine.classify(prompts))
    best = probs.argmax(dim=-1).tolist()
    data = [{"index": i, "label": labels[b], "probs": row, "num_classes": len(labels)}
            for i, (b, row) in enumerate(zip(best, probs.tolist()))]
    return pooling_list("classify", served, data, sum(map(len, prompts)))
