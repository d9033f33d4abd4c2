"""Offline transcription through an LLM (the Python API and the CLI): a recording cut at silences, every
segment decoded in one engine batch, the answers parsed into timed text."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from qwenstack.audio.asr import AsrPrompter, max_transcript_tokens, segment_prompts
from qwenstack.engine.params import SamplingParams
from qwenstack.multimodal.inputs import MultimodalInputs


@dataclass
class TimedText:
    start: float
    end: float
    text: str


@dataclass
class Transcript:
    text: str
    language: str | None  # Qwen's name of the (first) detected or forced language
    segments: list[TimedText]
    seconds: float


def prompter_of(llm: Any) -> AsrPrompter:
    prompter = AsrPrompter.for_model(llm.loaded.model, llm.tokenizer, llm.loaded.path)
    if prompter is None:
        raise ValueError(f"{llm.loaded.name} has no audio encoder: transcription needs a speech model "
                         "such as Qwen/Qwen3-ASR-0.6B")
    return prompter


def transcribe_samples(llm: Any, samples: np.ndarray, *, language: str | None = None, context: str = "",
                       temperature: float = 0.0, max_segment_seconds: float = 30.0,
                       on_segment: Callable[[int, int], None] | None = None) -> Transcript:
    """16 kHz mono samples -> Transcript. `language` is Qwen's name (see asr.language_name) or None.
    on_segment(done, total) is called as segments finish (a progress bar)."""
    prompter = prompter_of(llm)
    pieces = segment_prompts(prompter, samples, context, language, max_segment_seconds)
    room = llm.engine.max_model_len
    params = [SamplingParams(temperature=temperature,
                             max_tokens=max(1, min(max_transcript_tokens(p.end - p.start), room - len(p.prompt_ids))))
              for p in pieces]
    engine = llm.engine
    batch = uuid.uuid4().hex[:12]
    ids = [f"transcribe-{batch}-{i}" for i in range(len(pieces))]
    for rid, piece, p in zip(ids, pieces, params):
        engine.add_request(rid, piece.prompt_ids, p, multimodal=MultimodalInputs(audios=[piece.clip]))
    finals: dict[str, Any] = {}
    while len(finals) < len(ids):
        for out in engine.step():
            if out.finished and out.request_id in ids:
                finals[out.request_id] = out
                if on_segment is not None:
                    on_segment(len(finals), len(ids))
    parsed = [prompter.parse(finals[rid].outputs[0].text, language) for rid in ids]
    segments = [TimedText(p.start, p.end, a.text) for p, a in zip(pieces, parsed)]
    detected = next((a.language for a in parsed if a.language), language)
    return Transcript(" ".join(s.text for s in segments if s.text), detected, segments, len(samples) / 16000)


__all__ = ["TimedText", "Transcript", "prompter_of", "transcribe_samples"]
