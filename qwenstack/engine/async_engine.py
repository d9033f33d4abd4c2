"""The engine for servers: one background thread owns the model and steps it; coroutines submit requests
and read their outputs from their own queues.

Decisions:
- A single owner thread (mlx-lm's server pattern): the model, the KV pool and the scheduler are touched
  only there, so there are no locks around tensors. Requests and aborts reach it through a command queue
  and are applied between steps.
- A request is validated in the caller's task before it is queued, so a bad request fails alone with a
  RequestError and never reaches the engine thread.
- A consumer that stops reading (client disconnected, task cancelled) aborts its request, which frees its
  KV blocks at the next step boundary.
- If a forward pass raises, the requests of that step receive the error and the loop keeps serving.
- Embeddings (engine/embed.py) are one more command: the owner thread runs their passes between two steps,
  so they never race a step for the model, and a failed pass fails that embedding request alone. Reranking's
  scoring passes (last_token_logits) and a classifier's (classify) are the same command.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from qwenstack.engine.engine import LLMEngine
from qwenstack.engine.outputs import RequestOutput
from qwenstack.engine.params import SamplingParams
from qwenstack.engine.sampler import RequestFailed
from qwenstack.errors import EngineUnavailableError, RequestError

log = logging.getLogger("qwenstack.engine")


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    sink: Callable[[RequestOutput | BaseException], None]
    multimodal: Any = None  # MultimodalInputs: images of a request to a vision-language model


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Pass:
    compute: Callable[[], Any]  # the engine's pass over the prompts (embed, last_token_logits, classify)
    sink: Callable[[Any], None]  # gets the tensor, or the exception


class AsyncEngine:
    def __init__(self, engine: LLMEngine, name: str = "engine") -> None:
        self.engine = engine
        self.name = name
        self._commands: queue.Queue[Any] = queue.Queue()
        self._sinks: dict[str, Callable[[RequestOutput | BaseException], None]] = {}
        self._ids = itertools.count()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"qwenstack-{name}", daemon=True)
        self._thread.start()
        self.on_step: Callable[[list[RequestOutput]], None] | None = None  # metrics hook (engine thread)

    # --- caller side (any thread, usually the event loop) --------------------------------------------

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
        prompt: str | None = None, multimodal: Any = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutputs (with deltas) until the request finishes. Raises RequestError up front."""
        self._check_running()
        self.engine.validate(prompt_token_ids, params)
        self.engine.plan_multimodal(prompt_token_ids, multimodal)
        request_id = request_id or self.new_request_id()
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def sink(item: RequestOutput | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # the caller's event loop has closed: nobody reads this request any more
                self.abort(request_id)

        self._commands.put(_Add(request_id, list(prompt_token_ids), params, prompt, sink, multimodal))
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    async def embed(self, prompts: list[list[int]]) -> Any:
        """Last-token hidden states [N, hidden] (a float32 tensor) of whole prompts, computed in the engine thread
        between steps. Raises RequestError up front for a prompt that cannot run."""
        self.engine.check_embedding_prompts(prompts)
        prompts = [list(p) for p in prompts]
        return await self._pass(lambda: self.engine.embed(prompts))

    async def last_token_logits(self, prompts: list[list[int]], token_ids: list[int]) -> Any:
        """Each whole prompt's next-token logits of `token_ids` [N, len(token_ids)] (float32), from the same
        passes as embed (LLMEngine.last_token_logits): one command, run between two steps."""
        self.engine.check_scoring(prompts, token_ids)
        prompts, token_ids = [list(p) for p in prompts], list(token_ids)
        return await self._pass(lambda: self.engine.last_token_logits(prompts, token_ids))

    async def classify(self, prompts: list[list[int]]) -> Any:
        """A sequence classifier's label logits [N, labels] (float32) of whole prompts (LLMEngine.classify), from
        the same passes as embed. Raises RequestError up front for a model without labels or a bad prompt."""
        self.engine.check_classifying(prompts)
        prompts = [list(p) for p in prompts]
        return await self._pass(lambda: self.engine.classify(prompts))

    async def _pass(self, compute: Callable[[], Any]) -> Any:
        """Queues one pass (an embedding, scoring or classifying command) and awaits what the engine thread
        gives."""
        self._check_running()
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Any] = loop.create_future()

        def settle(item: Any) -> None:
            if result.done():  # the caller was cancelled (client gone): nobody wants the states
                return
            if isinstance(item, BaseException):
                result.set_exception(item)
            else:
                result.set_result(item)

        def sink(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(settle, item)
            except RuntimeError:  # the caller's event loop has closed
                pass

        self._commands.put(_Pass(compute, sink))
        return await result

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def _check_running(self) -> None:
        """A request to an engine that was shut down would wait for ever on a queue nobody reads."""
        if self._stopped.is_set():
            raise EngineUnavailableError(f"the engine {self.name} has shut down")

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put(None)
        self._thread.join(timeout=10)
        self.engine.close()

    # --- engine thread ------------------------------------------------------------------------------

    def _apply(self, command: Any) -> None:
        if isinstance(command, _Add):
            try:
                self.engine.add_request(command.request_id, command.prompt_token_ids, command.params, command.prompt,
                                        multimodal=command.multimodal)
                self._sinks[command.request_id] = command.sink
            except Exception as exc:  # queue full, duplicate id: refuse this request only
                command.sink(exc)
        elif isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            self._sinks.pop(command.request_id, None)
        elif isinstance(command, _Pass):
            try:
                states = command.compute()
            except Exception as exc:  # a failed pass fails this request, never the engine thread
                log.exception("embedding, scoring or classifying pass failed")
                command.sink(exc)
                return
            command.sink(states)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            block = not self.engine.has_unfinished_requests()
            try:
                command = self._commands.get(block=block)
                if command is None:
                    continue
                self._apply(command)
                while True:  # drain whatever else arrived
                    command = self._commands.get_nowait()
                    if command is not None:
                        self._apply(command)
            except queue.Empty:
                pass
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except RequestFailed as exc:  # requests' own logits processors: they end, the others' step stands
                for request_id, cause in exc.failures.items():
                    log.warning("request %s failed: %s", request_id, cause)
                    self._fail_request(request_id, cause)
                outputs = exc.outputs
            except Exception as exc:  # a failed forward ends the requests it carried, not the server
                log.exception("engine step failed")
                self._fail_running(exc)
                continue
            if self.on_step is not None:
                try:
                    self.on_step(outputs)
                except Exception:
                    log.exception("on_step hook failed")
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    sink(out)
                if out.finished:
                    self._sinks.pop(out.request_id, None)

    def _fail_request(self, request_id: str, exc: Exception) -> None:
        self.engine.abort(request_id)
        sink = self._sinks.pop(request_id, None)
        if sink is not None:  # the request's own fault is said as it is (a 400), anything else as the engine's
            sink(exc if isinstance(exc, RequestError) else
                 RuntimeError(f"the engine failed while running this request: {exc}"))

    def _fail_running(self, exc: Exception) -> None:
        if isinstance(exc, EngineUnavailableError):
            # Nothing can run any more (a tensor-parallel worker died): end every request, queued ones too,
            # with the error as it is (the server answers 503), rather than leave them waiting.
            for request_id in list(self._sinks):
                self.engine.abort(request_id)
                self._sinks.pop(request_id)(exc)
            return
        running = {s.request_id for s in self.engine.scheduler.running}
        for request_id in running:
            self.engine.abort(request_id)
            sink = self._sinks.pop(request_id, None)
            if sink is not None:
                sink(RuntimeError(f"the engine failed while running this request: {exc}"))
