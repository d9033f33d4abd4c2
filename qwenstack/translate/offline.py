"""The offline pipeline over the same components a live session uses: transcribe the whole clip, cut the
transcript into the same units, translate them in order, synthesise each. With greedy settings a live
session's final output equals this (tests/translate/test_translate_session.py), so it is the reference a stream is
checked against and what `qwenstack translate` can compare with."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from qwenstack.audio.asr import max_transcript_tokens, segment_prompts
from qwenstack.engine.params import SamplingParams
from qwenstack.multimodal.inputs import MultimodalInputs
from qwenstack.translate.pipeline import TranslationPipeline
from qwenstack.translate.translator import Unit, translate_text
from qwenstack.translate.units import joiner


@dataclass
class OfflineTranslation:
    source: str
    units: list[Unit]
    audio: np.ndarray  # float32 at the TTS model's rate

    @property
    def text(self) -> str:
        out = ""
        for unit in self.units:
            if unit.text:
                out += (joiner(unit.language) if out else "") + unit.text
        return out


async def transcribe(pipeline: TranslationPipeline, samples: np.ndarray, language: str | None = None) -> str:
    """16 kHz samples -> transcript, as audio.transcribe does it, through the pipeline's async ASR engine."""
    asr = pipeline.generate(pipeline.asr, "offline-asr")
    pieces = segment_prompts(pipeline.prompter, samples, "", language)
    room = pipeline.asr.max_model_len
    outs = await asyncio.gather(*(asr(p.prompt_ids, SamplingParams(temperature=0, max_tokens=max(
        1, min(max_transcript_tokens(p.end - p.start), room - len(p.prompt_ids)))), MultimodalInputs(audios=[p.clip]))
        for p in pieces))
    texts = [pipeline.prompter.parse(pipeline.asr.tokenizer.decode(o, skip_special_tokens=True), language).text
             for o in outs]
    return " ".join(t for t in texts if t)


async def translate_offline(pipeline: TranslationPipeline, samples: np.ndarray, language: str,
                            voice: str | None = None) -> OfflineTranslation:
    source = await transcribe(pipeline, samples, pipeline.settings.live.language)
    llm = pipeline.generate(pipeline.llm, "offline-mt")
    units = await translate_text(pipeline.translator, llm, source, language, pipeline.settings.units,
                                 pipeline.llm.max_model_len)
    audio: list[np.ndarray] = []
    for unit in units:
        if unit.text:
            request = pipeline.speech_request(unit.text, unit.language, voice or pipeline.default_voice)
            audio += [chunk async for chunk in pipeline.synthesize(request)]
    return OfflineTranslation(source, units, np.concatenate(audio) if audio else np.zeros(0, np.float32))


__all__ = ["OfflineTranslation", "transcribe", "translate_offline"]
