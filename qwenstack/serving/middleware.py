"""Rules every request body meets before a handler sees it, and the last line of defence against our bugs.

    BodyRulesMiddleware: size limit (counted as bytes arrive, so chunked uploads are limited too), media
        type (JSON unless the route declares a form), and the JSON hazards a parser turns into a crash
        (nesting deeper than any real request, lone surrogates, bytes that are not UTF-8).
    UnexpectedErrorMiddleware: an exception that escaped every handler becomes a 500 in OpenAI's shape,
        answered on the same keep-alive connection (Starlette's own handler re-raises, which makes the
        server drop the connection without saying so, and the client's next request on it fails).
    HeadAsGet: HEAD on any GET route, answered with the GET's status and headers and no body.
    ErrorShape: the errors of some paths in another API's shape (Anthropic's under /v1/messages, Ollama's
        under its /api/ routes), whoever answered them.
    LOCAL_ORIGINS: the web pages whose browser calls CORS lets through by default (Starlette's CORSMiddleware,
        installed by serving/app.py): pages served from this machine's loopback names, on any port, as
        Ollama allows by default. A browser UI on localhost (Open WebUI in direct mode, a notebook, a dev
        server) can call the API; any other site only where `--allowed-origins` names it. vLLM allows every
        origin by default; here that would let any page the owner visits read the models' answers and the
        chat page's stored conversations.

Decisions:
- Both are pure ASGI middlewares: streaming responses pass untouched, and the body is read here once,
  incrementally, then replayed to the app, so no route (present or added later) can skip the rules.
- JSON is required on every body-carrying request to a route unless that route declares a form body
  (FastAPI's Form/File parameters, or an `openapi_extra` requestBody naming its media types): a browser
  can send text/plain and form posts cross-site without a preflight, JSON it cannot. A body with no
  Content-Type or application/octet-stream is read as JSON when the request has no Origin header: a browser
  sends one with every cross-site POST, and non-browser clients (LiteLLM's ollama providers) send JSON so.
  On Ollama's routes curl -d's form type is read so too (Ollama's documented `curl URL -d '{...}'`). The
  handler then sees the body as application/json.
- The checks scan raw bytes at C speed (bytes.count, re, numpy) so a large body costs little on the event
  loop; the rare body that needs a closer look is examined in a worker thread.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable, Iterable

import numpy as np
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwenstack.serving.errors import APIError
from qwenstack.serving.routes import matching_route

log = logging.getLogger("qwenstack.server")

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
JSON_TYPES = ("application/json",)
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
UNTYPED = ("", "application/octet-stream")  # bodies some non-browser clients send JSON as
# What `curl URL -d '{...}'` sends, as Ollama's documentation writes every example: read as JSON on the routes
# `curl_json` names (Ollama's, which reads any body as JSON), refused elsewhere (a /v1 route wants JSON).
CURL_TYPES = ("application/x-www-form-urlencoded", "text/plain")
MAX_JSON_DEPTH = 128  # far beyond any real request (a tool schema nests a dozen levels), far below recursion limits

# A \uD800-\uDFFF escape with the backslashes before it: an odd count means a real escape.
_SURROGATE_ESCAPE = re.compile(rb"(\\+)u([dD][89a-fA-F][0-9a-fA-F]{2})")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_hazard(body: bytes) -> str | None:
    """Why this JSON body would crash a parser or a tokenizer, or None. Valid JSON is never refused for
    its content, only for what no real request contains."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:  # also catches surrogates encoded as UTF-8 bytes (ED A0 80)
        return f"the request body is not valid UTF-8 (byte {exc.start})"
    if _has_u_escape(body) and lone_surrogate(body):
        return "the request body contains a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair)"
    # Bodies over a megabyte skip this scan (it holds the GIL): the /v1 routes' parser refuses nesting past 200
    # levels itself, and the others' RecursionError is answered 400.
    if len(body) <= 1 << 20 and body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH \
            and json_depth(body) > MAX_JSON_DEPTH:
        return f"the request body is nested deeper than {MAX_JSON_DEPTH} levels"
    return None


def _has_u_escape(body: bytes) -> bool:
    """Whether the bytes `\\u` occur. `b"\\u" in body` takes ~15 ms for 10 MB (a two-byte needle is searched
    slowly); a memchr for the backslash and numpy on the backslashes it finds take a few."""
    if b"\\" not in body:
        return False
    if len(body) < 1 << 16:
        return b"\\u" in body
    data = np.frombuffer(body, dtype=np.uint8)
    backslashes = np.flatnonzero(data[:-1] == ord("\\"))
    return bool(np.any(data[backslashes + 1] == ord("u")))


def lone_surrogate(body: bytes) -> bool:
    pending_high_end = -1  # where a high surrogate escape ended, awaiting its low half right there
    for match in _SURROGATE_ESCAPE.finditer(body):
        if len(match.group(1)) % 2 == 0:  # "\\ud800": an escaped backslash, then text
            continue
        high = match.group(2)[1:2].lower() in b"89ab"
        escape_start = match.end(1) - 1
        if pending_high_end >= 0:
            if high or escape_start != pending_high_end:
                return True
            pending_high_end = -1
        elif high:
            pending_high_end = match.end()
        else:
            return True
    return pending_high_end >= 0


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects (brackets inside strings do not count)."""
    outside = np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)
    steps = (np.isin(outside, (ord("["), ord("{"))).astype(np.int32)
             - np.isin(outside, (ord("]"), ord("}"))).astype(np.int32))
    return int(np.cumsum(steps).max(initial=0))


def form_media_types(route: Any) -> tuple[str, ...]:
    """The non-JSON media types a route accepts: what its OpenAPI requestBody names, or forms for a route
    with Form/File parameters."""
    from fastapi import params

    declared = ((getattr(route, "openapi_extra", None) or {}).get("requestBody") or {}).get("content") or {}
    if declared:
        return tuple(t for t in declared if t not in JSON_TYPES)
    field = getattr(route, "body_field", None)
    if field is not None and isinstance(field.field_info, (params.Form, params.File)):
        return FORM_TYPES
    return ()


LOCAL_ORIGINS = r"^(https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?)$"


class BodyRulesMiddleware:
    def __init__(self, app: ASGIApp, routes: Callable[[], Iterable[Any]], default_limit: int,
                 limits: dict[str, int] | None = None, curl_json: Callable[[str], bool] = lambda path: False) -> None:
        self.app = app
        self.curl_json = curl_json  # path -> whether curl -d's form-typed bodies are read as JSON there
        self.routes = routes  # the app's routes, looked up per request: routes added later are covered too
        self.default_limit = default_limit
        self.limits = limits if limits is not None else {}  # path prefix -> byte limit (e.g. the chat store)

    def limit_for(self, path: str) -> int:
        for prefix, limit in self.limits.items():
            if path.startswith(prefix):
                return limit
        return self.default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        has_body = headers.get("transfer-encoding") is not None or (length is not None and length != "0")
        route = matching_route(self.routes(), scope)
        if not has_body or route is None:  # no body to check, or a 404/405 the app answers
            await self.app(scope, receive, send)
            return
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        forms = form_media_types(route)
        is_json = media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))
        # Read as JSON, as Ollama does: no browser sends these without an Origin (LiteLLM's ollama providers do).
        untyped = UNTYPED + CURL_TYPES if self.curl_json(scope.get("path", "")) else UNTYPED
        untyped_json = not is_json and media in untyped and not forms and "origin" not in headers
        if untyped_json:
            is_json, scope = True, _as_json(scope)
        if forms and media not in forms:  # a form route (uploads): JSON cannot carry its files
            await _refuse(APIError(415, f"this route takes a form with its files, sent as {' or '.join(forms)} "
                                        f"(Content-Type: {media or 'none'})", code="unsupported_media_type"),
                          scope, receive, send)
            return
        if not is_json and not forms:
            await _refuse(APIError(415, f"the request body must be sent as application/json (Content-Type: "
                                        f"{media or 'none'})", code="unsupported_media_type"), scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        if length is not None and length.isdigit() and int(length) > limit:
            await _refuse(_too_large(limit), scope, receive, send)
            return
        try:
            body = await _read_body(receive, limit)
        except _ClientGone:
            return
        if body is None:
            await _refuse(_too_large(limit), scope, receive, send)
            return
        if is_json:
            hazard = json_hazard(body)  # C-speed scans: ~10 ms for 10 MB
            if hazard is not None:
                await APIError(400, hazard, code="invalid_json").response()(scope, receive, send)
                return
        await self.app(scope, _replay(body, receive), send)


def _as_json(scope: Scope) -> Scope:
    """The request as the app should parse it: Content-Type application/json (FastAPI parses a body model only
    from a JSON media type)."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                    code="body_too_large")


class _ClientGone(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` (the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: disconnect notices, as the app expects

    return replay


async def _refuse(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answers before the body was (fully) read: the connection is closed rather than left with unread bytes."""
    error.headers.setdefault("Connection", "close")
    await error.response()(scope, receive, send)


class UnexpectedErrorMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.error("request %s %s failed", scope.get("method"), scope.get("path"), exc_info=exc)
            if started:  # nothing more can be said on this response; the server ends it
                return
            error = APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
            await error.response()(scope, receive, send)


class HeadAsGet:
    """HEAD answered as GET without the body, on every GET route: Ollama's CLI checks the server with `HEAD /`
    (any status >= 400 is fatal to it), and HTTP monitors probe with HEAD; FastAPI registers GET alone."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        ended = False

        async def headers_only(message: Message) -> None:
            nonlocal ended
            if message["type"] == "http.response.start":
                await send(message)
            elif not ended:  # the first body message ends the response; the rest is never sent
                ended = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class ErrorShape:
    """Error responses of the requests `applies` accepts (it reads the ASGI scope: path, headers) in another API's
    shape, whoever answered them (a handler,
    the app's exception handlers, or the middlewares inside this one: API key, body rules, unexpected 500s).
    A pure ASGI middleware: streams and successes pass untouched; a JSON error body in OpenAI's shape is held
    until whole, then rewritten as `shape(status, message)`."""

    def __init__(self, app: ASGIApp, applies: Callable[[Scope], bool],
                 shape: Callable[[int, str], dict[str, Any]]) -> None:
        self.app = app
        self.applies = applies
        self.shape = shape

    def reshaped(self, status: int, body: bytes) -> bytes:
        """An error body in OpenAI's shape -> this API's (anything else unchanged)."""
        try:
            parsed = json.loads(body)
        except ValueError:
            return body
        if not isinstance(parsed, dict) or set(parsed) != {"error"} or not isinstance(parsed["error"], dict):
            return body
        return json.dumps(self.shape(status, str(parsed["error"].get("message", "")))).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.applies(scope):
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        chunks: list[bytes] = []

        async def reshaping_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400 and any(
                    k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in message["headers"]):
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = self.reshaped(held["status"], b"".join(chunks))
            headers = [(k, v) for k, v in held["headers"] if k.lower() != b"content-length"]
            await send({**held, "headers": headers + [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshaping_send)
