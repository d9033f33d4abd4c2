"""The chat page's own API under /api/ (conversations and messages kept by ChatStore), and `mount_ui`.

Design notes:
- Every request body is a pydantic model with extra="forbid" and bounds; a malformed request is answered
  with 400 and the OpenAI error body {"error": {"message", "type", "param", "code"}} before the store is
  touched, so it changes nothing. The router converts its own errors (its route class catches them), so it
  gives the same shape whatever exception handlers the host app installs.
- The page and its assets are plain files (no build step): `/` serves index.html, `/ui/` everything else,
  with relative URLs in the page so a reverse proxy may mount qwenstack under a prefix.
"""

from __future__ import annotations

import mimetypes
import sqlite3
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, model_validator

from qwenstack.serving.errors import APIError, validation_error
from qwenstack.serving.store import ChatStore, NotFound

UI_DIR = Path(__file__).parent / "ui"

# Limits on what one request may store; a data URL of ~22 MB holds a ~16 MB file.
MAX_TITLE = 200
MAX_TEXT = 2_000_000
MAX_DATA_URL = 22_000_000
MAX_ATTACHMENTS = 16
MAX_TOOL_CALLS = 64
MAX_MESSAGES = 5_000
MAX_LIST = 500
MAX_BODY_BYTES = 64 * 1024 * 1024  # refused from Content-Length here; the server's body rules count the bytes
MAX_INT64 = 2**63 - 1  # SQLite's integers

mimetypes.add_type("font/woff2", ".woff2")
mimetypes.add_type("text/javascript", ".js")


class _Strict(BaseModel):
    """Unknown fields are refused; numbers and booleans are strict (JSON true is not 1, "0.7" not 0.7)."""
    model_config = ConfigDict(extra="forbid")


class Settings(_Strict):
    """Per-conversation generation settings; None means "the server's default"."""
    system_prompt: str = Field("", max_length=100_000)
    temperature: float | None = Field(None, ge=0.0, le=2.0, strict=True)
    top_p: float | None = Field(None, gt=0.0, le=1.0, strict=True)
    max_tokens: int | None = Field(None, ge=1, le=1_048_576, strict=True)
    thinking_budget: int | None = Field(None, ge=0, le=1_048_576, strict=True)
    enable_thinking: bool = Field(True, strict=True)
    # MCP servers (names registered with serve --mcp) whose tools this conversation uses; stored only when set.
    mcp_servers: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=64,
                                                                    exclude_if=lambda v: not v)


class ToolFunction(_Strict):
    name: str = Field(max_length=256)
    arguments: str = Field("", max_length=MAX_TEXT)


class ToolCall(_Strict):
    id: str | None = Field(None, max_length=256)
    type: Literal["function"] = "function"
    function: ToolFunction


class Attachment(_Strict):
    kind: Literal["image", "audio"]
    name: str = Field("", max_length=512)
    mime: str = Field(max_length=128, pattern=r"^(image|audio)/[\w.+-]+$")
    data_url: str = Field(max_length=MAX_DATA_URL, pattern=r"^data:(image|audio)/[\w.+-]+;base64,[A-Za-z0-9+/=]*$")


class Metrics(_Strict):
    ttft_s: float | None = Field(None, ge=0, strict=True)
    tokens_per_s: float | None = Field(None, ge=0, strict=True)
    elapsed_s: float | None = Field(None, ge=0, strict=True)
    prompt_tokens: int | None = Field(None, ge=0, strict=True)
    completion_tokens: int | None = Field(None, ge=0, strict=True)
    reasoning_tokens: int | None = Field(None, ge=0, strict=True)
    thinking_s: float | None = Field(None, ge=0, strict=True)
    # True when the server sent no usage, so tokens were counted as stream chunks.
    estimated: bool = Field(False, strict=True)


class GuardVerdict(BaseModel):
    model_config = ConfigDict(extra="allow")  # a guard may add fields (its model, scores); keep them
    direction: Literal["prompt", "answer"]
    safety: str = Field(max_length=64)
    categories: list[str] = Field(default_factory=list, max_length=64)
    action: str | None = Field(None, max_length=64)


class MessageIn(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field("", max_length=MAX_TEXT)
    reasoning: str | None = Field(None, max_length=MAX_TEXT)
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOL_CALLS)
    tool_call_id: str | None = Field(None, max_length=256)
    name: str | None = Field(None, max_length=256)
    attachments: list[Attachment] | None = Field(None, max_length=MAX_ATTACHMENTS)
    metrics: Metrics | None = None
    model: str | None = Field(None, max_length=256)
    finish_reason: str | None = Field(None, max_length=64)
    guard: GuardVerdict | None = None
    error: str | None = Field(None, max_length=100_000)

    @model_validator(mode="after")
    def _tool_result_names_its_call(self) -> "MessageIn":
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self


class ConversationCreate(_Strict):
    title: str = Field("New chat", min_length=1, max_length=MAX_TITLE)
    model: str | None = Field(None, max_length=256)
    settings: Settings = Field(default_factory=Settings)


class ConversationPatch(_Strict):
    title: str | None = Field(None, min_length=1, max_length=MAX_TITLE)
    model: str | None = Field(None, max_length=256)
    settings: Settings | None = None

    @model_validator(mode="after")
    def _something_to_change(self) -> "ConversationPatch":
        if self.title is None and self.model is None and self.settings is None:
            raise ValueError("give at least one of title, model, settings")
        return self


class MessageList(_Strict):
    messages: list[MessageIn] = Field(max_length=MAX_MESSAGES)


class Truncate(_Strict):
    keep: int = Field(ge=0, le=MAX_INT64, strict=True, description="how many leading messages to keep")


class _OpenAIErrorRoute(APIRoute):
    """Answers this router's failures in the OpenAI error shape, independent of the host app's handlers."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:
                return APIError(413, f"the request body has {int(length)} bytes; the limit is {MAX_BODY_BYTES}",
                                code="body_too_large").response()
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return validation_error(exc.errors()).response()
            except APIError as exc:
                return exc.response()
            except NotFound as exc:
                return APIError(404, f"no such conversation or message: {exc.args[0]}", type_="not_found_error",
                                code="not_found").response()
            except sqlite3.Error as exc:
                return APIError(500, f"chat store error: {exc}").response()

        return route


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_none=False)


def _message_dict(message: MessageIn) -> dict[str, Any]:
    return message.model_dump(mode="json")


def make_router(store: ChatStore) -> APIRouter:
    router = APIRouter(prefix="/api", route_class=_OpenAIErrorRoute, tags=["chat store"])

    @router.get("/conversations")
    def list_conversations(q: str | None = Query(None, max_length=500), limit: int = Query(100, ge=1, le=MAX_LIST),
                           offset: int = Query(0, ge=0, le=MAX_INT64)) -> dict[str, Any]:
        return {"object": "list", "data": store.list_conversations(q, limit, offset)}

    @router.post("/conversations", status_code=201)
    def create_conversation(body: ConversationCreate) -> dict[str, Any]:
        return store.create_conversation(body.title, body.model, _dump(body.settings))

    @router.get("/conversations/{cid}")
    def get_conversation(cid: str) -> dict[str, Any]:
        return store.get_conversation(cid)

    @router.patch("/conversations/{cid}")
    def update_conversation(cid: str, body: ConversationPatch) -> dict[str, Any]:
        settings = _dump(body.settings) if body.settings is not None else None
        return store.update_conversation(cid, title=body.title, model=body.model, settings=settings)

    @router.put("/conversations/{cid}/settings")
    def put_settings(cid: str, body: Settings) -> dict[str, Any]:
        return store.update_conversation(cid, settings=_dump(body))["settings"]

    @router.delete("/conversations/{cid}")
    def delete_conversation(cid: str) -> dict[str, Any]:
        store.delete_conversation(cid)
        return {"id": cid, "object": "conversation.deleted", "deleted": True}

    @router.post("/conversations/{cid}/messages", status_code=201)
    def append_message(cid: str, body: MessageIn) -> dict[str, Any]:
        return store.append_message(cid, _message_dict(body))

    @router.put("/conversations/{cid}/messages")
    def replace_messages(cid: str, body: MessageList) -> dict[str, Any]:
        return {"object": "list", "data": store.replace_messages(cid, [_message_dict(m) for m in body.messages])}

    @router.put("/conversations/{cid}/messages/{mid}")
    def replace_message(cid: str, mid: str, body: MessageIn) -> dict[str, Any]:
        return store.replace_message(cid, mid, _message_dict(body))

    @router.post("/conversations/{cid}/truncate")
    def truncate(cid: str, body: Truncate) -> dict[str, Any]:
        return {"object": "list", "data": store.truncate(cid, body.keep)}

    return router


def mount_ui(app: FastAPI, store: ChatStore | None = None) -> ChatStore:
    """Add the /api/ router, the page at `/` and its assets under `/ui/` to `app`; returns the store used."""
    store = store if store is not None else ChatStore()
    app.include_router(make_router(store))
    index = UI_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    def chat_page() -> FileResponse:
        return FileResponse(index, media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")
    app.state.chat_store = store
    return store
