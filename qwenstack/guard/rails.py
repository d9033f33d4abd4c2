"""Guardrails at run time: a policy, a Gen guard and/or a Stream guard, and the moderation of an engine's
output stream as it is generated. No HTTP here (qwenstack.serving.moderation maps this onto the API).

    rails = Guardrails(GuardPolicy.parse("controversial=block"), gen=GenGuard(...), stream=GuardStream(...))
    decision = await rails.check_prompt(messages)            # Decision(direction, verdict, action)
    decision = await rails.check_answer(messages, answer)
    async for out in rails.moderate_stream(outputs, messages, n=1, on_cut=abort):  ...

Decisions:
- Which guard judges what: a Gen guard (if any) judges whole prompts and whole answers; a Stream guard
  judges prompts and answers when there is no Gen guard, and always moderates streamed answers token by
  token. With only a Gen guard, a streamed answer is judged when it ends (its last chunk then carries
  finish_reason content_filter if blocked: the text has already been sent).
- Stream moderation runs beside the stream with a bounded lag: a chunk reaches the client only once the
  guard has checked every answer token but the last `window` ones, so at most `window` tokens from the
  first Unsafe token on are ever sent (window 0: none). The guard runs in its own thread, so the main
  model keeps generating while it checks.
- The Stream guard reads text: each streamed delta is re-encoded with the guard's tokenizer, so the main
  model may use any tokenizer (the Qwen3Guard README asks for exactly this re-tokenization).
- A guard that cannot run (input too long, an error) gives an `unknown` verdict, which the policy handles
  (fail closed by default); it never fails the request by itself.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

from qwenstack.engine.outputs import CompletionOutput, RequestOutput
from qwenstack.guard.gen import GenGuard, guard_messages
from qwenstack.guard.verdict import Action, Decision, Direction, GuardPolicy, Safety, Verdict, decide

log = logging.getLogger("qwenstack.guard")

CONTENT_FILTER = "content_filter"
ANSWER_SENTINEL = "\x00qwenstack-answer\x00"
SEVERITY = {Safety.SAFE: 0, Safety.CONTROVERSIAL: 1, Safety.UNKNOWN: 2, Safety.UNSAFE: 3}

DecisionHook = Callable[[str, Decision], None]  # (guard kind "gen" | "stream", decision): metrics
LatencyHook = Callable[[str, Direction, float], None]  # (guard kind, direction, seconds of one guard call)


def stream_conversation_ids(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """The Stream guard's token ids for a conversation ending in a user turn: the user part (through that
    turn's <|im_end|>) and the assistant header that precedes an answer (as the Qwen3Guard README feeds
    them: the template with enable_thinking=False, split where the user turn ends)."""
    turns = guard_messages(messages, Direction.PROMPT)
    text = None
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": ANSWER_SENTINEL}],
                                                 add_generation_prompt=False, enable_thinking=False)
        except Exception:  # noqa: BLE001 - a template that refuses this shape: plain ChatML below
            text = None
    if text is None or ANSWER_SENTINEL not in text:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns)
        text += f"<|im_start|>assistant\n{ANSWER_SENTINEL}"
    prefix = text.split(ANSWER_SENTINEL, 1)[0]
    end = prefix.rfind("<|im_end|>")
    cut = end + len("<|im_end|>") if end >= 0 else len(prefix)
    return tokenizer.encode(prefix[:cut]), tokenizer.encode(prefix[cut:])


def combine(verdicts: Sequence[Verdict], note: str) -> Verdict:
    """The most severe of several per-token verdicts (Safe when there are none)."""
    if not verdicts:
        return Verdict(Safety.SAFE, raw=note)
    worst = max(verdicts, key=lambda v: SEVERITY[v.safety])
    return dataclasses.replace(worst, raw=note)


@dataclass
class _Choice:
    """Stream moderation state of one choice (sample) of a request."""

    session: Any = None
    seen: int = 0  # answer tokens received from the engine
    checked: int = 0  # answer tokens whose text the guard has read
    blocked_at: int | None = None  # answer token whose chunk held the first token the policy blocks
    verdict: Verdict | None = None
    worst: Verdict | None = None  # most severe verdict so far (for the annotation)
    released: CompletionOutput | None = None  # last version of this choice sent on
    done: bool = False


@dataclass
class StreamReport:
    """What stream moderation decided, per choice index (read by the chat handler for its annotation)."""

    decisions: dict[int, Decision] = field(default_factory=dict)
    cut: set[int] = field(default_factory=set)


class Guardrails:
    def __init__(self, policy: GuardPolicy | None = None, *, gen: GenGuard | None = None, stream: Any = None,
                 stream_window: int = 0, name: str | None = None) -> None:
        if stream_window < 0:
            raise ValueError("the stream moderation window must be >= 0 tokens")
        self.policy = policy or GuardPolicy()
        self.gen = gen
        self.stream = stream  # qwenstack.models.qwen3_guard_stream.GuardStream
        self.stream_window = stream_window
        self.name = name or (gen.name if gen is not None else "guard-stream")
        self.on_decision: list[DecisionHook] = []
        self.on_latency: list[LatencyHook] = []
        self._executor: ThreadPoolExecutor | None = None

    @property
    def enabled(self) -> bool:
        return self.gen is not None or self.stream is not None

    def _decided(self, kind: str, direction: Direction, verdict: Verdict, latency_s: float = 0.0) -> Decision:
        decision = decide(self.policy, direction, verdict, latency_s)
        for hook in self.on_decision:
            try:
                hook(kind, decision)
            except Exception:  # metrics must never fail a request
                log.exception("guard decision hook failed")
        return decision

    def _latency(self, kind: str, direction: Direction, seconds: float) -> None:
        for hook in self.on_latency:
            try:
                hook(kind, direction, seconds)
            except Exception:
                log.exception("guard latency hook failed")

    # --- the Stream guard, on its own thread ------------------------------------------------------------

    async def _in_stream_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwenstack-guard-stream")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open_session(self, messages: Sequence[dict[str, Any]]) -> tuple[Any, Verdict]:
        """A session fed with the prompt and the assistant header; the prompt's verdict."""
        user_ids, header_ids = stream_conversation_ids(self.stream.tokenizer, messages)
        session = self.stream.new_session()
        try:
            prompt_verdicts = session.feed_user(user_ids)
            session.feed_assistant(header_ids)
        except Exception:
            session.close()
            raise
        last = prompt_verdicts[-1].verdict() if prompt_verdicts else Verdict(Safety.SAFE)
        return session, dataclasses.replace(last, raw="stream guard: last prompt token")

    def _feed_text(self, session: Any, text: str) -> list[Verdict]:
        ids = self.stream.tokenizer.encode(text) if text else []
        return [v.verdict() for v in session.feed_assistant(ids)]

    def stream_verdict(self, messages: Sequence[dict[str, Any]], answer: str | None) -> Verdict:
        session, prompt_verdict = self._open_session(messages)
        try:
            if answer is None:
                return prompt_verdict
            return combine(self._feed_text(session, answer), "stream guard: most severe answer token")
        finally:
            session.close()

    # --- whole prompts and answers ----------------------------------------------------------------------

    async def _judge(self, messages: Sequence[dict[str, Any]], direction: Direction) -> tuple[str, Verdict]:
        try:
            if self.gen is not None:
                return "gen", await self.gen.amoderate(messages, direction)
            if self.stream is not None:
                answer = None
                if direction is Direction.ANSWER:
                    turns = guard_messages(messages, Direction.ANSWER)
                    messages, answer = turns[:-1], turns[-1]["content"]
                return "stream", await self._in_stream_thread(self.stream_verdict, messages, answer)
        except Exception as exc:  # an unusable conversation or a failing guard: unknown, for the policy
            log.warning("guard failed on a %s: %s", direction.value, exc)
            return "gen" if self.gen is not None else "stream", Verdict.unknown(f"guard failed: {exc}")
        raise RuntimeError("no guard model is configured")

    async def check(self, messages: Sequence[dict[str, Any]], direction: Direction) -> Decision:
        start = time.monotonic()
        kind, verdict = await self._judge(messages, direction)
        latency = time.monotonic() - start
        self._latency(kind, direction, latency)
        return self._decided(kind, direction, verdict, latency)

    async def check_prompt(self, messages: Sequence[dict[str, Any]]) -> Decision:
        return await self.check(messages, Direction.PROMPT)

    async def check_answer(self, messages: Sequence[dict[str, Any]], answer: str) -> Decision:
        turns = [m for m in messages if m.get("role") in ("user", "assistant")]
        return await self.check([*turns, {"role": "assistant", "content": answer}], Direction.ANSWER)

    # --- streamed answers -------------------------------------------------------------------------------

    async def moderate_stream(self, outputs: AsyncIterator[RequestOutput], messages: Sequence[dict[str, Any]],
                              n: int, report: StreamReport,
                              on_cut: Callable[[], Any] | None = None) -> AsyncIterator[RequestOutput]:
        """The engine's outputs, passed on under moderation. A choice that reaches a token the policy blocks
        ends with finish_reason "content_filter" (its later tokens are dropped); when the stream ends and
        a choice was cut, `on_cut` (which should abort the engine request) is called. Decisions go into
        `report`."""
        if self.stream is None:
            async for out in self._moderate_at_end(outputs, messages, report):
                yield out
            return
        choices = [_Choice() for _ in range(n)]
        window = self.stream_window
        queue: asyncio.Queue[tuple[int, str, int] | None] = asyncio.Queue()
        progress = asyncio.Event()
        failure: list[BaseException] = []

        async def checker() -> None:
            """Reads each choice's new text in order, on the guard's thread."""
            try:
                for c in choices:
                    c.session, _ = await self._in_stream_thread(self._open_session, messages)
                while (item := await queue.get()) is not None:
                    i, text, end = item
                    c = choices[i]
                    if c.blocked_at is None and text:
                        start = time.monotonic()
                        verdicts = await self._in_stream_thread(self._feed_text, c.session, text)
                        self._latency("stream", Direction.ANSWER, time.monotonic() - start)
                        worst = combine(verdicts, "stream guard: most severe answer token")
                        if c.worst is None or SEVERITY[worst.safety] > SEVERITY[c.worst.safety]:
                            c.worst = worst
                        blocking = next((v for v in verdicts
                                         if self.policy.action(Direction.ANSWER, v) is Action.BLOCK), None)
                        if blocking is not None:
                            c.blocked_at, c.verdict = end - 1, blocking
                    c.checked = end
                    progress.set()
            except Exception as exc:  # an unknown verdict from here on, handled by the policy
                log.exception("stream guard failed")
                failure.append(exc)
                progress.set()

        def failed_verdict() -> Verdict:
            return Verdict.unknown(f"stream guard failed: {failure[0]}")

        def must_cut(comp: CompletionOutput, c: _Choice) -> bool:
            if c.blocked_at is not None:
                return comp.finished or len(comp.token_ids) > c.blocked_at + window
            return bool(failure) and self.policy.answer.unknown is Action.BLOCK

        def ready(comp: CompletionOutput, c: _Choice) -> bool:
            """Checked far enough to go out: all but the last `window` tokens (all of a finished answer)."""
            if c.blocked_at is not None or failure:
                return True
            end = len(comp.token_ids)
            return c.checked >= (end if comp.finished else end - window)

        def cut_output(i: int, base: RequestOutput) -> RequestOutput:
            c = choices[i]
            verdict = c.verdict or failed_verdict()
            report.decisions[i] = self._decided("stream", Direction.ANSWER, verdict)
            report.cut.add(i)
            sent = c.released
            comp = CompletionOutput(index=i, text=sent.text if sent else "",
                                    token_ids=list(sent.token_ids) if sent else [], finish_reason=CONTENT_FILTER)
            c.done, c.released = True, comp
            others = [dataclasses.replace(o.released, delta_text="", delta_token_ids=[], delta_logprobs=None)
                      for j, o in enumerate(choices) if j != i and o.released is not None]
            return dataclasses.replace(base, outputs=[comp, *others], finished=all(o.done for o in choices))

        pending: deque[RequestOutput] = deque()

        async def release() -> AsyncIterator[RequestOutput]:
            """Sends on what the guard has cleared, oldest first; waits for the guard when it lags."""
            while pending:
                head = pending[0]
                waiting = False
                for comp in head.outputs:
                    c = choices[comp.index]
                    if c.done:
                        continue
                    if must_cut(comp, c):
                        yield cut_output(comp.index, head)
                    elif not ready(comp, c):
                        waiting = True
                if waiting:
                    progress.clear()
                    await progress.wait()
                    continue
                pending.popleft()
                live = [comp for comp in head.outputs if not choices[comp.index].done]
                for comp in live:
                    choices[comp.index].released = comp
                    choices[comp.index].done = comp.finished
                if live:
                    yield dataclasses.replace(head, outputs=live)

        task = asyncio.ensure_future(checker())
        try:
            async for out in outputs:
                for comp in out.outputs:
                    c = choices[comp.index]
                    if not c.done and len(comp.token_ids) > c.seen:
                        c.seen = len(comp.token_ids)
                        queue.put_nowait((comp.index, comp.delta_text, c.seen))
                pending.append(out)
                async for item in release():
                    yield item
                if all(c.done for c in choices):
                    break
        finally:
            queue.put_nowait(None)
            await asyncio.gather(task, return_exceptions=True)
            for i, c in enumerate(choices):
                if i not in report.decisions:
                    verdict = c.worst or (failed_verdict() if failure else Verdict(Safety.SAFE, raw="stream guard"))
                    report.decisions[i] = self._decided("stream", Direction.ANSWER, verdict)
                if c.session is not None and self._executor is not None:
                    self._executor.submit(c.session.close)
                    c.session = None
            if report.cut and on_cut is not None:
                result = on_cut()
                if asyncio.iscoroutine(result):
                    await result

    async def _moderate_at_end(self, outputs: AsyncIterator[RequestOutput], messages: Sequence[dict[str, Any]],
                               report: StreamReport) -> AsyncIterator[RequestOutput]:
        """Gen guard only: pass chunks on, judge each choice's whole answer when it finishes."""
        async for out in outputs:
            finished = [c for c in out.outputs if c.finished]
            if finished:
                replaced = {}
                for comp in finished:
                    decision = await self.check_answer(messages, comp.text)
                    report.decisions[comp.index] = decision
                    if decision.blocked:
                        report.cut.add(comp.index)
                        replaced[comp.index] = dataclasses.replace(comp, finish_reason=CONTENT_FILTER)
                if replaced:
                    out = dataclasses.replace(out, outputs=[replaced.get(c.index, c) for c in out.outputs])
            yield out

    def shutdown(self) -> None:
        if self.gen is not None:
            self.gen.shutdown()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
