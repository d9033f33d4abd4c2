"""POST /v1/audio/speech (OpenAI's shape, streamed as it is made), GET /v1/audio/voices, and
POST /v1/audio/voices (register a cloned voice from a reference clip, multipart).

Decisions:
- Speech models live beside the text models, on `app.state.qwenstack_speech` (a SpeechRegistry), each
  with its own SpeechService thread (batched talker + streaming codec) and voice directory. GET /v1/models
  lists them with the capability "speech" and the voices a request can name (the chat page leaves them
  out of its chat models).
- The request is validated before anything is queued (input length, voice, language, format), so a bad
  request is a 400 and never reaches the engine. A client that disconnects aborts its request.
- Raw responses use chunked transfer: wav, pcm, mp3, opus and aac bytes leave as each audio chunk is
  decoded and encoded (tts/audio_format.py); flac is encoded once the audio is complete.
  `stream_format: "sse"` sends `speech.audio.delta` events (base64 pcm16) and a final `speech.audio.done`
  with usage, as vLLM-Omni does.
- voice: a named speaker of a CustomVoice model, a voice registered on a Base model (ICL clone when the
  clip came with its transcript, else x-vector), or "default" for a VoiceDesign model, whose voice is
  described by `instructions`.
"""
from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import torch
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, model_validator

from qwenstack.errors import RequestError
from qwenstack.serving.errors import APIError, bad_request
from qwenstack.serving.openapi import form_body, request_body
from qwenstack.serving.state import app_registry, get_state, parse, read_json
from qwenstack.tts.audio_format import FORMATS, MEDIA_TYPES, SSE_FORMATS, ChunkEncoder
from qwenstack.tts.engine import SpeechEngine, SpeechParams, SpeechRequest, SpeechService
from qwenstack.tts.loader import TTSModel
from qwenstack.tts.voices import VoiceStore, decode_clip

router = APIRouter()
MAX_INPUT_CHARS = 4096


class SpeechBody(BaseModel):
    model: str
    input: str = Field(max_length=MAX_INPUT_CHARS)
    voice: str | dict[str, str] | None = None
    instructions: str | None = None
    response_format: Literal["wav", "pcm", "flac", "mp3", "opus", "aac"] | None = None
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"

    @model_validator(mode="after")
    def _default_format(self) -> "SpeechBody":
        """OpenAI's default is mp3; events carry raw samples, so with stream_format "sse" it is pcm."""
        if self.response_format is None:
            self.response_format = "pcm" if self.stream_format == "sse" else "mp3"
        return self
    language: str = "auto"
    seed: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_new_tokens: int | None = Field(None, ge=2)


@dataclass
class SpeechModel:
    tts: TTSModel
    service: SpeechService
    voices: VoiceStore
    max_frames: int = 2047

    def named_voices(self) -> list[str] | None:
        """The voices a request names without registering one: a CustomVoice model's speakers, "default" for
        a VoiceDesign model (described by `instructions`); None for a Base model, whose voices are the clones
        registered on it."""
        kind = self.tts.kind
        return self.tts.speakers if kind == "custom_voice" else ["default"] if kind == "voice_design" else None


@dataclass
class SpeechRegistry:
    models: dict[str, SpeechModel] = field(default_factory=dict)

    def get(self, name: str) -> SpeechModel:
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise APIError(404, f"the model '{name}' is not a speech model served here (speech models: {known})",
                           param="model", code="model_not_found")
        return self.models[name]

    def model_cards(self) -> list[dict[str, Any]]:
        """The speech models' entries in GET /v1/models (OpenAI lists its speech models there too), with the
        voices a request can name without registering one (a Base model's: GET /v1/audio/voices)."""
        return [{"id": name, "created": 0, "owned_by": "qwenstack", "capabilities": ["speech"],
                 "voices": self.models[name].named_voices()} for name in sorted(self.models)]


def add_speech_model(app: Any, tts: TTSModel, voices_dir: Path, max_frames: int = 2047,
                     kv_blocks: int = 512) -> SpeechModel:
    """Serves a loaded TTS model under its name; its engine thread starts now."""
    registry = registry_of(app)
    engine = SpeechEngine(tts.model, tts.codec.decoder, kv_blocks=kv_blocks)
    served = SpeechModel(tts, SpeechService(engine), VoiceStore(voices_dir), max_frames)
    registry.models[tts.name] = served
    return served


def load_speech_models(app: Any, config: Any) -> None:
    """Loads the config's Qwen3-TTS checkpoints (`qwenstack serve --tts DIR`)."""
    if not config.speech_models:
        return
    from qwenstack.tts.loader import load_tts

    voices = Path(config.voices_dir) if config.voices_dir else Path.home() / ".cache" / "qwenstack" / "voices"
    for path in config.speech_models:
        add_speech_model(app, load_tts(path), voices)


def registry_of(app: Any) -> SpeechRegistry:
    """The app's speech models."""
    return app_registry(app, "qwenstack_speech", SpeechRegistry)


def _voice_name(voice: str | dict[str, str] | None) -> str | None:
    if isinstance(voice, dict):
        return voice.get("id")
    return voice


def build_request(served: SpeechModel, body: SpeechBody, request_id: str) -> SpeechRequest:
    tts, model = served.tts, served.tts.model
    if not body.input.strip():
        raise bad_request("input is empty", param="input")
    if body.response_format not in FORMATS:
        raise bad_request(f"response_format '{body.response_format}' is not supported (use {', '.join(FORMATS)})",
                          param="response_format")
    if body.stream_format == "sse" and body.response_format not in SSE_FORMATS:
        raise bad_request("stream_format 'sse' sends pcm or wav audio", param="response_format")
    voice = _voice_name(body.voice)
    speaker, embedding, ref_ids, ref_codes = None, None, None, None
    if not voice and tts.kind != "voice_design":  # a VoiceDesign model's one voice is described, not named
        known = f" (voices: {', '.join(tts.speakers)})" if tts.kind == "custom_voice" else ""
        raise bad_request(f"voice is required{known}", param="voice")
    if tts.kind == "custom_voice":
        if voice.lower() not in model.args.talker.spk_id:
            raise bad_request(f"unknown voice '{voice}' (voices: {', '.join(tts.speakers)})", param="voice")
        speaker = voice
    elif tts.kind == "base":
        cloned = served.voices.load(voice, tts.name)
        if cloned is None:
            raise bad_request(f"unknown voice '{voice}': register one with POST /v1/audio/voices", param="voice")
        embedding = cloned.embedding
        if cloned.codes is not None and cloned.transcript:
            ref_ids, ref_codes = tts.ref_ids(cloned.transcript), cloned.codes
    elif voice not in (None, "default"):
        raise bad_request(f"unknown voice '{voice}': a VoiceDesign model takes 'default' and a description "
                          "of the voice in instructions", param="voice")
    language = body.language.lower()
    if language not in model.args.languages:
        raise bad_request(f"unknown language '{body.language}' (languages: {', '.join(model.args.languages)})",
                          param="language")
    instruct = tts.instruct_ids(body.instructions) if body.instructions else None
    try:
        prompt = model.build_prompt(tts.text_ids(body.input), language, speaker, embedding, instruct,
                                    ref_ids=ref_ids, ref_codes=ref_codes, non_streaming_text=False)
    except RequestError as exc:
        raise bad_request(str(exc)) from None
    params = SpeechParams(seed=body.seed, max_frames=min(served.max_frames, (body.max_new_tokens or 10**9) - 1))
    if body.temperature is not None:
        params.temperature = params.subtalker_temperature = body.temperature
    # ICL: the reference's codes are the codec's left context, so the new audio continues the clip's.
    speech = SpeechRequest(request_id, prompt, params, context_codes=ref_codes)
    try:
        served.service.engine.check(speech)
    except RequestError as exc:
        raise bad_request(str(exc), param="input") from None
    return speech


async def _chunks(served: SpeechModel, request: SpeechRequest, usage: dict[str, int]) -> AsyncIterator[torch.Tensor]:
    sink = served.service.submit(request)
    iterator = SpeechService.chunks(sink)
    done = False
    try:
        while True:
            chunk = await asyncio.to_thread(next, iterator, None)
            if chunk is None:
                done = True
                return
            usage["output_tokens"] += chunk.frames.shape[0]
            yield chunk.samples
    finally:
        if not done:
            served.service.abort(request.request_id)


@router.post("/v1/audio/speech", response_model=None)
@request_body(SpeechBody)
async def create_speech(request: Request) -> StreamingResponse:
    body = parse(SpeechBody, await read_json(request))
    served = registry_of(request.app).get(body.model)
    speech = build_request(served, body, served.service.new_request_id())
    usage = {"input_tokens": int(speech.prompt.prefill.shape[0]), "output_tokens": 0}
    rate = served.tts.sample_rate
    encoder = ChunkEncoder(body.response_format, rate, body.speed)
    # Encoding a chunk (PyAV for mp3/opus, libsndfile for the whole flac at the end) runs off the event loop.
    raw = body.response_format in ("wav", "pcm")

    async def encoded() -> AsyncIterator[bytes]:
        async for samples in _chunks(served, speech, usage):
            data = encoder.write(samples) if raw else await asyncio.to_thread(encoder.write, samples)
            if data:
                yield data
        data = encoder.close() if raw else await asyncio.to_thread(encoder.close)
        if data:
            yield data

    if body.stream_format == "sse":
        async def events() -> AsyncIterator[str]:
            async for data in encoded():
                event = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode(),
                         "response_format": body.response_format}
                yield f"event: speech.audio.delta\ndata: {json.dumps(event)}\n\n"
            usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
            done = {"type": "speech.audio.done", "usage": usage}
            yield f"event: speech.audio.done\ndata: {json.dumps(done)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return StreamingResponse(encoded(), media_type=MEDIA_TYPES[body.response_format])


@router.get("/v1/audio/voices")
def list_voices(request: Request, model: str | None = None) -> dict[str, Any]:
    registry = registry_of(request.app)
    names = [model] if model else sorted(registry.models)
    data = []
    for name in names:
        served = registry.get(name)
        named = served.named_voices()
        if named is None:
            data += served.voices.list(name)
        else:
            kind = "builtin" if served.tts.kind == "custom_voice" else "designed"
            data += [{"id": voice, "model": name, "type": kind} for voice in named]
    return {"object": "list", "data": data}


@router.post("/v1/audio/voices", openapi_extra=form_body({
    "model": "a Base speech model served here", "name": "the new voice's name", "file": "the reference clip",
    "transcript": "what the clip says (enables in-context cloning)"}, required=("model", "name", "file")))
async def register_voice(request: Request) -> dict[str, Any]:
    try:
        form = await request.form()
    except Exception:  # noqa: BLE001 - a body that is not multipart
        raise bad_request("send the reference clip as multipart/form-data (fields: model, name, file)") from None
    model, name, upload = form.get("model"), form.get("name"), form.get("file")
    if not isinstance(model, str) or not isinstance(name, str) or upload is None or isinstance(upload, str):
        raise bad_request("multipart fields 'model', 'name' and 'file' (the reference clip) are required")
    served = registry_of(request.app).get(model)
    encoder = served.tts.model.speaker_encoder
    if encoder is None:
        raise bad_request(f"'{model}' is a {served.tts.kind} model; only Base models clone voices", param="model")
    limit = get_state(request).config.max_audio_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise bad_request(f"the reference clip is over the limit of {limit} bytes", param="file")
    transcript = form.get("transcript")

    text = transcript.strip() if isinstance(transcript, str) and transcript.strip() else None
    codec = served.tts.codec

    def embed() -> tuple[torch.Tensor, torch.Tensor | None]:
        wave = decode_clip(data, encoder.args.sample_rate)
        # With a transcript the clip's codes are kept too (ICL cloning), if the tokenizer has its encoder.
        codes = codec.encode(wave) if text and codec.encoder is not None else None
        return encoder.embed(wave), codes

    try:
        served.voices.check_name(name)
    except RequestError as exc:
        raise bad_request(str(exc), param="name") from None
    try:
        embedding, codes = await asyncio.to_thread(embed)
        return served.voices.save(name, model, embedding, text, codes)
    except RequestError as exc:
        raise bad_request(str(exc), param="file") from None
