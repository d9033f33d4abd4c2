"""The /v1/responses routes: create (plain, streamed, background), retrieve, delete, input items, cancel.

    install_responses(app, config)   # create_app does this

Decisions:
- Everything a request can get wrong is checked before the 200 (unknown previous response 404, malformed items
  and unknown approvals 400, tools the server cannot reach by policy 400, the first turn's template and
  tools): after it, failures are a `response.failed` event (streamed) or a failed stored response.
- Stored responses (store=true, the default) live in SQLite (store.py); a background response is saved when
  queued and when it ends, and is readable while it runs from the in-memory run.
- Streams are Server-Sent Events with an `event:` line naming the type, as OpenAI sends them.
"""
from __future__ import annotations

import asyncio
import logging
import re
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from qwenstack.serving import moderation
from qwenstack.serving.chat import ChatPlan, attach_media
from qwenstack.serving.errors import APIError, from_exception
from qwenstack.serving.responses import conversations, mcp_tools
from qwenstack.serving.responses.conversations import conversation_items
from qwenstack.serving.responses.events import EventLog
from qwenstack.serving.responses.loop import ITEMS, ResponseRun, check_approvals, execute, plan_turn
from qwenstack.serving.responses.protocol import McpTool, ResponsesRequest
from qwenstack.serving.responses.store import ResponseStore, item_page, stored_items
from qwenstack.serving.responses.translate import function_tools, items_to_messages
from qwenstack.serving.state import get_state
from qwenstack.serving.streaming import reply, typed_sse

log = logging.getLogger("qwenstack.responses")
router = APIRouter()


class ResponsesService:
    """The store and the background runs of one app."""

    def __init__(self, store: ResponseStore, config: Any) -> None:
        self.store = store
        self.config = config
        self.running: dict[str, tuple[ResponseRun, asyncio.Task[None]]] = {}
        self.streaming: dict[str, ResponseRun] = {}  # streamed responses still being written (retrievable)


def service(request: Request) -> ResponsesService:
    return request.app.state.qwenstack_responses


def install_responses(app: FastAPI, config: Any) -> ResponsesService:
    mcp_tools.check_registered(config.mcp_servers, config.mcp_allow_stdio)
    path = config.responses_db_path
    if path is None and config.ui_db_path:  # beside the chat page's store (in memory when it is)
        path = ":memory:" if config.ui_db_path == ":memory:" else str(Path(config.ui_db_path).with_name("responses.db"))
    svc = ResponsesService(ResponseStore(path), config)
    app.state.qwenstack_responses = svc
    app.include_router(router)
    app.include_router(conversations.router)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with inner(app_) as value:
            try:
                yield value
            finally:  # background responses end as cancelled (and are saved so) before the engines stop
                tasks = [task for _, task in svc.running.values()]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    app.router.lifespan_context = lifespan
    return svc


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"no response with id '{response_id}' is stored here", param="response_id",
                    code="not_found")


def _input_items(request: ResponsesRequest, history: list[dict[str, Any]],
                 store: ResponseStore) -> list[dict[str, Any]]:
    if isinstance(request.input, str):
        return stored_items([{"type": "message", "role": "user",
                              "content": [{"type": "input_text", "text": request.input}]}])
    items = [item.model_dump(exclude_none=True, by_alias=True) for item in request.input]
    return stored_items([_referenced(item, history, store) if item["type"] == "item_reference" else item
                         for item in items])


def _referenced(reference: dict[str, Any], history: list[dict[str, Any]], store: ResponseStore) -> dict[str, Any]:
    """The item an item_reference names, from this conversation or any stored response (OpenAI's 404 if none)."""
    item_id = reference["id"]
    found = next((i for i in history if i.get("id") == item_id), None) or store.find_item(item_id)
    if found is None or found.get("type") == "item_reference":
        raise APIError(404, f"Item with id '{item_id}' not found. Items are not persisted when `store` is set to "
                            "false. Try again with `store` set to true, or remove this item from your input.",
                       param="input")
    return dict(found)


def _prepare(request: Request, body: ResponsesRequest) -> tuple[ResponseRun, ChatPlan]:
    state, svc = get_state(request), service(request)
    served = state.registry.get(body.model)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        if body.previous_response_id in svc.running:
            raise APIError(400, f"the previous response '{body.previous_response_id}' is still in progress: wait "
                                "for it to end", param="previous_response_id")
        found = svc.store.conversation(body.previous_response_id)
        if found is None:
            raise _not_found(body.previous_response_id)
        history = found
    if body.conversation_id is not None:
        history = conversation_items(svc.store, body.conversation_id)
    inputs = _input_items(body, history, svc.store)
    check_approvals(inputs, history)
    _check_call_outputs(inputs, history)
    config = svc.config
    targets = [mcp_tools.resolve(t, config.mcp_servers, config.mcp_allow_stdio, i)
               for i, t in enumerate(body.tools or []) if isinstance(t, McpTool)]
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise APIError(400, "two mcp tools share a server_label", param="tools")
    run = ResponseRun(state, served, body, history, inputs, targets, config.mcp_timeout_s, config.mcp_max_steps,
                      rails=moderation.guardrails_of(request))  # 503 now, not after the 200, while it loads
    # The first turn's prompt, planned now so that template and tool errors are a 400 before the 200 (MCP tools
    # are listed later: with them, a forced tool_choice is checked then).
    messages = items_to_messages(ITEMS.validate_python(history + inputs), body.instructions)
    check = body.model_copy(update={"tool_choice": None}) if targets else body
    try:
        plan = plan_turn(served, check, messages, function_tools(body), body.max_output_tokens, state)
    except APIError as exc:  # the chat layer names its own fields; say the Responses API's
        exc.message = responses_names(exc.message)
        exc.param = responses_names(exc.param) if exc.param else exc.param
        raise
    return run, plan


# Chat Completions' names of the fields a Responses request fills: its messages come from `input`, its
# response_format from `text.format`, and its tools lose the `function` wrapper.
_CHAT_NAMES = ((re.compile(r"^messages\b[.\[\]\w]*"), "input"), (re.compile(r"\bresponse_format\b"), "text.format"),
               (re.compile(r"\b(tools[.\[]\d+\]?)\.function\b"), r"\1"))


def responses_names(text: str) -> str:
    """A chat-layer error's param or message, in the Responses API's field names."""
    for pattern, name in _CHAT_NAMES:
        text = pattern.sub(name, text)
    return text


def _check_call_outputs(inputs: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
    """Every function_call_output answers a function_call of the conversation (OpenAI's 400 otherwise)."""
    calls = {i.get("call_id") for i in history + inputs if i.get("type") == "function_call"}
    for item in inputs:
        if item.get("type") == "function_call_output" and item.get("call_id") not in calls:
            raise APIError(400, f"no tool call found for function call output with call_id '{item.get('call_id')}'",
                           param="input")


def _finish(run: ResponseRun, svc: ResponsesService) -> dict[str, Any]:
    body = run.body()
    if run.request.store:
        svc.store.save(body, run.inputs)
    conversation = run.request.conversation_id
    if conversation is not None and run.status in ("completed", "incomplete"):  # a failed turn adds nothing
        svc.store.add_items(conversation, run.inputs + body["output"])
    return body


def _fail(run: ResponseRun, exc: BaseException) -> dict[str, Any]:
    error = from_exception(exc) if not isinstance(exc, APIError) else exc
    run.status = "failed"
    code = {400: "invalid_prompt", 429: "rate_limit_exceeded"}.get(error.status, "server_error")  # OpenAI's codes
    run.error = {"code": code, "message": error.message}
    return {"type": "error", "code": run.error["code"], "message": error.message, "param": error.param}


async def _stream(run: ResponseRun, svc: ResponsesService) -> AsyncIterator[str]:
    """The events of a streamed response; while it runs its id answers GET as in_progress, and a client that
    leaves mid-way leaves it stored as cancelled (with the output so far) rather than unknown."""
    log_ = EventLog()
    svc.streaming[run.id] = run
    try:
        async for event in execute(run):
            yield typed_sse(log_.number(event))
    except Exception as exc:  # after the 200: tell the client in-band
        yield typed_sse(log_.number(_fail(run, exc)))
        yield typed_sse(log_.number({"type": "response.failed", "response": _finish(run, svc)}))
        return
    else:
        kind = "response.completed" if run.status == "completed" else "response.incomplete"
        yield typed_sse(log_.number({"type": kind, "response": _finish(run, svc)}))
    finally:
        svc.streaming.pop(run.id, None)
        if run.status == "in_progress":  # the client went away mid-way: what was written stays retrievable
            run.status = "cancelled"
            _finish(run, svc)


async def _drain(run: ResponseRun, svc: ResponsesService) -> dict[str, Any]:
    async for _ in execute(run):
        pass
    return _finish(run, svc)


async def _background(run: ResponseRun, svc: ResponsesService) -> None:
    try:
        async for _ in execute(run):
            pass
    except asyncio.CancelledError:
        run.status = "cancelled"
    except Exception as exc:  # noqa: BLE001 - stored as the response's error
        _fail(run, exc)
        log.warning("background response %s failed: %s", run.id, exc)
    finally:
        _finish(run, svc)
        svc.running.pop(run.id, None)


@router.post("/v1/responses")
async def create_response(request: Request, body: ResponsesRequest) -> Response:
    svc = service(request)
    run, _ = _prepare(request, body)
    if body.background:
        if body.stream:
            raise APIError(400, "streaming a background response is not supported here: create it with "
                           "stream=false and poll GET /v1/responses/{id}", param="stream")
        run.status = "queued"
        svc.store.save(run.body(), run.inputs)
        svc.running[run.id] = (run, asyncio.ensure_future(_background(run, svc)))
        return JSONResponse(run.body())

    async def whole() -> Response:
        return JSONResponse(await _drain(run, svc))

    return await reply(request, bool(body.stream), lambda: _stream(run, svc), whole, sources=[])


def _stored(svc: ResponsesService, response_id: str) -> dict[str, Any]:
    running = svc.running.get(response_id)
    if running is not None:
        return running[0].body()
    if response_id in svc.streaming:
        return svc.streaming[response_id].body()
    body = svc.store.get(response_id)
    if body is None:
        raise _not_found(response_id)
    return body


@router.post("/v1/responses/input_tokens")
async def count_input_tokens(request: Request, body: ResponsesRequest) -> JSONResponse:
    """What a response with this body would read, in tokens (OpenAI's input token count): its first turn's
    prompt, the conversation and instructions included, as the engine would be given it."""
    _, plan = _prepare(request, body)  # the first turn's plan, as the response would run it
    await attach_media(plan, get_state(request))  # images and audio count as the tokens they expand to
    return JSONResponse({"object": "response.input_tokens", "input_tokens": len(plan.prompt_ids)})


@router.get("/v1/responses/{response_id}")
async def retrieve_response(request: Request, response_id: str, stream: bool = False) -> JSONResponse:
    if stream:  # the events are not kept: a replay cannot be given, and an empty one would look like success
        raise APIError(400, "streaming a stored response again is not supported here: retrieve it without stream",
                       param="stream")
    return JSONResponse(_stored(service(request), response_id))


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> JSONResponse:
    svc = service(request)
    running = svc.running.get(response_id)
    if running is not None:
        running[1].cancel()
        await asyncio.gather(running[1], return_exceptions=True)
    if not svc.store.delete(response_id):
        raise _not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(request: Request, response_id: str) -> JSONResponse:
    svc = service(request)
    body = _stored(svc, response_id)
    if not body.get("background"):
        raise APIError(400, "only background responses can be cancelled", param="response_id")
    running = svc.running.get(response_id)
    if running is not None:
        running[1].cancel()
        await asyncio.gather(running[1], return_exceptions=True)
        body = svc.store.get(response_id) or running[0].body()
    return JSONResponse(body)


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(request: Request, response_id: str, limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "desc", after: str | None = None) -> JSONResponse:
    items = service(request).store.input_items(response_id)
    if items is None:
        raise _not_found(response_id)
    return JSONResponse(item_page(items, limit, order, after))


@router.get("/v1/mcp/servers")
async def list_mcp_servers(request: Request) -> JSONResponse:
    """The operator-registered MCP servers (by name; a request's mcp tool names one by server_label). URLs are
    left out: they may carry tokens, and stdio ones are commands."""
    servers = service(request).config.mcp_servers
    data = [{"name": name, "transport": "stdio" if url.startswith(mcp_tools.STDIO_SCHEME) else "streamable_http"}
            for name, url in servers.items()]
    return JSONResponse({"object": "list", "data": data})
