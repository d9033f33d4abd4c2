"""Live transcription of a growing audio stream: committed text that never changes plus a revisable tail.

The official Qwen3-ASR streaming method (qwen-asr's vLLM backend, reference/speech-and-images.md §2.3):
audio is buffered; every `chunk_seconds` of new audio the model re-reads ALL the audio so far, with the
previous answer minus its last `rollback_tokens` tokens already written as the start of the new answer.
For the first `unfixed_chunks` decodes nothing is forced. We follow it, with two decisions of our own:
- The prefix is kept as token ids, not re-tokenized text (re-encoding a decoded prefix can split it
  differently), and it never shrinks: what was forced once is committed and stays. The committed text is
  therefore append-only; everything after it is the tentative tail, which the next decode may rewrite.
  As in the official code, the cut moves back further while the prefix would end inside a character.
- `finish()` decodes once more over all the audio with the committed prefix and no new-token cap beyond
  the transcript bound, and commits everything.

LiveTranscription is the state machine without I/O (what to decode next, what a decode means); Transcriber
drives it with an LLM (the Python API); the WebSocket route drives it with the server's async engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qwenstack.audio.asr import ASR_TEXT, AsrPrompter, max_transcript_tokens
from qwenstack.audio.decode import SAMPLE_RATE, resample
from qwenstack.engine.params import SamplingParams
from qwenstack.multimodal.inputs import AudioInput, MultimodalInputs

REPLACEMENT = "\ufffd"


@dataclass
class LiveSettings:
    chunk_seconds: float = 2.0  # decode after this much new audio (the official default)
    unfixed_chunks: int = 2  # decodes at the start with nothing forced
    rollback_tokens: int = 5  # the tail of each answer left open to revision
    max_new_tokens: int = 32  # per intermediate decode (the official example's value)
    context: str = ""
    language: str | None = None  # Qwen's language name, or None to detect


@dataclass
class DecodeRequest:
    prompt_ids: list[int]
    clip: AudioInput
    params: SamplingParams
    final: bool

    @property
    def multimodal(self) -> MultimodalInputs:
        return MultimodalInputs(audios=[self.clip])


class LiveTranscription:
    """The stream's state: audio so far (at its own rate), the committed answer tokens, the last answer."""

    def __init__(self, prompter: AsrPrompter, settings: LiveSettings = LiveSettings(), input_rate: int = SAMPLE_RATE,
                 max_model_len: int | None = None) -> None:
        self.prompter = prompter
        self.settings = settings
        self.input_rate = input_rate
        self.max_model_len = max_model_len
        self.eos = set(prompter.tokenizer.eos_token_ids)
        self.reset()

    def reset(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.samples = 0  # input samples so far
        self.decoded_samples = 0  # input samples the last decode saw
        self.decodes = 0
        self.committed: list[int] = []  # answer tokens forced into every later decode: final
        self.answer: list[int] = []  # the last decode's whole answer (committed + tentative)

    # --- audio in -------------------------------------------------------------------------------------

    def add(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if len(samples):
            self.chunks.append(samples)
            self.samples += len(samples)

    @property
    def seconds(self) -> float:
        return self.samples / self.input_rate

    def due(self) -> bool:
        """Whether a chunk's worth of new audio has arrived since the last decode."""
        return self.samples - self.decoded_samples >= self.settings.chunk_seconds * self.input_rate

    def audio(self) -> np.ndarray:
        """All audio so far at 16 kHz (resampled as a whole, exactly as an offline transcription would be)."""
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        raw = self.chunks[0] if self.chunks else np.zeros(0, np.float32)
        return resample(raw, self.input_rate, SAMPLE_RATE)

    # --- decodes --------------------------------------------------------------------------------------

    def next_request(self, final: bool = False) -> DecodeRequest | None:
        """The decode to run now over all the audio so far (None when there is no audio)."""
        if self.samples == 0:
            return None
        s = self.settings
        clip = self.prompter.clip(self.audio())
        ids = self.prompter.prompt_ids(clip, s.context, s.language) + self.committed
        room = None if self.max_model_len is None else self.max_model_len - len(ids)
        cap = max_transcript_tokens(clip.seconds) if final else s.max_new_tokens
        if room is not None:
            cap = max(1, min(cap, room))
        self.decoded_samples = self.samples
        return DecodeRequest(ids, clip, SamplingParams(temperature=0, max_tokens=cap), final)

    def accept(self, request: DecodeRequest, new_tokens: list[int]) -> tuple[str, str]:
        """A decode's output -> (committed text, tentative text), committing what the method fixes."""
        new = list(new_tokens)
        while new and new[-1] in self.eos:
            new.pop()
        self.answer = self.committed + new
        self.decodes += 1
        if request.final:
            self.committed = list(self.answer)
        elif self.decodes > self.settings.unfixed_chunks:
            cut = len(self.answer) - self.settings.rollback_tokens
            while cut > len(self.committed) and REPLACEMENT in self._decode(self.answer[:cut])[-1:]:
                cut -= 1  # do not fix a prefix that ends inside a character
            if cut > len(self.committed):
                self.committed = self.answer[:cut]
        return self.texts()

    def texts(self) -> tuple[str, str]:
        committed = self.transcript(self.committed)
        whole = self.transcript(self.answer)
        tentative = whole[len(committed):] if whole.startswith(committed) else whole
        return committed, tentative

    def transcript(self, tokens: list[int]) -> str:
        """The transcript part of answer tokens (after `<asr_text>`, or all of it when the answer has no header:
        the language forced in the prompt, or a model asked in words); leading spaces dropped, so a longer prefix
        only ever appends."""
        text = self._decode(tokens)
        if self.prompter.headed(self.settings.language):
            head, marker, rest = text.partition(ASR_TEXT)
            text = rest if marker else ""
        return text.lstrip()

    def _decode(self, tokens: list[int]) -> str:
        return self.prompter.tokenizer.decode(tokens, skip_special_tokens=True)


class Transcriber:
    """Live transcription through an LLM: `feed(pcm)` returns (committed, tentative) after each call.

        t = Transcriber(LLM("Qwen/Qwen3-ASR-0.6B"))
        for chunk in microphone():                  # float32 samples at 16 kHz (or `sample_rate`)
            committed, tentative = t.feed(chunk)
        text = t.finish()
    """

    def __init__(self, llm: Any, settings: LiveSettings | None = None, sample_rate: int = SAMPLE_RATE) -> None:
        prompter = AsrPrompter.for_model(llm.loaded.model, llm.tokenizer, llm.loaded.path)
        if prompter is None:
            raise ValueError(f"{llm.loaded.name} has no audio encoder: live transcription needs a speech model")
        self.llm = llm
        self.state = LiveTranscription(prompter, settings or LiveSettings(), sample_rate, llm.engine.max_model_len)

    def _run(self, request: DecodeRequest) -> tuple[str, str]:
        out = self.llm.engine.generate_all([request.prompt_ids], [request.params], [request.multimodal])[0]
        return self.state.accept(request, out.outputs[0].token_ids)

    def feed(self, pcm: np.ndarray) -> tuple[str, str]:
        self.state.add(pcm)
        if self.state.due():
            request = self.state.next_request()
            if request is not None:
                return self._run(request)
        return self.state.texts()

    def finish(self) -> str:
        """Decodes the whole stream one last time and commits everything; returns the full transcript."""
        request = self.state.next_request(final=True)
        if request is not None:
            self._run(request)
        return self.state.texts()[0]


__all__ = ["DecodeRequest", "LiveSettings", "LiveTranscription", "Transcriber"]
