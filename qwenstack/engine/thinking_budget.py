"""Thinking budget: once a thinking block has used `budget` tokens without closing, force "\\n</think>\\n\\n"
one token at a time, then let the answer follow freely.

    SamplingParams(..., logits_processors=[make_thinking_budget_processor(tokenizer, 512, starts_in_reasoning)])

Decisions:
- The block opens where qwenstack's reasoning parser opens it: at the start when the prompt pre-filled `<think>`
  (`starts_in_reasoning`), else at the first `<think>` token generated before any `<tool_call>`. Tokens after
  `<think>` count; `<think>` itself does not. A `</think>` the model writes ends the block and the processor's
  work. Budget 0 closes the block as soon as it opens.
- The forced text is tokenized once, with the tokenizer: `</think>` is one added token in Qwen3 vocabularies,
  the newlines are whatever the vocabulary makes of them. When the last thinking token already ends in a newline,
  the leading "\\n" is left out, so the reasoning does not end in a blank line.
- Forcing masks every other token to -inf (it composes with a grammar processor whose grammar allows the close,
  see qwenstack.engine.grammar). Per sequence, like every logits processor; a list that does not continue
  what it saw is replayed from the start.
"""
from __future__ import annotations

import enum
from typing import Sequence

import torch

from qwenstack.engine.params import LogitsProcessor
from qwenstack.errors import RequestError
from qwenstack.markup import THINK_END, THINK_START, TOOL_CALL_START
from qwenstack.tokenizer import Tokenizer

FORCED_CLOSE = "\n</think>\n\n"


class _Phase(enum.Enum):
    BEFORE = "before"  # no block open yet
    THINKING = "thinking"
    FORCING = "forcing"
    DONE = "done"


class ThinkingBudgetProcessor:
    def __init__(self, tokenizer: Tokenizer, budget: int, starts_in_reasoning: bool, think_end: int,
                 think_start: int | None, tool_call_start: int | None) -> None:
        self.tokenizer = tokenizer
        self.budget = budget
        self.starts_in_reasoning = starts_in_reasoning
        self.think_start, self.think_end, self.tool_call_start = think_start, think_end, tool_call_start
        self._forced_full = tokenizer.encode(FORCED_CLOSE)
        self._forced_no_newline = tokenizer.encode(FORCED_CLOSE.lstrip("\n"))
        self._reset()

    def fork(self) -> "ThinkingBudgetProcessor":
        """Another sequence's processor, at the start of its budget (see LogitsProcessor)."""
        return ThinkingBudgetProcessor(self.tokenizer, self.budget, self.starts_in_reasoning, self.think_end,
                                       self.think_start, self.tool_call_start)

    def _reset(self) -> None:
        self.phase = _Phase.THINKING if self.starts_in_reasoning else _Phase.BEFORE
        self.thinking_tokens = 0
        self._forced: list[int] = []
        self._forced_at = 0
        self._seen = 0
        self._last: int | None = None

    def _advance(self, output_token_ids: Sequence[int]) -> None:
        n = len(output_token_ids)
        if n < self._seen or (self._seen and output_token_ids[self._seen - 1] != self._last):
            self._reset()
        for token in output_token_ids[self._seen :]:
            if self.phase is _Phase.BEFORE:
                if token == self.think_start:
                    self.phase = _Phase.THINKING
                elif token == self.tool_call_start:
                    self.phase = _Phase.DONE
            elif self.phase is _Phase.THINKING:
                if token == self.think_end:
                    self.phase = _Phase.DONE
                else:
                    self.thinking_tokens += 1
            elif self.phase is _Phase.FORCING:
                self._forced_at += 1
                if self._forced_at == len(self._forced):
                    self.phase = _Phase.DONE
        self._seen = n
        self._last = output_token_ids[-1] if n else None
        if self.phase is _Phase.THINKING and self.thinking_tokens >= self.budget:
            ends_line = self.thinking_tokens > 0 and self.tokenizer.decode([output_token_ids[-1]]).endswith("\n")
            self._forced = self._forced_no_newline if ends_line else self._forced_full
            self._forced_at = 0
            self.phase = _Phase.FORCING

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self._advance(output_token_ids)
        if self.phase is not _Phase.FORCING:
            return logits
        token = self._forced[self._forced_at]
        forced = torch.full_like(logits, float("-inf"))
        forced[token] = 0.0
        return forced


def make_thinking_budget_processor(tokenizer: Tokenizer, budget: int, starts_in_reasoning: bool) -> LogitsProcessor:
    """A per-sequence processor that closes the thinking block after `budget` thinking tokens."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise RequestError(f"the thinking budget must be an integer >= 0, got {budget!r}")
    think_end = tokenizer.token_to_id(THINK_END)
    if think_end is None:
        raise RequestError("this model's tokenizer has no </think> token, so a thinking budget cannot be applied")
    return ThinkingBudgetProcessor(tokenizer, budget, starts_in_reasoning, think_end,
                                   tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(TOOL_CALL_START))
