"""Request and response bodies of Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens), as pydantic
models: the requests are validated with them, and the OpenAPI document describes both.

Decisions:
- As for chat (serving/protocol.py's `_Request`): known fields strict, unknown ones ignored (`cache_control`,
  `metadata`, `service_tier`, `citations`... change nothing here), an explicit null means the default.
- Content blocks are a union told apart by `type`: an unknown block type (`search_result`, `server_tool_use`...)
  is a 400 naming the block, never silently dropped.
- Numeric ranges are Anthropic's (temperature 0..1); `max_tokens` is required and at least 1 (Anthropic's 0,
  "warm the prompt cache only", is not offered).
- Responses and stream events are built as plain dicts (api.py); the response models below document them.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, model_validator

from qwenstack.serving.protocol import MAX_COUNT, _Request

# --- content blocks -------------------------------------------------------------------------------------


class TextBlock(_Request):
    type: Literal["text"]
    text: str


class Base64Source(_Request):
    type: Literal["base64"]
    media_type: str
    data: str


class URLSource(_Request):
    type: Literal["url"]
    url: str


class FileSource(_Request):
    """A Files API upload: accepted by the schema, refused with a 400 (no file store here)."""

    type: Literal["file"]
    file_id: str


ImageSource = Annotated[Union[Base64Source, URLSource, FileSource], Field(discriminator="type")]


class ImageBlock(_Request):
    type: Literal["image"]
    source: ImageSource


class TextSource(_Request):
    type: Literal["text"]
    media_type: str = "text/plain"
    data: str


class ContentSource(_Request):
    type: Literal["content"]
    content: list[Annotated[Union[TextBlock, ImageBlock], Field(discriminator="type")]] | str


DocumentSource = Annotated[Union[TextSource, ContentSource, Base64Source, URLSource, FileSource],
                           Field(discriminator="type")]


class DocumentBlock(_Request):
    """A document: its text (a text source, inline content, or base64 of a text/* media type) goes to the model
    with its title and context; PDFs, URLs and Files API sources are refused (translate.py)."""

    type: Literal["document"]
    source: DocumentSource
    title: str | None = None
    context: str | None = None


class ToolUseBlock(_Request):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


ToolResultPart = Annotated[Union[TextBlock, ImageBlock, DocumentBlock], Field(discriminator="type")]


class ToolResultBlock(_Request):
    type: Literal["tool_result"]
    tool_use_id: str
    content: list[ToolResultPart] | str = ""
    is_error: bool = False


class ThinkingBlock(_Request):
    type: Literal["thinking"]
    thinking: str
    signature: str = ""  # required by Anthropic; read and ignored here


class RedactedThinkingBlock(_Request):
    type: Literal["redacted_thinking"]
    data: str = ""


ContentBlock = Annotated[
    Union[TextBlock, ImageBlock, DocumentBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock],
    Field(discriminator="type"),
]


class InputMessage(_Request):
    role: Literal["user", "assistant", "system"]  # "system": the SDK's SystemMessageParam, text only
    content: list[ContentBlock] | str  # the list first: a bad block is reported as such, not as "not a string"


# --- tools and options ----------------------------------------------------------------------------------


class MessagesTool(_Request):
    """A client tool (`type` absent or "custom": needs input_schema) or one of Anthropic's server tools (another
    `type`, e.g. web_search_20250305), which this server does not run: it is left out of the prompt."""

    name: str
    type: str | None = None
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class MessagesToolChoice(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self) -> "MessagesToolChoice":
        if self.type == "tool" and not self.name:
            raise ValueError('tool_choice of type "tool" needs the tool\'s name')
        return self


class MessagesThinking(_Request):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0, le=MAX_COUNT)  # "enabled": the thinking budget


class MessagesOutputFormat(_Request):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class MessagesOutputConfig(_Request):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: MessagesOutputFormat | None = None


# --- requests -------------------------------------------------------------------------------------------


class CountTokensRequest(_Request):
    """POST /v1/messages/count_tokens: the prompt-shaping fields of a message request."""

    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: list[TextBlock] | str | None = None
    tools: list[MessagesTool] | None = None
    tool_choice: MessagesToolChoice | None = None
    thinking: MessagesThinking | None = None
    output_config: MessagesOutputConfig | None = None


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""

    max_tokens: int = Field(ge=1, le=MAX_COUNT)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_COUNT)


# --- responses (documentation; api.py builds them as dicts) ---------------------------------------------


class MessageUsage(BaseModel):
    input_tokens: int  # the whole prompt, as count_tokens counts it
    output_tokens: int  # every generated token, thinking included


class MessageOutputBlock(BaseModel):
    """A thinking block (thinking, signature), a text block (text) or a tool_use block (id, name, input)."""

    type: Literal["thinking", "text", "tool_use"]
    thinking: str | None = None
    signature: str | None = None
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[MessageOutputBlock]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "model_context_window_exceeded"]
    stop_sequence: str | None
    usage: MessageUsage


class MessageTokenCount(BaseModel):
    input_tokens: int


class AnthropicErrorDetail(BaseModel):
    type: str  # invalid_request_error, authentication_error, not_found_error, rate_limit_error, api_error...
    message: str


class AnthropicErrorResponse(BaseModel):
    """Every error of these routes, as Anthropic answers them."""

    type: Literal["error"]
    error: AnthropicErrorDetail
