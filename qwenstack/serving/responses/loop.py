"""One response from start to end: MCP approvals and tool listings, then model turns and server-side tool calls
until the model answers, a client function call is due, an approval is needed, or a limit is reached.

`execute(run)` yields the events (unnumbered) and leaves the final state on `run`; the routes decide whether
the events are streamed, drained into one JSON body, or drained by a background task.

Decisions:
- Each model turn is a chat turn: the conversation's items -> chat messages -> serving/chat.py's plan_chat
  (template, thinking switch and budget, tool grammars, json_schema) -> the engine -> the chat parser.
- A turn that calls MCP tools runs them (unless they need approval) and loops; one that calls a client
  function ends the response with the `function_call` items. After `mcp_max_steps` tool turns (or once
  `max_tool_calls` MCP calls ran) the next turn is offered no MCP tools, so the model should answer; if it
  still calls one, the call is an `mcp_call` item with an error saying it was not run, and the response ends
  `incomplete` with `incomplete_details.reason` "max_tool_steps" (or "max_tool_calls"): a model stuck in a
  loop never runs the server's tools without bound. A call past `max_tool_calls` within a turn gets an error
  result instead of running (and the model reads it).
- A client function call is streamed while the model writes it (the chat parser's `stream_arguments`): its
  item is added once the name is known and `function_call_arguments.delta` events follow as the arguments
  grow. MCP calls are run after the turn, so their items come whole then, and so do client calls the model
  wrote after an MCP call (output items keep the model's order).
- `tool_choice` required or named forces the first model turn only (later turns answer the tools' results).
- Guardrails (--guard-model) screen each model turn's prompt and moderate its answer, as on
  /v1/chat/completions (serving/moderation.py's guarded_turn and moderate_outputs): a blocked prompt never
  reaches the model and the refusal is the turn's text; a blocked answer ends there. Either way the response
  ends `incomplete` with `incomplete_details.reason` "content_filter" (OpenAI's) and no tool the turn called
  runs. No `qwenstack_guard` annotation here.
- Usage adds up every turn: input tokens are each turn's prompt (cached ones counted apart), reasoning tokens
  those of the think blocks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from pydantic import TypeAdapter

from qwenstack.guard.rails import CONTENT_FILTER
from qwenstack.serving import moderation
from qwenstack.serving.chat import (
    ChatPlan, attach_media, cap_max_tokens, fewest_dropped, plan_chat, reasoning_token_count, turn_deltas,
)
from qwenstack.serving.errors import APIError
from qwenstack.serving.logprobs import TokenTexts, chat_logprobs
from qwenstack.serving.responses import mcp_tools
from qwenstack.serving.responses.events import Event, OutputBuilder, new_id
from qwenstack.serving.responses.protocol import InputItem, ResponsesRequest
from qwenstack.serving.responses.translate import (
    arguments_object, chat_request, function_tools, items_to_messages, offered,
)
from qwenstack.serving.served import ServedModel
from qwenstack.serving.state import ServerState
from qwenstack.serving.streaming import OutputStream, close_all, first_output

ITEMS = TypeAdapter(list[InputItem])
DENIED = "the user denied this tool call"


@dataclass
class Usage:
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        # cache_write_tokens (required by the SDK's types since openai 3.x) counts prompt-caching writes billed
        # apart; the prefix cache here keeps every prompt it computes at no charge, so there are none to report.
        return {"input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": self.cached_tokens, "cache_write_tokens": 0},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "total_tokens": self.input_tokens + self.output_tokens}


@dataclass
class ResponseRun:
    state: ServerState
    served: ServedModel
    request: ResponsesRequest
    history: list[dict[str, Any]]  # the stored conversation before this request
    inputs: list[dict[str, Any]]  # this request's input items, with ids
    targets: list[mcp_tools.McpTarget]
    mcp_timeout_s: float
    max_steps: int
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    builder: OutputBuilder = field(default_factory=OutputBuilder)
    status: str = "queued"
    usage: Usage = field(default_factory=Usage)
    error: dict[str, Any] | None = None
    incomplete_reason: str | None = None
    rails: Any = None  # the guard's Guardrails (moderation.guardrails_of, taken with the request); None: unguarded
    tool_calls_made: int = 0
    completed_at: int | None = None  # when it ended completed or incomplete

    def __post_init__(self) -> None:
        reasoning = self.request.reasoning
        self.builder.summary = reasoning is not None and reasoning.summary is not None

    def body(self) -> dict[str, Any]:
        r = self.request
        # MCP headers often carry credentials: never echoed or stored (as OpenAI does).
        tools = [t.model_dump(exclude_none=True, by_alias=True, exclude={"headers"}) for t in r.tools or []]
        choice = r.tool_choice
        fmt = (r.text.format.model_dump(exclude_none=True, by_alias=True) if r.text and r.text.format
               else {"type": "text"})
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": self.status,
            "background": r.background, "error": self.error,
            "incomplete_details": {"reason": self.incomplete_reason} if self.incomplete_reason else None,
            "instructions": r.instructions, "max_output_tokens": r.max_output_tokens,
            "max_tool_calls": r.max_tool_calls, "model": self.served.name, "output": list(self.builder.output),
            "parallel_tool_calls": r.parallel_tool_calls is not False,
            "previous_response_id": r.previous_response_id,
            "conversation": {"id": r.conversation_id} if r.conversation_id else None,
            "reasoning": {"effort": r.reasoning.effort if r.reasoning else None,
                          "summary": r.reasoning.summary if r.reasoning else None},
            "store": r.store, "temperature": r.temperature, "top_p": r.top_p, "text": {"format": fmt},
            "tool_choice": "auto" if choice is None else choice if isinstance(choice, str) else choice.model_dump(),
            "tools": tools, "truncation": r.truncation, "top_logprobs": r.top_logprobs,
            "usage": self.usage.as_dict() if self.status not in ("queued", "in_progress") else None,
            "completed_at": self.completed_at,
            "user": r.user, "metadata": r.metadata or {},
        }


def _mcp_listing(items: list[dict[str, Any]], label: str) -> list[dict[str, Any]] | None:
    """The tools a successful earlier listing of this server gave, if the conversation has one."""
    for item in reversed(items):
        if item.get("type") == "mcp_list_tools" and item.get("server_label") == label and not item.get("error"):
            return item.get("tools") or []
    return None


def approval_requests(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {i["id"]: i for i in items if i.get("type") == "mcp_approval_request"}


async def execute(run: ResponseRun) -> AsyncIterator[Event]:
    run.status = "in_progress"
    yield {"type": "response.created", "response": run.body()}
    yield {"type": "response.in_progress", "response": run.body()}
    b = run.builder
    by_label = {t.label: t for t in run.targets}

    # Approvals answered in this request: run (or refuse) the calls they approved.
    pending = approval_requests(run.history)
    for item in run.inputs:
        if item.get("type") != "mcp_approval_response":
            continue
        asked = pending[item["approval_request_id"]]
        target = by_label.get(asked["server_label"])
        index, events = b.mcp_call_started(asked["server_label"], asked["name"], asked["arguments"], asked["id"])
        for event in events:
            yield event
        if not item["approve"]:
            output, error = None, mcp_tools.execution_error(
                DENIED + (f": {item['reason']}" if item.get("reason") else ""))
        elif target is None:
            output, error = None, mcp_tools.protocol_error(
                f"the MCP server '{asked['server_label']}' is not among this request's tools")
        else:
            output, error = await _call(run, target, asked["name"], asked["arguments"])
        for event in b.mcp_call_finished(index, output, error):
            yield event

    # Tool listings: once per conversation and server (a failed one is retried next time).
    mcp_map: dict[str, tuple[mcp_tools.McpTarget, dict[str, Any]]] = {}
    for target in run.targets:
        tools = _mcp_listing(run.history, target.label)
        if tools is None:
            item = {"id": new_id("mcpl"), "type": "mcp_list_tools", "server_label": target.label, "tools": [],
                    "error": None}
            index, events = b.add_item(item)
            for event in events:
                yield event
            yield {"type": "response.mcp_list_tools.in_progress", "item_id": item["id"], "output_index": index}
            try:
                tools = await mcp_tools.list_tools(target, run.mcp_timeout_s)
                item["tools"] = tools
                yield {"type": "response.mcp_list_tools.completed", "item_id": item["id"], "output_index": index}
            except mcp_tools.McpFailure as exc:
                item["error"] = f"could not list the tools of '{target.label}' at {target.url}: {exc}"
                tools = []
                yield {"type": "response.mcp_list_tools.failed", "item_id": item["id"], "output_index": index}
            for event in b.done_item(index):
                yield event
        for tool in tools:
            mcp_map.setdefault(tool["name"], (target, tool))

    client_tools = function_tools(run.request)
    client_names = {t.name for t in run.request.tools or [] if t.type == "function"}  # offered or not
    mcp_map = {name: (target, tool) for name, (target, tool) in mcp_map.items()
               if name not in client_names and offered(run.request.tool_choice, name, target.label)}
    steps = 0
    limit = run.request.max_tool_calls
    while True:
        by_calls = limit is not None and run.tool_calls_made >= limit
        limited = steps >= run.max_steps or by_calls
        # Past a limit the MCP tools are no longer offered (client functions end the response, so they stay).
        tools = client_tools + ([] if limited else [mcp_tools.chat_tool(t) for _, t in mcp_map.values()])
        calls = []
        async for event in _model_turn(run, tools, calls, first=steps == 0, parse_calls=limited,
                                       client_call=lambda name: name not in mcp_map):
            yield event
        if run.incomplete_reason is not None or not calls:
            break
        ran_mcp = asked = client_call = refused = False
        for call in calls:
            name, arguments = call["name"], call["arguments"]
            if name not in mcp_map:
                client_call = True
                if call["item"] is None:  # not streamed (it followed an MCP call): whole, in the model's order
                    for event in b.function_call(call["id"], name, arguments):
                        yield event
                continue
            target, _ = mcp_map[name]
            if not limited and target.spec is not None and target.spec.needs_approval(name):
                asked = True
                index, events = b.add_item({"id": new_id("mcpr"), "type": "mcp_approval_request",
                                            "server_label": target.label, "name": name, "arguments": arguments})
                for event in events + b.done_item(index):
                    yield event
                continue
            index, events = b.mcp_call_started(target.label, name, arguments)
            for event in events:
                yield event
            if limited:  # the model insists after the limit: the call is shown, not run, and the response stops
                refused = True
                output, error = None, mcp_tools.protocol_error(_limit_text(run, by_calls))
            elif limit is not None and run.tool_calls_made >= limit:
                output, error = None, mcp_tools.protocol_error(f"not run: this response's max_tool_calls ({limit}) "
                                                               "is reached")
            else:
                output, error = await _call(run, target, name, arguments)
            for event in b.mcp_call_finished(index, output, error):
                yield event
            ran_mcp = True
        if refused:
            run.incomplete_reason = "max_tool_calls" if by_calls else "max_tool_steps"
            break
        if client_call or asked or not ran_mcp:
            break
        steps += 1
    run.status = "incomplete" if run.incomplete_reason else "completed"
    run.completed_at = int(time.time())


def plan_turn(served: ServedModel, request: ResponsesRequest, messages: list[dict[str, Any]],
              tools: list[dict[str, Any]], max_tokens: int | None, state: ServerState) -> ChatPlan:
    """A model turn's chat plan. With truncation "auto" the oldest whole turns (from a user message to the next)
    are dropped until the prompt fits, the instructions and the last turn kept; max_tokens (what is left of
    max_output_tokens, a budget) is cut to the room the prompt leaves, so the turn ends "incomplete" at the
    context's end instead of failing."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    starts = [i for i in range(head, len(messages)) if messages[i]["role"] == "user"]

    def dropping(count: int) -> ChatPlan:
        kept = messages[:head] + messages[starts[count] if count else head:]
        return plan_chat(served, chat_request(request, kept, tools, max_tokens), state)

    plan = fewest_dropped(dropping, max(len(starts) - 1, 0) if request.truncation == "auto" else 0)
    cap_max_tokens(plan)
    return plan


def _limit_text(run: ResponseRun, by_calls: bool) -> str:
    if by_calls:
        return f"not run: this response's max_tool_calls ({run.request.max_tool_calls}) is reached"
    return (f"not run: the server's limit of {run.max_steps} model turns with tool calls per response is reached "
            "(continue with previous_response_id to go on)")


async def _call(run: ResponseRun, target: mcp_tools.McpTarget, name: str,
                arguments: str) -> tuple[str | None, dict[str, Any] | None]:
    run.tool_calls_made += 1
    try:
        args = arguments_object(arguments)
    except ValueError as exc:
        return None, mcp_tools.protocol_error(str(exc))
    return await mcp_tools.call_tool(target, name, args, run.mcp_timeout_s)


async def _model_turn(run: ResponseRun, tools: list[dict[str, Any]], calls: list[dict[str, Any]], first: bool,
                      parse_calls: bool, client_call: Callable[[str], bool]) -> AsyncIterator[Event]:
    """One generation: streams reasoning and text events, and the calls for which `client_call(name)` holds as
    function_call items with their arguments as the model writes them (up to the first other call, so that items
    keep the model's order once the other calls run after the turn); fills `calls` with every parsed tool call
    (with `parse_calls`, also when no tool is offered: a model that still calls one must not leak the markup)."""
    state, served, b = run.state, run.served, run.builder
    limit = run.request.max_output_tokens
    remaining = None if limit is None else limit - run.usage.output_tokens
    if remaining is not None and remaining <= 0:
        run.incomplete_reason = "max_output_tokens"
        return
    conversation = ITEMS.validate_python(run.history + run.inputs + b.output)
    messages = items_to_messages(conversation, run.request.instructions)
    request = run.request
    if not tools or (not first and request.tool_choice not in (None, "none", "auto")):
        request = request.model_copy(update={"tool_choice": None})  # the forced call was the first turn's
    plan = plan_turn(served, request, messages, tools, remaining, state)
    plan.params.n = 1
    await attach_media(plan, state)
    stream = await moderation.guarded_turn(  # a blocked prompt never reaches the engine: the refusal instead
        run.rails, plan,
        lambda: served.engine.generate(plan.prompt_ids, plan.params, request_id=new_id(run.id), prompt=plan.prompt,
                                       **({"multimodal": plan.multimodal} if plan.multimodal else {})))
    tracker = state.metrics.track(served.name, time.monotonic())
    outputs = OutputStream(await first_output(stream, state.config.retry_after_s), stream)
    moderated = moderation.moderate_outputs(plan, outputs)
    parser = plan.parser(stream_arguments=True, parse_calls=parse_calls)
    found: dict[int, dict[str, Any]] = {}
    streaming = True  # client function calls are streamed until another kind of call comes
    open_call: dict[str, Any] | None = None  # the streamed call whose item is not done yet
    final = None
    texts = TokenTexts(served.tokenizer) if request.wants_logprobs else None
    unshown: list[dict[str, Any]] = []  # logprobs of tokens whose text the parser holds back (a possible tag)
    try:
        async for out, parsed in turn_deltas(plan, moderated, tracker, parser):
            if texts is not None and out.outputs[0].delta_token_ids:
                step = out.outputs[0]
                unshown += chat_logprobs(texts, step.delta_token_ids, step.delta_logprobs, request.top_logprobs or 0)
            # The answer's logprobs are those of the tokens that wrote its text: a token the parser held back
            # joins the next text shown, unless it was markup (the end of thinking, a call's tags).
            shown, unshown = (unshown, []) if parsed.content else ([], unshown)
            if parsed.reasoning or parsed.tool_calls or not (parsed.content or b.answering):
                unshown = []
            # A delta holds, in this order: the open call's last arguments, text after it, new calls. Text
            # closes the call first: two items are never open at once, as in OpenAI.
            known = set(found)
            for delta in parsed.tool_calls:
                if delta.index in known:
                    for event in _call_arguments(b, found[delta.index], delta.arguments):
                        yield event
            if open_call is not None and (parsed.reasoning or parsed.content):
                for event in b.function_call_done(open_call["item"], "completed"):
                    yield event
                open_call = None
            for event in b.reasoning(parsed.reasoning) + b.text(parsed.content, shown):
                yield event
            for delta in parsed.tool_calls:  # (parallel_tool_calls=false: the first call only)
                if delta.index in known:
                    continue
                call = found.get(delta.index)
                if call is None:
                    call = found[delta.index] = {"id": delta.id, "name": delta.name, "arguments": "", "item": None}
                    streaming = streaming and client_call(delta.name)
                    if streaming:
                        if open_call is not None:  # the last call is whole: items follow one another, as in OpenAI
                            for event in b.function_call_done(open_call["item"], "completed"):
                                yield event
                        call["item"], events = b.function_call_started(delta.id, delta.name)
                        open_call = call
                        for event in events:
                            yield event
                for event in _call_arguments(b, call, delta.arguments):
                    yield event
            if out.finished:
                final = out
    finally:
        await close_all([moderated, outputs])
        tracker.done()
    assert final is not None
    comp = final.outputs[0]
    # Cut off by max_output_tokens or the guard: the open item (text or a call's arguments) may be unfinished.
    status = "incomplete" if comp.finish_reason in ("length", CONTENT_FILTER) else "completed"
    for event in b.close_text(status):
        yield event
    if open_call is not None:
        for event in b.function_call_done(open_call["item"], status):
            yield event
    run.usage.input_tokens += len(plan.prompt_ids)
    run.usage.cached_tokens += final.metrics.num_cached_tokens
    run.usage.output_tokens += len(comp.token_ids)
    run.usage.reasoning_tokens += reasoning_token_count(plan, comp.token_ids)
    calls += [found[i] for i in sorted(found)]
    if comp.finish_reason == "length":
        run.incomplete_reason = "max_output_tokens"
    elif comp.finish_reason == CONTENT_FILTER:  # the guard stopped the prompt or the answer: no more turns
        run.incomplete_reason = CONTENT_FILTER


def _call_arguments(b: OutputBuilder, call: dict[str, Any], fragment: str) -> list[Event]:
    """A fragment of a call's arguments: kept, and streamed when the call has an item."""
    call["arguments"] += fragment
    return b.function_call_arguments(call["item"], fragment) if call["item"] is not None and fragment else []


def check_approvals(inputs: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
    """Every approval response answers an approval request of the conversation (a 400 otherwise)."""
    asked = approval_requests(history)
    for i, item in enumerate(inputs):
        if item.get("type") == "mcp_approval_response" and item["approval_request_id"] not in asked:
            raise APIError(400, f"input[{i}]: no mcp_approval_request with id '{item['approval_request_id']}' in "
                           "this conversation (send previous_response_id of the response that asked)",
                           param=f"input.{i}.approval_request_id")
