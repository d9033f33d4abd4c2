"""Spoken chat answers (Qwen3-Omni) in OpenAI's Chat Completions audio shape.

Decisions:
- A request asks for speech with `modalities: ["text", "audio"]` and `audio: {voice, format}` (both
  required, as in OpenAI). A model without a Talker, a voice the checkpoint lacks, n > 1, or a format we do
  not write is a 400 before anything runs. `modalities: ["text"]` (or none) skips the Talker entirely.
- Non-streamed: `message.audio = {id, data (base64 wav or pcm16), expires_at, transcript}` and `content` null,
  as OpenAI answers. Streamed: `delta.audio` chunks carry base64 pcm16 (24 kHz mono) and the transcript
  text as it is written; the last audio delta carries only `expires_at`. Streaming writes pcm16 only
  (OpenAI's advice; a wav header needs the length).
- A spoken answer is bounded (ServerConfig max_speech_seconds, speech_seconds_per_token, speech_tail_seconds):
  a Talker that never says EOS - a random or a misbehaving one - stops a couple of seconds after its text
  instead of after transformers' 4096 frames (5.5 min).
- The speech path (audio/omni_speech.py) is fed in a worker thread per request, the answer's tokens as the
  engine emits them, so audio chunks go out while the text is still being generated; the Talker steps of all
  spoken answers of a model run batched in its one speech stage (ServedModel.speech_stage).
  The speech that outlasts the text (most of a long answer's) goes out one decoded chunk per delta,
  not in one piece when the Talker stops.
"""
from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from qwenstack.serving.errors import bad_request

EXPIRES_S = 24 * 3600
TALKER_MAX_FRAMES = 4095  # transformers' talker_max_new_tokens 4096, whose last code is never decoded
FORMATS = ("wav", "pcm16")


@dataclass
class AudioAnswer:
    """One request's speech: the session and what has been sent."""

    speech: Any  # AnswerSpeech
    format: str
    sample_rate: int
    id: str = field(default_factory=lambda: f"audio_{uuid.uuid4().hex}")
    samples: list[torch.Tensor] = field(default_factory=list)

    @property
    def expires_at(self) -> int:
        return int(time.time()) + EXPIRES_S


def wants_audio(request: Any) -> bool:
    return bool(request.modalities) and "audio" in request.modalities


def speech_limits(config: Any, frame_seconds: float) -> tuple[int, Any]:
    """The server's bounds in frames: (the Talker's max_frames, SpeechLimits)."""
    from qwenstack.audio.omni_speech import SpeechLimits

    # 1e-9: seconds that are a whole number of frames (2.0 / 0.08) must not lose one to float rounding
    max_frames = max(1, min(TALKER_MAX_FRAMES, int(config.max_speech_seconds / frame_seconds + 1e-9)))
    limits = SpeechLimits(frames_per_token=max(1.0, config.speech_seconds_per_token / frame_seconds),
                          tail_frames=max(0, round(config.speech_tail_seconds / frame_seconds)))
    return max_frames, limits


def start_audio(served: Any, request: Any, plan_ids: list[int], multimodal: Any,
                config: Any) -> AudioAnswer | None:
    """The speech session of a request that asks for audio (None otherwise); 400s for what cannot be served.
    Blocking (plans the multimodal positions): run it in a thread."""
    if not wants_audio(request):
        return None
    from qwenstack.audio.omni_speech import AnswerSpeech
    from qwenstack.models.qwen3_omni_moe_talker import TalkerSampling

    model = served.engine.engine.model
    if not getattr(model, "has_talker", False):
        raise bad_request(f"the model '{served.name}' cannot answer with audio (it has no Talker)",
                          param="modalities", code="unsupported_modality")
    if request.audio is None:
        raise bad_request("modalities includes 'audio', so the 'audio' parameter ({voice, format}) is required",
                          param="audio")
    voices = model.args.talker.voices
    if request.audio.voice.lower() not in voices:
        raise bad_request(f"voice '{request.audio.voice}' is not one of this model's voices: {', '.join(voices)}",
                          param="audio.voice", code="invalid_voice")
    if request.audio.format not in FORMATS or (request.stream and request.audio.format != "pcm16"):
        allowed = "pcm16" if request.stream else ", ".join(FORMATS)
        raise bad_request(f"audio.format '{request.audio.format}' is not supported here (use {allowed})",
                          param="audio.format")
    if (request.n or 1) > 1:
        raise bad_request("audio output supports n = 1 only", param="n")
    plan = None
    if multimodal:
        plan = model.plan_multimodal(plan_ids, multimodal.images, multimodal.audios)
    seed = (request.seed or 0) % 2**63  # any int64 the API accepts, as a generator seed
    c2w = model.code2wav
    max_frames, limits = speech_limits(config, c2w.samples_per_frame / c2w.sample_rate)
    sampling = TalkerSampling(temperature=0.9 if (request.temperature is None or request.temperature > 0) else 0.0,
                              seed=seed, max_frames=max_frames)
    eos = list(served.engine.engine.eos_token_ids)
    # The engine runner's encoder outputs, so the speech path does not encode the prompt's media again.
    step = getattr(getattr(served.engine.engine, "runner", None), "multimodal", None)
    speech = AnswerSpeech(model, plan_ids, plan, request.audio.voice, eos, sampling=sampling, limits=limits,
                          encoder_cache=getattr(step, "cache", None), stage=getattr(served, "speech_stage", None))
    return AudioAnswer(speech, request.audio.format, model.code2wav.sample_rate)


def close_audio(answer: AudioAnswer | None) -> None:
    """Ends a request's speech (finished, failed or cancelled): the Talker stage drops it and frees its KV."""
    if answer is not None:
        answer.speech.close()


def pcm16_b64(samples: torch.Tensor) -> str:
    from qwenstack.tts.audio_format import pcm16

    return base64.b64encode(pcm16(samples)).decode()


def message_audio(answer: AudioAnswer, transcript: str) -> dict[str, Any]:
    from qwenstack.tts.audio_format import encode_whole

    samples = torch.cat(answer.samples) if answer.samples else torch.zeros(0)
    fmt = "pcm" if answer.format == "pcm16" else answer.format
    data = base64.b64encode(encode_whole(samples, answer.sample_rate, fmt)).decode()
    return {"id": answer.id, "data": data, "expires_at": answer.expires_at, "transcript": transcript}
