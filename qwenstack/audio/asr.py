"""Qwen3-ASR's prompt and output format, independent of HTTP: what the server, the CLI and live
transcription share.

Decisions:
- The prompt is the one Qwen3-ASR was trained on (its chat template, as the qwen-asr package renders it):
  the context (OpenAI's `prompt` field) as the system message, the audio as the user message, and, when
  the caller names the language, `language <Name><asr_text>` already written at the start of the answer.
- The answer is `language <Name><asr_text><transcript>` (`language None` for no speech). TranscriptText
  turns a growing answer into transcript deltas: nothing is emitted until `<asr_text>` has appeared, so a
  stream never shows the language header; an answer without the marker is all transcript.
- Qwen3-Omni hears too but was not trained on that format: its prompt asks in words ("Transcribe the audio
  into text.", naming the language when the caller does) and its answer is the transcript alone, with no
  header. The prompter knows which format its model speaks (`headed`), so callers parse through it.
- Languages are accepted as ISO-639-1 codes (OpenAI's `language` field) or as Qwen's names.
- A clip's prompt is made of token ids with the placeholder already expanded to the clip's encoder rows;
  the clip's content hash covers its decoded samples' features, so equal audio shares the encoder cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qwenstack.audio.features import MelSettings, log_mel
from qwenstack.errors import ConfigError, RequestError
from qwenstack.multimodal.inputs import AudioInput

ASR_TEXT = "<asr_text>"
AUDIO_START, AUDIO_END = "<|audio_start|>", "<|audio_end|>"

# ISO-639-1 (and a few ISO-639-3) codes -> the language names Qwen3-ASR writes and accepts.
LANGUAGES = {
    "zh": "Chinese", "en": "English", "yue": "Cantonese", "ar": "Arabic", "de": "German", "fr": "French",
    "es": "Spanish", "pt": "Portuguese", "id": "Indonesian", "it": "Italian", "ko": "Korean", "ru": "Russian",
    "th": "Thai", "vi": "Vietnamese", "ja": "Japanese", "tr": "Turkish", "hi": "Hindi", "ms": "Malay",
    "nl": "Dutch", "sv": "Swedish", "da": "Danish", "fi": "Finnish", "pl": "Polish", "cs": "Czech",
    "fil": "Filipino", "tl": "Filipino", "fa": "Persian", "el": "Greek", "ro": "Romanian", "hu": "Hungarian",
    "mk": "Macedonian",
}
_NAME_TO_CODE = {name.lower(): code for code, name in LANGUAGES.items()}


def language_name(language: str | None) -> str | None:
    """'en' or 'English' (any case) -> 'English'; None or '' -> None. Raises RequestError for others."""
    if not language:
        return None
    key = language.strip().lower()
    if key in LANGUAGES:
        return LANGUAGES[key]
    if key in _NAME_TO_CODE:
        return LANGUAGES[_NAME_TO_CODE[key]]
    raise RequestError(f"language '{language}' is not one Qwen3-ASR knows (use an ISO-639-1 code such as 'en', "
                       f"or one of: {', '.join(sorted(set(LANGUAGES.values())))})")


def language_code(name: str | None) -> str | None:
    """'English' -> 'en' (the form OpenAI's verbose_json reports); unknown names pass through lowercased."""
    if not name or name == "None":
        return None
    return _NAME_TO_CODE.get(name.lower(), name.lower())


@dataclass
class AsrOutput:
    language: str | None  # Qwen's name, e.g. "English"; None when the model found no speech
    text: str


def parse_asr_output(raw: str, forced_language: str | None = None) -> AsrOutput:
    """`language English<asr_text>hello` -> AsrOutput('English', 'hello')."""
    if forced_language is not None:  # the header was part of the prompt: the answer is the transcript
        return AsrOutput(forced_language, raw.strip())
    head, marker, text = raw.partition(ASR_TEXT)
    if not marker:
        return AsrOutput(None, raw.strip())
    head = head.strip()
    name = head[len("language"):].strip() if head.startswith("language") else head
    return AsrOutput(None if name in ("", "None") else name, text.strip())


class TranscriptText:
    """Incremental form of parse_asr_output: feed answer text, get transcript text as it becomes certain."""

    def __init__(self, forced_language: str | None = None, headed: bool | None = None) -> None:
        self.in_text = not headed if headed is not None else forced_language is not None
        self.pending = ""  # answer text held back while the header may still be running
        self.emitted = ""

    def feed(self, delta: str) -> str:
        if self.in_text:
            out = delta if self.emitted else delta.lstrip()
        else:
            self.pending += delta
            head, marker, rest = self.pending.partition(ASR_TEXT)
            if not marker:
                return ""
            self.in_text, self.pending = True, ""
            out = rest.lstrip()
        self.emitted += out
        return out

    def finish(self) -> str:
        """Whatever was held back: an answer that never wrote the marker is all transcript."""
        out = "" if self.in_text else self.pending.strip()
        self.pending = ""
        self.emitted += out
        return out


class AsrPrompter:
    """Builds Qwen3-ASR prompts (token ids with the audio placeholders expanded) for one served model."""

    def __init__(self, tokenizer: Any, model: Any, mel: MelSettings) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.mel = mel
        args = model.args
        # Qwen3-ASR's answer format, or a chat model that hears (Qwen3-Omni) asked in words (module notes).
        self.instructed = str(getattr(args, "model_type", "")).startswith("qwen3_omni")
        self.audio_token_id = int(args.audio_token_id)
        pad = tokenizer.id_to_token(self.audio_token_id)
        if pad is None or tokenizer.token_to_id(AUDIO_START) is None or tokenizer.token_to_id(AUDIO_END) is None:
            raise ConfigError(f"the tokenizer lacks Qwen3-ASR's audio tokens ({AUDIO_START}, the token of "
                              f"audio_token_id={self.audio_token_id}, {AUDIO_END})")
        self.placeholder = AUDIO_START + pad + AUDIO_END

    @classmethod
    def for_model(cls, model: Any, tokenizer: Any, model_dir: Any = None) -> "AsrPrompter | None":
        """The prompter of a model with an audio encoder (None for others); mel settings from the checkpoint's
        feature extractor's settings when it has them (MelSettings.from_dir)."""
        if not hasattr(model, "encode_audio"):
            return None
        return cls(tokenizer, model, MelSettings() if model_dir is None else MelSettings.from_dir(model_dir))

    def clip(self, samples: np.ndarray, content_hash: str | None = None) -> AudioInput:
        """16 kHz mono samples -> the clip the engine carries (features and hash)."""
        return AudioInput.from_features(log_mel(samples, self.mel), len(samples) / self.mel.sampling_rate,
                                        content_hash)

    def prompt_text(self, context: str = "", language: str | None = None, prefix: str = "") -> str:
        if self.instructed:
            system = f"<|im_start|>system\n{context}<|im_end|>\n" if context else ""
            spoken = f"{language} audio" if language else "audio"
            return (f"{system}<|im_start|>user\n{self.placeholder}Transcribe the {spoken} into text.<|im_end|>\n"
                    f"<|im_start|>assistant\n{prefix}")
        head = f"language {language}{ASR_TEXT}" if language else ""
        return (f"<|im_start|>system\n{context}<|im_end|>\n<|im_start|>user\n{self.placeholder}<|im_end|>\n"
                f"<|im_start|>assistant\n{head}{prefix}")

    def headed(self, language: str | None) -> bool:
        """Whether the answer starts with the `language X<asr_text>` header (Qwen3-ASR detecting the language);
        otherwise it is the transcript alone."""
        return language is None and not self.instructed

    def parse(self, raw: str, language: str | None) -> AsrOutput:
        """An answer to prompt_text(language=...) -> its language and transcript."""
        if self.headed(language):
            return parse_asr_output(raw)
        return AsrOutput(language, raw.strip())

    def transcript_start(self, token_ids: list[int], language: str | None) -> int:
        """Where the transcript begins among an answer's tokens: after the `<asr_text>` that ends the language
        header, or 0 (no header asked for, or an answer that never wrote the marker: all transcript, as parse
        reads it). The marker is looked for in the tokens' text, so a vocabulary that spells it in pieces works as
        well as the released one, where it is one token; a token that runs on past the marker carries transcript
        text, so the transcript starts with it."""
        if not self.headed(language):
            return 0
        text = ""
        for i, token in enumerate(token_ids):
            text += self.tokenizer.decode([token])
            at = text.find(ASR_TEXT)
            if at >= 0:
                return i + 1 if at + len(ASR_TEXT) == len(text) else i
        return 0

    def transcript_text(self, language: str | None) -> "TranscriptText":
        """parse's incremental form, for a streamed answer."""
        return TranscriptText(language, headed=self.headed(language))

    def prompt_ids(self, clip: AudioInput, context: str = "", language: str | None = None,
                   prefix: str = "") -> list[int]:
        ids = self.tokenizer.encode(self.prompt_text(context, language, prefix))
        return self.expand(ids, [clip])

    def expand(self, ids: list[int], clips: list[AudioInput]) -> list[int]:
        """Each single audio placeholder token -> as many as its clip has encoder rows."""
        at = [i for i, t in enumerate(ids) if t == self.audio_token_id]
        if len(at) != len(clips):
            raise RequestError("the text contains audio placeholder tokens; send audio as audio parts")
        out: list[int] = []
        start = 0
        for position, clip in zip(at, clips):
            out += ids[start:position] + [self.audio_token_id] * self.model.audio_tokens(clip)
            start = position + 1
        return out + ids[start:]


@dataclass
class SegmentPrompt:
    """One piece of a long recording, ready for the engine."""

    start: float  # seconds into the recording
    end: float
    clip: AudioInput
    prompt_ids: list[int]


def segment_prompts(prompter: AsrPrompter, samples: np.ndarray, context: str = "", language: str | None = None,
                    max_seconds: float = 30.0) -> list[SegmentPrompt]:
    """A recording cut at silences into pieces of at most `max_seconds`, each with its prompt."""
    from qwenstack.audio.segment import split_at_silences

    rate = prompter.mel.sampling_rate
    out = []
    for seg in split_at_silences(samples, rate, max_seconds):
        clip = prompter.clip(samples[seg.start:seg.end])
        out.append(SegmentPrompt(seg.start / rate, seg.end / rate, clip, prompter.prompt_ids(clip, context, language)))
    return out


def max_transcript_tokens(seconds: float) -> int:
    """A bound on a transcript's length: fast speech is about 5 tokens a second; this allows 4x that, so a
    model that never stops (or a random one in tests) cannot run to the context limit."""
    return int(32 + 20 * seconds)


__all__ = ["ASR_TEXT", "AsrOutput", "AsrPrompter", "LANGUAGES", "SegmentPrompt", "segment_prompts", "TranscriptText", "language_code",
           "language_name", "max_transcript_tokens", "parse_asr_output"]
