"""The OpenAPI document of the server, made to describe what the server really does, so schema-driven tools
(schemathesis, client generators) can test and call it.

Decisions:
- Handlers that read their JSON body by hand (to forward it verbatim to a remote, or to word their own
  errors) name their model with `@request_body(Model)`; the document then declares it as FastAPI would.
- Errors are documented as answered: OpenAI's shape (`ErrorResponse`; a route marked `@error_model(Model)`
  answers another, as /v1/messages answers Anthropic's), 400 for any invalid request (never
  FastAPI's 422), 413/415 for bodies, 401 only when an API key is set, 404/429/503 where a model is looked up.
  A route added later gets the same documentation by the same rules (its path decides, see `_error_codes`).
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel

from qwenstack.serving.routes import route_contexts

F = TypeVar("F", bound=Callable[..., Any])

ATTRIBUTE = "__qwenstack_request_model__"
ERROR_ATTRIBUTE = "__qwenstack_error_model__"
# Requests that name a model: 404, 429, 503 possible (Ollama's /api/embed covers /api/embeddings too).
MODEL_PATHS = ("/v1/", "/tokenize", "/detokenize", "/completion", "/infill", "/props", "/api/chat", "/api/generate",
               "/api/embed", "/api/show")
API_PATHS = ("/v1/", "/api/", "/tokenize", "/detokenize", "/completion", "/infill", "/props")  # answer API errors
ERROR_TEXT = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model, route or object",
              413: "Request body too large", 415: "The request body is not JSON (or a form the route accepts)",
              429: "Queue full: retry after the Retry-After header's seconds",
              500: "Internal error (a bug: please report it)", 501: "Not supported by this server",
              502: "The remote model's server failed", 503: "Model still loading: retry after Retry-After"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, as OpenAI answers them."""

    error: ErrorDetail


def _marker(attribute: str, model: type[BaseModel]) -> Callable[[F], F]:
    def mark(endpoint: F) -> F:
        setattr(endpoint, attribute, model)
        return endpoint

    return mark


def request_body(model: type[BaseModel]) -> Callable[[F], F]:
    """Documents `model` as the JSON body of a handler that parses its body itself."""
    return _marker(ATTRIBUTE, model)


def error_model(model: type[BaseModel]) -> Callable[[F], F]:
    """Documents `model` as the error body of a handler that answers errors in another shape than OpenAI's."""
    return _marker(ERROR_ATTRIBUTE, model)


def form_body(fields: dict[str, str], required: tuple[str, ...] = (), files: tuple[str, ...] = ("file",)
              ) -> dict[str, Any]:
    """`openapi_extra` of a route that reads a multipart form by hand: declares the form (field -> description;
    `files` are uploads), which also tells the body rules (middleware.py) that this route takes forms."""
    properties = {name: {"type": "string", "description": text} | ({"format": "binary"} if name in files else {})
                  for name, text in fields.items()}
    schema = {"type": "object", "properties": properties, "required": list(required)}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


# One server-sent event, as a client parses the stream (the schema of text/event-stream content is each event's).
SSE_EVENT = {"type": "object", "required": ["data"], "description": "one server-sent event; data holds its JSON",
             "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"},
                            "retry": {"type": "integer"}}}


def chat_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The 200 of a route that answers JSON, or server-sent events when the request says `stream`."""
    return {200: {"model": model, "description": "The answer as JSON, or as server-sent events with stream=true",
                  "content": {"text/event-stream": {"schema": SSE_EVENT}}}}


def _error_codes(path: str, method: str, has_body: bool, api_key: bool) -> list[int]:
    if not path.startswith(API_PATHS):
        return [500]
    codes = [400, 404, 500]
    if has_body:
        codes += [413, 415]
    if path.startswith(MODEL_PATHS):
        codes += [429, 503]
    if path.startswith(("/v1/chat/", "/v1/completions", "/v1/messages")):
        codes += [501, 502]  # unsupported content kinds; remote routes
    if api_key:
        codes.append(401)
    return sorted(codes)


def build_openapi(app: FastAPI, api_key: bool) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    _add_schema(schemas, ErrorResponse)
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for route in route_contexts(app.routes):
        if not isinstance(getattr(route, "original_route", route), APIRoute) or not route.include_in_schema:
            continue
        model = getattr(route.endpoint, ATTRIBUTE, None)
        errors = getattr(route.endpoint, ERROR_ATTRIBUTE, ErrorResponse)
        _add_schema(schemas, errors)
        route_error_ref = {"$ref": f"#/components/schemas/{errors.__name__}"}
        for method in route.methods or ():
            op = doc["paths"].get(route.path_format, {}).get(method.lower())
            if op is None:
                continue
            if model is not None:
                _add_schema(schemas, model)
                op["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for code in _error_codes(route.path_format, method, "requestBody" in op, api_key):
                responses.setdefault(str(code), {"description": ERROR_TEXT.get(code, "Error"),
                                                 "content": {"application/json": {"schema": route_error_ref}}})
    if "/health" in doc["paths"]:
        doc["paths"]["/health"]["get"]["responses"]["503"] = {
            "description": "Loading, or a model failed to load",
            "content": {"application/json": {"schema": error_ref}}}
    return doc


def _add_schema(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas.setdefault(model.__name__, schema)


def install_openapi(app: FastAPI, api_key: bool) -> None:
    cached: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "doc" not in cached:
            cached["doc"] = build_openapi(app, api_key)
        return cached["doc"]

    app.openapi = openapi  # type: ignore[method-assign]
