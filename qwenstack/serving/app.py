"""The OpenAI-compatible HTTP server: `create_app` builds the FastAPI app, `run_server` runs it with uvicorn.

    app = create_app([served_model], ServerConfig(api_key="..."))      # models already loaded (tests)
    run_server(ServerConfig(models=[ModelSpec("Qwen/Qwen3-0.6B")]))    # models loaded after the port opens

Decisions:
- Everything a request needs hangs off the app (`app.state.qwenstack`): two apps in one process share
  nothing, which is how the tests run an upstream and a proxy side by side.
- The API key guards the API and the chat store; /health, /metrics, /version and the chat page's static
  files stay open so probes, scrapers and the page itself load without a key.
- The chat page (ui/, store_api.py) is mounted when present; the API does not depend on it.
"""
from __future__ import annotations

import errno
import hmac
import logging
import os
import socket
import sys
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from qwenstack import __version__
from qwenstack.serving import (
    chat, completions, embeddings, introspect, llamacpp, moderations, realtime, speech, transcriptions, translations,
)
from qwenstack.serving import classify, rerank
from qwenstack.serving.chat import conversation_ids
from qwenstack.serving.config import ModelSpec, ServerConfig
from qwenstack.serving.errors import APIError, install_handlers
from qwenstack.serving.image_api import install_image_api
from qwenstack.serving.messages.api import anthropic_model, anthropic_model_list, install_messages, is_anthropic_client
from qwenstack.serving.metrics import ServerMetrics
from qwenstack.serving.middleware import LOCAL_ORIGINS, BodyRulesMiddleware, HeadAsGet, UnexpectedErrorMiddleware
from qwenstack.serving.moderation import guard_card, install_guardrails
from qwenstack.serving.ollama.api import install_ollama, is_ollama_path
from qwenstack.serving.openapi import install_openapi
from qwenstack.serving.protocol import (
    DetokenizeRequest, DetokenizeResponse, HealthResponse, ModelCard, ModelList,
    TokenizeRequest, TokenizeResponse, VersionResponse,
)
from qwenstack.serving.remote import RemoteRouter
from qwenstack.serving.responses.api import install_responses
from qwenstack.serving.served import Loader, ModelRegistry, ServedModel, load_served_model
from qwenstack.serving.state import ServerState, get_state

log = logging.getLogger("qwenstack.server")

OPEN_PATHS = {"/", "/health", "/metrics", "/version", "/favicon.ico"}
OPEN_PREFIXES = ("/ui/",)


class APIKeyMiddleware:
    """Bearer-token check in OpenAI's error shape (a pure ASGI middleware: streaming passes untouched). The key
    may also come as `x-api-key`, as Anthropic's clients send it."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or path in OPEN_PATHS \
                or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given, key = headers.get("authorization", "").encode(), headers.get("x-api-key", "").encode()
        if not (hmac.compare_digest(given, self.expected) or hmac.compare_digest(key, self.key)):
            error = APIError(401, "invalid or missing API key (send Authorization: Bearer <key>, or x-api-key: <key>)",
                             code="invalid_api_key")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _info_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health", responses={200: {"model": HealthResponse}})
    def health(request: Request) -> Response:
        registry = get_state(request).registry
        if registry.failed:
            return APIError(503, registry.failed, code="load_failed").response()
        if not registry.ready:
            return APIError(503, f"loading model(s): {', '.join(registry.loading)}", code="loading",
                            headers={"Retry-After": str(registry.retry_after_s)}).response()
        return JSONResponse({"status": "ok"})

    @router.get("/version")
    def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    @router.get("/metrics", response_class=PlainTextResponse)
    def metrics(request: Request) -> Response:
        return Response(get_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get("/v1/models", responses={200: {"model": ModelList}})
    def models(request: Request) -> Any:
        cards = model_cards(request.app)  # an Anthropic client (it sends anthropic-version) gets its API's shape
        return anthropic_model_list(cards) if is_anthropic_client(request.headers) else ModelList(data=cards)

    @router.get("/v1/models/{model_id:path}", responses={200: {"model": ModelCard}})
    def get_model(request: Request, model_id: str) -> Any:
        cards = {card.id: card for card in model_cards(request.app)}
        if model_id not in cards:
            get_state(request).registry.get(model_id)  # 503 while loading, else 404 naming what is served
        card = cards[model_id]
        return anthropic_model(card) if is_anthropic_client(request.headers) else card

    @router.post("/tokenize")
    def tokenize(request: Request, body: TokenizeRequest) -> TokenizeResponse:
        state = get_state(request)
        served = state.registry.resolve(body.model)
        if body.messages is not None:  # exactly the tokens a chat request with these messages would get
            ids = conversation_ids(served, body.messages, state, body.chat_template_kwargs,
                                   body.add_generation_prompt)
        else:
            ids = served.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=served.max_model_len, tokens=ids)

    @router.post("/detokenize")
    def detokenize(request: Request, body: DetokenizeRequest) -> DetokenizeResponse:
        served = get_state(request).registry.resolve(body.model)
        served.check_token_ids(body.tokens, "tokens")
        text = served.tokenizer.decode(body.tokens)
        return DetokenizeResponse(prompt=text, content=text)

    return router


def _mount_ui(app: FastAPI, config: ServerConfig, body_limits: dict[str, int]) -> None:
    try:
        from qwenstack.serving.store import ChatStore
        from qwenstack.serving.store_api import MAX_BODY_BYTES, mount_ui
    except ImportError as exc:  # the page is optional: the API works without it
        log.warning("chat page not available (%s); serving the API only", exc)
        return
    mount_ui(app, ChatStore(config.ui_db_path) if config.ui_db_path else None)
    body_limits["/api/conversations"] = MAX_BODY_BYTES


def model_cards(app: FastAPI) -> list[ModelCard]:
    """Every model the app serves: language models, remote routes, the image, translation, speech and guard
    models."""
    state: ServerState = app.state.qwenstack
    cards = [ModelCard(id=m.name, created=m.created, owned_by=m.owned_by, max_model_len=m.max_model_len,
                       capabilities=m.capabilities, voices=m.voices) for m in list(state.registry.models.values())]
    cards += [ModelCard(id=r.name, created=0, owned_by=f"remote:{r.base_url}", capabilities=["chat", "completion"])
              for r in state.remote.routes.values()]
    cards += [ModelCard(**card) for card in app.state.qwenstack_images.model_cards()]
    cards += [ModelCard(**card) for card in translations.registry_of(app).model_cards()]
    cards += [ModelCard(**card) for card in speech.registry_of(app).model_cards()]
    guard = guard_card(app)
    if guard is not None and guard["id"] not in {c.id for c in cards}:
        cards.append(ModelCard(**guard))
    return cards


def create_app(
    models: list[ServedModel] | None = None,
    config: ServerConfig | None = None,
    *,
    loader: Loader = load_served_model,
    on_load_error: Callable[[BaseException], None] | None = None,
    image_pipeline: Any = None,
) -> FastAPI:
    """The app serving `models` (already loaded) plus `config.models` (loaded in the background once the
    app starts; /health answers 503 until they are). The app shuts the engines down when it stops."""
    config = config or ServerConfig()
    registry = ModelRegistry(list(models or []), config.retry_after_s)
    metrics = ServerMetrics(lambda: {name: m.engine.engine for name, m in list(registry.models.items())})
    remote = RemoteRouter(config.remote, config.remote_timeout_s)
    for spec in config.remote:
        if spec.name in registry.models:
            raise ValueError(f"'{spec.name}' is both a local model and a remote route")
    state = ServerState(config, registry, metrics, remote)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await remote.start()
        registry.start_loading(config, loader, on_load_error)
        images.start(on_load_error)
        try:
            yield
        finally:
            await remote.close()
            registry.shutdown()
            for engine in translation_engines:
                engine.shutdown()
            images.close()

    app = FastAPI(title="qwenstack", version=__version__, lifespan=lifespan)
    app.state.qwenstack = state
    install_handlers(app, config.retry_after_s)
    # Outermost last: CORS; unexpected errors -> 500 on the same connection; the key; then the body rules.
    body_limits: dict[str, int] = {}
    app.add_middleware(BodyRulesMiddleware, routes=lambda: app.routes, default_limit=config.max_request_body_bytes,
                       limits=body_limits, curl_json=is_ollama_path)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    app.add_middleware(UnexpectedErrorMiddleware)
    # A browser's preflight (OPTIONS, without the key) is answered before the key is asked for.
    app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_origin_regex=LOCAL_ORIGINS,
                       allow_methods=["*"], allow_headers=["*"], expose_headers=["*"])
    app.add_middleware(HeadAsGet)
    app.include_router(_info_router())
    app.include_router(introspect.router())
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(llamacpp.router)  # llama-server's /completion and /props
    app.include_router(embeddings.router)  # /v1/embeddings, from embedding and chat models alike
    app.include_router(rerank.router)  # /v1/rerank, /rerank, /v2/rerank, /score (Qwen3-Reranker's method)
    app.include_router(classify.router)  # /classify: a sequence classifier's labels (vLLM's)
    images = install_image_api(app, config, image_pipeline,  # /v1/images/*; image jobs yield to chat
                               chat_busy=lambda: any(m.engine.engine.has_unfinished_requests()
                                                     for m in list(registry.models.values())))
    app.include_router(speech.router)  # /v1/audio/speech and voices
    speech.load_speech_models(app, config)
    app.include_router(transcriptions.router)
    app.include_router(realtime.router)
    translation_engines = translations.install_translations(app, config)  # /v1/realtime/translations
    app.include_router(moderations.router)  # /v1/moderations
    install_guardrails(app, config)  # the guard's state; loads config.guard_model when the app starts
    install_responses(app, config)  # /v1/responses, its store and MCP tools
    install_messages(app)  # Anthropic's /v1/messages (its errors in Anthropic's shape)
    install_ollama(app)  # Ollama's /api/chat, /api/generate, /api/embed... (its errors in Ollama's shape)
    if config.enable_ui:
        _mount_ui(app, config, body_limits)
    else:  # the root still says the server is up (Ollama's clients check it)
        app.add_api_route("/", lambda: PlainTextResponse("qwenstack is running"), include_in_schema=False)
    install_openapi(app, api_key=bool(config.api_key))
    # A request naming a model of another kind (a speech model asked to transcribe) hears what that model is.
    registry.other_models = lambda: {card.id: card.capabilities or [] for card in model_cards(app)
                                     if card.id not in registry.models}
    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or SystemExit with one sentence (a taken port, a host that is not this
    machine's), before anything starts: uvicorn would exit mid-start with the model loading under it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        hint = " (another server holds it: choose another with --port)" if exc.errno == errno.EADDRINUSE else ""
        raise SystemExit(f"qwenstack serve: cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    return sock


LOADER_GRACE_S = 2.0  # how long a stopped server waits for a model load to end before it exits at once


def run_server(config: ServerConfig, models: list[ServedModel] | None = None) -> None:
    """Serves until interrupted. With no model and no remote route, serves the bundled demo model. Exits
    with an error if a model fails to load (rather than answering 503 forever)."""
    import uvicorn

    if not config.models and not config.remote and not models:
        config.models = [ModelSpec(model=None)]
    failure: list[BaseException] = []
    holder: dict[str, uvicorn.Server] = {}

    def on_load_error(exc: BaseException) -> None:
        failure.append(exc)
        server = holder.get("server")
        if server is not None:
            server.should_exit = True

    sock = listening_socket(config.host, config.port)  # before any model loads: a taken port is one line
    app = create_app(models, config, on_load_error=on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                           timeout_graceful_shutdown=5))
    holder["server"] = server
    url = f"http://{config.host}:{config.port}"
    log.info("serving the OpenAI-compatible API at %s/v1%s%s", url,
             " (API key required)" if config.api_key else "", f", the chat page at {url}/" if config.enable_ui else "")
    interrupted = False
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it caught again once the app has shut down
        interrupted = True
    if failure:
        raise SystemExit(f"qwenstack serve: {failure[0]}")
    # Stopped (Ctrl-C) while a model loads: the loader thread is inside torch, and an interpreter finalising
    # around it, or around what a load that ended after the app stopped left running, aborts the process
    # ("terminate called without an active exception", exit 134). A load about to end is waited for and its
    # engine stopped; then the process exits at once, as the app has already shut down.
    registry = app.state.qwenstack.registry
    if registry.loading:
        print(f"qwenstack serve: stopped while loading {', '.join(registry.loading)}", file=sys.stderr, flush=True)
        if registry.loader is not None:
            registry.loader.join(timeout=LOADER_GRACE_S)
        registry.shutdown()
        sys.stdout.flush()
        os._exit(130)
    if interrupted:
        raise KeyboardInterrupt
