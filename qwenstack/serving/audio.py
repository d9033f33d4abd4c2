"""Audio for the server: the ASR prompter of a served model, decoding uploads with 400s for bad audio, and
the `input_audio` / `audio_url` content parts of chat messages.

Decisions:
- A model takes audio when it has an audio encoder (`encode_audio`); its mel settings come from the
  checkpoint's preprocessor_config.json when there is one.
- Decoding and feature extraction run in a worker thread, never on the event loop.
- Every refusal is a 400 with code `invalid_audio` naming what was wrong (corrupt, empty, over the byte or
  seconds limit, unsupported source), so one bad upload never becomes a 500.
- Chat parts: `input_audio.data` is base64 of an encoded file (any format libsndfile reads; `format` is a
  hint only); `audio_url.url` must be a `data:` URL (the server does not fetch audio from elsewhere). In
  the prompt each part is Qwen's `<|audio_start|><|audio_pad|><|audio_end|>`, expanded after tokenizing.
"""
from __future__ import annotations

import asyncio
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenstack.audio.asr import AsrPrompter
from qwenstack.audio.decode import AudioError, AudioLimits, DecodedAudio, decode_audio
from qwenstack.multimodal.image_processing import lenient_b64decode
from qwenstack.multimodal.inputs import AudioInput, MultimodalInputs
from qwenstack.serving.errors import bad_request


def asr_prompter_for(model: Any, tokenizer: Any, model_dir: Path | None) -> AsrPrompter | None:
    """The prompter of a model with an audio encoder (None for others)."""
    return AsrPrompter.for_model(model, tokenizer, model_dir)


def audio_limits(config: Any) -> AudioLimits:
    return AudioLimits(max_bytes=config.max_audio_bytes, max_seconds=config.max_audio_seconds)


async def decode_upload(data: bytes, config: Any, param: str = "file") -> DecodedAudio:
    """Encoded audio -> 16 kHz mono samples, or a 400 naming the problem."""
    try:
        return await asyncio.to_thread(decode_audio, data, audio_limits(config))
    except AudioError as exc:
        raise bad_request(f"{param}: {exc}", param=param, code="invalid_audio") from None


def require_audio_model(served: Any) -> AsrPrompter:
    if served.asr is None:
        raise bad_request(f"the model '{served.name}' does not accept audio (it has no audio encoder)",
                          param="model", code="unsupported_content")
    return served.asr


# --- chat content parts --------------------------------------------------------------------------------


@dataclass
class AudioRef:
    """An audio part of a chat request, with where it was (for error messages)."""

    message: int
    part: int
    part_type: str  # "input_audio" or "audio_url"
    data: str  # base64 (input_audio) or a URL (audio_url)

    @property
    def param(self) -> str:
        return f"messages.{self.message}.content.{self.part}.{self.part_type}"

    @property
    def where(self) -> str:
        return f"messages[{self.message}].content[{self.part}]"


def audio_ref(message: int, index: int, part: Any) -> AudioRef:
    if part.type == "input_audio":
        return AudioRef(message, index, part.type, part.input_audio.data)
    return AudioRef(message, index, part.type, part.audio_url.url)


def _part_bytes(ref: AudioRef, max_bytes: int) -> bytes:
    payload = ref.data.strip()
    if ref.part_type == "audio_url":
        if not payload.lower().startswith("data:"):
            raise AudioError("audio_url.url must be a data: URL with base64 audio (the server does not fetch "
                             "audio from other places)")
        header, _, payload = payload.partition(",")
        if ";base64" not in header.lower():
            raise AudioError("audio_url data: URLs must be base64-encoded")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise AudioError(f"the audio is over the limit of {max_bytes} bytes")
    try:
        return lenient_b64decode(payload)
    except (binascii.Error, ValueError):
        raise AudioError("the audio data is not valid base64") from None


async def load_audio_parts(refs: list[AudioRef], prompter: AsrPrompter, config: Any) -> list[AudioInput]:
    clips = []
    limits = audio_limits(config)
    for ref in refs:
        try:
            data = _part_bytes(ref, limits.max_bytes)
            decoded = await asyncio.to_thread(decode_audio, data, limits)
        except AudioError as exc:
            raise bad_request(f"{ref.where}: {exc}", param=ref.param, code="invalid_audio") from None
        clips.append(await asyncio.to_thread(prompter.clip, decoded.samples))
    return clips


async def attach_audio(plan: Any, state: Any) -> None:
    """Loads a chat plan's audio parts and expands their placeholders in prompt_ids."""
    if not plan.audio_refs:
        return
    prompter = require_audio_model(plan.served)
    clips = await load_audio_parts(plan.audio_refs, prompter, state.config)
    plan.prompt_ids = prompter.expand(plan.prompt_ids, clips)
    images = plan.multimodal.images if plan.multimodal else []
    plan.multimodal = MultimodalInputs(images=list(images), audios=clips)


__all__ = ["AudioRef", "asr_prompter_for", "attach_audio", "audio_limits", "audio_ref", "decode_upload",
           "load_audio_parts", "require_audio_model"]
