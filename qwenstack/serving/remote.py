"""Remote models: a model name routed to another OpenAI-compatible API (the seed's hybrid strategy: open
and local first, a proprietary endpoint where needed), through the same /v1 routes.

Decisions:
- The client's JSON body is forwarded as it came, with `model` replaced by the upstream's id, so fields
  this server does not know still reach an upstream that does.
- Streams are relayed chunk by chunk as bytes; closing the client's connection closes the upstream one.
- The upstream's key comes from the environment (never from the command line, where `ps` shows it).
- Upstream failures keep their status; a body not in OpenAI's error shape is wrapped into it. An upstream
  that cannot be reached is a 502.
"""
from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, Response

from qwenstack.serving.config import RemoteSpec
from qwenstack.serving.errors import APIError, error_frame
from qwenstack.serving.streaming import DONE, ClosingStreamingResponse

log = logging.getLogger("qwenstack.server")

PASSED_HEADERS = ("retry-after", "x-request-id")


class RemoteRouter:
    def __init__(self, specs: list[RemoteSpec], timeout_s: float = 600.0) -> None:
        self.routes = {s.name: s for s in specs}
        self.timeout_s = timeout_s
        self._client: Any = None  # httpx.AsyncClient, created when the app starts

    def get(self, name: Any) -> RemoteSpec | None:
        return self.routes.get(name) if isinstance(name, str) else None

    async def start(self) -> None:
        if not self.routes:
            return
        try:
            import httpx
        except ImportError as exc:
            raise RuntimeError("remote models need the httpx package (pip install httpx)") from exc
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=10.0))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def forward(self, spec: RemoteSpec, path: str, body: dict[str, Any]) -> Response:
        import httpx

        if self._client is None:
            raise APIError(503, "remote routes are not started yet", headers={"Retry-After": "1"})
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        key = spec.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = spec.base_url + path
        request = self._client.build_request("POST", url, json={**body, "model": spec.upstream_model}, headers=headers)
        try:
            upstream = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise APIError(502, f"remote model '{spec.name}' ({spec.base_url}) could not be reached: {exc}",
                           code="upstream_unreachable") from None
        passed = {k: v for k, v in upstream.headers.items() if k.lower() in PASSED_HEADERS}
        content_type = upstream.headers.get("content-type", "")
        if upstream.status_code >= 400 or "text/event-stream" not in content_type:
            try:
                content = await upstream.aread()
            finally:
                await upstream.aclose()
            if upstream.status_code >= 400:
                return _upstream_error(spec, upstream.status_code, content, passed)
            return Response(content, status_code=upstream.status_code, media_type=content_type or None,
                            headers=passed)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            except httpx.HTTPError as exc:
                error = APIError(502, f"remote model '{spec.name}' failed mid-stream: {exc}")
                yield error_frame(error).encode()
                yield DONE.encode()
            finally:
                await upstream.aclose()

        return ClosingStreamingResponse(relay(), status_code=upstream.status_code, headers=passed)


def _upstream_error(spec: RemoteSpec, status: int, content: bytes, headers: dict[str, str]) -> Response:
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return JSONResponse(body, status_code=status, headers=headers)
    text = content.decode("utf-8", errors="replace").strip()[:500]
    log.warning("remote model %s answered %d: %s", spec.name, status, text)
    error = APIError(status, f"remote model '{spec.name}' answered {status}: {text}", code="upstream_error")
    error.headers.update(headers)
    return error.response()
