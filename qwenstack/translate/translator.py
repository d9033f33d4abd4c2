"""The incremental translator: a Qwen3 LLM prompted to translate, fed committed source text.

IncrementalTranslation is the state without I/O (as audio/live.py's LiveTranscription): committed source
text comes in append-only; `ready()` says which units are complete (translation/units.py); a unit's
translation, once recorded, is committed and published whole. The uncommitted tail (source text not yet in
a complete unit) may be translated too, as a tentative preview that the next call replaces: only the tail
is ever re-translated, never what was published.

Decisions:
- Each unit is one greedy chat request with thinking off: a system message naming the target language,
  then the last `context_units` units and their translations as earlier turns (so pronouns and terms carry
  over), then the unit. The same prompt for the same history, so the offline pipeline (translate_text)
  gives exactly the live result.
- The answer is cut to its first non-empty line with whitespace collapsed: a translation is one line of
  speech, and a model that rambles on after it must not reach the speaker.
- The target language may change between units; units already published stay as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from qwenstack.engine.params import SamplingParams
from qwenstack.markup import THINK_END
from qwenstack.translate.units import UnitPolicy, cut_units, joiner

# ISO-639-1 codes -> names the prompt uses (the languages Qwen3-TTS and Qwen3-ASR both cover, and more).
TARGETS = {
    "en": "English", "zh": "Chinese", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian",
    "pt": "Portuguese", "ru": "Russian", "ja": "Japanese", "ko": "Korean", "ar": "Arabic", "nl": "Dutch",
    "tr": "Turkish", "vi": "Vietnamese", "th": "Thai", "id": "Indonesian", "hi": "Hindi", "pl": "Polish",
    "sv": "Swedish", "yue": "Cantonese",
}


def target_code(language: Any) -> str:
    """'de', 'DE' or 'German' -> 'de'; raises ValueError naming the choices for anything else."""
    key = str(language or "").strip().lower()
    if key in TARGETS:
        return key
    for code, name in TARGETS.items():
        if name.lower() == key:
            return code
    raise ValueError(f"target language {language!r} is not supported (use one of: {', '.join(sorted(TARGETS))})")


# (prompt token ids, sampling) -> completion token ids; the server and the CLI back it with an AsyncEngine.
Generate = Callable[[list[int], SamplingParams], Awaitable[list[int]]]


@dataclass
class TranslatorSettings:
    context_units: int = 3  # earlier units (and their translations) shown to the model
    max_tokens_per_source_token: float = 3.0
    min_tokens: int = 16


@dataclass
class Unit:
    source: str
    text: str  # its committed translation
    language: str  # the target code it was translated into


class Translator:
    """Prompts and answers of one LLM (its tokenizer); no state of a stream."""

    def __init__(self, tokenizer: Any, settings: TranslatorSettings | None = None) -> None:
        self.tokenizer = tokenizer
        self.settings = settings or TranslatorSettings()

    def messages(self, source: str, language: str, history: list[Unit]) -> list[dict[str, str]]:
        name = TARGETS[language]
        out = [{"role": "system", "content": f"You are a simultaneous interpreter. Translate each message into "
                                             f"{name}. Reply with the {name} translation only."}]
        for unit in history[-self.settings.context_units:] if self.settings.context_units else []:
            out += [{"role": "user", "content": unit.source}, {"role": "assistant", "content": unit.text}]
        return out + [{"role": "user", "content": source}]

    def prompt_ids(self, source: str, language: str, history: list[Unit]) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(self.messages(source, language, history),
                                                    add_generation_prompt=True, enable_thinking=False)
        return self.tokenizer.encode(prompt)

    def params(self, source: str) -> SamplingParams:
        n = len(self.tokenizer.encode(source))
        s = self.settings
        return SamplingParams(temperature=0, max_tokens=max(s.min_tokens, int(n * s.max_tokens_per_source_token)))

    def answer(self, token_ids: list[int]) -> str:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        text = text.split(THINK_END)[-1]  # a model that thinks anyway: the answer follows the block
        for line in text.splitlines():
            if line.strip():
                return " ".join(line.split())
        return ""

    async def translate(self, generate: Generate, source: str, language: str, history: list[Unit],
                        max_model_len: int | None = None) -> str:
        ids = self.prompt_ids(source, language, history)
        params = self.params(source)
        if max_model_len is not None:
            room = max_model_len - len(ids)
            if room < 1:
                raise ValueError(f"the translation prompt ({len(ids)} tokens) does not fit the LLM's context "
                                 f"({max_model_len}); lower context_units")
            params.max_tokens = min(params.max_tokens or room, room)
        return self.answer(await generate(ids, params))


@dataclass
class IncrementalTranslation:
    """The translation state of one stream: committed source, consumed units, published translation."""

    policy: UnitPolicy = field(default_factory=UnitPolicy)
    language: str = "en"
    source: str = ""  # committed source text (append-only)
    consumed: int = 0  # characters of `source` already cut into units
    units: list[Unit] = field(default_factory=list)
    published: str = ""  # the translation deltas joined: what clients have

    def add_source(self, delta: str) -> None:
        self.source += delta

    def ready(self, final: bool = False) -> list[str]:
        """Complete units not yet handed out; each is handed out once."""
        units, used = cut_units(self.source[self.consumed:], self.policy, final)
        self.consumed += used
        return units

    def tail(self) -> str:
        """The committed source not yet in a complete unit (what a tentative translation covers)."""
        return self.source[self.consumed:].strip()

    def commit(self, source: str, text: str, language: str) -> str:
        """Records a unit's translation; returns the delta to publish (with the separator before it)."""
        self.units.append(Unit(source, text, language))
        if not text:
            return ""
        delta = (joiner(language) if self.published else "") + text
        self.published += delta
        return delta


async def translate_text(translator: Translator, generate: Generate, text: str, language: str,
                         policy: UnitPolicy, max_model_len: int | None = None) -> list[Unit]:
    """The offline path: a finished source text cut into the same units and translated in order."""
    from qwenstack.translate.units import split_units

    state = IncrementalTranslation(policy, language)
    for source in split_units(text, policy):
        state.commit(source, await translator.translate(generate, source, language, state.units, max_model_len),
                     language)
    return state.units


__all__ = ["Generate", "IncrementalTranslation", "TARGETS", "Translator", "TranslatorSettings", "Unit",
           "target_code", "translate_text"]
