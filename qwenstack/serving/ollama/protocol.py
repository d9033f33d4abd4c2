"""Request and response bodies of Ollama's native API (/api/chat, /api/generate, /api/embed, /api/embeddings,
/api/show, /api/tags, /api/ps, /api/version), as pydantic models: the requests are validated with them, and the
OpenAPI document describes both.

Decisions:
- As for chat (serving/protocol.py's `_Request`): known fields strict, unknown ones ignored (`keep_alive`,
  `shift`... change nothing here), an explicit null means the default.
- `options` takes Ollama's runtime options; the numeric ranges are the chat API's (a temperature of 3 is a 400
  here where Ollama would take it). Load-time options (`num_ctx`, `num_gpu`, `num_thread`, ...) and the sampler
  options this engine does not have (`mirostat*`, `typical_p`, `repeat_last_n`, `penalize_newline`, ...) are
  accepted and ignored.
- `think` is a boolean or one of Ollama's levels; `format` is "" (none), "json" or a JSON schema object.
- Responses and stream lines are built as plain dicts (api.py); the response models below document them.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qwenstack.serving.protocol import INT64_MAX, INT64_MIN, MAX_COUNT, MAX_TOP_LOGPROBS, Tool, _Request

ThinkLevel = Literal["low", "medium", "high", "max"]
Format = Literal["", "json"] | dict[str, Any]


class OllamaOptions(_Request):
    num_predict: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # <= 0 (Ollama's -1, -2): no limit
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_COUNT)  # 0 or -1: off
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # negative (Ollama's -1): a random seed
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


class OllamaToolCallFunction(_Request):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)  # an object in Ollama; a JSON string is read too
    index: int | None = None


class OllamaToolCall(_Request):
    id: str | None = None
    function: OllamaToolCallFunction


class OllamaMessage(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None  # base64, without a data: prefix
    thinking: str | None = None  # an assistant turn's earlier thinking
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None  # a tool result's tool
    tool_call_id: str | None = None


class _Generating(_Request):
    model: str = Field(min_length=1)
    stream: bool = True  # Ollama streams unless told not to
    format: Format = ""
    options: OllamaOptions | None = None
    think: bool | ThinkLevel | None = None  # None: as the server's default (Qwen3: thinking on)
    keep_alive: str | float | None = None  # models stay loaded here: only zero's empty request says unload
    logprobs: bool = False  # Ollama 0.12.11's: each generated token's log probability, in `logprobs`
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # and this many alternatives (implies logprobs)


class OllamaChatRequest(_Generating):
    messages: list[OllamaMessage] = Field(default_factory=list)  # none: only "load the model" (done_reason "load")
    tools: list[Tool] | None = None
    truncate: bool = True  # drop the oldest messages of a conversation too long for the context; false: a 400


class OllamaGenerateRequest(_Generating):
    prompt: str = ""  # empty: only "load the model" (done_reason "load")
    system: str = ""
    suffix: str = ""  # fill-in-the-middle (serving/infill.py): Coder models only, a 400 for the others
    template: str = ""  # a Go template in Ollama: not supported (a 400 when given)
    context: list[int] | None = None  # Ollama's deprecated memory: not supported (a 400 when given)
    raw: bool = False
    images: list[str] | None = None


class OllamaEmbedRequest(_Request):
    model: str = Field(min_length=1)
    input: str | list[str] = ""
    truncate: bool = True  # cut each input to the context (Ollama's default); false: a 400 for a long one
    dimensions: int | None = Field(None, ge=1, le=MAX_COUNT)
    options: dict[str, Any] | None = None  # ignored
    keep_alive: str | float | None = None  # ignored


class OllamaEmbeddingsRequest(_Request):
    """The older /api/embeddings: one prompt, one vector."""

    model: str = Field(min_length=1)
    prompt: str = ""
    options: dict[str, Any] | None = None  # ignored
    keep_alive: str | float | None = None  # ignored


class OllamaShowRequest(_Request):
    model: str | None = None
    name: str | None = None  # Ollama's older spelling of `model`
    verbose: bool = False  # ignored: no tensor listing here


# --- responses (documentation; the handlers build dicts) ------------------------------------------------


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class OllamaErrorResponse(_Response):
    """Every error on Ollama's routes, as Ollama answers them."""

    error: str


class OllamaOutToolCall(_Response):
    id: str
    function: dict[str, Any]  # {index, name, arguments: an object}


class OllamaOutMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str
    thinking: str | None = None
    tool_calls: list[OllamaOutToolCall] | None = None


class _Final(_Response):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None  # nanoseconds, as all durations
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    logprobs: list[dict[str, Any]] | None = None  # [{token, logprob, bytes, top_logprobs}], when asked for


class OllamaChatResponse(_Final):
    message: OllamaOutMessage


class OllamaGenerateResponse(_Final):
    response: str
    thinking: str | None = None


class OllamaEmbedResponse(_Response):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class OllamaEmbeddingsResponse(_Response):
    embedding: list[float]


class OllamaModelDetails(_Response):
    parent_model: str
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class OllamaListedModel(_Response):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaModelDetails


class OllamaTagsResponse(_Response):
    models: list[OllamaListedModel]


class OllamaShowResponse(_Response):
    modelfile: str
    parameters: str
    template: str
    details: OllamaModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class OllamaVersion(_Response):
    version: str
