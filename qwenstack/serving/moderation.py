"""Qwen3Guard in the server: the guard an app holds and the guardrails the chat handler calls (the
/v1/moderations endpoint is serving/moderations.py).

    install_guardrails(app, config)           # create_app does this: metrics, background loading
    set_guardrails(app, Guardrails(...))      # tests: guards already loaded

Chat handler hooks (qwenstack.serving.chat), each a no-op when no guard is configured:
- `screen_prompt(request, plan)` before the main engine runs: a blocked prompt returns a complete answer
  (the refusal, finish_reason "content_filter", `qwenstack_guard`) and the main model never sees it.
- `review_answer(plan, body)` after a non-streamed generation: a blocked choice is replaced by the refusal
  with finish_reason "content_filter".
- `moderate_outputs(plan, outputs)` around a streamed generation, and `guard_chunk(plan, base)` for the
  chunk that carries the verdict at the end of the stream (choices: [], like the usage chunk).

Hooks of the routes that shape a chat turn their own way (/v1/messages, Ollama's /api/chat and /api/generate,
each model turn of /v1/responses):
- `guarded_turn(rails, plan, generate)` in place of the engine call: the prompt is screened as above, and a
  blocked one gets `refusal_outputs(plan)` (one finished output: the refusal, finish_reason "content_filter",
  no tokens) instead of `generate()`, so the route turns the refusal into its own shape.
- `moderate_outputs(plan, outputs)` around the admitted outputs, streamed or not (not the refusal's): a
  blocked answer ends with finish_reason "content_filter", which each route names in its own words.
  These routes carry no `qwenstack_guard` annotation.

Decisions:
- `qwenstack_guard` is one object {direction, safety, categories, refusal, action}: the most severe
  decision of the request (blocked over flagged over allowed; the prompt's first among equals). A
  non-streamed answer also carries it per choice.
- Guard latency is the histogram `qwenstack:guard_latency_seconds` in the app's metrics registry.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import Counter, Histogram

from qwenstack.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from qwenstack.guard.rails import CONTENT_FILTER, SEVERITY, Guardrails, StreamReport
from qwenstack.guard.verdict import Action, Decision, GuardPolicy
from qwenstack.markup import THINK_END
from qwenstack.serving.errors import APIError
from qwenstack.serving.state import get_state
from qwenstack.serving.streaming import DONE, sse

if TYPE_CHECKING:
    from qwenstack.serving.config import ServerConfig
    from qwenstack.serving.protocol import ChatCompletionResponse

log = logging.getLogger("qwenstack.server")

REFUSAL_MESSAGE = "I can't help with that: the content guard stopped this conversation."
GUARD_KV_CACHE_MEMORY = 512 * 1024**2  # the Gen guard's own KV pool
GUARD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# --- the guard of an app --------------------------------------------------------------------------------


class GuardState:
    """The guardrails of one app, and their loading state (hung off `app.state.qwenstack_guard`)."""

    def __init__(self, config: "ServerConfig | None", metrics_registry: Any = None) -> None:
        self.config = config
        self.models = [m for m in (getattr(config, "guard_model", None), getattr(config, "guard_stream_model", None))
                       if m]
        # Parsed now: a bad policy is a startup error, not a failure on the first request.
        self.policy = GuardPolicy.parse(getattr(config, "guard_policy", None),
                                        fail_open=bool(getattr(config, "guard_fail_open", False)))
        self.rails: Guardrails | None = None
        self.loading = bool(self.models)
        self.failed: str | None = None
        self.latency = self.decisions = None
        if metrics_registry is not None:
            labels = ["model_name", "direction", "guard"]
            self.latency = Histogram("qwenstack:guard_latency_seconds",
                                     "Time of one guard call: a whole prompt or answer, or one streamed chunk.",
                                     labels, registry=metrics_registry, buckets=GUARD_BUCKETS)
            self.decisions = Counter("qwenstack:guard_decisions", "Guard decisions by direction, level and action.",
                                     ["model_name", "direction", "safety", "action"], registry=metrics_registry)

    @property
    def configured(self) -> bool:
        return self.rails is not None or bool(self.models)

    def attach(self, rails: Guardrails) -> None:
        if self.latency is not None:
            rails.on_latency.append(lambda kind, direction, s: self.latency.labels(  # type: ignore[union-attr]
                rails.name, direction.value, kind).observe(s))
        if self.decisions is not None:
            rails.on_decision.append(lambda kind, d: self.decisions.labels(  # type: ignore[union-attr]
                rails.name, d.direction.value, d.verdict.safety.value, d.action.value).inc())
        self.rails, self.loading, self.failed = rails, False, None

    def load(self) -> Guardrails:
        """Loads the configured guard checkpoints (blocking); a Stream checkpoint is told by its config.json."""
        from qwenstack.config import read_config
        from qwenstack.guard.gen import GenGuard
        from qwenstack.loading import default_device
        from qwenstack.models.qwen3_guard_stream import GuardStream, is_stream_guard_config
        from qwenstack.resolve import resolve_model, served_name

        config = self.config
        gen, stream = None, None
        for model in self.models:
            path = resolve_model(model)
            if is_stream_guard_config(read_config(path)):
                stream = GuardStream.load(path, dtype="bfloat16", device=default_device())
            else:
                gen = GenGuard.load(path, asynchronous=True, kv_cache_memory=GUARD_KV_CACHE_MEMORY)
        return Guardrails(self.policy, gen=gen, stream=stream, stream_window=getattr(config, "guard_stream_window", 0),
                          name=served_name(self.models[0]))

    def start_loading(self, registry: Any) -> threading.Thread | None:
        """Loads in a thread; until it is done /health says the guard is loading (through the model
        registry's loading list) and guarded requests get 503."""
        if not self.models or self.rails is not None:
            return None
        label = f"guard {self.models[0]}"
        registry.loading.append(label)

        def run() -> None:
            try:
                self.attach(self.load())
                log.info("guard ready: %s (%s)", ", ".join(self.models), self.policy.describe())
            except BaseException as exc:  # reported on /health and to guarded requests
                log.exception("loading the guard failed")
                self.failed = registry.failed = f"loading the guard {self.models[0]} failed: {exc}"
                self.loading = False
            finally:
                if label in registry.loading:
                    registry.loading.remove(label)

        thread = threading.Thread(target=run, name="qwenstack-guard-loader", daemon=True)
        thread.start()
        return thread

    def get(self, retry_after_s: int = 1) -> Guardrails | None:
        """The guardrails, None when none are configured; 503 while loading or after a failed load."""
        if self.rails is not None:
            return self.rails
        if self.failed:
            raise APIError(503, self.failed, code="guard_unavailable")
        if self.loading:
            raise APIError(503, "the guard model is still loading", code="guard_loading",
                           headers={"Retry-After": str(retry_after_s)})
        return None

    def shutdown(self) -> None:
        if self.rails is not None:
            self.rails.shutdown()


def install_guardrails(app: FastAPI, config: "ServerConfig") -> GuardState:
    """Adds the guard's state and metrics to an app built by create_app, and loads the guard
    models named in `config` in the background when the app starts."""
    state = get_state_of(app)
    guard = GuardState(config, state.metrics.registry if state is not None else None)
    app.state.qwenstack_guard = guard
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with inner(app_) as value:
            if state is not None:
                guard.start_loading(state.registry)  # after the models' loader set its loading list
            try:
                yield value
            finally:
                guard.shutdown()

    app.router.lifespan_context = lifespan
    return guard


def set_guardrails(app: FastAPI, rails: Guardrails | None) -> None:
    """Uses already-loaded guardrails (tests, embedding); None turns guarding off."""
    guard: GuardState | None = getattr(app.state, "qwenstack_guard", None)
    if guard is None:
        guard = install_guardrails(app, None)  # type: ignore[arg-type]
    if rails is None:
        guard.rails, guard.models, guard.loading = None, [], False
    else:
        guard.attach(rails)


def get_state_of(app: FastAPI) -> Any:
    return getattr(app.state, "qwenstack", None)


def guard_card(app: FastAPI) -> dict[str, Any] | None:
    """The guard as /v1/models lists it (the `model` /v1/moderations answers with), once it is loaded."""
    guard: GuardState | None = getattr(app.state, "qwenstack_guard", None)
    rails = guard.rails if guard is not None else None
    if rails is None:
        return None
    return {"id": rails.name, "created": 0, "owned_by": "qwenstack", "capabilities": ["moderation"]}


def guardrails_of(request: Request) -> Guardrails | None:
    guard: GuardState | None = getattr(request.app.state, "qwenstack_guard", None)
    if guard is None:
        return None
    return guard.get(get_state(request).config.retry_after_s)


# --- chat hooks -----------------------------------------------------------------------------------------


@dataclass
class GuardContext:
    """The guard's part of one chat request."""

    rails: Guardrails
    messages: list[dict[str, Any]]
    prompt: Decision | None = None
    answers: dict[int, Decision] = field(default_factory=dict)
    report: StreamReport = field(default_factory=StreamReport)

    def decisive(self) -> Decision | None:
        candidates = [d for d in [self.prompt, *self.answers.values(), *self.report.decisions.values()] if d]
        if not candidates:
            return None
        rank = {Action.BLOCK: 2, Action.FLAG: 1, Action.ALLOW: 0}
        return max(candidates, key=lambda d: (rank[d.action], SEVERITY[d.verdict.safety]))

    def annotation(self) -> dict[str, Any] | None:
        decision = self.decisive()
        return None if decision is None else decision.to_dict()


class GuardedChat(Protocol):
    """What the chat hooks below read of a chat request (serving/chat.py's ChatPlan): a protocol, so that
    moderation does not import the chat handler that calls it."""
    request_id: str
    created: int
    served: Any
    request: Any  # ChatCompletionRequest
    prompt_ids: list[int]
    params: Any  # SamplingParams
    guard: Any
    starts_in_reasoning: bool


def chat_messages(plan: "GuardedChat") -> list[dict[str, Any]]:
    """The request's user and assistant turns as text, for the guard."""
    out = []
    for m in plan.request.messages:
        if m.role not in ("user", "assistant"):
            continue
        content = m.content
        if isinstance(content, list):
            content = "\n".join(p.text for p in content if getattr(p, "type", None) == "text")
        out.append({"role": m.role, "content": content or ""})
    return out


async def _prompt_blocked(rails: Guardrails, plan: "GuardedChat") -> bool:
    """Judges the prompt; the guard's context is left on `plan.guard`."""
    context = GuardContext(rails, chat_messages(plan))
    plan.guard = context
    context.prompt = await rails.check_prompt(context.messages)
    return context.prompt.blocked


async def screen_prompt(request: Request, plan: "GuardedChat") -> Response | None:
    """Runs the prompt past the guard (if any). Returns the response to send instead of running the main
    model when the prompt is blocked; otherwise None, with the guard's context on `plan.guard`."""
    rails = guardrails_of(request)
    if rails is None or not await _prompt_blocked(rails, plan):
        return None
    return blocked_response(plan, plan.guard)


async def guarded_turn(rails: Guardrails | None, plan: "GuardedChat",
                       generate: Callable[[], AsyncIterator[RequestOutput]]) -> AsyncIterator[RequestOutput]:
    """`generate()`, the engine stream of a chat turn, once the guard (if any) let its prompt through; a blocked
    prompt gets refusal_outputs instead, so that the route formats the refusal as it formats any answer.
    `rails` is guardrails_of(request), taken before the 200 (a /v1/responses run may outlive its request)."""
    if rails is None or not await _prompt_blocked(rails, plan):
        return generate()
    return refusal_outputs(plan)


async def refusal_outputs(plan: "GuardedChat") -> AsyncIterator[RequestOutput]:
    """The engine stream of a refused turn: one finished output, each choice the refusal with finish_reason
    "content_filter" and no tokens. A plan whose template opened the think block closes it first, so that the
    chat parser reads the refusal as the answer."""
    text = (THINK_END + "\n\n" if plan.starts_in_reasoning else "") + REFUSAL_MESSAGE
    now = time.monotonic()
    yield RequestOutput(
        request_id=plan.request_id, prompt_token_ids=list(plan.prompt_ids), finished=True,
        outputs=[CompletionOutput(index=i, text=text, token_ids=[], finish_reason=CONTENT_FILTER, delta_text=text)
                 for i in range(plan.params.n)],
        metrics=RequestMetrics(arrival_time=now, first_scheduled_time=None, first_token_time=None,
                               last_token_time=None, finished_time=now, num_cached_tokens=0))


def blocked_response(plan: "GuardedChat", context: GuardContext) -> Response:
    from qwenstack.serving.protocol import AssistantMessage, ChatChoice, ChatCompletionResponse, Usage

    n = plan.params.n
    annotation = context.annotation()
    if plan.request.stream:
        return _blocked_stream(plan, annotation)
    body = ChatCompletionResponse(
        id=plan.request_id, created=plan.created, model=plan.served.name,
        choices=[ChatChoice(index=i, message=AssistantMessage(content=REFUSAL_MESSAGE), finish_reason=CONTENT_FILTER)
                 for i in range(n)],
        usage=Usage(prompt_tokens=len(plan.prompt_ids), completion_tokens=0, total_tokens=len(plan.prompt_ids)),
        qwenstack_guard=annotation,
    )
    return Response(body.model_dump_json(), media_type="application/json")


def _blocked_stream(plan: "GuardedChat", annotation: dict[str, Any] | None) -> Response:
    from qwenstack.serving.streaming import ClosingStreamingResponse

    base = {"id": plan.request_id, "object": "chat.completion.chunk", "created": plan.created,
            "model": plan.served.name}
    include_usage = bool(plan.request.stream_options and plan.request.stream_options.include_usage)

    async def frames() -> AsyncIterator[str]:
        extra = {"usage": None} if include_usage else {}
        for i in range(plan.params.n):
            for delta, finish in (({"role": "assistant", "content": ""}, None), ({"content": REFUSAL_MESSAGE}, None),
                                  ({}, CONTENT_FILTER)):
                yield sse({**base, **extra, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                                         "finish_reason": finish}]})
        yield sse({**base, **extra, "choices": [], "qwenstack_guard": annotation})
        if include_usage:
            n = len(plan.prompt_ids)
            yield sse({**base, "choices": [], "usage": {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}})
        yield DONE

    return ClosingStreamingResponse(frames())


def answer_text(choice: Any) -> str:
    """What the guard reads of a non-streamed choice: its reasoning, content and tool calls, as text."""
    message = choice.message
    parts = [message.reasoning_content or "", message.content or ""]
    for call in message.tool_calls or []:
        parts.append(f"{call.function.name}({call.function.arguments})")
    return "\n\n".join(p for p in parts if p)


async def review_answer(plan: "GuardedChat", body: "ChatCompletionResponse") -> "ChatCompletionResponse":
    """Judges each choice of a finished, non-streamed answer; blocked choices become the refusal."""
    from qwenstack.serving.protocol import AssistantMessage

    context: GuardContext | None = getattr(plan, "guard", None)
    if context is None:
        return body
    decisions = await asyncio.gather(*(context.rails.check_answer(context.messages, answer_text(c))
                                       for c in body.choices))
    for choice, decision in zip(body.choices, decisions):
        context.answers[choice.index] = decision
        if decision.blocked:
            choice.message = AssistantMessage(content=REFUSAL_MESSAGE)
            choice.finish_reason = CONTENT_FILTER
            choice.logprobs = None
        setattr(choice, "qwenstack_guard", decision.to_dict())
    body.qwenstack_guard = context.annotation()  # type: ignore[attr-defined]
    return body


def moderate_outputs(plan: "GuardedChat", outputs: Any) -> Any:
    """The engine outputs of a streamed answer under stream moderation (unchanged without a guard).
    A cut closes `outputs`, which aborts the engine request."""
    context: GuardContext | None = getattr(plan, "guard", None)
    if context is None or (context.prompt is not None and context.prompt.blocked):  # the refusal is not judged
        return outputs

    async def abort() -> None:
        close = getattr(outputs, "aclose", None)
        if close is not None:
            await close()

    return context.rails.moderate_stream(outputs, context.messages, plan.params.n, context.report, on_cut=abort)


def guard_chunk(plan: "GuardedChat", base: dict[str, Any]) -> str | None:
    """The SSE chunk that carries the verdict after the choices finish (None without a guard)."""
    context: GuardContext | None = getattr(plan, "guard", None)
    if context is None:
        return None
    return sse({**base, "choices": [], "qwenstack_guard": context.annotation()})
