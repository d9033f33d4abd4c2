"""What the handlers share, hung off the app instance (`app.state.qwenstack`), never off a module."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from qwenstack.serving.config import ServerConfig
from qwenstack.serving.errors import bad_request, validation_error
from qwenstack.serving.metrics import ServerMetrics
from qwenstack.serving.remote import RemoteRouter
from qwenstack.serving.served import ModelRegistry

M = TypeVar("M", bound=BaseModel)


@dataclass
class ServerState:
    config: ServerConfig
    registry: ModelRegistry
    metrics: ServerMetrics
    remote: RemoteRouter


def get_state(request: Request) -> ServerState:
    return request.app.state.qwenstack


LARGE_BODY = 1 << 20  # bytes; larger bodies are parsed and validated in a worker thread


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object. Parsed by hand (not by FastAPI) so remote routes can forward it verbatim."""
    raw = await request.body()
    body = await asyncio.to_thread(_loads, raw) if len(raw) > LARGE_BODY else _loads(raw)
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the request body is not valid JSON", code="invalid_json") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply", code="invalid_json") from None


def parse(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


async def parse_off_loop(model: type[M], body: dict[str, Any], request: Request) -> M:
    """`parse`, in a worker thread when the request's body was large."""
    length = request.headers.get("content-length", "")
    if not length.isdigit() or int(length) > LARGE_BODY:
        return await asyncio.to_thread(parse, model, body)
    return parse(model, body)
