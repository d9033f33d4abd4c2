"""POST /v1/moderations: Qwen3Guard's verdicts in OpenAI's moderation shape.

Decisions:
- /v1/moderations answers in OpenAI's shape: per input `flagged` (the policy's action is not allow),
  `categories` and `category_scores` keyed by OpenAI's 13 category names (the SDK's types require them, and
  clients read `categories.violence`) and by Qwen3Guard's published names; plus `safety`, `category_names`,
  `refusal`, `action`, `direction`. A Gen guard gives no probabilities, so a score is 1.0 for a named category
  and 0.0 otherwise; a Stream guard's score is its probability.
- OpenAI's categories from Qwen3Guard's: violence <- Violent, illicit <- Non-violent Illegal Acts, sexual <-
  Sexual Content or Sexual Acts, self-harm <- Suicide & Self-Harm, harassment and hate <- Unethical Acts (whose
  definition covers hate speech, harassment, insults and threats). Qwen3Guard has no finer categories, so
  OpenAI's subcategories (violence/graphic, sexual/minors, ...) stay false, and PII, political topics, copyright
  and jailbreak exist only under their Qwen3Guard names.
- A string (or a list of strings) is moderated as a user prompt; a conversation (`messages`, or `input` as
  a list of chat messages) is judged in the direction of its last turn (assistant: response moderation).
- `model` may be left out, name the guard (its name or its directory's), or be one of OpenAI's moderation
  models (omni-moderation-latest, ...: clients send those by default); any other name is a 404 naming the guard.
- `category_applied_input_types` says, per category, which input kinds it was flagged for: ["text"] or [].
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from qwenstack.guard.verdict import CATEGORIES, Decision, Direction, Safety
from qwenstack.serving.errors import APIError, bad_request
from qwenstack.serving.moderation import guardrails_of
from qwenstack.serving.openapi import request_body
from qwenstack.serving.state import parse, read_json

log = logging.getLogger("qwenstack.server")

MAX_INPUTS = 64  # inputs per /v1/moderations request

router = APIRouter()


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: str | list[Any] | None = None
    messages: list[dict[str, Any]] | None = None
    model: str | None = None


def _conversation_direction(messages: list[dict[str, Any]], param: str) -> Direction:
    for i, m in enumerate(messages):
        if not isinstance(m.get("content"), str):
            raise bad_request(f"{param}[{i}]: a message to moderate needs its content as text", param=param)
    roles = [m.get("role") for m in messages if m.get("role") in ("user", "assistant")]
    if not roles:
        raise bad_request("a conversation to moderate needs a user or assistant message", param=param)
    return Direction.ANSWER if roles[-1] == "assistant" else Direction.PROMPT


def check_model(model: str | None, guard: str) -> None:
    """404 for a model that is neither the guard nor one of OpenAI's moderation models (see the notes)."""
    if model is None or model in (guard, guard.rstrip("/").rsplit("/", 1)[-1]) or "moderation" in model:
        return
    raise APIError(404, f"the model '{model}' does not moderate here: this server's moderation model is '{guard}'",
                   param="model", code="model_not_found")


def moderation_items(body: ModerationRequest) -> list[tuple[list[dict[str, Any]], Direction]]:
    """(conversation, direction) per result, from the request's input or messages."""
    if body.messages is not None:
        if not all(isinstance(m, dict) for m in body.messages):
            raise bad_request("messages must be a list of chat messages", param="messages")
        return [(body.messages, _conversation_direction(body.messages, "messages"))]
    value = body.input
    if value is None:
        raise bad_request("give `input` (a string or a list of strings) or `messages`", param="input")
    if isinstance(value, str):
        return [([{"role": "user", "content": value}], Direction.PROMPT)]
    if not value:
        raise bad_request("input is an empty list", param="input")
    if all(isinstance(v, str) for v in value):
        if len(value) > MAX_INPUTS:
            raise bad_request(f"at most {MAX_INPUTS} inputs per request, got {len(value)}", param="input")
        return [([{"role": "user", "content": v}], Direction.PROMPT) for v in value]
    if all(isinstance(v, dict) and "role" in v for v in value):  # a chat conversation
        return [(value, _conversation_direction(value, "input"))]
    if all(isinstance(v, dict) and "type" in v for v in value):  # OpenAI's multimodal input: one input
        if any(v.get("type") != "text" for v in value):
            raise bad_request("only text inputs can be moderated here", param="input", code="unsupported_content")
        if not all(isinstance(v.get("text"), str) for v in value):
            raise bad_request("a text input part needs its text as a string", param="input")
        text = "\n".join(v["text"] for v in value)
        return [([{"role": "user", "content": text}], Direction.PROMPT)]
    raise bad_request("input must be a string, a list of strings, a list of {type: text} parts or a list of chat "
                      "messages", param="input")


# OpenAI's moderation categories, each with the Qwen3Guard categories it is flagged by (see the notes).
OPENAI_CATEGORIES: dict[str, tuple[str, ...]] = {
    "harassment": ("Unethical Acts",), "harassment/threatening": (), "hate": ("Unethical Acts",),
    "hate/threatening": (), "illicit": ("Non-violent Illegal Acts",), "illicit/violent": (),
    "self-harm": ("Suicide & Self-Harm",), "self-harm/intent": (), "self-harm/instructions": (),
    "sexual": ("Sexual Content or Sexual Acts",), "sexual/minors": (), "violence": ("Violent",),
    "violence/graphic": (),
}


def moderation_result(decision: Decision) -> dict[str, Any]:
    verdict = decision.verdict
    named = set(verdict.categories) if verdict.safety is not Safety.SAFE else set()
    named |= {openai for openai, ours in OPENAI_CATEGORIES.items() if named & set(ours)}
    score = verdict.score if verdict.score is not None else 1.0
    names = list(OPENAI_CATEGORIES) + list(CATEGORIES) + [c for c in verdict.categories if c not in CATEGORIES]
    return {
        "flagged": decision.flagged,
        "categories": {c: c in named for c in names},
        "category_scores": {c: (score if c in named else 0.0) for c in names},
        "category_applied_input_types": {c: ["text"] if c in named else [] for c in names},
        "safety": verdict.safety.value,
        "category_names": list(verdict.categories),
        "refusal": None if verdict.refusal is None else verdict.refusal.value,
        "action": decision.action.value,
        "direction": decision.direction.value,
    }


@router.post("/v1/moderations")
@request_body(ModerationRequest)
async def create_moderation(request: Request) -> dict[str, Any]:
    rails = guardrails_of(request)
    if rails is None:
        raise APIError(404, "this server has no guard model (start it with --guard GUARD_MODEL)",
                       code="guard_not_configured")
    body = parse(ModerationRequest, await read_json(request))
    check_model(body.model, rails.name)
    items = moderation_items(body)
    start = time.monotonic()
    decisions = await asyncio.gather(*(rails.check(messages, direction) for messages, direction in items))
    log.debug("moderated %d input(s) in %.3f s", len(items), time.monotonic() - start)
    return {"id": f"modr-{uuid.uuid4().hex}", "model": rails.name,
            "results": [moderation_result(d) for d in decisions]}
