"""Incremental detokenization and stop strings.

Decisions:
- Text is produced by decoding a small window of recent tokens (vLLM's prefix/read offsets), so the cost
  per token does not grow with the output; text ending in U+FFFD (an incomplete UTF-8 sequence split
  across byte-level tokens) is held back until the next token completes it. No broken UTF-8 is emitted.
- Stop strings: the output is cut before the first stop string (kept when include_stop_str_in_output);
  text that could still become a stop string is held back from the stream until it is ruled out, so a
  partial stop string never leaks.
- Stop strings act on the answer, not the reasoning (SamplingParams.reasoning): a `\n` stop must not end a
  thinking model inside its `<think>` block (lm-eval sends exactly that). The search starts where the
  answer starts (after the block and the whitespace that follows it); text that may still turn out to be
  answer (only whitespace or part of the opening tag so far, or whitespace after the block) is held back
  from the stream meanwhile, so the stream and the final text agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from qwenstack.engine.params import ReasoningMarkers


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


# How many tokens before the new ones are decoded with them, so merges across the boundary are right.
CONTEXT_TOKENS = 6


@dataclass
class IncrementalDetokenizer:
    decoder: Decoder
    prompt_token_ids: list[int]
    skip_special_tokens: bool = True
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    text: str = ""  # full output text so far (cut at a stop string)
    emitted: int = 0  # characters of `text` already handed out as deltas
    _tokens: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0
    reasoning: ReasoningMarkers | None = None
    stopped_on: str | None = None
    _stop_at: int = 0
    _answer_at: int | None = None  # where the answer (the text stop strings apply to) begins, once known
    _searched: int = 0  # the text before this was searched for stop strings
    _hold_from: int | None = None  # while the answer's start is unknown: text from here may still be answer
    min_tokens: int = 0  # stop strings apply after this many tokens (vLLM's): the text they wrote is not searched
    _added: int = 0  # output tokens added
    _min_text_end: int = 0  # the end of the text of the first min_tokens tokens

    def __post_init__(self) -> None:
        tail = self.prompt_token_ids[-CONTEXT_TOKENS:]
        self._tokens = list(tail)
        self._prefix_offset = 0
        self._read_offset = len(tail)

    def add_token(self, token_id: int) -> None:
        self._tokens.append(token_id)
        self._added += 1
        prefix = self.decoder.decode(self._tokens[self._prefix_offset : self._read_offset], self.skip_special_tokens)
        full = self.decoder.decode(self._tokens[self._prefix_offset :], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new_text = full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            self._append(new_text)

    def flush(self) -> None:
        """At the end: whatever the last tokens decode to, even an incomplete character (as U+FFFD)."""
        full = self.decoder.decode(self._tokens[self._prefix_offset :], self.skip_special_tokens)
        prefix = self.decoder.decode(self._tokens[self._prefix_offset : self._read_offset], self.skip_special_tokens)
        if len(full) > len(prefix):
            self._append(full[len(prefix) :])
        self._prefix_offset = self._read_offset = len(self._tokens)

    def _locate_answer(self) -> int | None:
        """Where the answer begins (None while unknown); sets _hold_from while the text is undecided."""
        if self._answer_at is not None:
            return self._answer_at
        m, text = self.reasoning, self.text
        self._hold_from = None
        if m is None:
            self._answer_at = 0
        elif not m.opened and m.start.startswith(text.lstrip()):
            self._hold_from = 0  # nothing yet, or part of the opening tag: the block may still open
        elif not m.opened and not text.lstrip().startswith(m.start):
            self._answer_at = 0  # no reasoning block: all of it is answer
        elif (at := text.find(m.end)) != -1:
            after = at + len(m.end)
            rest = text[after:]
            if rest.strip():  # the whitespace after the block (the parser drops it) is not answer either
                self._answer_at = after + len(rest) - len(rest.lstrip())
            else:
                self._hold_from = after
        return self._answer_at

    def _append(self, new_text: str) -> None:
        if self.stopped_on is not None:
            return
        self.text += new_text
        if self._added <= self.min_tokens:
            self._min_text_end = len(self.text)
        begin = self._locate_answer() if self.stop else None
        if begin is None:
            return
        start = max(begin, self._min_text_end, self._searched - max(len(s) for s in self.stop) + 1)
        self._searched = len(self.text)
        for stop in self.stop:
            at = self.text.find(stop, start)
            if at != -1 and (self.stopped_on is None or at < self._stop_at):
                self.stopped_on, self._stop_at = stop, at
        if self.stopped_on is not None:
            end = self._stop_at + (len(self.stopped_on) if self.include_stop_str_in_output else 0)
            self.text = self.text[:end]

    def _held_back(self) -> int:
        """Characters at the end of the text that may be the start of a stop string."""
        if self.stopped_on is not None or not self.stop:
            return 0
        begin = self._locate_answer()
        if begin is None:
            return len(self.text) - self._hold_from if self._hold_from is not None else 0
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(self.text) - max(begin, self._min_text_end)), 0, -1):
                if self.text.endswith(stop[:k]):
                    longest = max(longest, k)
                    break
        return longest

    def take_delta(self, final: bool = False) -> str:
        """Text not yet handed out; when not final, keeps back a possible partial stop string."""
        end = len(self.text) if final else len(self.text) - self._held_back()
        delta = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta
