"""WebSocket /v1/realtime?intent=transcription: live transcription in OpenAI Realtime's event shapes.

Client events: `session.update` (transcription model, language, prompt, input format and rate),
`input_audio_buffer.append {audio: base64 PCM16 mono}`, `input_audio_buffer.commit` (end of an utterance:
its final transcript), `input_audio_buffer.clear`.
Server events: `session.created` / `session.updated`, `input_audio_buffer.committed` / `.cleared`,
`conversation.item.input_audio_transcription.delta {item_id, content_index, delta}` carrying only newly
committed text (so deltas concatenate to the transcript and never need retracting; the revisable tail is
sent beside it as `tentative`, a field of ours), `.completed {item_id, content_index, transcript}`, and
`error {error: {type, code, message}}` for a bad event, which never closes the session.

Decisions:
- Audio is PCM16 at 24 kHz by default, as OpenAI's `audio/pcm`; `session.audio.input.format.rate` may say
  16000 (DashScope's rate). The buffered audio is resampled as a whole for every decode, so the final
  decode sees exactly what an offline transcription of the same audio sees.
- One decode runs at a time per session, in the engine beside every other request; audio that arrives
  meanwhile waits for the next decode (LiveTranscription: the official re-feed with rollback).
- The model is the `model` query parameter, else the session's transcription model, else the first served
  model with an audio encoder.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import uuid
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from qwenstack.audio.asr import language_name
from qwenstack.audio.decode import AudioError, pcm16_to_float
from qwenstack.audio.live import DecodeRequest, LiveSettings, LiveTranscription
from qwenstack.errors import QwenstackError
from qwenstack.serving.errors import APIError
from qwenstack.serving.state import ServerState

router = APIRouter()
log = logging.getLogger("qwenstack.server")

DEFAULT_RATE = 24000
RATES = (8000, 16000, 24000, 44100, 48000)


class SessionError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _audio_model(state: ServerState, name: str | None) -> Any:
    if name:
        try:
            served = state.registry.get(name)
        except APIError as exc:
            raise SessionError("model_not_found", exc.message) from None
        if served.asr is None:
            raise SessionError("unsupported_content", f"the model '{name}' does not accept audio")
        return served
    for served in list(state.registry.models.values()):
        if served.asr is not None:
            return served
    raise SessionError("model_not_found", "no served model takes audio")


class Session:
    def __init__(self, ws: WebSocket, state: ServerState, model: str | None) -> None:
        self.ws = ws
        self.state = state
        self.served = _audio_model(state, model)
        self.rate = DEFAULT_RATE
        self.settings = LiveSettings()
        self.live = self._new_live()
        self.item_id = _item_id()
        self.previous_item: str | None = None
        self.sent = ""  # committed text already sent for the current item
        self.decoding: asyncio.Task | None = None

    def _new_live(self) -> LiveTranscription:
        return LiveTranscription(self.served.asr, self.settings, self.rate, self.served.max_model_len)

    def description(self) -> dict[str, Any]:
        return {"type": "transcription", "id": f"sess_{id(self):x}", "object": "realtime.transcription_session",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": self.rate},
                                    "transcription": {"model": self.served.name,
                                                      "language": self.settings.language,
                                                      "prompt": self.settings.context}}}}

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps({"event_id": f"event_{uuid.uuid4().hex[:16]}", **event}))

    async def error(self, code: str, message: str, event_id: str | None = None) -> None:
        await self.send({"type": "error", "error": {"type": "invalid_request_error", "code": code,
                                                    "message": message, "event_id": event_id}})

    # --- client events ---------------------------------------------------------------------------------

    async def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "input_audio_buffer.append":
            await self.append(event)
        elif kind == "input_audio_buffer.commit":
            await self.commit()
        elif kind == "input_audio_buffer.clear":
            await self.wait_decode()
            self.live.reset()
            self.sent = ""
            await self.send({"type": "input_audio_buffer.cleared"})
        elif kind in ("session.update", "transcription_session.update"):
            await self.update(event.get("session") or {})
        else:
            raise SessionError("unknown_event", f"unsupported event type {kind!r} in a transcription session")

    async def append(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise SessionError("invalid_audio", "input_audio_buffer.append needs 'audio': base64 PCM16")
        try:
            samples = pcm16_to_float(base64.b64decode(audio, validate=True))
        except (binascii.Error, ValueError, AudioError) as exc:
            raise SessionError("invalid_audio", f"the audio is not base64 PCM16: {exc}") from None
        limit = self.state.config.max_audio_seconds
        if self.live.seconds + len(samples) / self.rate > limit:
            raise SessionError("invalid_audio", f"the audio buffer would exceed {limit:g} s; commit or clear it")
        self.live.add(samples)
        if self.decoding is None and self.live.due():
            self.start_decode()

    async def update(self, session: Any) -> None:
        if self.live.samples:
            raise SessionError("session_busy", "update the session before sending audio (or after a commit)")
        session = _object(session, "session")
        audio_in = _object(_object(session.get("audio"), "session.audio").get("input"), "session.audio.input")
        transcription = _object(audio_in.get("transcription") or session.get("input_audio_transcription"),
                                "session.audio.input.transcription")
        fmt = audio_in.get("format") or {}
        try:
            rate = int(fmt.get("rate") or self.rate) if isinstance(fmt, dict) else self.rate
        except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite rate (1e400 in JSON)
            raise SessionError("invalid_value", f"audio rate must be a number, got {fmt.get('rate')!r}") from None
        if rate not in RATES:
            raise SessionError("invalid_value", f"audio rate {rate} is not supported ({', '.join(map(str, RATES))})")
        if isinstance(fmt, dict) and fmt.get("type", "audio/pcm") != "audio/pcm" or \
                session.get("input_audio_format") not in (None, "pcm16"):  # the beta's spelling of the format
            raise SessionError("invalid_value", "only audio/pcm (PCM16 mono) input is supported")
        context = _text(transcription.get("prompt"), "transcription.prompt") or self.settings.context
        if transcription.get("model"):
            self.served = _audio_model(self.state, _text(transcription["model"], "transcription.model"))
        _no_turn_detection(session, audio_in)
        try:
            language = language_name(_text(transcription.get("language"), "language")) \
                if "language" in transcription else self.settings.language
        except QwenstackError as exc:
            raise SessionError("invalid_value", str(exc)) from None
        self.rate = rate
        self.settings = LiveSettings(context=context, language=language)
        self.live = self._new_live()
        await self.send({"type": "session.updated", "session": self.description()})

    async def commit(self) -> None:
        await self.wait_decode()
        if self.live.samples == 0:
            raise SessionError("input_audio_buffer_commit_empty", "the audio buffer is empty")
        item = self.item_id
        await self.send({"type": "input_audio_buffer.committed", "item_id": item,
                         "previous_item_id": self.previous_item})
        seconds = self.live.seconds  # the audio this item transcribes (OpenAI's duration usage)
        request = self.live.next_request(final=True)
        assert request is not None
        try:
            await self.run_decode(request)
        except Exception as exc:  # too long for the model, a failed decode: said in-band, the buffer dropped
            await self.error("transcription_failed", f"{type(exc).__name__}: {exc}")
        else:
            committed, _ = self.live.texts()
            await self.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item,
                             "content_index": 0, "transcript": committed,
                             "usage": {"type": "duration", "seconds": round(seconds, 3)}})
        self.previous_item, self.item_id = item, _item_id()
        self.live.reset()
        self.sent = ""

    # --- decodes -------------------------------------------------------------------------------------------

    def start_decode(self) -> None:
        request = self.live.next_request()
        if request is not None:
            self.decoding = asyncio.ensure_future(self._decode_loop(request))

    async def _decode_loop(self, request: DecodeRequest) -> None:
        try:
            while request is not None:
                await self.run_decode(request)
                request = self.live.next_request() if self.live.due() else None
        except Exception as exc:  # reported in-band; the session goes on
            await self.error("transcription_failed", f"{type(exc).__name__}: {exc}")
        finally:
            self.decoding = None

    async def wait_decode(self) -> None:
        task = self.decoding
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def run_decode(self, request: DecodeRequest) -> None:
        final = None
        async for out in self.served.engine.generate(request.prompt_ids, request.params,
                                                     request_id=f"realtime-{uuid.uuid4().hex}",
                                                     multimodal=request.multimodal):
            final = out
        assert final is not None
        committed, tentative = self.live.accept(request, final.outputs[0].token_ids)
        delta = committed[len(self.sent):] if committed.startswith(self.sent) else ""
        self.sent = committed
        if delta or not request.final:
            await self.send({"type": "conversation.item.input_audio_transcription.delta", "item_id": self.item_id,
                             "content_index": 0, "delta": delta, "tentative": tentative})


def _object(value: Any, name: str) -> dict[str, Any]:
    """A JSON object field of an event ({} when absent or null); any other type is the client's error."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SessionError("invalid_value", f"{name} must be an object, got {type(value).__name__}")
    return value


def _text(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise SessionError("invalid_value", f"{name} must be a string, got {type(value).__name__}")
    return value


def _no_turn_detection(session: dict[str, Any], audio_in: dict[str, Any]) -> None:
    """Turns end when the client commits: a server VAD asked for would be waited on forever, so it is refused."""
    for where in (audio_in.get("turn_detection"), session.get("turn_detection")):
        if where is not None:
            raise SessionError("invalid_value", "turn_detection is not supported here: set it to null and commit "
                                                "each turn with input_audio_buffer.commit")


def _item_id() -> str:
    return f"item_{uuid.uuid4().hex[:20]}"


async def websocket_authorized(ws: WebSocket, key: str | None) -> bool:
    """The bearer-key check of a socket (the HTTP middleware does not see WebSockets); closes it if wrong."""
    if key:
        given = ws.headers.get("authorization", "").encode()
        # browsers cannot set headers on a socket: OpenAI's browser subprotocol carries the key instead
        offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")]
        for protocol in offered:
            if protocol.startswith("openai-insecure-api-key."):
                given = f"Bearer {protocol[len('openai-insecure-api-key.'):]}".encode()
        if not hmac.compare_digest(given, f"Bearer {key}".encode()):
            if "websocket.http.response" in ws.scope.get("extensions", {}):  # a 401 to the handshake, as OpenAI's
                await ws.send_denial_response(APIError(401, "invalid or missing API key", code="invalid_api_key")
                                              .response())
            else:  # a server without the denial extension: refused at the handshake (uvicorn says 403)
                await ws.close(code=1008, reason="invalid or missing API key")
            return False
    return True


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket) -> None:
    state: ServerState = ws.app.state.qwenstack
    if not await websocket_authorized(ws, state.config.api_key):
        return
    await ws.accept()
    intent = ws.query_params.get("intent", "transcription")
    try:
        if intent != "transcription":
            raise SessionError("unsupported_intent", "this server's realtime sessions transcribe only: "
                                                     "connect with ?intent=transcription")
        session = Session(ws, state, ws.query_params.get("model"))
    except SessionError as exc:
        await ws.send_text(json.dumps({"type": "error", "error": {"type": "invalid_request_error",
                                                                   "code": exc.code, "message": str(exc)}}))
        await ws.close(code=1008)
        return
    await session.send({"type": "session.created", "session": session.description()})
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("text")
            if raw is None:
                await session.error("invalid_json", "events are JSON text frames, not binary ones")
                continue
            try:
                event = json.loads(raw)
                if not isinstance(event, dict):
                    raise ValueError("an event must be a JSON object")
            except ValueError as exc:
                await session.error("invalid_json", f"the event is not a JSON object: {exc}")
                continue
            try:
                await session.handle(event)
            except SessionError as exc:
                await session.error(exc.code, str(exc), event.get("event_id"))
            except Exception as exc:  # our bug, not the client's: said in-band, and the session goes on
                log.exception("realtime event %r failed", event.get("type"))
                await session.error("server_error", f"{type(exc).__name__}: {exc}", event.get("event_id"))
    except WebSocketDisconnect:
        pass
    finally:
        if session.decoding is not None:
            session.decoding.cancel()
            await asyncio.gather(session.decoding, return_exceptions=True)


__all__ = ["router", "websocket_authorized"]
