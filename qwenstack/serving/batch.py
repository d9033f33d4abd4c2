"""OpenAI's batch file format run through the server's own app, in this process (`qwenstack run-batch`, as
vLLM's run-batch).

    summary = await run_batch(app, lines, write)    # each input line in, one output line out, in order

Each input line is one request: `{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions",
"body": {...}}`. Each output line is OpenAI's batch output: `{"id": "batch_req_...", "custom_id": ...,
"response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}`.

Decisions:
- Requests go through the app (httpx's ASGI transport), not around it: a batch line gets exactly what the same
  body gets from `qwenstack serve` (validation, templates, structured output, the guard), on any JSON route it
  serves (/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, /v1/rerank, ...).
- A bad line never stops the batch. A line that is not a request (not JSON, a missing custom_id, a method
  other than POST) has `response: null` and an `error` {code, message}; a request the app refuses is a response
  with its status code and the app's error body, as OpenAI reports a failed request. `stream: true` is an
  error line: a batch answers whole.
- Lines run concurrently, at most `max_concurrency` at a time, and come out in input order: a window of that
  many requests in flight, the oldest written as soon as it is done. The engine batches whatever is in flight.
- The app's models load as the server's do (its lifespan); a model that fails to load ends the run with that
  error before any line is read.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import httpx

from qwenstack.errors import QwenstackError

BASE_URL = "http://qwenstack-batch"


@dataclass
class BatchSummary:
    lines: int = 0
    succeeded: int = 0  # a 2xx response
    failed: int = 0  # any other response, or an error line
    seconds: float = 0.0


def _line(custom_id: Any, response: dict[str, Any] | None = None, error: tuple[str, str] | None = None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response,
            "error": None if error is None else {"code": error[0], "message": error[1]}}


def _request_of(number: int, text: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the request, None) or (None, the error line) for input line `number`."""
    try:
        item = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, _line(None, error=("invalid_json", f"line {number} is not JSON: {exc}"))
    if not isinstance(item, dict):
        return None, _line(None, error=("invalid_request", f"line {number} must be a JSON object"))
    custom_id = item.get("custom_id")
    problem = None
    if not isinstance(custom_id, str) or not custom_id:
        problem = "custom_id must be a non-empty string"
    elif str(item.get("method", "POST")).upper() != "POST":
        problem = f"method must be POST, not {item.get('method')!r}"
    elif not isinstance(item.get("url"), str) or not item["url"].startswith("/"):
        problem = "url must be a path such as /v1/chat/completions"
    elif not isinstance(item.get("body"), dict):
        problem = "body must be a JSON object"
    elif item["body"].get("stream"):
        problem = "stream is not supported in a batch: each request is answered whole"
    if problem:
        return None, _line(custom_id if isinstance(custom_id, str) else None,
                           error=("invalid_request", f"line {number}: {problem}"))
    return item, None


async def _answer(client: httpx.AsyncClient, number: int, text: str) -> dict[str, Any]:
    item, error_line = _request_of(number, text)
    if item is None:
        assert error_line is not None
        return error_line
    try:
        response = await client.post(item["url"], json=item["body"])
    except Exception as exc:  # noqa: BLE001 - the app answers errors itself; this is a last guard for the batch
        return _line(item["custom_id"], error=("internal_error", f"{type(exc).__name__}: {exc}"))
    try:
        body = response.json()
    except ValueError:
        return _line(item["custom_id"], error=(
            "unsupported_response", f"{item['url']} answered {response.headers.get('content-type')}, not JSON"))
    request_id = response.headers.get("x-request-id") or (body.get("id") if isinstance(body, dict) else None)
    return _line(item["custom_id"], {"status_code": response.status_code,
                                     "request_id": request_id or f"req_{uuid.uuid4().hex}", "body": body})


async def _ready(app: Any) -> None:
    registry = app.state.qwenstack.registry
    while not registry.ready:
        if registry.failed is not None:
            raise QwenstackError(registry.failed)
        await asyncio.sleep(0.05)


async def run_batch(app: Any, lines: Iterable[str], write: Callable[[dict[str, Any]], None], *,
                    max_concurrency: int = 256) -> BatchSummary:
    """Answers every non-blank line of `lines` through `app` (create_app's), `write`-ing each output line's
    object in input order."""
    summary = BatchSummary()
    started = time.monotonic()

    def done(line: dict[str, Any]) -> None:
        response = line["response"]
        summary.succeeded += response is not None and 200 <= response["status_code"] < 300
        summary.failed += response is None or not 200 <= response["status_code"] < 300
        write(line)

    async with app.router.lifespan_context(app):
        await _ready(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=None) as client:
            in_flight: deque[asyncio.Task] = deque()
            for number, text in enumerate(lines, 1):
                if not text.strip():
                    continue
                summary.lines += 1
                in_flight.append(asyncio.create_task(_answer(client, number, text)))
                while len(in_flight) >= max_concurrency:
                    done(await in_flight.popleft())
            while in_flight:
                done(await in_flight.popleft())
    summary.seconds = time.monotonic() - started
    return summary
