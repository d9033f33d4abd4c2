"""WebSocket /v1/realtime/translations?model=ID: live speech translation in the shape of OpenAI's Realtime
translation sessions (the openai SDK's `client.realtime.translations.connect(model=...)`).

Client events: `session.update {session: {audio: {output: {language, voice}, input: {transcription,
noise_reduction}}}}`, `session.input_audio_buffer.append {audio: base64 PCM16 mono 24 kHz}`, `session.close`.
Server events: `session.created` / `session.updated`, `session.input_transcript.delta`,
`session.output_transcript.delta`, `session.output_audio.delta {delta, sample_rate, channels, format,
elapsed_ms}`, `session.closed`, and `error {error: {type, code, message, event_id}}`. Fields of ours:
`tentative` on both transcript deltas (the revisable tail; deltas themselves are append-only), `language`
on output transcript deltas, `lag_ms` on a unit's first audio delta.

Decisions:
- The model id names a pipeline configured on the command line (`--translate asr=,llm=,tts=`); its three
  models are loaded at startup and shared by every session.
- A bad event gets an `error` event and the session goes on; an unknown model, a full server (more than
  `translation_max_sessions`) or a bad key gets an `error` event and the socket is closed (code 1008/1013).
- Bounded and isolated: each session has its own tasks and queues; one sender per socket with a timeout
  per event (a client that stops reading is dropped, and its session aborted); a client that sends
  nothing for `translation_idle_timeout_s` is told so and closed; everything a session holds is released
  when the socket ends, however it ends.
- `audio.input.noise_reduction` is accepted and not applied (the ASR hears the audio as sent);
  `audio.input.transcription: null` turns the source transcript events off (they are on by default).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, WebSocket

from qwenstack.audio.decode import AudioError, pcm16_to_float
from qwenstack.serving.config import ServerConfig, TranslationSpec
from qwenstack.serving.realtime import websocket_authorized
from qwenstack.serving.state import app_registry
from qwenstack.tts.audio_format import pcm16
from qwenstack.translate.events import Closed, Event, InputTranscript, OutputAudio, OutputTranscript, SessionFailed
from qwenstack.translate.pipeline import TranslationPipeline
from qwenstack.translate.session import SessionError, SessionSettings, TranslationSession

log = logging.getLogger("qwenstack.translate")
router = APIRouter()
INPUT_RATE = 24000  # OpenAI's translation sessions take 24 kHz PCM16 only
MAX_APPEND_SECONDS = 10.0  # one append event's audio


@dataclass
class TranslationRegistry:
    """Pipelines by model id and the sessions now open (hung off the app, never off the module)."""

    pipelines: dict[str, TranslationPipeline] = field(default_factory=dict)
    sessions: dict[str, TranslationSession] = field(default_factory=dict)

    def model_cards(self) -> list[dict[str, Any]]:
        return [{"id": name, "created": 0, "owned_by": "qwenstack", "capabilities": ["translation"]}
                for name in sorted(self.pipelines)]

    def add(self, pipeline: TranslationPipeline) -> None:
        if pipeline.name in self.pipelines:
            raise ValueError(f"two translation pipelines are named '{pipeline.name}'")
        self.pipelines[pipeline.name] = pipeline


def registry_of(app: Any) -> TranslationRegistry:
    """The app's translation pipelines."""
    return app_registry(app, "qwenstack_translations", TranslationRegistry)


def load_pipeline(spec: TranslationSpec) -> tuple[TranslationPipeline, list[Any]]:
    """Loads the three checkpoints of `--translate`; returns the pipeline and the engines to shut down."""
    from qwenstack.serving.config import ModelSpec
    from qwenstack.serving.served import load_served_model
    from qwenstack.tts.engine import SpeechEngine, SpeechService
    from qwenstack.tts.loader import load_tts

    asr = load_served_model(ModelSpec(spec.asr), spec.kv_cache_memory)
    if asr.asr is None:
        raise ValueError(f"--translate asr={spec.asr}: the model has no audio encoder")
    llm = load_served_model(ModelSpec(spec.llm), spec.kv_cache_memory)
    tts = load_tts(spec.tts)
    service = SpeechService(SpeechEngine(tts.model, tts.codec.decoder, kv_blocks=512), name=f"{spec.name}-tts")
    pipeline = TranslationPipeline(spec.name, asr, asr.asr, llm, tts, service, voice=spec.voice)
    return pipeline, [asr.engine, llm.engine]


def install_translations(app: Any, config: ServerConfig) -> list[Any]:
    """Mounts the socket and loads the configured pipelines; returns their text engines (to shut down)."""
    app.include_router(router)
    registry = registry_of(app)
    engines: list[Any] = []
    for spec in config.translations:
        pipeline, owned = load_pipeline(spec)
        registry.add(pipeline)
        engines += owned
    return engines


def _event(kind: str, **fields: Any) -> str:
    return json.dumps({"event_id": f"event_{uuid.uuid4().hex[:16]}", "type": kind, **fields})


def _error(code: str, message: str, event_id: str | None = None) -> str:
    return _event("error", error={"type": "invalid_request_error", "code": code, "message": message,
                                  "event_id": event_id})


def _wire(event: Event, input_transcripts: bool) -> str | None:
    if isinstance(event, InputTranscript):
        if not input_transcripts:
            return None
        return _event("session.input_transcript.delta", delta=event.delta, tentative=event.tentative,
                      elapsed_ms=event.elapsed_ms)
    if isinstance(event, OutputTranscript):
        return _event("session.output_transcript.delta", delta=event.delta, tentative=event.tentative,
                      elapsed_ms=event.elapsed_ms, language=event.language)
    if isinstance(event, OutputAudio):
        import torch

        data = pcm16(torch.from_numpy(event.samples))
        extra = {"lag_ms": event.lag_ms} if event.lag_ms else {}
        return _event("session.output_audio.delta", delta=base64.b64encode(data).decode(), sample_rate=event.sample_rate,
                      channels=1, format="pcm16", elapsed_ms=event.elapsed_ms, **extra)
    if isinstance(event, SessionFailed):
        return _error(event.code, event.message)
    return _event("session.closed")


class Connection:
    """One socket: its session, the one task that writes to it, and the parsing of client events."""

    def __init__(self, ws: WebSocket, config: ServerConfig, pipeline: TranslationPipeline) -> None:
        self.ws = ws
        self.config = config
        self.pipeline = pipeline
        self.session = TranslationSession(pipeline, SessionSettings())
        self.input_transcripts = True
        self.created = int(time.time())
        self.received_seconds = 0.0
        self.lock = asyncio.Lock()  # the sender task and the error replies share the socket

    async def send(self, text: str) -> None:
        async with self.lock:
            await asyncio.wait_for(self.ws.send_text(text), self.config.translation_send_timeout_s)

    def description(self) -> dict[str, Any]:
        s = self.session
        return {"id": s.id, "object": "realtime.translation_session", "type": "translation",
                "model": self.pipeline.name, "expires_at": self.created + 3600,
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": INPUT_RATE},
                                    "transcription": {"model": self.pipeline.asr.name} if self.input_transcripts
                                    else None, "noise_reduction": None},
                          "output": {"language": s.language, "voice": s.voice,
                                     "format": {"type": "audio/pcm", "rate": self.pipeline.tts.sample_rate}}}}

    async def pump(self) -> None:
        """Session events -> the socket, until the session says Closed or fails."""
        while True:
            event = await self.session.next_event()
            text = _wire(event, self.input_transcripts)
            if text is not None:
                await self.send(text)
            if isinstance(event, SessionFailed):
                await self.send(_event("session.closed"))
                return
            if isinstance(event, Closed):
                return

    async def handle(self, event: dict[str, Any]) -> bool:
        """Applies one client event; True when the client asked to close."""
        kind = event.get("type")
        if kind == "session.input_audio_buffer.append":
            self.append(event.get("audio"))
        elif kind == "session.update":
            self.update(event.get("session"))
            await self.send(_event("session.updated", session=self.description()))
        elif kind == "session.close":
            return True
        else:
            raise SessionError("unknown_event", f"unsupported event type {kind!r} in a translation session "
                                                "(session.update, session.input_audio_buffer.append, session.close)")
        return False

    def append(self, audio: Any) -> None:
        if not isinstance(audio, str):
            raise SessionError("invalid_audio", "session.input_audio_buffer.append needs 'audio': base64 PCM16")
        try:
            samples = pcm16_to_float(base64.b64decode(audio, validate=True))
        except (binascii.Error, ValueError, AudioError) as exc:
            raise SessionError("invalid_audio", f"the audio is not base64 PCM16: {exc}") from None
        seconds = len(samples) / INPUT_RATE
        if seconds > MAX_APPEND_SECONDS:
            raise SessionError("invalid_audio", f"one append carries at most {MAX_APPEND_SECONDS:g} s of audio "
                                                "(send 200 ms chunks)")
        if self.received_seconds + seconds > self.config.max_audio_seconds:
            raise SessionError("audio_limit", f"a session takes at most {self.config.max_audio_seconds:g} s of "
                                              "audio; open a new one")
        self.session.append(samples)
        self.received_seconds += seconds

    def update(self, session: Any) -> None:
        if not isinstance(session, dict):
            raise SessionError("invalid_value", "session.update needs a 'session' object")
        if session.get("model") not in (None, self.pipeline.name):
            raise SessionError("invalid_value", "a translation session's model is fixed when it is created")
        audio = session.get("audio") or {}
        if not isinstance(audio, dict):
            raise SessionError("invalid_value", "session.audio must be an object")
        output, audio_in = audio.get("output") or {}, audio.get("input") or {}
        if not isinstance(output, dict) or not isinstance(audio_in, dict):
            raise SessionError("invalid_value", "session.audio.input and .output must be objects")
        fmt = audio_in.get("format")
        if isinstance(fmt, dict) and (fmt.get("type", "audio/pcm") != "audio/pcm"
                                      or fmt.get("rate", INPUT_RATE) not in (None, INPUT_RATE)):
            raise SessionError("invalid_value", "translation input is audio/pcm (PCM16 mono) at 24000 Hz")
        self.session.update(output.get("language"), output.get("voice"))
        if "transcription" in audio_in:
            self.input_transcripts = audio_in["transcription"] is not None


async def _receive(ws: WebSocket, timeout: float) -> str | None:
    """The next text frame; None when the client left. Raises TimeoutError after `timeout` seconds."""
    while True:
        message = await asyncio.wait_for(ws.receive(), timeout)
        if message["type"] == "websocket.disconnect":
            return None
        if message.get("text") is not None:
            return message["text"]
        raise SessionError("invalid_json", "events are JSON text frames, not binary ones")


@router.websocket("/v1/realtime/translations")
async def translations(ws: WebSocket) -> None:
    state = ws.app.state.qwenstack
    config: ServerConfig = state.config
    if not await websocket_authorized(ws, config.api_key):
        return
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")]
    await ws.accept(subprotocol="realtime" if "realtime" in offered else None)  # the page's apiSocket offers it
    registry = registry_of(ws.app)
    name = ws.query_params.get("model")
    pipeline = registry.pipelines.get(name or "")
    if pipeline is None:
        known = ", ".join(sorted(registry.pipelines)) or "none configured (serve with --translate)"
        await ws.send_text(_error("model_not_found", f"no translation pipeline named {name!r} (pipelines: {known})"))
        await ws.close(code=1008)
        return
    if len(registry.sessions) >= config.translation_max_sessions:
        await ws.send_text(_error("session_limit", f"this server runs at most {config.translation_max_sessions} "
                                                   "translation sessions at once; try again later"))
        await ws.close(code=1013)
        return
    conn = Connection(ws, config, pipeline)
    session = conn.session
    registry.sessions[session.id] = session
    pump: asyncio.Task[None] | None = None
    try:
        await conn.send(_event("session.created", session=conn.description()))
        session.start()
        pump = asyncio.ensure_future(conn.pump())
        while True:
            receiving = asyncio.ensure_future(_receive(ws, config.translation_idle_timeout_s))
            await asyncio.wait({receiving, pump}, return_when=asyncio.FIRST_COMPLETED)
            if pump.done():  # the session ended (failed, or the client stopped reading): stop listening too
                receiving.cancel()
                await asyncio.gather(receiving, return_exceptions=True)
                break
            try:
                raw = receiving.result()
            except asyncio.TimeoutError:
                await session.abort()
                await conn.send(_error("session_timeout", f"no event for {config.translation_idle_timeout_s:g} s; "
                                                          "the session was closed"))
                await conn.send(_event("session.closed"))
                break
            except SessionError as exc:
                await conn.send(_error(exc.code, str(exc)))
                continue
            if raw is None:
                break
            try:
                event = json.loads(raw)
                if not isinstance(event, dict):
                    raise ValueError("an event must be a JSON object")
            except ValueError as exc:
                await conn.send(_error("invalid_json", f"the event is not a JSON object: {exc}"))
                continue
            try:
                if await conn.handle(event):
                    await session.close()
                    await asyncio.wait_for(asyncio.shield(pump), config.translation_send_timeout_s * 6)
                    break
            except SessionError as exc:
                await conn.send(_error(exc.code, str(exc), event.get("event_id")))
    except Exception as exc:  # noqa: BLE001 - a socket that failed or a client that stopped reading
        log.info("translation session %s ended: %s: %s", session.id, type(exc).__name__, exc)
    finally:
        await session.abort()
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        registry.sessions.pop(session.id, None)
        try:
            await ws.close()
        except Exception:  # noqa: BLE001 - already closed by the client
            pass


__all__ = ["TranslationRegistry", "install_translations", "load_pipeline", "registry_of", "router"]
