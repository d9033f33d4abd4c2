"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Decisions:
- Unknown fields are ignored (clients send vendor extras freely; vLLM does the same), but the fields we
  know are strict: a string where a number belongs is a 400, never silently coerced. An explicit null
  for an optional field means its default (OpenAI's spec makes most of them nullable).
- Names follow OpenAI, plus the extras self-hosted servers share (top_k, min_p, repetition_penalty,
  chat_template_kwargs, a thinking budget), so clients written for vLLM work unchanged.
- Streaming chunks are built as plain dicts in the handlers (the hot path, with exact control over which
  keys are null); the non-streaming responses are the models below.
"""
from __future__ import annotations

import types
from functools import lru_cache
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import (
    BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, ValidatorFunctionWrapHandler, field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_N = 64
MAX_TOP_LOGPROBS = 20
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # a seed is a signed 64-bit integer (each extra sample adds 1)
MAX_COUNT = 2**31 - 1  # token counts and budgets: far beyond any context, still a machine integer


@lru_cache(maxsize=None)
def _defaulted_not_nullable(model: type[BaseModel]) -> frozenset[str]:
    """Names and aliases of the fields that have a default but do not take null."""
    names: set[str] = set()
    for name, info in model.model_fields.items():
        if not info.is_required() and info.annotation is not Any and types.NoneType not in get_args(info.annotation):
            names.update(n for n in (name, info.alias) if n)
    return frozenset(names)


def null_means_default(model: type[BaseModel], data: Any) -> Any:
    """An explicit null for an optional field is its default: OpenAI's spec makes n, stream, logprobs, echo,
    store... nullable, and SDKs send null for an argument passed as None. A required field stays required."""
    if not isinstance(data, dict):
        return data
    fields = _defaulted_not_nullable(model)
    if not any(data[k] is None for k in fields.intersection(data)):
        return data
    return {k: v for k, v in data.items() if v is not None or k not in fields}


def nullable_in_schema(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """The JSON schema (so the OpenAPI document) says what `null_means_default` accepts."""
    properties = schema.get("properties", {})
    for name in _defaulted_not_nullable(model).intersection(properties):
        prop = properties[name]
        meta = {k: prop[k] for k in ("title", "description", "default") if k in prop}
        inner = {k: v for k, v in prop.items() if k not in meta}
        properties[name] = {"anyOf": [inner, {"type": "null"}], **meta}


def one_sentence_error(field: str, code: str, message: str) -> Any:
    """A validator for a union-typed field whose failure is one sentence naming the forms it takes, instead of
    each union member's complaint about each element. In a model: `_forms = one_sentence_error("input", ...)`."""

    def validate(cls: type, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(code, message) from None

    return field_validator(field, mode="wrap")(classmethod(validate))


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True, json_schema_extra=nullable_in_schema)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return null_means_default(cls, data)


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- chat messages --------------------------------------------------------------------------------------


class TextPart(_Request):
    type: Literal["text"]
    text: str


def _url_alone(cls: type, value: Any) -> Any:
    """A media part's URL given as a plain string (vLLM takes it so) -> OpenAI's {"url": ...}."""
    return {"url": value} if isinstance(value, str) else value


class ImageURL(_Request):
    url: str
    # Accepted and not used (the model's processor sizes every image by its own rules), but one of OpenAI's values:
    # anything else is its 400 (and vLLM's, which validates with the openai types).
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL

    _plain_url = field_validator("image_url", mode="before")(classmethod(_url_alone))


class MediaURL(_Request):
    url: str


class InputAudio(_Request):
    data: str
    format: str | None = None


class AudioPart(_Request):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURLPart(_Request):
    type: Literal["audio_url"]
    audio_url: MediaURL

    _plain_url = field_validator("audio_url", mode="before")(classmethod(_url_alone))


class VideoURLPart(_Request):
    type: Literal["video_url"]
    video_url: MediaURL

    _plain_url = field_validator("video_url", mode="before")(classmethod(_url_alone))


ContentPart = Annotated[
    Union[TextPart, ImagePart, AudioPart, AudioURLPart, VideoURLPart], Field(discriminator="type")
]


class FunctionCallIn(_Request):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    # Earlier thinking, sent back in tool loops: either name is accepted (clients use both).
    reasoning_content: str | None = None
    reasoning: str | None = None


# --- tools and output formats ---------------------------------------------------------------------------


class FunctionDef(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class AllowedTools(_Request):
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]  # {"type": "function", "function": {"name": ...}}


class AllowedToolChoice(_Request):
    """OpenAI's: only the listed tools may be called (ChatCompletionRequest narrows `tools` to them)."""
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class JsonSchemaSpec(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # llama.cpp's json_object + schema

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs`: one of json (a schema), regex, choice, grammar (Lark or GBNF), json_object."""

    json_: dict[str, Any] | str | bool | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


# --- requests -------------------------------------------------------------------------------------------


class _SamplingFields(_Request):
    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_COUNT)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(0, ge=0, le=MAX_COUNT)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None
    # Structured output, in every spelling clients send (constraints.answer_processors reads them; one at a time):
    # OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields, llama.cpp's grammar
    # (GBNF) and json_schema. vLLM takes response_format on /v1/completions too.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | bool | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | bool | None = None
    # Whitespace a structured answer may have around its JSON tokens, as a regex (vLLM's name). Omitted: none
    # beyond json.dumps' ", " and ": " (a small model cannot loop on newlines); "[ \t\n]*" relaxes it.
    guided_whitespace_pattern: str | None = None
    # vLLM's extras, read by RL and evaluation frameworks: the prompt's logprobs and the token ids back, and two
    # restrictions on what may be sampled (serving/vllm_extras.py).
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    return_token_ids: bool = False
    allowed_token_ids: list[int] | None = Field(None, min_length=1)
    bad_words: list[str] | None = None

    @field_validator("prompt_logprobs", mode="before")
    @classmethod
    def _flag_means_one(cls, value: Any) -> Any:
        return int(value) if isinstance(value, bool) else value  # vLLM's lax parsing reads true as 1

    @field_validator("prompt_logprobs")
    @classmethod
    def _not_streamed(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and info.data.get("stream"):
            raise ValueError("prompt_logprobs are not available when stream is true")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_streamed(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):  # OpenAI's and vLLM's 400
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("seed")
    @classmethod
    def _seeds_fit(cls, seed: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if seed is not None and seed + n - 1 > INT64_MAX:  # sample i is drawn with seed + i
            raise ValueError(f"with n={n} the seed may be at most {INT64_MAX - n + 1} (each sample adds 1)")
        return seed


# OpenAI's reasoning efforts on Qwen3's thinking switch and budget, the same in chat and /v1/responses: none and
# minimal turn thinking off, low and medium cap it at a budget, high and xhigh leave it unbounded.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
THINKING_OFF = frozenset({"none", "minimal"})
EFFORT_BUDGETS = {"low": 1024, "medium": 8192}


def ends_in_prefill(messages: list[dict[str, Any]]) -> bool:
    """A conversation (chat message dicts) whose last message is the assistant's text without tool calls: a
    prefill, which Anthropic's and Ollama's APIs continue (chat's continue_final_message)."""
    last = messages[-1] if messages else {}
    return last.get("role") == "assistant" and bool(last.get("content")) and not last.get("tool_calls")


class ChatAudioParams(_Request):
    """OpenAI's `audio` request parameter: both fields required."""

    voice: str = Field(min_length=1, max_length=64)
    format: str = Field(min_length=1, max_length=16)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: ChatAudioParams | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_COUNT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_COUNT)  # wins over max_tokens, as in OpenAI
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None  # see EFFORT_BUDGETS; an explicit budget below wins
    # A thinking budget: three spellings in use (ours, Qwen docs, vLLM).
    max_thinking_tokens: int | None = Field(None, ge=0, le=MAX_COUNT)
    thinking_budget: int | None = Field(None, ge=0, le=MAX_COUNT)
    thinking_token_budget: int | None = Field(None, ge=0, le=MAX_COUNT)
    # Processor options (vLLM's field): {"use_audio_in_video": true} hears each video's audio track (Qwen3-Omni).
    mm_processor_kwargs: dict[str, Any] | None = None
    # vLLM's prefill fields: continue_final_message goes on writing the last (assistant) message instead of
    # starting a new turn, the answer being only what follows it; it implies add_generation_prompt false.
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _continues_an_assistant_message(self) -> "ChatCompletionRequest":
        if not self.continue_final_message:
            return self
        if self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs the last message to be the assistant's, to continue it")
        if "add_generation_prompt" in self.model_fields_set and self.add_generation_prompt:
            raise ValueError("continue_final_message continues the last message; it cannot be combined with "
                             "add_generation_prompt true, which starts a new one")
        self.add_generation_prompt = False
        return self

    @model_validator(mode="after")
    def _allowed_tools_narrow_the_tools(self) -> "ChatCompletionRequest":
        """tool_choice allowed_tools -> the listed tools alone, offered with its mode (auto or required)."""
        choice = self.tool_choice
        if isinstance(choice, AllowedToolChoice):
            names = {(t.get("function") or {}).get("name") for t in choice.allowed_tools.tools
                     if t.get("type", "function") == "function"}
            self.tools = [t for t in self.tools or [] if t.function.name in names]
            self.tool_choice = choice.allowed_tools.mode
        return self

    @field_validator("reasoning_effort", mode="before")
    @classmethod
    def _effort_in_any_case(cls, effort: Any) -> Any:
        return effort.lower() if isinstance(effort, str) else effort

    @property
    def thinking_budget_tokens(self) -> int | None:
        for value in (self.max_thinking_tokens, self.thinking_budget, self.thinking_token_budget):
            if value is not None:
                return value
        return EFFORT_BUDGETS.get(self.reasoning_effort or "")

    @property
    def thinking_off(self) -> bool:
        return self.reasoning_effort in THINKING_OFF

    @property
    def sampled_logprobs(self) -> int | None:
        """The top-logprobs count the engine samples with (0: the chosen token's only), None when not asked."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    # Token-id lists first: a union member that fails reports every element, so list[str] tried first on a
    # million ids costs a second where list[int] costs 50 ms.
    prompt: str | list[int] | list[list[int]] | list[str]
    max_tokens: int | None = Field(16, ge=0, le=MAX_COUNT)  # OpenAI's default; 0 only with echo (scoring)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_COUNT)
    suffix: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # vLLM's: keep the last k (-1: what the context holds)


class TokenizeRequest(_Request):
    model: str | None = None  # may be left out when one model is served
    prompt: str | None = None
    content: str | None = None  # llama.cpp's name for prompt
    messages: list[ChatMessage] | None = Field(None, min_length=1)  # as a chat request's
    add_special_tokens: bool = False
    add_special: bool | None = None  # llama.cpp's name for add_special_tokens
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if sum(x is not None for x in (self.prompt, self.content, self.messages)) != 1:
            raise ValueError("give exactly one of prompt (or llama.cpp's content) or messages")
        if self.content is not None:
            self.prompt = self.content
        if self.add_special is not None:
            self.add_special_tokens = self.add_special
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# --- responses ------------------------------------------------------------------------------------------


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class CompletionTokensDetails(_Response):
    reasoning_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class FunctionCallOut(_Response):
    name: str
    arguments: str


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[TokenLogprob] | None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    reasoning: str | None = None  # the same text: vLLM's and Ollama's name for it
    tool_calls: list[ToolCallOut] | None = None
    audio: dict[str, Any] | None = None  # {id, data, expires_at, transcript} when audio was asked for


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # with return_token_ids (vLLM)


# vLLM's prompt logprobs: per prompt token, null for the first, else {token id: {logprob, rank, decoded_token}}.
PromptLogprobs = list[dict[str, dict[str, Any]] | None]


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # with prompt_logprobs (vLLM)
    prompt_token_ids: list[int] | None = None  # with return_token_ids (vLLM)


class LegacyLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # with prompt_logprobs (vLLM)
    prompt_token_ids: list[int] | None = None  # with return_token_ids (vLLM)
    token_ids: list[int] | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int | None = None
    capabilities: list[str] = Field(default_factory=list)
    voices: list[str] | None = None  # a model that answers aloud: the `audio.voice` values it takes


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(_Response):
    prompt: str
    content: str  # the same text under llama.cpp's name


class HealthResponse(_Response):
    status: Literal["ok"]


class VersionResponse(_Response):
    version: str
