"""Every error status of the server in OpenAI's shape, through the official SDK where a client would see it:
400 (too long, wrong types, bad JSON, unsupported input), 401, 404, 429 with Retry-After, 503 while
loading, an error frame after streaming started; a client that disconnects frees its KV blocks; and 32
concurrent streams with one bad request among them all end correctly."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from server_utils import BackgroundServer, before_each_step, tiny_served_model, wait_idle
from qwenstack.serving import chat as chat_module
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ModelSpec, ServerConfig
from qwenstack.serving.served import ServedModel

MESSAGES = [{"role": "user", "content": "Hello there"}]
LONG = {"temperature": 0, "max_tokens": 400, "ignore_eos": True}  # raw JSON bodies
LONG_SDK = {"temperature": 0, "max_tokens": 400, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tiny_qwen3: Path) -> Iterator[BackgroundServer]:
    models = [tiny_served_model(tiny_qwen3), tiny_served_model(tiny_qwen3, "busy", max_num_seqs=1, max_waiting=1)]
    app = create_app(models, ServerConfig(enable_ui=False))
    with BackgroundServer(app) as srv:
        srv.models = {m.name: m for m in models}  # type: ignore[attr-defined]
        yield srv


def engine_of(server: BackgroundServer, name: str = "tiny") -> Any:
    return server.models[name].engine.engine  # type: ignore[attr-defined]


def assert_openai_shape(body: dict) -> dict:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_prompt_too_long_names_both_numbers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 600}])
    message = info.value.body["message"]
    assert "maximum context length is 512" in message and "the prompt has" in message
    with pytest.raises(openai.BadRequestError, match=r"prompt has 600 tokens.*maximum context length is 512"):
        client.completions.create(model="tiny", prompt=[5] * 600)
    with pytest.raises(openai.BadRequestError, match="max_tokens=5000 is too large"):
        client.completions.create(model="tiny", prompt="Hi", max_tokens=5000)


@pytest.mark.parametrize("body, param", [
    ({"temperature": "hot"}, "temperature"),
    ({"n": "2"}, "n"),
    ({"messages": "hello"}, "messages"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: a 400 in OpenAI and vLLM, not silently nothing
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: OpenAI's and vLLM's 400
])
def test_wrong_types_and_values_are_400(server: BackgroundServer, body: dict, param: str) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, **body})
    assert r.status_code == 400, r.text
    error = assert_openai_shape(r.json())
    assert error["type"] == "invalid_request_error" and param in (error["param"] or error["message"])


@pytest.mark.parametrize("part, says", [
    ({"type": "image_url", "image_url": {}}, "messages.0.content.1.image_url.url: Field required"),
    ({"type": "image", "image": "data:image/png;base64,AAAA"}, "messages.0.content.1: type 'image' is not supported here"),
    ({"image_url": {"url": "data:image/png;base64,AAAA"}}, "messages.0.content.1: Unable to extract tag"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "bogus"}},
     "messages.0.content.1.image_url.detail: Input should be 'auto', 'low' or 'high'"),  # OpenAI's 400
])
def test_a_malformed_content_part_is_named(server: BackgroundServer, part: dict, says: str) -> None:
    """content is a string or a list of parts: a bad part used to be reported as the string branch's
    "messages.0.content: Input should be a valid string", which hides which part was wrong and why."""
    content = [{"type": "text", "text": "What is this?"}, part]
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": "tiny", "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 400
    message = assert_openai_shape(r.json())["message"]
    assert message.startswith(says) and "valid string" not in message, message


def test_unknown_fields_are_ignored_and_bad_json_is_400(server: BackgroundServer, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2,
                                       extra_body={"some_vendor_extra": {"x": 1}, "user": "u1"})
    assert r.choices[0].finish_reason in ("stop", "length")
    bad = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                     headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in assert_openai_shape(bad.json())["message"]
    # FastAPI's own validation (422) is answered as 400 in the same shape.
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "no model named"})
    assert tok.status_code == 400 and assert_openai_shape(tok.json())["param"] == "model"


def test_null_means_the_default(server: BackgroundServer, client: openai.OpenAI) -> None:
    # OpenAI's spec marks n, stream, logprobs, echo, store... nullable, and the SDK sends null for a keyword
    # passed as None: those used to be 400s ("n: Input should be a valid integer").
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, n=None, stream=None,
                                       logprobs=None, extra_body={"min_tokens": None, "ignore_eos": None})
    assert len(r.choices) == 1 and r.choices[0].logprobs is None
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, stream=True,
                                            stream_options={"include_usage": None})  # type: ignore[typeddict-item]
    assert [c for c in stream if c.usage is not None] == []
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=2, n=None, echo=None, stream=None)
    assert len(r.choices) == 1
    r = client.responses.create(model="tiny", input="Hi", max_output_tokens=2, store=None, stream=None,
                                extra_body={"background": None})
    assert r.status in ("completed", "incomplete") and r.store is True
    # A required field is still required, null or not.
    bad = httpx.post(server.url + "/v1/chat/completions", json={"model": None, "messages": MESSAGES})
    assert bad.status_code == 400 and assert_openai_shape(bad.json())["param"] == "model"


def test_image_input_refused_for_text_only_model(client: openai.OpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(openai.BadRequestError, match="does not accept image_url"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [image]}])


def test_unknown_model_and_route_are_404(server: BackgroundServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found" and "tiny" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and assert_openai_shape(r.json())["type"] == "not_found_error"


def test_queue_full_is_429_with_retry_after(server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # "busy" runs one request and queues one. The engine's first step is held until three requests are
    # submitted, so when it resumes one runs, one waits and at least one finds the queue full.
    engine = engine_of(server, "busy")
    async_engine = server.models["busy"].engine  # type: ignore[attr-defined]
    gate = threading.Event()
    before_each_step(monkeypatch, engine, lambda: gate.wait(30))

    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as aclient:
            async def one(i: int) -> Any:
                try:
                    return await aclient.completions.create(model="busy", prompt=f"Request {i}", max_tokens=2)
                except openai.RateLimitError as exc:
                    return exc

            tasks = [asyncio.ensure_future(one(i)) for i in range(3)]
            deadline = time.monotonic() + 10
            # Every request is either refused already, admitted, or still in the engine's command queue.
            while sum(t.done() for t in tasks) + len(engine.requests) + async_engine._commands.qsize() < 3 \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            gate.set()
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert refused and len(refused) < 3
    assert all(r.response.headers["retry-after"] == "1" and r.body["code"] == "queue_full" for r in refused)
    assert all(r.choices[0].finish_reason == "length" for r in results if not isinstance(r, Exception))
    assert wait_idle(engine)


def test_error_after_stream_started_is_an_error_frame(client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_after_three(output_token_ids: list[int], logits: Any) -> Any:
        if len(output_token_ids) >= 3:
            raise RuntimeError("injected failure")
        return logits

    original = chat_module.build_processors
    monkeypatch.setattr(chat_module, "build_processors", lambda *a, **k: original(*a, **k) + [failing_after_three])
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **LONG_SDK)
    received = []
    with pytest.raises(openai.APIError, match="injected failure"):
        for chunk in stream:
            received.append(chunk)
    assert len(received) >= 2  # the role chunk and some tokens came before the failure
    monkeypatch.undo()
    ok = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)  # the server carries on
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_disconnect_aborts_and_frees_blocks(server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_of(server)
    assert wait_idle(engine)
    body = {"model": "tiny", "messages": MESSAGES, "stream": True, **LONG}
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    assert wait_idle(engine), "the disconnected stream still holds KV blocks"
    # The same for a non-streaming request whose client gives up. Its steps wait until the client has gone,
    # so the request cannot finish first on a quick machine.
    gate = threading.Event()
    before_each_step(monkeypatch, engine, lambda: gate.wait(30))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "Hi", **LONG}, timeout=0.5)
    gate.set()
    assert wait_idle(engine), "the abandoned non-streaming request still holds KV blocks"
    metrics = httpx.get(server.url + "/metrics").text
    assert 'request_success_total{finished_reason="abort",model_name="tiny"}' in metrics


def test_disconnect_while_queued_withdraws_the_request(server: BackgroundServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_of(server, "busy")
    assert wait_idle(engine)
    gate = threading.Event()
    before_each_step(monkeypatch, engine, lambda: gate.wait(30))
    before = engine.counters.generation_tokens
    for path, body in (("/v1/chat/completions", {"messages": MESSAGES, "stream": True}),
                       ("/v1/completions", {"prompt": "Hi"})):
        with pytest.raises(httpx.ReadTimeout):  # the engine is held: no first token, so no headers yet
            httpx.post(server.url + path, json={"model": "busy", **body, **LONG}, timeout=0.3)
    time.sleep(1.0)  # the server polls for disconnects every 0.5 s
    gate.set()
    assert wait_idle(engine)
    assert engine.counters.generation_tokens - before <= 2  # at most the step that was already under way


def test_32_concurrent_streams_one_invalid(server: BackgroundServer) -> None:
    async def one(aclient: openai.AsyncOpenAI, i: int) -> Any:
        content = "word " * 600 if i == 13 else f"Request number {i}"
        try:
            stream = await aclient.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": content}], stream=True, max_tokens=8,
                temperature=0.7, seed=i, stream_options={"include_usage": True})
            finish, usage = None, None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    usage = chunk.usage
            return finish, usage
        except openai.BadRequestError as exc:
            return exc

    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(32)))

    results = asyncio.run(run())
    assert isinstance(results[13], openai.BadRequestError)
    for i, result in enumerate(results):
        if i != 13:
            finish, usage = result
            assert finish in ("stop", "length") and 1 <= usage.completion_tokens <= 8, (i, result)
    assert wait_idle(engine_of(server))


def test_api_key(tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENSTACK_API_KEY", "from-env")
    assert ServerConfig().api_key == "from-env"
    app = create_app([tiny_served_model(tiny_qwen3)], ServerConfig(api_key="sekrit", ui_db_path=":memory:"))
    with BackgroundServer(app) as srv:
        for open_path in ("/health", "/metrics", "/version", "/"):
            assert httpx.get(srv.url + open_path).status_code == 200, open_path
        r = httpx.get(srv.url + "/v1/models")
        assert r.status_code == 401 and assert_openai_shape(r.json())["type"] == "authentication_error"
        assert httpx.get(srv.url + "/api/conversations").status_code == 401  # the stored chats too
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekrit", max_retries=0)
        assert [m.id for m in good.models.list().data] == ["tiny"]
        assert good.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices


def test_browser_pages_on_this_machine_may_call_the_api_others_only_when_allowed(tiny_qwen3: Path) -> None:
    """CORS: a page on localhost / 127.0.0.1 (any port) gets its preflight and its answers, with the API key
    asked for on the call itself, not on the preflight; another site only when --allowed-origins names it."""
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    config = ServerConfig(api_key="sekrit", ui_db_path=":memory:", allowed_origins=["https://chat.example.com"])
    with BackgroundServer(create_app([tiny_served_model(tiny_qwen3)], config)) as srv:
        url = srv.url + "/v1/chat/completions"
        for origin in ("http://localhost:3000", "http://127.0.0.1:8080", "http://[::1]:5173",
                       "https://chat.example.com"):
            r = httpx.options(url, headers={"Origin": origin, **preflight})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin, origin
            assert "authorization" in r.headers["access-control-allow-headers"].lower()
        for origin in ("https://evil.example", "http://localhost.evil.example", "https://chat.example.com.evil"):
            r = httpx.options(url, headers={"Origin": origin, **preflight})
            assert "access-control-allow-origin" not in r.headers, origin
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
        local = {"Origin": "http://localhost:3000"}
        r = httpx.post(url, json=body, headers=local)
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = httpx.post(url, json=body, headers={**local, "Authorization": "Bearer sekrit"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = httpx.post(url, json=body, headers={"Origin": "https://evil.example", "Authorization": "Bearer sekrit"})
        assert "access-control-allow-origin" not in r.headers  # the browser keeps the answer from the page
    with BackgroundServer(create_app([tiny_served_model(tiny_qwen3)],
                                     ServerConfig(ui_db_path=":memory:", allowed_origins=["*"]))) as srv:
        r = httpx.options(srv.url + "/v1/models", headers={"Origin": "https://anywhere.example", **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "https://anywhere.example")


def test_health_is_503_while_loading(tiny_qwen3: Path) -> None:
    release = threading.Event()

    def slow_loader(spec: ModelSpec, kv_memory: int) -> ServedModel:
        release.wait(30)
        return tiny_served_model(tiny_qwen3, spec.name or "slow")

    config = ServerConfig(models=[ModelSpec(model=str(tiny_qwen3), name="slow")], enable_ui=False)
    with BackgroundServer(create_app([], config, loader=slow_loader)) as srv:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert assert_openai_shape(r.json())["type"] == "unavailable_error"
        sdk = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            sdk.chat.completions.create(model="slow", messages=MESSAGES)
        assert info.value.status_code == 503
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(srv.url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [m.id for m in sdk.models.list().data] == ["slow"]
        assert sdk.chat.completions.create(model="slow", messages=MESSAGES, max_tokens=2).choices


def test_failed_load_is_reported(tiny_qwen3: Path) -> None:
    failures: list[BaseException] = []
    config = ServerConfig(models=[ModelSpec(model=str(tiny_qwen3 / "missing"), name="broken")], enable_ui=False)
    with BackgroundServer(create_app([], config, on_load_error=failures.append)) as srv:
        deadline = time.monotonic() + 30
        while not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.get(srv.url + "/health")
        assert failures and r.status_code == 503 and "broken" in r.json()["error"]["message"]


def test_run_server_exits_when_a_model_cannot_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from qwenstack.serving.app import run_server
    from server_utils import free_port

    config = ServerConfig(port=free_port(), models=[ModelSpec(model=str(tmp_path / "missing"))], enable_ui=False,
                          log_level="warning")
    with caplog.at_level(logging.INFO, logger="qwenstack.server"), pytest.raises(SystemExit, match="missing"):
        run_server(config)
    (failed,) = [r for r in caplog.records if "loading model" in r.getMessage()]
    assert "missing" in failed.getMessage() and not failed.exc_info  # the traceback only with --debug


def test_run_server_says_in_one_line_when_it_cannot_listen(tmp_path: Path) -> None:
    """A port another server holds, or a host that is not this machine's: one sentence before any model loads
    (uvicorn had exited mid-start, once with the model loading under it: SIGABRT)."""
    import socket

    from qwenstack.serving.app import run_server

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        for host, port, reason in (("127.0.0.1", taken.getsockname()[1], "choose another with --port"),
                                   ("999.1.1.1", 8000, "cannot listen on 999.1.1.1:8000")):
            config = ServerConfig(host=host, port=port, models=[ModelSpec(model=str(tmp_path / "never-loaded"))],
                                  enable_ui=False, log_level="warning")
            with pytest.raises(SystemExit, match=reason):
                run_server(config)
    finally:
        taken.close()
