"""What the handlers share, hung off the app instance (`app.state.qwenstack`), never off a module."""
from __future__ import annotations

import asyncio
import codecs
from functools import lru_cache
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic_core import from_json

from qwenstack.serving.config import ServerConfig
from qwenstack.serving.errors import bad_request, validation_error
from qwenstack.serving.metrics import ServerMetrics
from qwenstack.serving.middleware import json_hazard
from qwenstack.serving.remote import RemoteRouter
from qwenstack.serving.served import ModelRegistry, ServedModel

M = TypeVar("M", bound=BaseModel)


@dataclass
class ServerState:
    config: ServerConfig
    registry: ModelRegistry
    metrics: ServerMetrics
    remote: RemoteRouter


def get_state(request: Request) -> ServerState:
    return request.app.state.qwenstack


T = TypeVar("T")


def app_registry(app: Any, name: str, factory: Callable[[], T]) -> T:
    """The app's object stored as app.state.<name>, made by factory() and stored on first use (the speech
    models' and translation pipelines' registries, which routes and loaders reach from the app alone)."""
    value = getattr(app.state, name, None)
    if value is None:
        value = factory()
        setattr(app.state, name, value)
    return value


LARGE_BODY = 1 << 20  # bytes; larger bodies are parsed and validated in a worker thread
CHUNK = 1024  # items of a long list validated per call


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object. Parsed by hand (not by FastAPI) so remote routes can forward it verbatim."""
    raw = await request.body()
    body = await asyncio.to_thread(_loads, raw) if len(raw) > LARGE_BODY else _loads(raw)
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _loads(raw: bytes) -> Any:
    """The parsed body. pydantic-core's parser (Rust) keeps what json.loads does that requests rely on (the last
    of repeated keys, NaN and Infinity, integers of any size) at about a tenth of json.loads's CPU time for
    a million numbers (~50 ms where json.loads with Python hooks took ~450 ms): it holds the GIL throughout,
    but briefly, and a worker thread parsing a large body leaves the other requests their pace."""
    if raw.startswith(codecs.BOM_UTF8):  # json.loads skipped a UTF-8 byte order mark; keep accepting it
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return from_json(raw)
    except ValueError as exc:
        if "recursion limit" in str(exc):  # nesting beyond 200 levels (the middleware refuses 128 in small bodies)
            raise bad_request("the request body is nested too deeply", code="invalid_json") from None
        hazard = json_hazard(raw)  # lone surrogates, bytes that are not UTF-8: the middleware's words
        raise bad_request(hazard or f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def parse(model: type[M], body: dict[str, Any]) -> M:
    long_lists = _prevalidated_lists(model, body)
    # The model sees a short stand-in of each long list (its constraints and validators still run), then
    # gets the whole list, already validated: no single call holds the GIL for the whole list.
    stand_ins = {name: items[:CHUNK] for name, items in long_lists.items()}
    try:
        parsed = model.model_validate({**body, **stand_ins})
    except ValidationError as exc:
        raise validation_error(exc.errors(), body) from None
    for name, items in long_lists.items():
        setattr(parsed, name, items)
    return parsed


def _prevalidated_lists(model: type[M], body: dict[str, Any]) -> dict[str, list[Any]]:
    """Long top-level lists (a million token ids, 300,000 messages) validated a chunk at a time, so the
    thread doing it hands the GIL back between chunks. Errors keep their index in the whole list."""
    out: dict[str, list[Any]] = {}
    for name, value in body.items():
        field = model.model_fields.get(name)
        if field is None or not isinstance(value, list) or len(value) <= CHUNK:
            continue
        adapter = _adapter(model, name)
        items: list[Any] = []
        for start in range(0, len(value), CHUNK):
            try:
                part = adapter.validate_python(value[start:start + CHUNK])
            except ValidationError as exc:
                errors = [dict(e, loc=_shift(e["loc"], start)) for e in exc.errors()]
                raise validation_error([dict(e, loc=(name, *e["loc"])) for e in errors]) from None
            if not isinstance(part, list):  # a union member other than a list took it: validate it whole
                break
            items += part
        else:
            out[name] = items
    return out


def _shift(loc: tuple[Any, ...], start: int) -> tuple[Any, ...]:
    return tuple(p + start if isinstance(p, int) and i == _first_int(loc) else p for i, p in enumerate(loc))


def _first_int(loc: tuple[Any, ...]) -> int:
    return next((i for i, p in enumerate(loc) if isinstance(p, int)), -1)


@lru_cache(maxsize=64)
def _adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    return TypeAdapter(model.model_fields[name].annotation, config=ConfigDict(strict=True))


async def parse_off_loop(model: type[M], body: dict[str, Any], request: Request) -> M:
    """`parse`, in a worker thread when the request's body was large."""
    length = request.headers.get("content-length", "")
    if not length.isdigit() or int(length) > LARGE_BODY:
        return await asyncio.to_thread(parse, model, body)
    return parse(model, body)


@dataclass
class LocalRequest(Generic[M]):
    """A request for a model served here: the server's state, the parsed body and the model."""

    state: ServerState
    body: M
    served: ServedModel


async def local_or_forwarded(request: Request, model: type[M], remote_path: str,
                             precheck: Callable[[dict[str, Any], ServedModel], None] | None = None,
                             generates: bool = True) -> LocalRequest[M] | Response:
    """The start every OpenAI-shaped generation route shares: read the JSON body, forward it verbatim when it
    names a remote model (the remote's answer is returned), else parse it and look the model up here.
    `precheck` sees the raw body and the model it names before parsing: refusals certain from the raw body
    (a prompt too long for the context) cost nothing there, where validating it item by item would.
    generates: the route generates text, which an embedding model refuses (400)."""
    state = get_state(request)
    raw = await read_json(request)
    named = raw.get("model")
    remote = state.remote.get(named)
    if remote is not None:
        return await state.remote.forward(remote, remote_path, raw)
    served = state.registry.models.get(named) if precheck is not None and isinstance(named, str) else None
    if served is not None:
        precheck(raw, served)  # type: ignore[misc]
    body = await parse_off_loop(model, raw, request)
    named_model = state.registry.get(body.model)  # type: ignore[attr-defined]
    if generates:
        named_model.check_generates()
    return LocalRequest(state, body, named_model)
