"""Live transcription of a growing stream (the official re-feed with rollback): the Python Transcriber and
the WebSocket route /v1/realtime?intent=transcription, driven by a client that sends 100 ms PCM16 chunks in
real time. Committed text never changes once committed, and the final text equals the offline transcript
of the whole clip. A scripted Qwen3-ASR gives a known transcript; a random one checks the rollback rules."""
from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import openai
from openai.types.realtime import ConversationItemInputAudioTranscriptionCompletedEvent
import pytest
import websockets
import torch

from asr_checkpoints import build_asr_checkpoint, build_scripted_asr, speechlike, wav_bytes
from server_utils import BackgroundServer
from qwenstack.audio.decode import resample
from qwenstack.audio.live import LiveSettings, Transcriber
from qwenstack.audio.transcribe import transcribe_samples
from qwenstack.engine.engine import EngineConfig
from qwenstack.llm import LLM
from qwenstack.models.registry import load_model
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.served import build_served_model
from qwenstack.tokenizer import Tokenizer


WORDS = ("the quick brown fox jumps over the lazy dog while seven small birds sing above a quiet river "
         "and children laugh near an old stone bridge under the warm evening sun as boats drift slowly home")
ANSWER = "language English<asr_text>" + WORDS
TRANSCRIPT = WORDS


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_scripted_asr(tmp_path_factory.mktemp("live-scripted"), ANSWER)


def _llm(path: Path) -> LLM:
    return LLM(path, dtype="float32", kv_cache_memory=2**24, block_size=8)


def _check_stream(history: list[tuple[str, str]], final: str) -> None:
    committed = [c for c, _ in history]
    for before, after in zip(committed, committed[1:]):
        assert after.startswith(before)  # committed text only ever grows
    assert all(final.startswith(c) for c in committed)
    assert any(committed) and committed[-1] != final  # something committed mid-stream, not everything


def test_transcriber_python_api(scripted: Path) -> None:
    llm = _llm(scripted)
    samples = speechlike(9.0, seed=2)
    offline = transcribe_samples(llm, samples)
    assert offline.text == TRANSCRIPT and offline.language == "English"
    t = Transcriber(llm)
    history = [t.feed(samples[i:i + 1600]) for i in range(0, len(samples), 1600)]  # 100 ms chunks
    final = t.finish()
    assert final == offline.text
    _check_stream(history, final)
    assert t.state.decodes == 5  # every 2 s of audio, then the final pass


@pytest.mark.slow
def test_transcriber_rollback_on_random_model(tmp_path: Path) -> None:
    """Random weights: whatever the text, what is committed is forced into every later decode, stays, and
    the final transcript extends it."""
    llm = _llm(build_asr_checkpoint(tmp_path / "r", seed=3))
    samples = speechlike(8.5, seed=5)
    t = Transcriber(llm, LiveSettings(rollback_tokens=3, max_new_tokens=12))
    history, forced = [], []
    for i in range(0, len(samples), 4000):
        history.append(t.feed(samples[i:i + 4000]))
        forced.append(list(t.state.committed))
    final = t.finish()
    for before, after in zip(forced, forced[1:]):
        assert after[:len(before)] == before
    assert len(forced[-1]) > 0
    for committed, _ in history:
        assert final.startswith(committed)


async def _stream_session(url: str, pcm16: bytes, rate: int) -> tuple[list[dict], float]:
    """Sends 100 ms chunks in real time, then commits; returns the server's events and the lag after the
    last chunk until the completed transcript."""
    events: list[dict] = []
    async with websockets.connect(url.replace("http", "ws") + "/v1/realtime?intent=transcription&model=asr") as ws:
        events.append(json.loads(await ws.recv()))
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm", "rate": rate}}}}}))

        async def reader() -> None:
            async for raw in ws:
                events.append(json.loads(raw))
                if events[-1]["type"] == "conversation.item.input_audio_transcription.completed":
                    return

        task = asyncio.ensure_future(reader())
        step = rate // 10 * 2  # 100 ms of PCM16
        start = time.monotonic()
        for n, i in enumerate(range(0, len(pcm16), step)):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(pcm16[i:i + step]).decode()}))
            await asyncio.sleep(max(0.0, start + (n + 1) * 0.1 - time.monotonic()))
        sent = time.monotonic()
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await asyncio.wait_for(task, 60)
        return events, time.monotonic() - sent


@pytest.fixture(scope="module")
def server(scripted: Path) -> Iterator[BackgroundServer]:
    served = build_served_model("asr", load_model(scripted, dtype=torch.float32), Tokenizer.from_dir(scripted),
                                EngineConfig(block_size=8, kv_cache_memory=2**24),
                                hf_config=json.loads((scripted / "config.json").read_text()), model_dir=scripted)
    with BackgroundServer(create_app([served], ServerConfig(enable_ui=False))) as srv:
        yield srv


def test_websocket_realtime_transcription(server: BackgroundServer) -> None:
    rate = 24000  # OpenAI's audio/pcm rate; the server resamples
    samples = resample(speechlike(7.0, seed=4), 16000, rate)
    pcm16 = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    events, lag = asyncio.run(_stream_session(server.url, pcm16, rate))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "session.created" and "session.updated" in kinds and "input_audio_buffer.committed" in kinds
    deltas = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.delta"]
    completed = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert len(completed) == 1 and all(d["item_id"] == completed[0]["item_id"] for d in deltas)
    committed, history = "", []
    for d in deltas:
        committed += d["delta"]
        history.append((committed, d["tentative"]))
    final = completed[0]["transcript"]
    assert final == committed  # the completed transcript is the deltas joined: nothing was ever retracted
    # Every field the SDK's type requires, the usage (OpenAI's duration form) among them.
    usage = ConversationItemInputAudioTranscriptionCompletedEvent.model_validate(completed[0]).usage
    assert usage.type == "duration" and usage.seconds == pytest.approx(len(samples) / rate, abs=0.01)
    _check_stream(history[:-1], final)
    # the offline transcript of the whole clip, through the server's own transcription route
    wav = wav_bytes(samples.astype(np.float32), rate)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    assert final == client.audio.transcriptions.create(file=("clip.wav", wav), model="asr").text == TRANSCRIPT


def test_websocket_refusals(server: BackgroundServer) -> None:
    async def run() -> list[dict]:
        out = []
        async with websockets.connect(server.url.replace("http", "ws") + "/v1/realtime?intent=transcription") as ws:
            out.append(json.loads(await ws.recv()))
            for event in ({"type": "input_audio_buffer.append", "audio": "@@not base64@@"},
                          {"type": "input_audio_buffer.commit"}, {"type": "response.create"}):
                await ws.send(json.dumps(event))
                out.append(json.loads(await ws.recv()))
            await ws.send("not json")
            out.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(b"\0\0" * 4800).decode()}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            while out[-1]["type"] != "conversation.item.input_audio_transcription.completed":
                out.append(json.loads(await ws.recv()))
        return out

    events = asyncio.run(run())
    assert events[0]["session"]["audio"]["input"]["transcription"]["model"] == "asr"
    codes = [e["error"]["code"] for e in events[1:5]]
    assert codes == ["invalid_audio", "input_audio_buffer_commit_empty", "unknown_event", "invalid_json"]
    assert events[-1]["transcript"] == TRANSCRIPT  # the session survived every bad event


def test_websocket_malformed_session_update_and_binary_frames(server: BackgroundServer) -> None:
    """Each malformed session.update (wrong JSON types where objects or numbers belong) and a binary frame get
    an `error` event; the socket stays open and the session still transcribes afterwards."""
    bad = [{"type": "session.update", "session": "x"}, {"type": "session.update", "session": [1]},
           {"type": "session.update", "session": {"audio": "x"}},
           {"type": "session.update", "session": {"audio": {"input": "x"}}},
           {"type": "session.update", "session": {"audio": {"input": {"transcription": "x"}}}},
           {"type": "session.update", "session": {"audio": {"input": {"format": {"rate": "abc"}}}}},
           {"type": "session.update", "session": {"audio": {"input": {"format": {"rate": [16000]}}}}},
           {"type": "session.update", "session": {"audio": {"input": {"transcription": {"language": 5}}}}},
           {"type": "session.update", "session": {"audio": {"input": {"format": {"rate": float("inf")}}}}},
           {"type": "session.update", "session": {"audio": {"input": {"transcription": {"prompt": {"a": 1}}}}}},
           # a model given as a list had crashed the socket; a VAD and the beta's mu-law were silently ignored
           {"type": "session.update", "session": {"audio": {"input": {"transcription": {"model": ["asr"]}}}}},
           {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "server_vad"}}}}},
           {"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}}]

    async def run() -> list[dict]:
        out = []
        async with websockets.connect(server.url.replace("http", "ws") + "/v1/realtime?intent=transcription") as ws:
            out.append(json.loads(await ws.recv()))
            for event in bad:
                await ws.send(json.dumps(event))
                out.append(json.loads(await ws.recv()))
            await ws.send(b"\x00\x01")
            out.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(b"\0\0" * 4800).decode()}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            while out[-1]["type"] != "conversation.item.input_audio_transcription.completed":
                out.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        return out

    events = asyncio.run(run())
    errors = events[1:len(bad) + 2]
    assert [e["type"] for e in errors] == ["error"] * (len(bad) + 1)
    assert {e["error"]["code"] for e in errors} <= {"invalid_value", "invalid_json"}
    assert events[-1]["transcript"] == TRANSCRIPT


def test_a_commit_too_long_for_the_model_is_an_error_event(scripted: Path) -> None:
    """A committed buffer whose prompt the model's context cannot hold: an error event, and the session goes on
    (it had left the socket without a close frame)."""
    served = build_served_model("asr", load_model(scripted, dtype=torch.float32), Tokenizer.from_dir(scripted),
                                EngineConfig(block_size=8, kv_cache_memory=2**24, max_model_len=48),
                                hf_config=json.loads((scripted / "config.json").read_text()), model_dir=scripted)

    async def run(url: str) -> list[dict]:
        out = []
        async with websockets.connect(url.replace("http", "ws") + "/v1/realtime?intent=transcription") as ws:
            out.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(b"\0\1" * 24000 * 4).decode()}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            while not (out[-1]["type"] == "error" and out[-1]["error"]["code"] == "transcription_failed"):
                out.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            while out[-1]["type"] != "input_audio_buffer.cleared":
                out.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        return out

    with BackgroundServer(create_app([served], ServerConfig(enable_ui=False))) as srv:
        events = asyncio.run(run(srv.url))
    failed = [e for e in events if e["type"] == "error"]
    assert failed and "context length" in failed[-1]["error"]["message"]
    assert events[-1]["type"] == "input_audio_buffer.cleared"  # the same socket still answers


def test_a_socket_without_the_key_is_refused_with_401(scripted: Path) -> None:
    """With --api-key, a handshake without it is answered 401 (OpenAI's status), one with it opens the session."""
    served = build_served_model("asr", load_model(scripted, dtype=torch.float32), Tokenizer.from_dir(scripted),
                                EngineConfig(block_size=8, kv_cache_memory=2**24),
                                hf_config=json.loads((scripted / "config.json").read_text()), model_dir=scripted)

    async def run(url: str) -> tuple[int, str]:
        endpoint = url.replace("http", "ws") + "/v1/realtime?intent=transcription"
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            async with websockets.connect(endpoint):
                pass
        async with websockets.connect(endpoint, additional_headers={"Authorization": "Bearer sekret"}) as ws:
            first = json.loads(await ws.recv())
        return refused.value.response.status_code, first["type"]

    with BackgroundServer(create_app([served], ServerConfig(enable_ui=False, api_key="sekret"))) as srv:
        assert asyncio.run(run(srv.url)) == (401, "session.created")
