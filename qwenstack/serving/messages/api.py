"""The Anthropic Messages routes: POST /v1/messages (whole or streamed) and POST /v1/messages/count_tokens.

    install_messages(app)   # create_app does this

Decisions:
- One model turn through the chat pipeline (translate.py -> serving/chat.py's plan_chat -> the engine -> the chat
  parser, with tool arguments streamed as the model writes them). The stream events come from one builder, and
  the whole message is what that builder holds at the end, so the streamed events reassemble to it exactly.
- Blocks follow one another (thinking, then text, then each tool_use): a block is stopped before the next starts.
  A thinking block ends with a `signature_delta` (translate.signature).
- `max_tokens` is capped at the room the context leaves (Claude Code asks for 32000 whatever the prompt), and a
  turn that reaches the context's end first stops with "model_context_window_exceeded", as Anthropic's newer
  models do, instead of a 400 up front. A prompt that fills the context alone is still a 400.
- usage.input_tokens is the whole prompt (what count_tokens counts; no cache fields), output_tokens every
  generated token, thinking included.
- Errors under /v1/messages are answered in Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`,
  with the same status codes as elsewhere: middleware.ErrorShape rewrites every JSON error the app or its
  middlewares (API key, body rules, unexpected 500s) answer on these paths. After the 200 of a stream, a
  failure is an `error` event and the stream ends.
- A model name routed to a remote server is forwarded verbatim to its base URL + /messages (for upstreams that
  serve the Messages API, e.g. another qwenstack or vLLM).
- Guardrails (--guard-model) apply as on /v1/chat/completions (serving/moderation.py's guarded_turn and
  moderate_outputs): a blocked prompt never reaches the model and is answered with the refusal as the text, a
  blocked answer ends there; both stop with stop_reason "refusal". No `qwenstack_guard` annotation here.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.types import Scope

from qwenstack.engine.outputs import RequestOutput
from qwenstack.serving.chat import (
    ChatPlan, answer_turn, attach_media, cap_max_tokens, plan_chat, turn_deltas,
)
from qwenstack.serving.errors import APIError
from qwenstack.serving.messages import translate
from qwenstack.serving.messages.protocol import (
    AnthropicErrorResponse, CountTokensRequest, MessageResponse, MessagesRequest, MessageTokenCount,
)
from qwenstack.serving.metrics import RequestTracker
from qwenstack.serving.middleware import ErrorShape
from qwenstack.serving.openapi import chat_responses, error_model, request_body
from qwenstack.serving.protocol import ModelCard
from qwenstack.serving.responses.events import Event, new_id
from qwenstack.serving.state import ServerState, local_or_forwarded
from qwenstack.serving.streaming import typed_sse

PREFIX = "/v1/messages"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
               529: "overloaded_error"}

router = APIRouter()


def install_messages(app: FastAPI) -> None:
    app.include_router(router)
    app.add_middleware(ErrorShape, applies=_anthropic_request, shape=error_body)


def _anthropic_request(scope: Scope) -> bool:
    """Under /v1/messages, or an Anthropic client's /v1/models (its SDK sends anthropic-version on every call)."""
    path = scope.get("path", "")
    return path == PREFIX or path.startswith(PREFIX + "/") or (
        path.startswith("/v1/models") and is_anthropic_client(Headers(scope=scope)))


def is_anthropic_client(headers: Headers) -> bool:
    return "anthropic-version" in headers


def anthropic_model(card: ModelCard) -> dict[str, Any]:
    """A model card in the shape of Anthropic's Models API."""
    created = datetime.fromtimestamp(card.created, timezone.utc).isoformat().replace("+00:00", "Z")
    return {"type": "model", "id": card.id, "display_name": card.id, "created_at": created}


def anthropic_model_list(cards: list[ModelCard]) -> dict[str, Any]:
    """GET /v1/models for an Anthropic client: every model on one page."""
    data = [anthropic_model(card) for card in cards]
    return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


# --- errors ---------------------------------------------------------------------------------------------


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _error_event(error: APIError) -> str:
    return typed_sse(error_body(error.status, error.message))


# --- one turn -------------------------------------------------------------------------------------------


class ContentBuilder:
    """The message's content blocks, built from parsed deltas; every change is a stream event. Blocks follow one
    another: starting one stops the open one."""

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self._open: int | None = None
        self._arguments = ""  # the open tool_use block's input as written so far

    def _start(self, block: dict[str, Any]) -> list[Event]:
        events = self.stop()
        self._open = len(self.content)
        self.content.append(block)
        return events + [{"type": "content_block_start", "index": self._open, "content_block": dict(block)}]

    def _delta(self, delta: dict[str, Any]) -> Event:
        return {"type": "content_block_delta", "index": self._open, "delta": delta}

    def _extend(self, kind: str, text: str) -> list[Event]:
        """Text for the open block of `kind` (thinking or text), opening one if needed."""
        if not text:
            return []
        events = []
        if self._open is None or self.content[self._open]["type"] != kind:
            events = self._start({"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking"
                                 else {"type": "text", "text": ""})
        self.content[self._open][kind] += text
        return events + [self._delta({"type": f"{kind}_delta", kind: text})]

    def thinking(self, text: str) -> list[Event]:
        return self._extend("thinking", text)

    def text(self, text: str) -> list[Event]:
        return self._extend("text", text)

    def tool_use(self, name: str) -> list[Event]:
        events = self._start({"type": "tool_use", "id": new_id("toolu"), "name": name, "input": {}})
        self._arguments = ""
        return events

    def tool_arguments(self, fragment: str) -> list[Event]:
        self._arguments += fragment
        return [self._delta({"type": "input_json_delta", "partial_json": fragment})]

    def stop(self) -> list[Event]:
        if self._open is None:
            return []
        index, block, events = self._open, self.content[self._open], []
        if block["type"] == "thinking":
            block["signature"] = translate.signature(block["thinking"])
            events.append(self._delta({"type": "signature_delta", "signature": block["signature"]}))
        elif block["type"] == "tool_use":
            block["input"] = translate.tool_input(self._arguments)
        self._open = None
        return events + [{"type": "content_block_stop", "index": index}]

    @property
    def made_calls(self) -> bool:
        return any(b["type"] == "tool_use" for b in self.content)


@dataclass
class Turn:
    plan: ChatPlan
    max_tokens: int  # as asked (the engine's may be capped by the context)
    id: str = field(default_factory=lambda: new_id("msg"))
    blocks: ContentBuilder = field(default_factory=ContentBuilder)
    stop_reason: str | None = None
    stop_sequence: str | None = None
    output_tokens: int = 0

    def body(self) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.plan.served.name,
                "content": self.blocks.content, "stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence,
                "usage": {"input_tokens": len(self.plan.prompt_ids), "output_tokens": self.output_tokens}}

    async def events(self, outputs: AsyncIterator[RequestOutput], tracker: RequestTracker) -> AsyncIterator[Event]:
        """The turn's stream events; the message (body()) is complete once they are."""
        plan, b = self.plan, self.blocks
        yield {"type": "message_start", "message": {**self.body(), "content": []}}
        final = None
        async for out, parsed in turn_deltas(plan, outputs, tracker, plan.parser(stream_arguments=True)):
            for event in b.thinking(parsed.reasoning) + b.text(parsed.content):
                yield event
            for call in parsed.tool_calls:  # (disable_parallel_tool_use: the first call only)
                events = b.tool_use(call.name or "") if call.id is not None else []
                for event in events + (b.tool_arguments(call.arguments) if call.arguments else []):
                    yield event
            if out.finished:
                final = out
        for event in b.stop():
            yield event
        assert final is not None
        comp = final.outputs[0]
        self.output_tokens = len(comp.token_ids)
        self.stop_reason, self.stop_sequence = translate.stop_reason(
            comp.finish_reason, comp.stop_reason, b.made_calls, self.output_tokens, self.max_tokens)
        yield {"type": "message_delta", "delta": {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence},
               "usage": {"output_tokens": self.output_tokens}}
        yield {"type": "message_stop"}


async def _frames(events: AsyncIterator[Event]) -> AsyncIterator[str]:
    async for event in events:
        yield typed_sse(event)


# --- routes ---------------------------------------------------------------------------------------------


def _default_thinking(state: ServerState) -> bool:
    return bool(state.config.default_chat_template_kwargs.get("enable_thinking", False))


@router.post(PREFIX, responses=chat_responses(MessageResponse))
@request_body(MessagesRequest)
@error_model(AnthropicErrorResponse)
async def create_message(request: Request) -> Response:
    arrival = time.monotonic()
    local = await local_or_forwarded(request, MessagesRequest, "/messages")
    if isinstance(local, Response):
        return local
    state, body, served = local.state, local.body, local.served
    chat = translate.chat_request(body, _default_thinking(state))
    plan = await asyncio.to_thread(plan_chat, served, chat, state)
    await attach_media(plan, state)
    cap_max_tokens(plan)
    turn = Turn(plan, body.max_tokens)
    return await answer_turn(request, state, plan, arrival, turn.id, body.stream, turn.events, _frames, turn.body,
                             _error_event)


@router.post(PREFIX + "/count_tokens", responses={200: {"model": MessageTokenCount}})
@request_body(CountTokensRequest)
@error_model(AnthropicErrorResponse)
async def count_tokens(request: Request) -> Response:
    local = await local_or_forwarded(request, CountTokensRequest, "/messages/count_tokens")
    if isinstance(local, Response):
        return local
    state = local.state
    chat = translate.chat_request(local.body, _default_thinking(state), counting=True)
    plan = await asyncio.to_thread(plan_chat, local.served, chat, state)
    await attach_media(plan, state)  # images count as the tokens they expand to
    return JSONResponse({"input_tokens": len(plan.prompt_ids)})

