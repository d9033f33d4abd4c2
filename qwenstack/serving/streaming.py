"""Server-sent events and the lifetime of an engine stream inside an HTTP request.

Decisions:
- The first engine output is awaited before the response starts, so a request the engine refuses (too
  long, queue full) still gets a proper status code (400, 429) instead of a 200 with an error frame.
- Once streaming, a failure becomes a `data: {"error": ...}` frame followed by `data: [DONE]`.
- A client that goes away must abort its request: Starlette cancels the streaming task on disconnect but
  leaves the body iterator suspended, so `ClosingStreamingResponse` closes it, which closes the engine
  stream, which aborts the request and frees its KV blocks. Non-streaming requests poll for disconnect.

The generating endpoints (chat, completions) share one path through here after their own planning:
`admit` (submit, await the first outputs, 499 if the client left meanwhile), then `reply` (an event
stream ended by `event_stream`, or one body computed while watching for the client leaving).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from qwenstack.engine.outputs import RequestOutput
from qwenstack.serving.errors import APIError, error_frame, from_exception

T = TypeVar("T")

DONE = "data: [DONE]\n\n"
EVENT_STREAM = "text/event-stream"
DISCONNECT_POLL_S = 0.5


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def typed_sse(event: dict[str, Any]) -> str:
    """An event with an `event:` line naming its type, as the Responses and Messages APIs stream them."""
    return f"event: {event['type']}\n{sse(event)}"


class ClosingStreamingResponse(StreamingResponse):
    def __init__(self, content: AsyncIterator[Any], *, sources: list[Any] = (), media_type: str = EVENT_STREAM,
                 **kwargs: Any) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(kwargs.pop("headers", None) or {})}
        super().__init__(content, media_type=media_type, headers=headers, **kwargs)
        self.sources = list(sources)  # what feeds `content`: closed too, even if `content` never started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await close_all([self.body_iterator, *self.sources])


async def first_output(stream: AsyncIterator[RequestOutput], retry_after_s: int) -> RequestOutput:
    """The first output, or the refusal as an APIError (validation 400, queue full 429)."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        raise APIError(500, "the engine ended the request without output") from None
    except Exception as exc:
        await _close(stream)
        raise from_exception(exc, retry_after_s) from None


async def _close(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


async def close_all(streams: list[Any]) -> None:
    """Closes each stream in turn: a guard's moderated stream, then the engine's it reads (closing the first does
    not close the second)."""
    for stream in streams:
        await _close(stream)


class OutputStream:
    """`first` then the rest of an engine stream. Closing it (even before iterating) closes the engine
    stream, which aborts the request if it is still running."""

    def __init__(self, first: RequestOutput, stream: AsyncIterator[RequestOutput]) -> None:
        self._first: RequestOutput | None = first
        self._stream = stream
        self._done = False

    def __aiter__(self) -> "OutputStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._first is not None:
            first, self._first = self._first, None
            self._done = first.finished
            return first
        if self._done:
            raise StopAsyncIteration
        return await self._stream.__anext__()

    async def aclose(self) -> None:
        self._done = True
        await _close(self._stream)


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, tagged with the stream's index. Closing stops them all."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except Exception as exc:  # handed to the consumer, which decides what the client sees
            await queue.put((i, exc))
        finally:
            await queue.put((i, end))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await _close(stream)


class ClientDisconnected(Exception):
    pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`; cancels it (aborting its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


CLIENT_LEFT = 499  # nginx's code for a client that closed the request: nobody reads it, logs and metrics do


async def admit(request: Request, streams: list[AsyncIterator[RequestOutput]],
                retry_after_s: int) -> list[OutputStream] | None:
    """Engine streams submitted together (one batch) -> each with its first output. None when the client
    left while they waited in the queue (all withdrawn). One refused: the others are withdrawn and the
    refusal is raised as an APIError (400, 429), before any status line is sent."""
    try:
        firsts = await unless_disconnected(request, asyncio.gather(
            *(first_output(s, retry_after_s) for s in streams), return_exceptions=True))
    except ClientDisconnected:
        for stream in streams:
            await _close(stream)
        return None
    admitted = [OutputStream(f, s) for f, s in zip(firsts, streams) if isinstance(f, RequestOutput)]
    refused = next((f for f in firsts if isinstance(f, BaseException)), None)
    if refused is not None:
        for stream in admitted:
            await stream.aclose()
        raise refused
    return admitted


async def event_stream(events: AsyncIterator[str], retry_after_s: int, on_end: Callable[[], None],
                       frame_error: Callable[[APIError], str] = error_frame,
                       done: str | None = DONE) -> AsyncIterator[str]:
    """The ending every generating stream shares: a failure after the 200 becomes an error frame (OpenAI's by
    default; /v1/messages sends Anthropic's `error` event, Ollama's routes an `{"error"}` line), then `done`
    (`[DONE]`, which Anthropic's and Ollama's streams do not have); on_end runs however the stream ends, the
    client leaving included."""
    try:
        async with contextlib.aclosing(events):  # a client that leaves closes `events` at once too
            async for event in events:
                yield event
    except Exception as exc:  # noqa: BLE001 - the status line is sent: the client learns it in-band
        yield frame_error(from_exception(exc, retry_after_s))
    finally:
        on_end()
    if done is not None:
        yield done


async def reply(request: Request, stream: bool, events: Callable[[], AsyncIterator[str]],
                whole: Callable[[], Awaitable[Response]], sources: list[Any],
                media_type: str = EVENT_STREAM) -> Response:
    """The response of admitted requests: the event stream (or another streamed media type: Ollama's NDJSON
    lines), or the whole body computed while watching for the client leaving (then its requests are aborted
    and nobody reads the 499). sources: what feeds the events, closed with the response even if the stream
    never started."""
    if stream:
        return ClosingStreamingResponse(events(), sources=sources, media_type=media_type)
    try:
        return await unless_disconnected(request, whole())
    except ClientDisconnected:
        return Response(status_code=CLIENT_LEFT)
