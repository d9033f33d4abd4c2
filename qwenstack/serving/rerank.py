"""POST /v1/rerank (also /rerank and /v2/rerank, as vLLM serves them) in Jina's and Cohere's shape, and vLLM's
POST /score: what RAG clients call to order retrieved passages (LangChain's and LlamaIndex's Jina/Cohere
rerankers, Dify, RAGFlow, Open WebUI).

Decisions:
- Scoring is Qwen3-Reranker's own method, in qwenstack/reranking.py (shared with the offline LLM.score): each
  (query, document) pair becomes one chat prompt and the score is P(yes) at its last position. `instruction`
  (an extra field) replaces the default one; a query that starts with `<|im_start|>` is taken as formatted.
- Any served chat model answers the same way (as chat models answer /v1/embeddings): it reranks with the
  Qwen3-Reranker prompt, which is useful only for a real Qwen3-Reranker checkpoint (a plain Qwen3ForCausalLM;
  nothing marks it as a reranker, so nothing is refused). An embedding model has no language-model head: 400.
  A one-label sequence classifier (Qwen3-Reranker converted to Qwen3ForSequenceClassification, vLLM's
  "seq-cls" form) scores the same prompts by sigmoid of its label; a classifier of more labels: 400.
- The pairs run as one command in the engine's embedding passes (engine/embed.py): no KV cache, packed up to
  the step budget, between two generation steps; only the two head rows of "no" and "yes" are multiplied
  (lm_logits with token_ids), never the whole vocabulary. One command holds the engine until it is done, so
  a request takes at most MAX_DOCUMENTS documents (a 400 beyond), as Cohere's and Voyage's APIs do.
- A pair longer than the context is a 400 naming the document, never truncated (vLLM's truncate_prompt_tokens
  is not offered). top_n below 1 is a 400 (vLLM reads 0 as "all"; leaving it out means all here too).
- `return_documents` (default true) puts each document's text in its result; results are sorted by score, ties
  in input order, and cut to top_n. usage.total_tokens counts the tokens scored (every pair's whole prompt).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from qwenstack.serving.errors import APIError, bad_request
from qwenstack.serving.openapi import request_body
from qwenstack.serving.protocol import MAX_COUNT, _Request, one_sentence_error
from qwenstack.serving.served import ServedModel
from qwenstack.serving.state import local_or_forwarded
from qwenstack.reranking import CannotRerank, PairPrompts, PromptTooLong, pairs_of, relevance, scoring_head

MAX_DOCUMENTS = 1000  # pairs per request: one command holds the engine for all of them

router = APIRouter()


class RerankDocument(_Request):
    text: str


class RerankRequest(_Request):
    model: str
    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = Field(None, ge=1, le=MAX_COUNT)  # None: every document
    return_documents: bool = True
    instruction: str | None = None  # Qwen3-Reranker's <Instruct>; None: DEFAULT_INSTRUCTION

    _strings_or_texts = one_sentence_error("documents", "invalid_documents",
                                           'must be a list of strings or of {"text": string} objects')


class ScoreRequest(_Request):
    model: str
    text_1: str | list[str]  # the queries: one for every text_2, or one per text_2
    text_2: str | list[str]  # the documents
    instruction: str | None = None


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None  # absent with return_documents false


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage


def scoring_ids(served: ServedModel) -> list[int] | None:
    """The ids of "no" and "yes", or None for a one-label classifier (reranking.scoring_head); 400 for a model
    that cannot score pairs."""
    try:
        return scoring_head(served.labels, served.embedding_only, served.tokenizer)
    except CannotRerank as exc:
        raise APIError(400, f"'{served.name}' {exc}", param="model", code="model_cannot_rerank") from None


def pair_prompts(served: ServedModel, pairs: list[tuple[str, str]], instruction: str | None,
                 params: tuple[str, str]) -> list[list[int]]:
    """Each pair's prompt ids; 400 for one that cannot fit the context, naming the query (params[0]) when it
    alone is too long, else the document (params[1], "document i")."""
    try:
        return PairPrompts(served.tokenizer, served.max_model_len, instruction, served.max_token_chars).all(pairs)
    except PromptTooLong as exc:
        if exc.pair is None:
            raise _too_long(served, "the query's reranking prompt (instruction and query, no document)", exc,
                            params[0]) from None
        raise _too_long(served, f"document {exc.pair}: its reranking prompt (instruction, query and document)",
                        exc, params[1]) from None


def _too_long(served: ServedModel, what: str, tokens: PromptTooLong, param: str) -> APIError:
    return APIError(400, f"{what} has {tokens} tokens, but this model's maximum context length is "
                         f"{served.max_model_len} tokens", param=param, code="context_length_exceeded")


async def relevance_scores(served: ServedModel, pairs: list[tuple[str, str]], instruction: str | None,
                           params: tuple[str, str]) -> tuple[list[float], int]:
    """P(yes) of each (query, document) pair, and the tokens scored; params: the request's names of the
    queries and the documents. 400 for an empty or oversized list."""
    param = params[1]
    if not pairs:
        raise bad_request(f"{param} must not be empty: there is nothing to rank", param=param)
    if len(pairs) > MAX_DOCUMENTS:
        raise bad_request(f"at most {MAX_DOCUMENTS} documents per request, got {len(pairs)}: split the list "
                          f"(scores do not depend on the other documents)", param=param)
    token_ids = scoring_ids(served)
    prompts = await asyncio.to_thread(pair_prompts, served, pairs, instruction, params)  # 1,000 encodes: off the loop
    logits = await (served.engine.classify(prompts) if token_ids is None  # [N, 1]: the classifier's label
                    else served.engine.last_token_logits(prompts, token_ids))  # [N, 2]: "no", "yes"
    return relevance(logits), sum(map(len, prompts))


@router.post("/v1/rerank", responses={200: {"model": RerankResponse}})
@router.post("/rerank", include_in_schema=False)  # vLLM's name (Jina's shape)
@router.post("/v2/rerank", include_in_schema=False)  # Cohere's v2 path; the same answer
@request_body(RerankRequest)
async def rerank(request: Request) -> Response:
    local = await local_or_forwarded(request, RerankRequest, "/rerank", generates=False)
    if isinstance(local, Response):
        return local
    body, served = local.body, local.served
    texts = [d if isinstance(d, str) else d.text for d in body.documents]
    scores, tokens = await relevance_scores(served, [(body.query, t) for t in texts], body.instruction,
                                            ("query", "documents"))
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:body.top_n]  # stable: ties keep input order
    results = [{"index": i, "relevance_score": scores[i]} | ({"document": {"text": texts[i]}} if body.return_documents
                                                              else {}) for i in order]
    return JSONResponse({"id": f"rerank-{uuid.uuid4().hex}", "model": served.name, "usage": {"total_tokens": tokens},
                         "results": results})


@router.post("/v1/score", responses={200: {"model": ScoreResponse}})
@router.post("/score", include_in_schema=False)  # vLLM's name
@request_body(ScoreRequest)
async def score(request: Request) -> Response:
    local = await local_or_forwarded(request, ScoreRequest, "/score", generates=False)
    if isinstance(local, Response):
        return local
    body, served = local.body, local.served
    try:
        pairs = pairs_of(body.text_1, body.text_2)
    except ValueError:
        counts = [1 if isinstance(t, str) else len(t) for t in (body.text_1, body.text_2)]
        raise bad_request(f"text_1 has {counts[0]} texts and text_2 {counts[1]}: give one text_1 for all, or one "
                          f"per text_2", param="text_1") from None
    scores, tokens = await relevance_scores(served, pairs, body.instruction, ("text_1", "text_2"))
    return pooling_list("score", served, [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
                        tokens)


def pooling_list(kind: str, served: ServedModel, data: list[dict], tokens: int) -> JSONResponse:
    """vLLM's envelope of /score and /classify answers: an id, object "list", the data, prompt-only usage."""
    return JSONResponse({"id": f"{kind}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                         "model": served.name, "data": data,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}})
