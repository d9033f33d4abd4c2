"""Remote routes: a model name served by another OpenAI-compatible API. The upstream here is a second
qwenstack server on loopback (with its own API key), the client the official SDK talking to the proxy."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from server_utils import BackgroundServer, free_port, tiny_served_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import RemoteSpec, ServerConfig, parse_remote

MESSAGES = [{"role": "user", "content": "Hello from afar"}]


@pytest.fixture(scope="module")
def upstream(tiny_qwen3: Path) -> Iterator[BackgroundServer]:
    model = tiny_served_model(tiny_qwen3)
    with BackgroundServer(create_app([model], ServerConfig(api_key="upstream-key", enable_ui=False))) as srv:
        srv.engine = model.engine.engine  # type: ignore[attr-defined]
        yield srv


@pytest.fixture(scope="module")
def proxy(upstream: BackgroundServer) -> Iterator[BackgroundServer]:
    remotes = [RemoteSpec("far", upstream.url + "/v1", model="tiny", api_key_env="TEST_FAR_KEY"),
               RemoteSpec("keyless", upstream.url + "/v1", model="tiny", api_key_env="TEST_UNSET_KEY"),
               parse_remote(f"down=http://127.0.0.1:{free_port()}/v1")]
    mp = pytest.MonkeyPatch()
    mp.setenv("TEST_FAR_KEY", "upstream-key")  # read per request, from the environment only
    mp.delenv("TEST_UNSET_KEY", raising=False)
    with BackgroundServer(create_app([], ServerConfig(remote=remotes, enable_ui=False))) as srv:
        yield srv
    mp.undo()


@pytest.fixture(scope="module")
def clients(upstream: BackgroundServer, proxy: BackgroundServer) -> tuple[openai.OpenAI, openai.OpenAI]:
    direct = openai.OpenAI(base_url=upstream.url + "/v1", api_key="upstream-key", max_retries=0)
    via = openai.OpenAI(base_url=proxy.url + "/v1", api_key="any", max_retries=0)
    return direct, via


def test_parse_remote() -> None:
    spec = parse_remote("qwen-max=https://example.com/v1/#qwen3-max")
    assert (spec.name, spec.base_url, spec.upstream_model) == ("qwen-max", "https://example.com/v1", "qwen3-max")
    with pytest.raises(ValueError):
        parse_remote("no-url")


def test_remote_listed(clients: tuple[openai.OpenAI, openai.OpenAI]) -> None:
    _, via = clients
    cards = {m.id: m.model_dump() for m in via.models.list().data}
    assert set(cards) == {"far", "keyless", "down"} and cards["far"]["owned_by"].startswith("remote:")


def test_chat_and_completions_through_remote(clients: tuple[openai.OpenAI, openai.OpenAI]) -> None:
    direct, via = clients
    args = dict(messages=MESSAGES, temperature=0, max_tokens=10)
    want = direct.chat.completions.create(model="tiny", **args)
    got = via.chat.completions.create(model="far", **args)
    assert got.choices[0].message == want.choices[0].message
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.usage.prompt_tokens,
                                                                      want.usage.completion_tokens)
    chunks = list(via.chat.completions.create(model="far", stream=True, stream_options={"include_usage": True}, **args))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == (want.choices[0].message.content or "") and chunks[-1].usage.total_tokens == want.usage.total_tokens
    text = via.completions.create(model="far", prompt="Paris is", temperature=0, max_tokens=5).choices[0].text
    assert text == direct.completions.create(model="tiny", prompt="Paris is", temperature=0, max_tokens=5).choices[0].text


def test_remote_errors(clients: tuple[openai.OpenAI, openai.OpenAI]) -> None:
    _, via = clients
    with pytest.raises(openai.BadRequestError, match="maximum context length"):  # the upstream's own 400
        via.chat.completions.create(model="far", messages=[{"role": "user", "content": "word " * 600}])
    with pytest.raises(openai.AuthenticationError):  # no key in the environment for this route
        via.chat.completions.create(model="keyless", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.APIStatusError) as info:  # nothing listens there
        via.chat.completions.create(model="down", messages=MESSAGES, max_tokens=2)
    assert info.value.status_code == 502 and "could not be reached" in info.value.body["message"]


def test_disconnect_through_remote_aborts_upstream(proxy: BackgroundServer, upstream: BackgroundServer) -> None:
    engine = upstream.engine  # type: ignore[attr-defined]
    body = {"model": "far", "messages": MESSAGES, "stream": True, "max_tokens": 400, "ignore_eos": True,
            "temperature": 0}
    with httpx.Client(timeout=30) as http, http.stream("POST", proxy.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 20
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
