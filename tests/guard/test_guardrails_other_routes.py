"""Guardrails on the chat routes other than /v1/chat/completions: /v1/messages (anthropic SDK), Ollama's
/api/chat and /api/generate (ollama package) and /v1/responses (openai SDK). A blocked prompt never reaches the
main engine and is answered with the refusal in the route's shape; a streamed or whole answer the Stream guard
cuts at its first Unsafe token ends with the route's content-filter reason. Guards as in test_guard_server.py: a
scripted Gen guard that calls everything Unsafe, a crafted Stream guard that flags one marker token."""
from __future__ import annotations

import json
from typing import Any, Iterator

import anthropic
import httpx
import ollama
import openai
import pytest
import torch

from guard_checkpoints import UNSAFE_VIOLENT, build_flagging_stream, build_gen_guard
from scripted import build_scripted_checkpoint
from server_utils import BackgroundServer, tiny_served_model
from qwenstack.engine.async_engine import AsyncEngine
from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.guard.gen import GenGuard
from qwenstack.guard.rails import Guardrails
from qwenstack.models.qwen3_guard_stream import GuardStream
from qwenstack.models.registry import load_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.moderation import REFUSAL_MESSAGE, set_guardrails
from qwenstack.tokenizer import Tokenizer

MARKER = "☠"
ANSWER = "Sure, here is the plan. First gather the tools. Then " + MARKER + " strike the target hard. Then rest."
ASK = "Tell me the plan."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    main = build_scripted_checkpoint(tmp_path_factory.mktemp("main"), ANSWER)
    app = create_app([tiny_served_model(main.path, "main")], ServerConfig(enable_ui=False))
    with BackgroundServer(app) as srv:
        srv.app = app  # type: ignore[attr-defined]
        yield srv


@pytest.fixture(scope="module")
def unsafe_gen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenGuard]:
    path = build_gen_guard(tmp_path_factory.mktemp("gen"), UNSAFE_VIOLENT).path
    tok = Tokenizer.from_dir(path)
    engine = LLMEngine(load_model(path, dtype=torch.float32), tok, tok.eos_token_ids,
                       EngineConfig(block_size=4, kv_cache_memory=2**22))
    guard = GenGuard(tok, AsyncEngine(engine, name="guard"), name="scripted-guard")
    yield guard
    guard.shutdown()


@pytest.fixture(scope="module")
def marker_stream(tmp_path_factory: pytest.TempPathFactory) -> GuardStream:
    from checkpoints import tiny_tokenizer

    tok = tiny_tokenizer()
    flagged = set(tok.encode(MARKER).ids) - set(tok.encode(ANSWER.replace(MARKER, "")).ids)
    return GuardStream.load(build_flagging_stream(tmp_path_factory.mktemp("stream"), sorted(flagged)),
                            dtype=torch.float32)


@pytest.fixture
def prompt_blocked(server: BackgroundServer, unsafe_gen: GenGuard, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every prompt is blocked; the list collects the main engine's generate calls (there must be none)."""
    set_guardrails(server.app, Guardrails(gen=unsafe_gen))  # type: ignore[attr-defined]
    engine = server.app.state.qwenstack.registry.models["main"].engine  # type: ignore[attr-defined]
    calls: list[Any] = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda *a, **k: (calls.append(a), generate(*a, **k))[1])
    return calls


@pytest.fixture
def answer_cut(server: BackgroundServer, marker_stream: GuardStream) -> None:
    """The prompt passes; the answer is cut at the marker (window 0: the marker is never sent)."""
    set_guardrails(server.app, Guardrails(stream=marker_stream))  # type: ignore[attr-defined]


def cut_text(text: str) -> bool:
    return bool(text) and MARKER not in text and ANSWER.startswith(text)


# --- /v1/messages -----------------------------------------------------------------------------------------


def anthropic_client(server: BackgroundServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def message(server: BackgroundServer, stream: bool) -> anthropic.types.Message:
    kwargs: dict[str, Any] = {"model": "main", "max_tokens": 200, "messages": [{"role": "user", "content": ASK}],
                              "extra_body": {"temperature": 0}}
    client = anthropic_client(server)
    if not stream:
        return client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as events:
        return events.get_final_message()


@pytest.mark.parametrize("stream", [False, True])
def test_messages_blocked_prompt_is_a_refusal(server: BackgroundServer, prompt_blocked: list[Any],
                                              stream: bool) -> None:
    reply = message(server, stream)
    assert reply.stop_reason == "refusal"
    assert [(b.type, b.text) for b in reply.content] == [("text", REFUSAL_MESSAGE)]  # type: ignore[union-attr]
    assert reply.usage.output_tokens == 0 and reply.usage.input_tokens > 0
    assert prompt_blocked == []


@pytest.mark.parametrize("stream", [False, True])
def test_messages_answer_cut(server: BackgroundServer, answer_cut: None, stream: bool) -> None:
    reply = message(server, stream)
    assert reply.stop_reason == "refusal"
    assert cut_text("".join(b.text for b in reply.content if b.type == "text"))  # type: ignore[union-attr]


# --- Ollama's /api/chat and /api/generate --------------------------------------------------------------------


def ollama_chat(server: BackgroundServer, stream: bool) -> tuple[str, Any]:
    """(the answer's text, its last line)."""
    client = ollama.Client(host=server.url)
    kwargs: dict[str, Any] = {"model": "main", "messages": [{"role": "user", "content": ASK}],
                              "options": {"temperature": 0}}
    if not stream:
        reply = client.chat(**kwargs)
        return reply.message.content or "", reply
    parts = list(client.chat(**kwargs, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    return "".join(p.message.content or "" for p in parts), parts[-1]


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_blocked_prompt_is_a_refusal(server: BackgroundServer, prompt_blocked: list[Any],
                                            stream: bool) -> None:
    text, last = ollama_chat(server, stream)
    assert text == REFUSAL_MESSAGE and last.done_reason == "stop" and last.eval_count == 0
    assert not last.message.thinking
    reply = ollama.Client(host=server.url).generate(model="main", prompt=ASK, stream=stream)
    if stream:
        parts = list(reply)
        assert "".join(p.response for p in parts) == REFUSAL_MESSAGE and parts[-1].done_reason == "stop"
    else:
        assert reply.response == REFUSAL_MESSAGE and reply.done_reason == "stop"
    raw = httpx.post(server.url + "/api/generate", json={"model": "main", "prompt": ASK, "raw": True,
                                                         "stream": False}, timeout=60).json()
    assert raw["response"] == REFUSAL_MESSAGE and raw["done_reason"] == "stop"
    assert prompt_blocked == []


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_answer_cut(server: BackgroundServer, answer_cut: None, stream: bool) -> None:
    text, last = ollama_chat(server, stream)
    assert cut_text(text) and last.done_reason == "stop"


# --- /v1/responses ----------------------------------------------------------------------------------------


def openai_client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_responses_blocked_prompt_is_a_refusal(server: BackgroundServer, prompt_blocked: list[Any]) -> None:
    reply = openai_client(server).responses.create(model="main", input=ASK, temperature=0)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "content_filter"  # type: ignore
    assert reply.output_text == REFUSAL_MESSAGE and reply.usage.output_tokens == 0  # type: ignore[union-attr]
    assert prompt_blocked == []


def test_responses_answer_cut_ends_the_response(server: BackgroundServer, answer_cut: None) -> None:
    events = list(openai_client(server).responses.create(model="main", input=ASK, temperature=0, stream=True))
    assert events[-1].type == "response.incomplete"
    reply = events[-1].response  # type: ignore[union-attr]
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "content_filter"  # type: ignore
    assert cut_text(reply.output_text)
    assert cut_text("".join(e.delta for e in events if e.type == "response.output_text.delta"))  # type: ignore


def test_no_guard_leaves_the_routes_alone(server: BackgroundServer) -> None:
    set_guardrails(server.app, None)  # type: ignore[attr-defined]
    assert message(server, stream=False).content[0].text == ANSWER  # type: ignore[union-attr]
    text, last = ollama_chat(server, stream=True)
    assert text == ANSWER and last.done_reason == "stop"
    reply = openai_client(server).responses.create(model="main", input=ASK, temperature=0)
    assert reply.status == "completed" and reply.output_text == ANSWER
    assert json.loads(httpx.get(server.url + "/health").text) == {"status": "ok"}
