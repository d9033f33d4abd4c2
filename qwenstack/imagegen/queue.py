"""A bounded queue of image jobs with one worker thread that owns the pipeline.

Decisions:
- One job at a time on one worker thread (the pipeline is not thread-safe, and one 20B model fills a GPU);
  at most `max_queued` more wait. Beyond that `submit` raises `QueueFull` with a Retry-After estimated from
  the mean job time so far, so the client does not spin.
- Chat comes first. The worker runs at a lower OS priority (`nice`, Linux: per thread, inherited by the
  OpenMP threads it starts), so on a CPU machine an image job does not take the cores the chat engines
  need (`torch.set_num_threads` cannot do it: it sets one process-wide pool size for every thread). And
  between two denoising steps, while `chat_busy()` says a chat engine has requests, the worker waits (up
  to `yield_s` per step) without holding the GIL, which the Python between diffusers' kernels would
  otherwise share with the engines' threads.
- Events cross from the worker thread to the request's event loop with `call_soon_threadsafe`; a job whose
  client went away is cancelled (`JobHandle.cancel`) and stops between two denoising steps, or is skipped
  if it had not started.
- The last `HISTORY` jobs are kept as `JobRecord`s (status, steps done, times) for tests and metrics.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from qwenstack.imagegen.jobs import ImageJob, JobCancelled, JobEvent, Progress, run_job
from qwenstack.imagegen.pipelines import ImagePipeline

log = logging.getLogger("qwenstack.imagegen")

HISTORY = 64
DEFAULT_NICE = 10
DEFAULT_YIELD_S = 0.25
YIELD_POLL_S = 0.002


class QueueFull(Exception):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class JobRecord:
    id: int
    total_steps: int
    status: str = "queued"  # queued, running, done, cancelled, failed
    steps_done: int = 0
    queued_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None


class _End:
    """The last item of a job's event stream: `error` is None when the job finished."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class JobHandle:
    """What a request holds: the job's events, and a way to cancel it."""

    def __init__(self, job: ImageJob, record: JobRecord, loop: asyncio.AbstractEventLoop) -> None:
        self.job = job
        self.record = record
        self._loop = loop
        self._events: asyncio.Queue[JobEvent | _End] = asyncio.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _post(self, item: JobEvent | _End) -> None:  # from the worker thread
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the request's loop has closed: nobody is listening
            pass

    async def events(self) -> AsyncIterator[JobEvent]:
        """The job's events until it ends; raises what the job raised (JobCancelled if cancelled)."""
        while True:
            item = await self._events.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item


class ImageJobQueue:
    def __init__(self, pipeline: ImagePipeline, max_queued: int = 4, nice: int = DEFAULT_NICE,
                 runner: Callable[..., None] = run_job, chat_busy: Callable[[], bool] | None = None,
                 yield_s: float = DEFAULT_YIELD_S) -> None:
        self.pipeline = pipeline
        self.max_queued = max_queued
        self.nice = nice
        self.chat_busy = chat_busy
        self.yield_s = yield_s
        self._runner = runner
        self._waiting: deque[JobHandle] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._ids = itertools.count(1)
        self._job_seconds: deque[float] = deque(maxlen=16)
        self.history: deque[JobRecord] = deque(maxlen=HISTORY)
        self.running: JobHandle | None = None
        self._thread = threading.Thread(target=self._work, name="qwenstack-image-worker", daemon=True)
        self._thread.start()

    def retry_after_s(self) -> int:
        per_job = sum(self._job_seconds) / len(self._job_seconds) if self._job_seconds else 1.0
        return max(1, math.ceil(per_job * (len(self._waiting) + 1)))

    def submit(self, job: ImageJob, loop: asyncio.AbstractEventLoop | None = None) -> JobHandle:
        loop = loop or asyncio.get_running_loop()
        with self._cond:
            if self._closed:
                raise RuntimeError("the image job queue is closed")
            if len(self._waiting) >= self.max_queued:
                raise QueueFull(f"{len(self._waiting)} image jobs are waiting (the limit is {self.max_queued})",
                                self.retry_after_s())
            record = JobRecord(next(self._ids), job.total_steps, queued_at=time.monotonic())
            handle = JobHandle(job, record, loop)
            self._waiting.append(handle)
            self.history.append(record)
            self._cond.notify()
        return handle

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for handle in self._waiting:
                handle.cancel()
            self._cond.notify_all()
        if self.running is not None:
            self.running.cancel()
        self._thread.join(timeout=30)

    def _lower_priority(self) -> None:
        if self.nice <= 0 or not hasattr(os, "setpriority"):
            return
        try:  # Linux: a thread's own niceness, inherited by the threads it creates from here on
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        except OSError as exc:
            log.warning("could not lower the image worker's priority: %s", exc)

    def _yield_to_chat(self) -> None:
        if self.chat_busy is None or self.yield_s <= 0:
            return
        deadline = time.monotonic() + self.yield_s
        while self.chat_busy() and time.monotonic() < deadline:
            time.sleep(YIELD_POLL_S)

    def _next(self) -> JobHandle | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            self.running = self._waiting.popleft()
            return self.running

    def _work(self) -> None:
        self._lower_priority()
        while (handle := self._next()) is not None:
            record = handle.record
            if handle.cancelled:  # its client left while it waited
                record.status = "cancelled"
                handle._post(_End(JobCancelled()))
                continue
            record.status, record.started_at = "running", time.monotonic()

            def emit(event: JobEvent, handle: JobHandle = handle) -> None:
                if isinstance(event, Progress):
                    handle.record.steps_done = event.steps_done
                handle._post(event)

            error: BaseException | None = None
            try:
                self._runner(self.pipeline, handle.job, emit, lambda h=handle: h.cancelled, self._yield_to_chat)
                record.status = "done"
            except JobCancelled as exc:
                record.status, error = "cancelled", exc
            except Exception as exc:  # noqa: BLE001 - reported to this job's client; the worker goes on
                log.error("image job %d failed", record.id, exc_info=exc)
                record.status, error = "failed", exc
            record.ended_at = time.monotonic()
            if record.status == "done":
                self._job_seconds.append(record.ended_at - record.started_at)
            self.running = None
            handle._post(_End(error))
