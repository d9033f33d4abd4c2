"""Live translation through /v1/realtime/translations with the openai SDK's
`client.realtime.translations.connect`: a multi-sentence espeak-ng clip streamed in 200 ms chunks in real
time; the three streams arrive in order and in OpenAI's shapes, committed text only grows, the final
translation (and its speech) equals the offline pipeline's with greedy settings (same components, same
inputs: a scripted ASR so the transcript is known, random translator and talker), and every resource a
session held is free afterwards. Then the refusals, the idle timeout, the session limit, a client that
vanishes mid-stream and one that stops reading."""
from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import openai
import pytest
import websockets

from server_utils import BackgroundServer, wait_idle
from translate_fixtures import (TRANSCRIPT, build_parts, build_pipeline, pcm16_bytes, speech_idle, spoken_clip)
from qwenstack.audio.decode import pcm16_to_float, resample
from qwenstack.serving.app import create_app
from qwenstack.serving.config import ServerConfig
from qwenstack.serving.translations import registry_of
from qwenstack.translate.events import OutputAudio, SessionFailed
from qwenstack.translate.offline import translate_offline
from qwenstack.translate.session import SessionSettings, TranslationSession

CHUNK_S = 0.2


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_parts(tmp_path_factory.mktemp("translate"))


@pytest.fixture(scope="module")
def server(parts: dict[str, Path]) -> Iterator[tuple[BackgroundServer, Any]]:
    app = create_app([], ServerConfig(enable_ui=False, translation_idle_timeout_s=3.0, translation_max_sessions=2))
    pipeline = build_pipeline(parts)
    registry_of(app).add(pipeline)
    with BackgroundServer(app) as srv:
        yield srv, app
    pipeline.asr.engine.shutdown()
    pipeline.llm.engine.shutdown()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, list[float]]:
    return spoken_clip(tmp_path_factory.mktemp("clip"))


def _idle(app: Any, timeout: float = 20.0) -> bool:
    registry = registry_of(app)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pipeline = registry.pipelines["live-translate"]
        if not registry.sessions and speech_idle(pipeline.speech):
            break
        time.sleep(0.05)
    pipeline = registry.pipelines["live-translate"]
    return (not registry.sessions and speech_idle(pipeline.speech) and wait_idle(pipeline.asr.engine.engine)
            and wait_idle(pipeline.llm.engine.engine))


async def _sdk_session(url: str, pcm: bytes) -> list[Any]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    events: list[Any] = []
    async with client.realtime.translations.connect(model="live-translate") as conn:
        events.append(await conn.recv())
        await conn.send({"type": "session.update", "session": {"audio": {"output": {"language": "de",
                                                                                    "voice": "eric"}}}})
        events.append(await conn.recv())

        async def reader() -> None:
            async for event in conn:
                events.append(event)
                if event.type in ("session.closed", "error"):
                    return

        task = asyncio.ensure_future(reader())
        step = int(24000 * CHUNK_S) * 2
        start = time.monotonic()
        for n, i in enumerate(range(0, len(pcm), step)):  # 200 ms chunks in real time
            await conn.send({"type": "session.input_audio_buffer.append",
                             "audio": base64.b64encode(pcm[i:i + step]).decode()})
            await asyncio.sleep(max(0.0, start + (n + 1) * CHUNK_S - time.monotonic()))
        await conn.send({"type": "session.close"})
        await asyncio.wait_for(task, 120)
    return events


def test_stream_equals_offline_pipeline(server: tuple[BackgroundServer, Any], clip: tuple[np.ndarray, list[float]]) -> None:
    srv, app = server
    samples, _ = clip
    pcm = pcm16_bytes(samples)
    events = asyncio.run(_sdk_session(srv.url, pcm))
    kinds = [e.type for e in events]
    assert kinds[0] == "session.created" and kinds[1] == "session.updated" and kinds[-1] == "session.closed"
    assert "error" not in kinds, [e for e in events if e.type == "error"]
    created, updated = events[0].session, events[1].session
    assert created.type == "translation" and created.model == "live-translate" and created.id.startswith("sess_")
    assert updated.audio.output.language == "de"
    inputs = [e for e in events if e.type == "session.input_transcript.delta"]
    outputs = [e for e in events if e.type == "session.output_transcript.delta"]
    audio = [e for e in events if e.type == "session.output_audio.delta"]
    assert inputs and outputs and audio
    # order: source text before its translation, a translation before its speech, closed last
    first = {k: kinds.index(k) for k in ("session.input_transcript.delta", "session.output_transcript.delta",
                                         "session.output_audio.delta")}
    first_input_text = next(i for i, e in enumerate(events) if e.type == "session.input_transcript.delta" and e.delta)
    first_output_text = next(i for i, e in enumerate(events) if e.type == "session.output_transcript.delta" and e.delta)
    assert first["session.input_transcript.delta"] < first_input_text < first_output_text < first["session.output_audio.delta"]
    for e in audio:
        assert e.format == "pcm16" and e.channels == 1 and e.sample_rate == 24000 and e.elapsed_ms > 0
        assert len(base64.b64decode(e.delta)) % 2 == 0
    # committed text is append-only: every point of the stream is a prefix of the end
    source = translation = ""
    live_sources, live_translations = [], []
    for e in events:
        if e.type == "session.input_transcript.delta":
            source += e.delta
            live_sources.append(source)
        elif e.type == "session.output_transcript.delta":
            translation += e.delta
            live_translations.append(translation)
    assert source == TRANSCRIPT
    assert all(source.startswith(s) for s in live_sources) and all(translation.startswith(t) for t in live_translations)
    assert any(s and s != source for s in live_sources)  # text was committed mid-stream, not only at the end
    elapsed = [e.elapsed_ms for e in inputs]
    assert elapsed == sorted(elapsed) and elapsed[-1] >= 1000 * (len(samples) / 24000 - CHUNK_S)
    # the offline pipeline over the same 24 kHz audio, the same models, greedy: the same words and speech
    pipeline = registry_of(app).pipelines["live-translate"]
    whole = resample(pcm16_to_float(pcm), 24000, 16000)
    offline = asyncio.run(translate_offline(pipeline, whole, "de", "eric"))
    assert offline.source == TRANSCRIPT
    assert translation == offline.text and len(offline.units) >= 4
    speech = np.concatenate([pcm16_to_float(base64.b64decode(e.delta)) for e in audio])
    expected = np.clip(offline.audio, -1, 1)
    assert len(speech) == len(expected)
    assert np.abs(speech - expected).max() < 2 / 32767  # equal up to the PCM16 rounding
    assert _idle(app)  # no session, no KV block, no speech request left behind


async def _raw(url: str, query: str = "?model=live-translate") -> Any:
    return await websockets.connect(url.replace("http", "ws") + "/v1/realtime/translations" + query)


def test_refusals_never_end_a_good_session(server: tuple[BackgroundServer, Any]) -> None:
    srv, app = server

    async def run() -> tuple[dict, list[dict]]:
        async with await _raw(srv.url, "?model=nope") as ws:
            unknown = json.loads(await ws.recv())
            await ws.wait_closed()
        out = []
        async with await _raw(srv.url) as ws:
            out.append(json.loads(await ws.recv()))
            for event in ({"type": "session.input_audio_buffer.append", "audio": "@@not base64@@"},
                          {"type": "session.input_audio_buffer.append", "audio": base64.b64encode(b"\0").decode()},
                          {"type": "session.update", "session": {"audio": {"output": {"language": "klingon"}}}},
                          {"type": "session.update", "session": {"audio": {"output": {"voice": "nobody"}}}},
                          {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm",
                                                                                                "rate": 8000}}}}},
                          {"type": "session.update", "session": {"audio": {"input": {"format": {"rate": "abc"}}}}},
                          {"type": "session.update", "session": "x"},
                          {"type": "response.create"}, [1, 2]):
                await ws.send(json.dumps(event))
                out.append(json.loads(await ws.recv()))
            await ws.send("not json")
            out.append(json.loads(await ws.recv()))
            await ws.send(b"\x00\x01")
            out.append(json.loads(await ws.recv()))
            # still a working session: one second of silence, then close flushes the whole transcript
            await ws.send(json.dumps({"type": "session.input_audio_buffer.append",
                                      "audio": base64.b64encode(b"\0\0" * 24000).decode()}))
            await ws.send(json.dumps({"type": "session.close"}))
            async for raw in ws:
                out.append(json.loads(raw))
        return unknown, out

    unknown, events = asyncio.run(run())
    assert unknown["type"] == "error" and unknown["error"]["code"] == "model_not_found"
    assert events[0]["type"] == "session.created"
    codes = [e["error"]["code"] for e in events[1:12]]
    assert codes == ["invalid_audio", "invalid_audio", "invalid_value", "invalid_value", "invalid_value",
                     "invalid_value", "invalid_value", "unknown_event", "invalid_json", "invalid_json",
                     "invalid_json"]
    assert all(e["error"]["type"] == "invalid_request_error" and e["error"]["message"] for e in events[1:12])
    assert events[-1]["type"] == "session.closed"
    source = "".join(e["delta"] for e in events if e["type"] == "session.input_transcript.delta")
    assert source == TRANSCRIPT and any(e["type"] == "session.output_audio.delta" for e in events)
    assert events[0]["session"]["audio"]["output"]["language"] == "en"  # the bad updates changed nothing
    assert _idle(app)


def test_idle_timeout_and_session_limit(server: tuple[BackgroundServer, Any]) -> None:
    srv, app = server

    async def run() -> tuple[list[dict], dict, float]:
        async with await _raw(srv.url) as a, await _raw(srv.url) as b:
            await a.recv(), await b.recv()
            async with await _raw(srv.url) as c:  # the limit is 2
                refused = json.loads(await c.recv())
                await c.wait_closed()
            await b.send(json.dumps({"type": "session.close"}))
            [json.loads(raw) async for raw in b]
            await a.send(json.dumps({"type": "session.input_audio_buffer.append",
                                     "audio": base64.b64encode(b"\0\0" * 4800).decode()}))
            start = time.monotonic()
            quiet = [json.loads(raw) async for raw in a]  # a says nothing more: closed after 3 s
            waited = time.monotonic() - start
        return quiet, refused, waited

    quiet, refused, waited = asyncio.run(run())
    assert refused["error"]["code"] == "session_limit"
    assert [e["type"] for e in quiet][-2:] == ["error", "session.closed"]
    assert quiet[-2]["error"]["code"] == "session_timeout" and 2.5 < waited < 15
    assert _idle(app)


def test_client_that_vanishes_frees_everything_and_others_go_on(server: tuple[BackgroundServer, Any],
                                                                  clip: tuple[np.ndarray, list[float]]) -> None:
    srv, app = server
    pcm = pcm16_bytes(clip[0][:24000 * 5])

    async def run() -> list[dict]:
        gone = await _raw(srv.url)
        await gone.recv()
        for i in range(0, len(pcm), 9600):  # 5 s as fast as it goes, so decodes and translations are in flight
            await gone.send(json.dumps({"type": "session.input_audio_buffer.append",
                                        "audio": base64.b64encode(pcm[i:i + 9600]).decode()}))
        async with await _raw(srv.url) as ok:
            await ok.recv()
            gone.transport.abort()  # no close frame: the TCP link just drops
            await ok.send(json.dumps({"type": "session.input_audio_buffer.append",
                                      "audio": base64.b64encode(pcm[:48000]).decode()}))
            await ok.send(json.dumps({"type": "session.close"}))
            return [json.loads(raw) async for raw in ok]

    events = asyncio.run(run())
    assert events[-1]["type"] == "session.closed"
    assert "".join(e["delta"] for e in events if e["type"] == "session.input_transcript.delta") == TRANSCRIPT
    assert _idle(app)


def test_a_client_that_stops_reading_is_closed_not_buffered(server: tuple[BackgroundServer, Any]) -> None:
    """The session's own bound: speech that piles up unread ends the session with slow_client, and its
    in-flight requests are aborted."""
    _, app = server
    pipeline = registry_of(app).pipelines["live-translate"]

    async def run() -> list[Any]:
        session = TranslationSession(pipeline, SessionSettings(max_unsent_audio_seconds=0.3, tentative=False))
        session.start()
        session.append(np.zeros(24000 * 3, np.float32))
        await session.close()  # nobody reads session.events meanwhile
        events = []
        while not session.events.empty():
            events.append(session.events.get_nowait())
        assert session.resources() == {"audio_samples": 0, "tasks_running": 0, "queued_events": 0}
        return events

    events = asyncio.run(run())
    failed = [e for e in events if isinstance(e, SessionFailed)]
    assert len(failed) == 1 and failed[0].code == "slow_client"
    assert sum(len(e.samples) for e in events if isinstance(e, OutputAudio)) / 24000 <= 0.3
    assert _idle(app)
