"""Faults (issue 25): a client that disconnects at any stage of a stream (before its first token, in the middle
of its reasoning, in the middle of a tool call) frees its KV blocks; a request larger than the KV pool is
answered and leaves the pool idle; a worker exception in one request leaves 16 concurrent streams intact;
and a server killed with SIGKILL during chat-store writes leaves an intact database holding every write it
acknowledged."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from scripted import build_case
from server_utils import BackgroundServer, free_port, tiny_served_model, wait_idle
from qwenstack.serving import chat as chat_module
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def server(tiny_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    scripted = build_case(tmp_path_factory.mktemp("tool_call"), "tool_call")
    models = [tiny_served_model(tiny_qwen3), tiny_served_model(scripted.path, "scripted")]
    with BackgroundServer(create_app(models, ServerConfig(enable_ui=False))) as srv:
        srv.models = {m.name: m for m in models}  # type: ignore[attr-defined]
        srv.script = scripted  # type: ignore[attr-defined]
        yield srv


def engine_of(server: BackgroundServer, name: str) -> Any:
    return server.models[name].engine.engine  # type: ignore[attr-defined]


def _raw_post(port: int, path: str, body: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    data = body.encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _received(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except BlockingIOError:
        pass
    return out


@pytest.mark.parametrize("stage", ["before_first_token", "mid_reasoning", "mid_tool_call"])
def test_disconnect_at_every_stage_frees_the_blocks(server: BackgroundServer, stage: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    engine = engine_of(server, "scripted")
    assert wait_idle(engine)
    script = server.script  # type: ignore[attr-defined]
    tool_start = script.script_token_ids.index(server.models["scripted"].tokenizer.token_to_id("<tool_call>"))
    hold_at = {"before_first_token": 0, "mid_reasoning": 5, "mid_tool_call": tool_start + 5}[stage]
    steps, reached, release = [0], threading.Event(), threading.Event()
    real_step = engine.step

    def held_step() -> Any:
        if steps[0] == hold_at:  # the engine thread waits here: the request is at exactly this stage
            reached.set()
            release.wait(30)
        steps[0] += 1
        return real_step()

    monkeypatch.setattr(engine, "step", held_step)
    body = json.dumps({"model": "scripted", "messages": MESSAGES, "tools": TOOLS, "stream": True,
                       "temperature": 0, "max_tokens": 200})
    sock = _raw_post(server.port, "/v1/chat/completions", body)
    assert reached.wait(30)
    time.sleep(0.3)
    seen = _received(sock)
    if stage == "before_first_token":
        assert seen == b""  # not even the headers: the first output is awaited before the response starts
    else:
        assert b'"reasoning_content"' in seen and b'"tool_calls"' not in seen
    sock.close()
    time.sleep(0.7)  # the server polls for disconnects every 0.5 s while the first output is awaited
    release.set()
    assert wait_idle(engine), f"a client gone at {stage} still holds KV blocks"
    before = engine.counters.generation_tokens
    time.sleep(0.3)
    assert engine.counters.generation_tokens == before  # nothing generates for the departed client


def test_request_larger_than_the_pool(tiny_qwen3: Path) -> None:
    probe = tiny_served_model(tiny_qwen3, "probe")
    bytes_per_block = 2**22 // probe.engine.engine.block_manager.num_blocks
    probe.engine.shutdown()
    small = tiny_served_model(tiny_qwen3, "small", kv_cache_memory=bytes_per_block * 24)  # 24 blocks, 96 tokens
    engine = small.engine.engine
    assert engine.block_manager.num_blocks == 24 and small.max_model_len == 96
    with BackgroundServer(create_app([small], ServerConfig(enable_ui=False))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError, match="maximum context length is 96"):
            client.completions.create(model="small", prompt=[5] * 200, max_tokens=1)
        # Four samples of 80 tokens need 80 blocks; the pool has 24: they take turns, and all finish.
        r = client.completions.create(model="small", prompt="Hello", max_tokens=80, n=4, temperature=0.8,
                                      extra_body={"ignore_eos": True})
        assert [c.finish_reason for c in r.choices] == ["length"] * 4
        assert r.usage.completion_tokens == 320
        assert wait_idle(engine)
        ok = client.completions.create(model="small", prompt="Hi", max_tokens=3)
        assert ok.choices[0].finish_reason in ("stop", "length")


def test_worker_exception_in_one_request_while_16_stream(server: BackgroundServer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(output_token_ids: list[int], logits: Any) -> Any:
        if len(output_token_ids) >= 4:
            raise RuntimeError("injected worker failure")
        return logits

    original = chat_module.build_processors

    def with_failure(tok: Any, request: Any, *args: Any, **kwargs: Any) -> list[Any]:
        extra = [failing] if request.user == "doomed" else []
        return original(tok, request, *args, **kwargs) + extra

    monkeypatch.setattr(chat_module, "build_processors", with_failure)

    async def one(client: openai.AsyncOpenAI, i: int) -> Any:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Request {i}"}], stream=True, max_tokens=24,
            temperature=0.7, seed=i, user="doomed" if i == 0 else f"u{i}", stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        finish, usage, text = None, None, ""
        try:
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
                usage = chunk.usage or usage
        except openai.APIError as exc:
            return exc
        return finish, usage

    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(17)))

    results = asyncio.run(run())
    assert isinstance(results[0], openai.APIError) and "injected worker failure" in str(results[0])
    for i, result in enumerate(results[1:], start=1):
        finish, usage = result
        assert finish == "length" and usage.completion_tokens == 24, (i, result)
    assert wait_idle(engine_of(server, "tiny"))


STORE_SERVER = """
import sys, uvicorn
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
uvicorn.run(create_app([], ServerConfig(ui_db_path=sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]),
            log_level="warning")
"""


def test_sigkill_during_store_writes_keeps_the_database_intact(tmp_path: Path) -> None:
    db, port = tmp_path / "chats.db", free_port()
    proc = subprocess.Popen([sys.executable, "-c", STORE_SERVER, str(db), str(port)], env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/api/conversations", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the store server did not start"
            time.sleep(0.1)
        acknowledged: list[tuple[str, str]] = []  # (conversation, message) ids the server answered 201 for
        stop = threading.Event()

        def writer(k: int) -> None:
            with httpx.Client(base_url=base, timeout=5) as http:
                cid = http.post("/api/conversations", json={"title": f"chat {k}"}).json()["id"]
                i = 0
                while not stop.is_set():
                    try:
                        r = http.post(f"/api/conversations/{cid}/messages",
                                      json={"role": "user", "content": f"message {i} " + "x" * 2000})
                    except httpx.HTTPError:
                        return  # the server is gone
                    if r.status_code == 201:
                        acknowledged.append((cid, r.json()["id"]))
                    i += 1

        writers = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for w in writers:
            w.start()
        while len(acknowledged) < 40 and all(w.is_alive() for w in writers):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        stop.set()
        for w in writers:
            w.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    assert len(acknowledged) >= 40
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {row[0] for row in conn.execute("SELECT id FROM messages")}
    lost = [mid for _, mid in acknowledged if mid not in stored]
    assert not lost, f"{len(lost)} acknowledged writes were lost"
