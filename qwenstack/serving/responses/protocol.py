"""Request bodies of /v1/responses as pydantic models (so the OpenAPI document describes them).

Decisions:
- Input items are a union told apart by `type`; an item without `type` but with `role` is a message (OpenAI's
  "easy input message"), one with only an `id` an item_reference (resolved from the store in api.py before
  anything reads the input). Unknown item types are a 400 naming the item, never silently dropped.
- Known fields are strict, unknown ones ignored (as for chat): clients send `prompt_cache_key`, `safety_
  identifier` and such, which change nothing here. `include` acts only for "message.output_text.logprobs".
- Output items and events are plain dicts built in events.py (exact control over nulls, as the chat stream does).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidatorFunctionWrapHandler, field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from qwenstack.serving.protocol import MAX_TOP_LOGPROBS, ReasoningEffort, null_means_default, nullable_in_schema

# The `include` value that asks for the answer's token logprobs; the others OpenAI lists (encrypted reasoning,
# search results, image URLs of inputs) have nothing to add here and are accepted and ignored.
OUTPUT_TEXT_LOGPROBS = "message.output_text.logprobs"


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True, json_schema_extra=nullable_in_schema)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return null_means_default(cls, data)


# --- input content parts --------------------------------------------------------------------------------


class InputText(_In):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputImage(_In):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None


class InputAudioData(_In):
    data: str
    format: str | None = None


class InputAudio(_In):
    type: Literal["input_audio"]
    input_audio: InputAudioData


class Refusal(_In):
    type: Literal["refusal"]
    refusal: str


InputPart = Annotated[Union[InputText, InputImage, InputAudio, Refusal], Field(discriminator="type")]


# --- input items ----------------------------------------------------------------------------------------


class MessageItem(_In):
    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]
    status: str | None = None


class ReasoningText(_In):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_In):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    status: str | None = None


class FunctionCallItem(_In):
    type: Literal["function_call"]
    id: str | None = None
    call_id: str
    name: str
    arguments: str
    status: str | None = None


class FunctionCallOutputItem(_In):
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str
    output: str | list[InputPart]
    status: str | None = None


class McpListToolsItem(_In):
    type: Literal["mcp_list_tools"]
    id: str | None = None
    server_label: str
    tools: list[dict[str, Any]] = Field(default_factory=list)
    error: str | None = None


class McpCallItem(_In):
    type: Literal["mcp_call"]
    id: str | None = None
    server_label: str
    name: str
    arguments: str
    output: str | None = None
    error: str | dict[str, Any] | None = None  # a string in older clients, an object in newer ones
    status: str | None = None
    approval_request_id: str | None = None


class McpApprovalRequestItem(_In):
    type: Literal["mcp_approval_request"]
    id: str
    server_label: str
    name: str
    arguments: str


class McpApprovalResponseItem(_In):
    type: Literal["mcp_approval_response"]
    id: str | None = None
    approval_request_id: str
    approve: bool
    reason: str | None = None


class ItemReference(_In):
    """An item of a stored response or conversation, by id (api.py swaps in the item before anything reads it):
    the AI SDK's Responses provider sends its reasoning items back this way."""
    type: Literal["item_reference"] = "item_reference"
    id: str


def _item_kind(value: Any) -> str | None:
    if isinstance(value, dict):  # OpenAI's: no type and a role is a message, no type and only an id a reference
        return value.get("type") or ("message" if "role" in value else "item_reference" if "id" in value else None)
    return getattr(value, "type", None)


InputItem = Annotated[
    Union[
        Annotated[MessageItem, Tag("message")], Annotated[ReasoningItem, Tag("reasoning")],
        Annotated[FunctionCallItem, Tag("function_call")],
        Annotated[FunctionCallOutputItem, Tag("function_call_output")],
        Annotated[McpListToolsItem, Tag("mcp_list_tools")], Annotated[McpCallItem, Tag("mcp_call")],
        Annotated[McpApprovalRequestItem, Tag("mcp_approval_request")],
        Annotated[McpApprovalResponseItem, Tag("mcp_approval_response")],
        Annotated[ItemReference, Tag("item_reference")],
    ],
    Discriminator(_item_kind),
]


# --- tools ----------------------------------------------------------------------------------------------


class FunctionTool(_In):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ApprovalFilter(_In):
    tool_names: list[str] | None = None


class ApprovalRule(_In):
    always: ApprovalFilter | None = None
    never: ApprovalFilter | None = None


class McpTool(_In):
    type: Literal["mcp"]
    server_label: str = Field(min_length=1)
    server_url: str | None = None
    allowed_tools: list[str] | ApprovalFilter | None = None
    require_approval: Literal["always", "never"] | ApprovalRule | None = None
    headers: dict[str, str] | None = None
    server_description: str | None = None

    def needs_approval(self, tool: str) -> bool:
        rule = self.require_approval
        if rule is None or rule == "always":  # OpenAI's default asks
            return True
        if rule == "never":
            return False
        assert isinstance(rule, ApprovalRule)
        if rule.never is not None and tool in (rule.never.tool_names or []):
            return False
        if rule.always is not None:
            return tool in (rule.always.tool_names or [])
        return True

    def allows(self, tool: str) -> bool:
        allowed = self.allowed_tools
        if allowed is None:
            return True
        names = allowed if isinstance(allowed, list) else (allowed.tool_names or [])
        return tool in names


Tool = Annotated[Union[FunctionTool, McpTool], Field(discriminator="type")]


class NamedFunctionChoice(_In):
    type: Literal["function"]
    name: str


class AllowedToolsChoice(_In):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)


# --- the request ----------------------------------------------------------------------------------------


class ReasoningConfig(_In):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class TextFormat(_In):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "TextFormat":
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("text.format of type json_schema needs a schema")
        return self


class TextConfig(_In):
    format: TextFormat | None = None
    verbosity: str | None = None


class ConversationRef(_In):
    id: str


class ResponsesRequest(_In):
    model: str
    input: str | list[InputItem] = Field(default_factory=list)
    instructions: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | AllowedToolsChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    max_tool_calls: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    store: bool = True
    stream: bool = False
    background: bool = False
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None  # the Conversations API's (conversations.py)
    truncation: Literal["auto", "disabled"] = "disabled"  # auto: the oldest turns dropped to fit the context
    metadata: dict[str, str] | None = None
    user: str | None = None
    seed: int | None = None  # a qwenstack extra: reproducible sampling
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _background_is_stored(self) -> "ResponsesRequest":
        if self.background and not self.store:
            raise ValueError("background responses must be stored (store=true)")
        if self.conversation is not None and self.previous_response_id is not None:
            raise ValueError("conversation and previous_response_id cannot both be set: a response continues one "
                             "or the other")
        return self

    @field_validator("input", mode="wrap")
    @classmethod
    def _name_the_item(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """A list input's first problem, naming its item (not the text form's complaint that it is no string)."""
        try:
            return handler(value)
        except ValidationError as exc:
            if not isinstance(value, list):
                raise
            problems = [e for e in exc.errors() if len(e["loc"]) > 1 and isinstance(e["loc"][1], int)]
            if not problems:
                raise
            # A field that also takes a string (a message's content) reports that branch first: skip it.
            first = next((e for e in problems if "str" not in e["loc"]), problems[0])
            loc = first["loc"][1:]  # after the list branch's name: indices, union tags (after an index), fields
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for n, p in enumerate(loc)
                            if isinstance(p, int) or not isinstance(loc[n - 1], int) and "[" not in p and p != "str")
            if first["type"] == "union_tag_invalid":
                message = (f"type '{first['ctx'].get('tag')}' is not supported here (supported: "
                           f"{first['ctx'].get('expected_tags')})")
            else:
                message = first["msg"]
            raise PydanticCustomError("invalid_input_item", "input{where}: {message}",
                                      {"where": where, "message": message}) from None

    @property
    def wants_logprobs(self) -> bool:
        """The answer's logprobs come with include "message.output_text.logprobs" only; top_logprobs alone
        leaves them empty, as OpenAI's does."""
        return OUTPUT_TEXT_LOGPROBS in (self.include or [])

    @property
    def conversation_id(self) -> str | None:
        return self.conversation.id if isinstance(self.conversation, ConversationRef) else self.conversation
