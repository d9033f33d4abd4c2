"""Every failure answered in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the
status the official SDK maps to the right exception: 400 bad input, 401 key, 404 unknown model, 429 queue
full (with Retry-After, which the SDK honours), 503 loading, 500 for our own bugs (which the SDK retries,
so never for bad input)."""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwenstack.chat_template import ChatTemplateError
from qwenstack.engine.scheduler import QueueFullError
from qwenstack.errors import ConfigError, EngineUnavailableError, QwenstackError, RequestError

log = logging.getLogger("qwenstack.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_supported_error",
    502: "upstream_error",
    503: "unavailable_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


SCALAR_TAGS = ("str", "int", "float", "bool", "list", "dict")  # pydantic's names of a union's plain branches


def _branches_taken(errors: list[Any]) -> list[Any]:
    """pydantic reports a failed union once per branch. Where the input went deeper into one branch (content
    given as a list of parts, one part wrong: the AI SDK sends PDFs as "file" parts), the scalar branches'
    errors ("Input should be a valid string") only hide the real problem, so they are dropped."""
    # The fields through which some error went into a branch of objects: one pass, as a body can carry many
    # thousands of errors (pairing them would be quadratic).
    entered = {loc[:i] for loc in (tuple(e.get("loc", ())) for e in errors)
               for i in range(len(loc) - 1) if _structured(loc[i])}

    def not_taken(error: Any) -> bool:
        loc = tuple(error.get("loc", ()))
        return bool(loc) and loc[-1] in SCALAR_TAGS and loc[:-1] in entered

    return [e for e in errors if not not_taken(e)] or errors


def _structured(branch: Any) -> bool:
    """A union branch of objects (parts, items: "list[tagged-union[...]]", "list[ChatMessage]"), which an input
    that went into it took; not one of plain values ("list[int]"), where the field as a whole is the problem
    (a prompt of token ids with a string among them fits no branch)."""
    return isinstance(branch, str) and ("union" in branch or any(c.isupper() for c in branch))


def _message(error: dict[str, Any]) -> str:
    if error.get("type") == "union_tag_invalid":  # an unknown `type` of a part or item
        ctx = error.get("ctx") or {}
        return f"type '{ctx.get('tag')}' is not supported here (supported: {ctx.get('expected_tags')})"
    return error.get("msg", "invalid request")


def _field_path(loc: Any, body: Any = None) -> list[str]:
    """pydantic's error location as the request's own path: FastAPI's prefix ("body"), union branches ("str",
    "list[int]", "function-after") and the tag a tagged union adds after a list index ("text" in
    messages.0.content.1.text.text) dropped; with the request `body`, so is a discriminated union's tag (the
    item's "type": "function" in tools.0.function.parameters of a Responses tool, which has no such field)."""
    path: list[str] = []
    union = tag_next = False
    node, tag_dropped = body, False  # the body's part at the path so far; whether its tag was dropped
    for p in loc:
        if tag_next:
            tag_next = False
            if isinstance(p, str):
                tag_dropped = True
                continue
        tag_next, union = union and isinstance(p, int), "tagged-union" in str(p)
        if p in ("body", "query", "path") or any(c in str(p) for c in "[]-") or p in SCALAR_TAGS:
            continue
        if not tag_dropped and isinstance(node, dict) and isinstance(p, str) and p not in node \
                and node.get("type") == p:
            tag_dropped = True
            continue
        path.append(str(p))
        tag_dropped = False
        node = node.get(p) if isinstance(node, dict) else \
            node[p] if isinstance(node, list) and isinstance(p, int) and -len(node) <= p < len(node) else None
    return path


def validation_error(errors: list[Any], body: Any = None) -> APIError:
    """pydantic's error list -> one readable 400 naming the field (FastAPI would answer 422); `body`, the request
    as sent, tells a field from a union's tag."""
    errors = _branches_taken(errors)
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return bad_request("the request body is not valid JSON", code="invalid_json")
    param = ".".join(_field_path(first.get("loc", ()), body)) or None
    message = _message(first)
    if param and not message.startswith(param):  # a validator's own message may already name it (input[0]...)
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return bad_request(message, param=param, code=first.get("type"))


def queue_full(retry_after_s: int, detail: str) -> APIError:
    return APIError(429, f"the server is busy: {detail}; retry shortly", code="queue_full",
                    headers={"Retry-After": str(retry_after_s)})


def from_exception(exc: BaseException, retry_after_s: int = 1) -> APIError:
    """Our exceptions -> API errors; anything unexpected is a 500 (and is logged with its traceback)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (RequestError, ChatTemplateError, ConfigError)):  # ConfigError: e.g. no chat template
        return bad_request(str(exc))
    if isinstance(exc, QueueFullError):
        return queue_full(retry_after_s, str(exc))
    if isinstance(exc, EngineUnavailableError):  # a dead tensor-parallel worker: the model cannot serve
        return APIError(503, str(exc), code="engine_unavailable")
    if isinstance(exc, RecursionError):  # a parser or validator met input nested past any real request
        return bad_request("the request is nested too deeply to process", code="nested_too_deeply")
    log.error("request failed", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


def error_frame(error: APIError) -> str:
    """A failure after the stream started: the SDK raises APIError on any frame with an `error` key."""
    return f"data: {json.dumps(error.body())}\n\n"


def install_handlers(app: FastAPI, retry_after_s: int) -> None:
    # Known errors are answered here, inside the app; true bugs reach middleware.UnexpectedErrorMiddleware,
    # which answers 500 on the same connection.
    async def _known(request: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc, retry_after_s).response()

    for known in (APIError, QwenstackError, ChatTemplateError, QueueFullError, RecursionError):
        app.add_exception_handler(known, _known)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors()), exc.body).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        if exc.status_code == 405:  # Starlette names only the first route of the path; name them all
            from qwenstack.serving.routes import allowed_methods

            headers["Allow"] = ", ".join(allowed_methods(request.app.routes, request.scope))
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {headers['Allow']})"
        return APIError(exc.status_code, message, headers=headers).response()
