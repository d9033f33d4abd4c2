"""A translation pipeline: the three models a live translation runs through, by one model id.

Decisions:
- The parts are the building blocks the server already has: a Qwen3-ASR model and a Qwen3 LLM each behind
  its own AsyncEngine (one owner thread, continuous batching with every other request), and a Qwen3-TTS
  model behind a SpeechService (the batched streaming talker). Sessions share them; nothing here holds a
  session's state.
- Speech is read from the SpeechService's queue by polling, not by a blocking read in a worker thread: a
  hundred sessions waiting for audio then hold no threads, and a slow one holds nothing anyone else needs.
- The voice is a speaker of a CustomVoice model or "default" for a VoiceDesign one; the target language is
  passed to the talker when it knows it, else the talker's "auto".
"""
from __future__ import annotations

import asyncio
import queue
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

import numpy as np

from qwenstack.audio.asr import AsrPrompter
from qwenstack.audio.live import LiveSettings
from qwenstack.engine.params import SamplingParams
from qwenstack.tts.engine import SpeechParams, SpeechRequest, SpeechService
from qwenstack.tts.loader import TTSModel
from qwenstack.translate.translator import TARGETS, Generate, Translator, TranslatorSettings
from qwenstack.translate.units import UnitPolicy

POLL_SECONDS = 0.01  # how often a waiting speech stream looks at its queue


class EngineModel(Protocol):
    """A served text model (serving.served.ServedModel, or the CLI's in-process one)."""

    name: str
    engine: Any  # qwenstack.engine.async_engine.AsyncEngine
    tokenizer: Any
    max_model_len: int


@dataclass
class PipelineSettings:
    live: LiveSettings = field(default_factory=LiveSettings)
    units: UnitPolicy = field(default_factory=UnitPolicy)
    translator: TranslatorSettings = field(default_factory=TranslatorSettings)
    speech: SpeechParams = field(default_factory=SpeechParams)  # seed None: sampled as qwen-tts does
    max_frames_per_char: float = 2.0  # a unit's speech is at most this many 80 ms frames per character (+16)


@dataclass
class TranslationPipeline:
    name: str
    asr: EngineModel
    prompter: AsrPrompter
    llm: EngineModel
    tts: TTSModel
    speech: SpeechService
    settings: PipelineSettings = field(default_factory=PipelineSettings)
    voice: str | None = None  # the default voice; None: the TTS model's first

    def __post_init__(self) -> None:
        if self.tts.kind not in ("custom_voice", "voice_design"):
            raise ValueError(f"{self.tts.name} is a {self.tts.kind} model: a translation pipeline speaks with a "
                             "CustomVoice or VoiceDesign model")
        if self.voice is not None:
            self.voice = self.check_voice(self.voice)
        self.translator = Translator(self.llm.tokenizer, self.settings.translator)

    # --- voices and languages --------------------------------------------------------------------------

    @property
    def voices(self) -> list[str]:
        return list(self.tts.speakers) if self.tts.kind == "custom_voice" else ["default"]

    @property
    def default_voice(self) -> str:
        return self.voice or self.voices[0]

    def check_voice(self, voice: Any) -> str:
        if not isinstance(voice, str) or voice.lower() not in self.voices:
            raise ValueError(f"unknown voice {voice!r} (voices: {', '.join(self.voices)})")
        return voice.lower()

    def speech_language(self, code: str) -> str:
        name = TARGETS[code].lower()
        return name if name in self.tts.model.args.languages else "auto"

    # --- the three stages' calls ---------------------------------------------------------------------

    def generate(self, model: EngineModel, prefix: str) -> Generate:
        async def run(prompt_ids: list[int], params: SamplingParams, multimodal: Any = None) -> list[int]:
            final = None
            async for out in model.engine.generate(prompt_ids, params, request_id=f"{prefix}-{uuid.uuid4().hex}",
                                                   multimodal=multimodal):
                final = out
            return [] if final is None else list(final.outputs[0].token_ids)

        return run

    def speech_request(self, text: str, language: str, voice: str) -> SpeechRequest:
        tts = self.tts
        speaker = voice if tts.kind == "custom_voice" else None
        prompt = tts.model.build_prompt(tts.text_ids(text), self.speech_language(language), speaker)
        base = self.settings.speech
        frames = min(base.max_frames, 16 + int(len(text) * self.settings.max_frames_per_char))
        params = SpeechParams(**{**base.__dict__, "max_frames": frames})
        return SpeechRequest(self.speech.new_request_id(), prompt, params)

    async def synthesize(self, request: SpeechRequest) -> AsyncIterator[np.ndarray]:
        """The request's audio (float32 at the codec's rate) as the talker makes it; aborted if abandoned."""
        sink = self.speech.submit(request)
        done = False
        try:
            while True:
                try:
                    item = sink.get_nowait()
                except queue.Empty:
                    await asyncio.sleep(POLL_SECONDS)
                    continue
                if isinstance(item, BaseException):
                    done = True
                    raise item
                if not hasattr(item, "samples"):  # the end marker
                    done = True
                    return
                if item.samples.numel():
                    yield item.samples.float().cpu().numpy()
                if item.finished:
                    done = True
                    return
        finally:
            if not done:
                self.speech.abort(request.request_id)


__all__ = ["EngineModel", "PipelineSettings", "TranslationPipeline"]
