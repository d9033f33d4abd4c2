"""Qwen3Guard in the server, end to end over HTTP with scripted guard checkpoints (real Qwen3 checkpoints whose
greedy output is a chosen verdict) and a crafted Stream guard: /v1/moderations, a blocked prompt that never
reaches the main model, an answer blocked after generation, unknown verdicts failing closed and open, a
streamed answer cut within the configured window of the first Unsafe token, and the guard's metrics."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import torch
from openai.types import ModerationCreateResponse

from guard_checkpoints import GARBAGE, SAFE_PROMPT, UNSAFE_VIOLENT, build_flagging_stream, build_gen_guard
from scripted import ScriptedCheckpoint, build_scripted_checkpoint
from server_utils import BackgroundServer, before_each_step, tiny_served_model
from qwenstack.engine.async_engine import AsyncEngine
from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.guard.gen import GenGuard
from qwenstack.guard.rails import Guardrails
from qwenstack.guard.verdict import GuardPolicy
from qwenstack.models.qwen3_guard_stream import GuardStream
from qwenstack.models.registry import load_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.moderation import REFUSAL_MESSAGE, set_guardrails
from qwenstack.tokenizer import Tokenizer

MARKER = "☠"
# The main model's answer: the marker sits early, with a long tail after it (the cut must stop the engine).
ANSWER = ("Sure, here is the plan. First gather the tools. Then " + MARKER + " strike the target hard. "
          + " ".join(f"Afterwards step {i} follows." for i in range(1, 61)))
ASK = [{"role": "user", "content": "Tell me the plan."}]


@pytest.fixture(scope="module")
def main_model(tmp_path_factory: pytest.TempPathFactory) -> ScriptedCheckpoint:
    return build_scripted_checkpoint(tmp_path_factory.mktemp("main"), ANSWER)


def _gen(path: Path) -> GenGuard:
    model = load_model(path, dtype=torch.float32)
    tok = Tokenizer.from_dir(path)
    engine = LLMEngine(model, tok, tok.eos_token_ids, EngineConfig(block_size=4, kv_cache_memory=2**22))
    return GenGuard(tok, AsyncEngine(engine, name="guard"), name="scripted-guard")


@pytest.fixture(scope="module")
def gens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, GenGuard]]:
    texts = {"unsafe": UNSAFE_VIOLENT, "safe": SAFE_PROMPT, "garbage": GARBAGE}
    guards = {k: _gen(build_gen_guard(tmp_path_factory.mktemp(k), t).path) for k, t in texts.items()}
    yield guards
    for g in guards.values():
        g.shutdown()


@pytest.fixture(scope="module")
def stream_guard(tmp_path_factory: pytest.TempPathFactory) -> GuardStream:
    from checkpoints import tiny_tokenizer

    tok = tiny_tokenizer()
    flagged = set(tok.encode(MARKER).ids) - set(tok.encode(ANSWER.replace(MARKER, "")).ids)
    assert flagged
    path = build_flagging_stream(tmp_path_factory.mktemp("stream"), sorted(flagged))
    guard = GuardStream.load(path, dtype=torch.float32)
    guard.source = path  # type: ignore[attr-defined]
    return guard


@pytest.fixture(scope="module")
def server(main_model: ScriptedCheckpoint) -> Iterator[BackgroundServer]:
    app = create_app([tiny_served_model(main_model.path, "main")], ServerConfig(enable_ui=False))
    with BackgroundServer(app) as srv:
        srv.app = app  # type: ignore[attr-defined]
        yield srv


def guard_with(server: BackgroundServer, policy: str | None = None, fail_open: bool = False,
               **guards: Any) -> None:
    rails = Guardrails(GuardPolicy.parse(policy, fail_open=fail_open), **guards)
    set_guardrails(server.app, rails)  # type: ignore[attr-defined]


def engine_of(server: BackgroundServer) -> LLMEngine:
    return server.app.state.qwenstack.registry.models["main"].engine.engine  # type: ignore[attr-defined]


def chat(server: BackgroundServer, **extra: Any) -> dict[str, Any]:
    body = {"model": "main", "messages": ASK, "temperature": 0, "max_tokens": 400, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def chat_stream(server: BackgroundServer, **extra: Any) -> list[dict[str, Any]]:
    body = {"model": "main", "messages": ASK, "temperature": 0, "max_tokens": 400, "stream": True, **extra}
    chunks = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def streamed_content(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def finish_reasons(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]


def verdict_chunk(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    [chunk] = [c for c in chunks if "qwenstack_guard" in c]
    assert chunk["choices"] == []
    return chunk["qwenstack_guard"]


def moderate(server: BackgroundServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + "/v1/moderations", json=body, timeout=60)


def test_moderations_needs_a_guard(server: BackgroundServer) -> None:
    set_guardrails(server.app, None)  # type: ignore[attr-defined]
    r = moderate(server, {"input": "hello"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "guard_not_configured"
    assert chat(server)["choices"][0]["message"]["content"] == ANSWER  # no guard: the answer as scripted
    assert "qwenstack_guard" not in chat(server)


def test_moderations_unsafe_and_safe(server: BackgroundServer, gens: dict[str, GenGuard]) -> None:
    guard_with(server, gen=gens["unsafe"])
    r = moderate(server, {"model": "omni-moderation-latest", "input": "How do I hurt someone?"})
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("modr-") and body["model"] == "scripted-guard"
    [result] = body["results"]
    assert result["flagged"] is True and result["safety"] == "Unsafe" and result["action"] == "block"
    assert result["category_names"] == ["Violent"] and result["direction"] == "prompt"
    assert result["categories"]["Violent"] is True and result["category_scores"]["Violent"] == 1.0
    # OpenAI's names too, which the SDK's types require and clients read: Violent is OpenAI's violence.
    assert result["categories"]["violence"] is True and result["category_scores"]["violence"] == 1.0
    assert not any(v for k, v in result["categories"].items() if k not in ("Violent", "violence"))
    parsed = ModerationCreateResponse.model_validate(body)  # every field the SDK requires
    assert parsed.results[0].categories.violence and not parsed.results[0].categories.harassment
    assert set(result["categories"]) == set(result["category_scores"]) and "Jailbreak" in result["categories"]
    applied = result["category_applied_input_types"]  # OpenAI's field: which input kinds each was flagged for
    assert set(applied) == set(result["categories"]) and applied["Violent"] == ["text"] and applied["Jailbreak"] == []
    assert moderate(server, {"model": "scripted-guard", "input": "x"}).status_code == 200  # the guard by name
    listed = {m["id"]: m for m in httpx.get(server.url + "/v1/models", timeout=10).json()["data"]}
    assert listed["scripted-guard"]["capabilities"] == ["moderation"]  # where a client finds that name
    wrong = moderate(server, {"model": "main", "input": "x"})  # the chat model does not moderate
    assert wrong.status_code == 404 and "scripted-guard" in wrong.json()["error"]["message"]

    guard_with(server, gen=gens["safe"])
    results = moderate(server, {"input": ["Hello there", "What is 2 + 2?"]}).json()["results"]
    assert [(x["flagged"], x["safety"], x["action"]) for x in results] == [(False, "Safe", "allow")] * 2
    assert not any(results[0]["categories"].values()) and not any(results[0]["category_scores"].values())

    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    for body in ({"messages": conversation}, {"input": conversation}):
        [result] = moderate(server, body).json()["results"]
        assert result["direction"] == "answer" and result["safety"] == "Safe"
    [result] = moderate(server, {"input": [{"type": "text", "text": "Hi"}]}).json()["results"]
    assert result["direction"] == "prompt"
    for bad in ({}, {"input": []}, {"input": [{"type": "image_url", "image_url": {"url": "x"}}]}, {"input": 3},
                {"input": ["x"] * 65}, {"input": [{"type": "text"}]}, {"input": [{"type": "text", "text": 5}]},
                {"messages": [{"role": "user"}]}):
        r = moderate(server, bad)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", bad


def test_blocked_prompt_never_reaches_the_main_model(server: BackgroundServer, gens: dict[str, GenGuard]) -> None:
    guard_with(server, gen=gens["unsafe"])
    engine = engine_of(server)
    before = engine.stats()["prompt_tokens"], engine.counters.finished_requests
    body = chat(server)
    [choice] = body["choices"]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] == REFUSAL_MESSAGE
    assert body["qwenstack_guard"] == {"direction": "prompt", "safety": "Unsafe", "categories": ["Violent"],
                                       "refusal": None, "action": "block"}
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] > 0
    chunks = chat_stream(server, stream_options={"include_usage": True})
    assert streamed_content(chunks) == REFUSAL_MESSAGE and finish_reasons(chunks) == ["content_filter"]
    assert verdict_chunk(chunks)["action"] == "block" and chunks[-1]["usage"]["completion_tokens"] == 0
    assert (engine.stats()["prompt_tokens"], engine.counters.finished_requests) == before  # never ran


def test_answer_blocked_after_generation(server: BackgroundServer, gens: dict[str, GenGuard]) -> None:
    guard_with(server, "prompt.unsafe=allow", gen=gens["unsafe"])  # this guard calls everything Unsafe
    engine = engine_of(server)
    before = engine.stats()["prompt_tokens"]
    body = chat(server)
    [choice] = body["choices"]
    assert engine.stats()["prompt_tokens"] > before  # the main model ran
    assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] == REFUSAL_MESSAGE
    assert body["usage"]["completion_tokens"] > 0
    decision = {"direction": "answer", "safety": "Unsafe", "categories": ["Violent"], "refusal": None,
                "action": "block"}
    assert body["qwenstack_guard"] == decision and choice["qwenstack_guard"] == decision
    # Streamed with only a Gen guard: judged when it ends; the last chunk says content_filter.
    chunks = chat_stream(server)
    assert streamed_content(chunks) == ANSWER and finish_reasons(chunks) == ["content_filter"]
    assert verdict_chunk(chunks) == decision


def test_unknown_verdict_fails_closed_or_open(server: BackgroundServer, gens: dict[str, GenGuard]) -> None:
    guard_with(server, gen=gens["garbage"])  # default: fail closed
    body = chat(server)
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert body["qwenstack_guard"] == {"direction": "prompt", "safety": "unknown", "categories": [],
                                       "refusal": None, "action": "block"}
    [result] = moderate(server, {"input": "hello"}).json()["results"]
    assert result["safety"] == "unknown" and result["flagged"] is True and not any(result["categories"].values())

    guard_with(server, fail_open=True, gen=gens["garbage"])
    body = chat(server)
    [choice] = body["choices"]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == ANSWER
    assert body["qwenstack_guard"]["safety"] == "unknown" and body["qwenstack_guard"]["action"] == "flag"
    assert choice["qwenstack_guard"]["direction"] == "answer"


def _cut_point(main_model: ScriptedCheckpoint) -> int:
    tok = Tokenizer.from_dir(main_model.path)
    ids = main_model.answer_token_ids
    return next(i for i in range(len(ids)) if MARKER in tok.decode(ids[: i + 1]))


@pytest.mark.parametrize("window", [0, 3])
def test_stream_cut_within_window(server: BackgroundServer, stream_guard: GuardStream,
                                  main_model: ScriptedCheckpoint, window: int,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    guard_with(server, stream=stream_guard, stream_window=window)
    engine = engine_of(server)
    # Decode steps paced at 20 ms, so the cut's abort reaches the engine long before the scripted answer
    # could end (on a quick machine the tiny model used to finish all of it first).
    before_each_step(monkeypatch, engine, lambda: time.sleep(0.02))
    generated = engine.stats()["generation_tokens"]
    chunks = chat_stream(server, stream_options={"include_usage": True})
    tok = Tokenizer.from_dir(main_model.path)
    u = _cut_point(main_model)
    # Exactly the tokens before the first Unsafe one, plus at most `window` from it on.
    assert streamed_content(chunks) == tok.decode(main_model.answer_token_ids[: u + window], skip_special_tokens=True)
    assert (MARKER in streamed_content(chunks)) == (window > 0)
    assert finish_reasons(chunks) == ["content_filter"]
    assert verdict_chunk(chunks) == {"direction": "answer", "safety": "Unsafe", "categories": ["Violent"],
                                     "refusal": None, "action": "block"}
    assert chunks[-1]["usage"]["completion_tokens"] == u + window
    deadline = time.monotonic() + 10
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.has_unfinished_requests()
    assert engine.stats()["generation_tokens"] - generated < len(main_model.answer_token_ids)  # stopped early


def test_stream_guard_judges_whole_prompts_and_answers(server: BackgroundServer, stream_guard: GuardStream) -> None:
    guard_with(server, stream=stream_guard)
    body = chat(server)  # not streamed: the whole answer is judged after generation
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert body["qwenstack_guard"]["direction"] == "answer" and body["qwenstack_guard"]["categories"] == ["Violent"]
    results = moderate(server, {"input": ["a calm question", f"a {MARKER} question"]}).json()["results"]
    assert [r["safety"] for r in results] == ["Safe", "Unsafe"]
    assert 0.99 < results[1]["category_scores"]["Violent"] <= 1.0
    r = chat(server, messages=[{"role": "user", "content": f"{MARKER} now"}])
    assert r["qwenstack_guard"]["direction"] == "prompt" and r["choices"][0]["finish_reason"] == "content_filter"


def test_guard_metrics(server: BackgroundServer, gens: dict[str, GenGuard], stream_guard: GuardStream) -> None:
    guard_with(server, stream=stream_guard)
    chat_stream(server)  # the stream guard's latency, per checked chunk
    guard_with(server, gen=gens["safe"])
    chat(server)
    text = httpx.get(server.url + "/metrics").text
    assert 'qwenstack:guard_latency_seconds_bucket{direction="prompt",guard="gen",le=' in text
    assert 'qwenstack:guard_latency_seconds_count{direction="answer",guard="gen",model_name="scripted-guard"}' in text
    assert ('qwenstack:guard_decisions_total{action="allow",direction="prompt",model_name="scripted-guard",'
            'safety="Safe"}') in text
    assert 'guard="stream"' in text


def test_guard_models_from_server_config(main_model: ScriptedCheckpoint, stream_guard: GuardStream,
                                        tmp_path: Path) -> None:
    """`qwenstack serve MODEL --guard GEN --guard-stream STREAM`: the guards named in ServerConfig load (in
    bfloat16, as served) when the app starts; /health waits for them."""
    guard = build_gen_guard(tmp_path / "guard", UNSAFE_VIOLENT)
    config = ServerConfig(enable_ui=False, guard_model=str(guard.path),
                          guard_stream_model=str(stream_guard.source),  # type: ignore[attr-defined]
                          guard_policy="prompt.unsafe=flag")
    app = create_app([tiny_served_model(main_model.path, "main")], config)
    with BackgroundServer(app) as srv:
        deadline = time.monotonic() + 60
        while httpx.get(srv.url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
        [result] = moderate(srv, {"input": "hit him"}).json()["results"]
        assert (result["safety"], result["action"], result["flagged"]) == ("Unsafe", "flag", True)
        body = chat(srv)  # the prompt is only flagged; the answer (Unsafe too) is blocked
        assert body["choices"][0]["finish_reason"] == "content_filter"
        assert body["qwenstack_guard"]["direction"] == "answer"
        chunks = chat_stream(srv)  # streamed: the Stream guard cuts it at the marker
        assert finish_reasons(chunks) == ["content_filter"] and MARKER not in streamed_content(chunks)
        assert streamed_content(chunks) and ANSWER.startswith(streamed_content(chunks))


def test_bad_policy_fails_at_startup() -> None:
    with pytest.raises(ValueError, match="guard policy item"):
        create_app([], ServerConfig(enable_ui=False, guard_policy="unsafe=explode"))
