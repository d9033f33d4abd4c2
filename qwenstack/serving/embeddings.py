"""POST /v1/embeddings in OpenAI's shape: what RAG clients (the openai SDK's embeddings.create, LangChain's
OpenAIEmbeddings, LlamaIndex) call on any OpenAI-compatible base URL.

Decisions:
- Any served model answers: an embedding model (Qwen3-Embedding) as it was trained, a chat model as Ollama does
  (the last token's final hidden state, normalized); see qwenstack/pooling_config.py for what is appended.
- `input` takes OpenAI's four forms: a string, a list of strings, a list of token ids, a list of token-id lists.
  Token ids are used as given. An input longer than the context is a 400 (context_length_exceeded), never
  silently truncated; empty inputs and ids outside the vocabulary are 400s too.
- `dimensions` (Matryoshka): the first d values, renormalized when the model normalizes (engine/embed.py).
- `encoding_format: "base64"`: the float32 values little-endian, base64, as OpenAI sends them (the openai SDK
  asks for base64 by default and decodes it with numpy).
- A request's inputs go to the engine as one command: its owner thread runs them in packed passes between
  two steps (engine/async_engine.py), so they never race generation for the model.
- `prompt_name` (sentence-transformers' word, an extra field) puts one of the checkpoint's named instructions
  before each text, e.g. Qwen3-Embedding's "query".
"""
from __future__ import annotations

import asyncio
import base64
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, model_validator

from qwenstack.engine.embed import matryoshka
from qwenstack.errors import RequestError
from qwenstack.serving.errors import bad_request
from qwenstack.serving.openapi import request_body
from qwenstack.serving.chat import conversation_ids
from qwenstack.serving.protocol import MAX_COUNT, ChatMessage, _Request, one_sentence_error
from qwenstack.serving.served import ServedModel
from qwenstack.serving.state import ServerState, get_state, local_or_forwarded
from qwenstack.serving.vllm_extras import last_tokens, truncation_length
from qwenstack.tokenizer import TooManyTokens

MAX_INPUTS = 2048  # inputs per request, OpenAI's limit

router = APIRouter()


class PoolingRequest(_Request):
    """What /v1/embeddings and /classify (serving/classify.py) share: the inputs, and how to cut them. The inputs
    are `input`, or vLLM's chat form: `messages`, one conversation rendered by the chat template as a chat
    request's prompt is (without the generation prompt unless asked, vLLM's default for pooling)."""

    model: str
    # Token-id lists first: a union member that fails reports every element (see CompletionRequest.prompt).
    input: str | list[int] | list[list[int]] | list[str] | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # vLLM's: keep each input's last k (-1: the context)

    _one_of_four_forms = one_sentence_error("input", "invalid_input", "must be a string, a list of strings, a list "
                                            "of token ids (integers) or a list of token-id lists")

    @model_validator(mode="after")
    def _input_or_messages(self) -> "PoolingRequest":
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of input or messages")
        return self


class EmbeddingRequest(PoolingRequest):
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=MAX_COUNT)  # at most the model's hidden size (checked later)
    prompt_name: str | None = None  # a named instruction of the checkpoint's config_sentence_transformers.json


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


def input_items(value: str | list[Any]) -> list[str] | list[list[int]]:
    """The request's inputs as a list of texts or a list of token-id prompts; 400 for an empty one."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif not value:
        raise bad_request("input must not be empty", param="input")
    elif isinstance(value[0], int):
        items = [value]  # one prompt of token ids
    else:
        items = value
    if len(items) > MAX_INPUTS:
        raise bad_request(f"at most {MAX_INPUTS} inputs per request, got {len(items)}", param="input")
    empty = next((i for i, item in enumerate(items) if len(item) == 0), None)
    if empty is not None:
        where = "input" if len(items) == 1 else f"input {empty}"
        raise bad_request(f"{where} is empty: it has no token to read", param="input")
    return items


def encode_text(served: ServedModel, text: str, truncate: bool = False, keep: int | None = None) -> list[int]:
    """A text's ids as the model was trained to embed it: the tokenizer's special tokens, then the pooling's end
    token unless the post-processor added it. 400 for a text that cannot fit the context, or with `truncate`
    (Ollama's /api/embed) its first tokens that fit, the end token still last; with `keep` (vLLM's
    truncate_prompt_tokens) its last `keep` tokens, the end token among them."""
    limit = served.max_model_len
    if keep is not None:
        ids = last_tokens(served.tokenizer, text, keep, served.max_token_chars, add_special_tokens=True)
        return served.pooling.with_end_token(ids, served.tokenizer)[-keep:]
    if truncate:  # what lies past this many characters is past the context's end whatever its tokens
        text = text[: limit * served.max_token_chars * 4]
    else:
        served.check_text_fits(text, "input")
    try:
        ids = served.tokenizer.encode(text, add_special_tokens=True, max_tokens=None if truncate else limit)
    except TooManyTokens as exc:
        raise served.too_long(exc.count, "input") from None
    ids = served.pooling.with_end_token(ids, served.tokenizer)
    if len(ids) > limit:
        if not truncate:
            raise served.too_long(len(ids), "input")
        keep = limit - (served.pooling.end_token is not None)  # room for the end token
        ids = served.pooling.with_end_token(ids[:keep], served.tokenizer)
    return ids


def prompt_ids(served: ServedModel, body: PoolingRequest, truncate: bool = False,
               prompt_name: str | None = None, state: ServerState | None = None) -> list[list[int]]:
    """Each input's token ids, checked against the context (or cut to it: `truncate`) and the vocabulary;
    prompt_name: an embedding request's named instruction, put before each text. A chat-form request (messages;
    `state`: the server's, whose chat settings render it) is one prompt."""
    keep = truncation_length(body.truncate_prompt_tokens, served.max_model_len)
    if body.messages is not None:
        if prompt_name is not None:
            raise bad_request("prompt_name applies to text inputs, not messages", param="prompt_name")
        assert state is not None, "a chat-form pooling request is rendered with the server's chat settings"
        return [pooled_conversation(served, body, state, keep)]
    items = input_items(body.input)  # type: ignore[arg-type]
    if isinstance(items[0], str):
        try:
            prefix = served.pooling.instruction(prompt_name)
        except RequestError as exc:
            raise bad_request(str(exc), param="prompt_name") from None
        return [encode_text(served, prefix + text, truncate, keep) for text in items]  # type: ignore[operator]
    if prompt_name is not None:
        raise bad_request("prompt_name applies to text inputs, not token ids", param="prompt_name")
    if keep is not None:
        items = [ids[-keep:] for ids in items]  # type: ignore[index]
    for ids in items:
        if len(ids) > served.max_model_len:
            raise served.too_long(len(ids), "input")
        served.check_token_ids(ids, "input")  # type: ignore[arg-type]
    return items  # type: ignore[return-value]


def pooled_conversation(served: ServedModel, body: PoolingRequest, state: ServerState, keep: int | None) -> list[int]:
    """The token ids of a chat-form request's conversation: the chat template's rendering (as /tokenize and chat
    requests render it: the server's template settings, special tokens typed by the client kept as text), then
    the pooling's end token; its last `keep` (truncate_prompt_tokens), or a 400 past the context."""
    assert body.messages is not None
    ids = conversation_ids(served, body.messages, state, body.chat_template_kwargs, body.add_generation_prompt)
    ids = served.pooling.with_end_token(ids, served.tokenizer)
    if keep is not None:
        ids = ids[-keep:]
    if len(ids) > served.max_model_len:
        raise served.too_long(len(ids), "messages")
    return ids


async def embed(served: ServedModel, body: EmbeddingRequest, truncate: bool = False,
                state: ServerState | None = None) -> tuple[Any, int]:
    """(the inputs' vectors, their token count): tokenized off the event loop, embedded by the engine in one
    command, cut to `dimensions` (renormalized where the model normalizes)."""
    # Tokenizing 2048 texts takes a while: off the event loop, other requests go on.
    prompts = await asyncio.to_thread(prompt_ids, served, body, truncate, body.prompt_name, state)
    states = await served.engine.embed(prompts)
    size = states.shape[-1]  # the model's hidden size, whatever the architecture calls it
    if body.dimensions is not None and body.dimensions > size:
        raise bad_request(f"dimensions must be between 1 and {size} (this model's embedding size), "
                          f"got {body.dimensions}", param="dimensions")
    return matryoshka(states, body.dimensions, served.pooling.normalize), sum(map(len, prompts))


def embedding_response(served: ServedModel, body: EmbeddingRequest, vectors: Any, tokens: int) -> JSONResponse:
    if body.encoding_format == "base64":
        little_endian = vectors.numpy().astype("<f4")
        values: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little_endian]
    else:
        values = vectors.tolist()
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)]
    return JSONResponse({"object": "list", "data": data, "model": served.name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


@router.post("/v1/embeddings", responses={200: {"model": EmbeddingResponse}})
@request_body(EmbeddingRequest)
async def create_embeddings(request: Request) -> Response:
    local = await local_or_forwarded(request, EmbeddingRequest, "/embeddings", generates=False)
    if isinstance(local, Response):
        return local
    body, served = local.body, local.served
    vectors, tokens = await embed(served, body, state=get_state(request))
    # Encoding 2048 vectors takes a while too: off the event loop.
    return await asyncio.to_thread(embedding_response, served, body, vectors, tokens)
