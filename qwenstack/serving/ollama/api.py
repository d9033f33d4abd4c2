"""Ollama's native routes: POST /api/chat, /api/generate, /api/embed, /api/embeddings, /api/show, GET /api/tags,
/api/version (GET /api/ps is introspect.py's, with Ollama's fields).

    install_ollama(app)   # create_app does this

Decisions:
- One model turn through the chat pipeline (translate.py -> serving/chat.py's plan_chat -> the engine -> the chat
  parser). Streamed (Ollama's default) the answer is NDJSON (`application/x-ndjson`): a line per engine step that
  brought text, thinking or tool calls (`done: false`), then a last line with done_reason and the counters.
  Unstreamed it is that last line holding the whole message; both come from one builder (Turn), so the streamed
  lines reassemble to the whole answer.
- /api/generate renders its prompt through the chat template as one user turn (after `system`), thinking parsed
  as in chat; `raw: true` sends the prompt as it is and returns the text as generated (`think` has no effect:
  nothing is parsed, as /v1/completions). An empty prompt (or /api/chat without messages) only "loads" the model,
  as Ollama answers it: `done_reason: "load"`, nothing generated.
- num_predict (or no limit) is capped at the room the prompt leaves, so a turn stops at the context's end with
  done_reason "length", as Ollama's do.
- A conversation longer than the context loses its oldest messages, as Ollama's chat does (clients such as Open
  WebUI send the whole history every turn): system messages and the last message are always kept, and the
  fewest older messages are dropped (a binary search over how many, each try rendered and counted). With
  `truncate: false`, or when even the kept ones do not fit, it is a 400. /api/generate's one turn is not cut.
- Bodies must be JSON (the server's rule against cross-site form posts): `curl -d` alone sends a form (415); a
  body with no Content-Type (LiteLLM's ollama providers) is read as JSON unless a browser sent it.
- `logprobs` (and `top_logprobs` alternatives) as Ollama 0.12.11 returns them: a list of {token, logprob,
  bytes, top_logprobs} on each line for the tokens that line brings (tokens of a step that showed no text yet
  ride on the next line), all of them on an unstreamed answer; every generated token counts, thinking included.
- Counters, in nanoseconds: total_duration from the request's arrival; load_duration until the engine had it
  (rendering the prompt: models are never loaded per request); prompt_eval_duration from scheduling to the first
  token; eval_duration from the first token to the last. prompt_eval_count is the whole prompt (cached tokens
  included), eval_count every generated token, thinking included. `context` is never returned.
- Errors on Ollama's paths are `{"error": "message"}` (middleware.ErrorShape rewrites whatever answered them),
  with the usual status codes: 400 bad input, 404 a model not served (Ollama's clients offer a pull on 404), 429
  queue full, 503 loading. After the 200 of a stream, a failure is a last `{"error": ...}` line. /api/pull,
  /api/push, /api/create, /api/copy and /api/delete answer 501: this server serves the models it started with.
- Models routed to a remote server (`--remote`) are not served here (a 400 naming /v1/chat/completions):
  the remote speaks OpenAI's API, not Ollama's.
- /api/version reports OLLAMA_VERSION, the Ollama release whose API shapes these routes follow (clients gate
  features such as `think` on it), and qwenstack's own version beside it.
- Guardrails (--guard-model) apply as on /v1/chat/completions (serving/moderation.py's guarded_turn and
  moderate_outputs): a blocked prompt never reaches the model and is answered with the refusal as the message
  (or response), a blocked answer ends there; both with done_reason "stop" (Ollama has no content filter). No
  `qwenstack_guard` annotation here.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from qwenstack import __version__
from qwenstack.engine.outputs import RequestOutput
from qwenstack.serving.chat import (
    ChatPlan, answer_turn, attach_media, cap_max_tokens, fewest_dropped, plan_chat, turn_deltas,
)
from qwenstack.serving.constraints import ThinkingPhase, build_processors
from qwenstack.serving.embeddings import EmbeddingRequest, embed
from qwenstack.serving.errors import APIError
from qwenstack.serving.infill import infill_ids, infill_stop_ids
from qwenstack.serving.introspect import model_status
from qwenstack.serving.logprobs import TokenTexts, chat_logprobs
from qwenstack.serving.metrics import RequestTracker
from qwenstack.serving.middleware import ErrorShape
from qwenstack.serving.ollama import models, translate
from qwenstack.serving.ollama.protocol import (
    OllamaChatRequest, OllamaChatResponse, OllamaEmbeddingsRequest, OllamaEmbeddingsResponse, OllamaEmbedRequest,
    OllamaEmbedResponse, OllamaErrorResponse, OllamaGenerateRequest, OllamaGenerateResponse, OllamaShowRequest,
    OllamaShowResponse, OllamaTagsResponse, OllamaVersion, _Generating,
)
from qwenstack.serving.openapi import error_model, request_body
from qwenstack.serving.parsers import ParsedDelta
from qwenstack.serving.protocol import ChatCompletionRequest, _Request
from qwenstack.serving.sampling import sampling_params
from qwenstack.serving.served import ServedModel
from qwenstack.serving.state import ServerState, get_state, parse_off_loop, read_json

OLLAMA_VERSION = "0.12.11"
NDJSON = "application/x-ndjson"
# Ollama's API paths: errors on them are answered in Ollama's shape.
PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show", "/api/tags", "/api/ps",
         "/api/version", "/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete")

router = APIRouter()
R = TypeVar("R", bound=_Request)


def install_ollama(app: FastAPI) -> None:
    app.include_router(router)
    app.add_middleware(ErrorShape, applies=lambda scope: is_ollama_path(scope.get("path", "")), shape=error_body)


def is_ollama_path(path: str) -> bool:
    return path in PATHS or path.startswith("/api/blobs/")


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": message}


def _error_line(error: APIError) -> str:
    return json.dumps(error_body(error.status, error.message)) + "\n"


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


# --- the model a request names ----------------------------------------------------------------------------


def served_model(state: ServerState, name: str, generates: bool = True) -> ServedModel:
    """The local model `name` (or `name:latest`) names: 404 in Ollama's words when none, 503 while it loads."""
    registry = state.registry
    base = name if name in registry.models else name.removesuffix(models.LATEST)
    if state.remote.get(name) is not None or state.remote.get(base) is not None:
        raise APIError(400, f"model '{name}' is routed to a remote OpenAI-compatible server: call it through "
                            "/v1/chat/completions, not Ollama's API", param="model")
    try:
        served = registry.get(base)
    except APIError as exc:
        if exc.status != 404:
            raise
        listed = ", ".join(models.ollama_name(n) for n in sorted(registry.models)) or "none loaded yet"
        raise APIError(404, f"model '{name}' not found (served here: {listed})", param="model",
                       code="model_not_found") from None
    if generates:
        served.check_generates()
    return served


async def _parsed(request: Request, model: type[R]) -> R:
    return await parse_off_loop(model, await read_json(request), request)


G = TypeVar("G", bound=_Generating)


async def _generating(request: Request, model: type[G]) -> tuple[float, ServerState, G, ServedModel]:
    """(arrival, state, body, model) of a generating request."""
    arrival = time.monotonic()
    state = get_state(request)
    body = await _parsed(request, model)
    return arrival, state, body, served_model(state, body.model)


# --- one turn -------------------------------------------------------------------------------------------


class Verbatim:
    """The parser of a raw /api/generate: the text as generated."""

    def feed_output(self, text: str, finished: bool) -> ParsedDelta:
        return ParsedDelta(content=text)


@dataclass
class Turn:
    """One answer's lines: `chat` answers carry a `message`, generate's a `response`."""

    plan: ChatPlan
    model: str  # as the request named it (Ollama echoes it)
    arrival: float
    chat: bool
    content: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # every token's, when the request asked
    final: dict[str, Any] | None = None

    def _line(self, content: str, thinking: str, calls: list[dict[str, Any]], done: bool) -> dict[str, Any]:
        line: dict[str, Any] = {"model": self.model, "created_at": models.timestamp()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            line["message"] = message
        else:
            line["response"] = content
            if thinking:
                line["thinking"] = thinking
        line["done"] = done
        return line

    async def lines(self, outputs: AsyncIterator[RequestOutput], tracker: RequestTracker,
                    parser: Any) -> AsyncIterator[dict]:
        """The answer's lines; the whole answer (body()) is complete once they are."""
        last = None
        texts = TokenTexts(self.plan.served.tokenizer) if self.plan.request.logprobs else None
        unsent = 0  # logprobs not yet on a line
        async for out, parsed in turn_deltas(self.plan, outputs, tracker, parser):
            calls = translate.tool_calls(parsed.tool_calls) if parsed.tool_calls else []
            self.content.append(parsed.content)
            self.thinking.append(parsed.reasoning)
            self.calls += calls
            comp = out.outputs[0]
            if texts is not None and comp.delta_logprobs:
                self.logprobs += chat_logprobs(texts, comp.delta_token_ids, comp.delta_logprobs,
                                               self.plan.request.top_logprobs or 0)
            if parsed.content or parsed.reasoning or calls:
                line = self._line(parsed.content, parsed.reasoning, calls, False)
                if texts is not None:
                    line["logprobs"], unsent = self.logprobs[unsent:], len(self.logprobs)
                yield line
            if out.finished:
                last = out
        assert last is not None
        self.final = {**self._line("", "", [], True), **self.counters(last)}
        if texts is not None:
            self.final["logprobs"] = self.logprobs[unsent:]
        yield self.final

    def counters(self, last: Any) -> dict[str, Any]:
        comp, m, now = last.outputs[0], last.metrics, time.monotonic()
        first_token = m.first_token_time or now
        return {"done_reason": translate.done_reason(comp.finish_reason),
                "total_duration": _ns(now - self.arrival), "load_duration": _ns(m.arrival_time - self.arrival),
                "prompt_eval_count": len(self.plan.prompt_ids),
                "prompt_eval_duration": _ns(first_token - (m.first_scheduled_time or m.arrival_time)),
                "eval_count": len(comp.token_ids), "eval_duration": _ns((m.last_token_time or now) - first_token)}

    def body(self) -> dict[str, Any]:
        assert self.final is not None
        whole = self._line("".join(self.content), "".join(self.thinking), self.calls, True)
        answer = {**self.final, **{k: whole[k] for k in ("message", "response", "thinking") if k in whole}}
        if "logprobs" in answer:
            answer["logprobs"] = self.logprobs
        return answer


async def _ndjson(lines: AsyncIterator[dict]) -> AsyncIterator[str]:
    async for line in lines:
        yield json.dumps(line, ensure_ascii=False) + "\n"


async def _answer(request: Request, state: ServerState, turn: Turn, stream: bool, parser: Any) -> Response:
    cap_max_tokens(turn.plan)  # Ollama stops at the context's end ("length") whatever num_predict asked
    return await answer_turn(request, state, turn.plan, turn.arrival, turn.plan.request_id, stream,
                             lambda outputs, tracker: turn.lines(outputs, tracker, parser), _ndjson, turn.body,
                             _error_line, media_type=NDJSON)


def _loaded(body: _Generating, chat: bool) -> JSONResponse:
    """Ollama's answer to a request with nothing to generate: the model is (here: already) loaded, or with a
    keep_alive of zero (`ollama stop`) unloaded; models stay loaded here, but the reason is Ollama's."""
    line: dict[str, Any] = {"model": body.model, "created_at": models.timestamp()}
    line.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    return JSONResponse({**line, "done": True, "done_reason": "unload" if _is_zero(body.keep_alive) else "load"})


def _is_zero(keep_alive: str | float | None) -> bool:
    """A keep_alive of zero: a number (seconds) or a Go duration ("0", "0s", "0m")."""
    if isinstance(keep_alive, (int, float)):
        return keep_alive == 0
    return keep_alive is not None and re.fullmatch(r"\s*0*\.?0+\s*(ns|us|µs|ms|s|m|h)?\s*", keep_alive) is not None


def plan_raw(served: ServedModel, request: ChatCompletionRequest, prompt: str, suffix: str = "") -> ChatPlan:
    """A raw /api/generate: the prompt's tokens as they are (with a suffix, the fill-in-the-middle prompt of
    infill.py, as Ollama's Coder templates render it, system left out), chat's sampling and `format` grammar (no
    thinking phase: nothing was rendered). Blocking: run it in a thread."""
    ids = infill_ids(served, prompt, suffix) if suffix else served.encode_prompt(prompt, "prompt")
    processors = build_processors(served.tokenizer, request, ThinkingPhase.ANSWER, None)
    params = sampling_params(request, served, max_tokens=request.max_new_tokens, logprobs=request.sampled_logprobs,
                             processors=processors)
    if suffix:
        params.stop_token_ids += infill_stop_ids(served.tokenizer)
    return ChatPlan(f"gen-{uuid.uuid4().hex}", int(time.time()), served, request, prompt, ids, params,
                    ThinkingPhase.ANSWER, False, None)


def plan_in_context(served: ServedModel, body: OllamaChatRequest, state: ServerState) -> ChatPlan:
    """plan_chat for the conversation, or for its most recent part that fits the context (see the module notes).
    Blocking: run it in a thread."""
    droppable = [i for i, m in enumerate(body.messages[:-1]) if m.role != "system"]

    def dropping(count: int) -> ChatPlan:
        """The plan without the `count` oldest droppable messages (a 400 when it does not fit)."""
        gone = set(droppable[:count])
        kept = [m for i, m in enumerate(body.messages) if i not in gone]
        return plan_chat(served, translate.chat_request(body.model_copy(update={"messages": kept})), state)

    return fewest_dropped(dropping, len(droppable) if body.truncate else 0)


def ndjson_responses(model: type[Any]) -> dict[int | str, dict[str, Any]]:
    """The 200 of a route that answers NDJSON lines unless the request says `stream: false`."""
    return {200: {"model": model, "description": "NDJSON lines (application/x-ndjson), the last one with done: true; "
                                                 "one JSON object with stream: false",
                  "content": {NDJSON: {"schema": {"type": "string"}}}}}


# --- routes ---------------------------------------------------------------------------------------------


@router.post("/api/chat", responses=ndjson_responses(OllamaChatResponse))
@request_body(OllamaChatRequest)
@error_model(OllamaErrorResponse)
async def chat(request: Request) -> Response:
    arrival, state, body, served = await _generating(request, OllamaChatRequest)
    if not body.messages:
        return _loaded(body, chat=True)
    plan = await asyncio.to_thread(plan_in_context, served, body, state)
    await attach_media(plan, state)
    return await _answer(request, state, Turn(plan, body.model, arrival, chat=True), body.stream, plan.parser())


@router.post("/api/generate", responses=ndjson_responses(OllamaGenerateResponse))
@request_body(OllamaGenerateRequest)
@error_model(OllamaErrorResponse)
async def generate(request: Request) -> Response:
    arrival, state, body, served = await _generating(request, OllamaGenerateRequest)
    if not body.prompt:
        return _loaded(body, chat=False)
    chat_request = translate.generate_request(body)
    if body.raw or body.suffix:
        plan = await asyncio.to_thread(plan_raw, served, chat_request, body.prompt, body.suffix)
        parser: Any = Verbatim()
    else:
        plan = await asyncio.to_thread(plan_chat, served, chat_request, state)
        await attach_media(plan, state)
        parser = plan.parser()
    return await _answer(request, state, Turn(plan, body.model, arrival, chat=False), body.stream, parser)


async def _vectors(state: ServerState, model: str, texts: list[str], truncate: bool,
                   dimensions: int | None = None) -> tuple[list[list[float]], int]:
    """Each text's embedding, as /v1/embeddings computes it."""
    served = served_model(state, model, generates=False)
    if not texts:
        return [], 0
    body = EmbeddingRequest(model=served.name, input=texts, dimensions=dimensions)
    vectors, tokens = await embed(served, body, truncate)
    return await asyncio.to_thread(vectors.tolist), tokens


@router.post("/api/embed", responses={200: {"model": OllamaEmbedResponse}})
@request_body(OllamaEmbedRequest)
@error_model(OllamaErrorResponse)
async def embed_inputs(request: Request) -> Response:
    arrival = time.monotonic()
    state = get_state(request)
    body = await _parsed(request, OllamaEmbedRequest)
    texts = body.input if isinstance(body.input, list) else [body.input] if body.input else []
    vectors, tokens = await _vectors(state, body.model, texts, body.truncate, body.dimensions)
    return JSONResponse({"model": body.model, "embeddings": vectors, "total_duration": _ns(time.monotonic() - arrival),
                         "load_duration": 0, "prompt_eval_count": tokens})


@router.post("/api/embeddings", responses={200: {"model": OllamaEmbeddingsResponse}})
@request_body(OllamaEmbeddingsRequest)
@error_model(OllamaErrorResponse)
async def embed_prompt(request: Request) -> Response:
    body = await _parsed(request, OllamaEmbeddingsRequest)
    vectors, _ = await _vectors(get_state(request), body.model, [body.prompt] if body.prompt else [], True)
    return JSONResponse({"embedding": vectors[0] if vectors else []})


@router.get("/api/tags", responses={200: {"model": OllamaTagsResponse}})
@error_model(OllamaErrorResponse)
def tags(request: Request) -> Response:
    registry = get_state(request).registry
    return JSONResponse({"models": [models.listed(m, model_status(m)) for m in list(registry.models.values())]})


@router.post("/api/show", responses={200: {"model": OllamaShowResponse}})
@request_body(OllamaShowRequest)
@error_model(OllamaErrorResponse)
async def show(request: Request) -> Response:
    body = await _parsed(request, OllamaShowRequest)
    name = body.model or body.name
    if not name:
        raise APIError(400, "model is required", param="model")
    served = served_model(get_state(request), name, generates=False)
    return JSONResponse(models.shown(served, model_status(served)))


@router.get("/api/version", responses={200: {"model": OllamaVersion}})
@error_model(OllamaErrorResponse)
def version() -> Response:
    return JSONResponse({"version": OLLAMA_VERSION, "qwenstack": __version__})


async def _managing(request: Request) -> Response:
    """Ollama's model management: not offered (models are named when the server starts)."""
    raise APIError(501, f"{request.url.path} is not offered: qwenstack serves the models it was started with "
                        "(`qwenstack pull MODEL`, then `qwenstack serve MODEL`)")


for _path, _methods in (("/api/pull", ["POST"]), ("/api/push", ["POST"]), ("/api/create", ["POST"]),
                        ("/api/copy", ["POST"]), ("/api/delete", ["DELETE"]),
                        ("/api/blobs/{digest}", ["HEAD", "POST"])):
    router.add_api_route(_path, _managing, methods=_methods, include_in_schema=False)
