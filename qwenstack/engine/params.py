"""Sampling parameters of one request, validated where they enter (a bad value is a RequestError that
names the field and the allowed range, never an assert deep in the engine)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from qwenstack.errors import RequestError

if TYPE_CHECKING:  # the scheduling layer (params, sequence, scheduler, block manager) imports no torch
    import torch

# --kv-cache-dtype's values (vLLM's names; engine/runner.py's kv_cache_dtype maps them to the pool's dtype). Here,
# away from torch, so that the command line can list them without importing it.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e5m2")


@dataclass(frozen=True)
class ReasoningMarkers:
    """Where a reasoning block opens and closes in the output text; stop strings act only after it closed.

    `opened`: the prompt already opened the block (the output starts inside it). Otherwise the block is
    optional: an output that does not begin with `start` (after whitespace) is all answer.
    """

    start: str
    end: str
    opened: bool = False


class LogitsProcessor(Protocol):
    """Per-sequence hook run before sampling (structured output, thinking budget).

    Receives the tokens generated so far and the logits row [V] (float32), returns the logits to sample from.
    A processor that keeps state from call to call (a grammar's matcher, a thinking budget's count) also
    defines `fork()`, a copy in its start state: the engine forks each sequence its own when it adds the
    request, so a request's n samples, or prompts given one SamplingParams, never share that state.
    """

    def __call__(self, output_token_ids: list[int], logits: "torch.Tensor") -> "torch.Tensor": ...


def fork_processor(processor: LogitsProcessor) -> LogitsProcessor:
    """The processor one sequence runs: its own fork where it keeps state (see LogitsProcessor), else itself."""
    fork = getattr(processor, "fork", None)
    return fork() if callable(fork) else processor


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: as many as the context allows
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top logprobs per generated token (0: only the chosen token's)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    skip_special_tokens: bool = True
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    reasoning: ReasoningMarkers | None = None  # stop strings are not looked for inside the reasoning

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):
            if not isinstance(getattr(self, name) or [], (list, tuple)):
                raise RequestError(f"{name} must be a list, got {getattr(self, name)!r}")
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(name: str, rule: str) -> RequestError:
            return RequestError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        # Types first (the offline API takes values as given): a wrong one would fail deep in a step instead.
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise bad(name, "a finite number")
        for name in ("n", "top_k", "min_tokens", "max_tokens", "seed", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if (value is not None or name in ("n", "top_k", "min_tokens")) and (
                    isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise bad(name, "an integer")
        if not all(isinstance(s, str) for s in self.stop):
            raise bad("stop", "a string or a list of strings")
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of token ids (integers)")
        if self.n < 1:
            raise bad("n", "an integer >= 1")
        if self.temperature < 0:
            raise bad("temperature", ">= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", ">= 0 (0 or -1 turn it off)")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "in [-2, 2]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", ">= 1")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise bad("min_tokens", ">= 0 and <= max_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= self.MAX_LOGPROBS:
                raise bad(name, f"in [0, {self.MAX_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def clone_for_sample(self, index: int) -> "SamplingParams":
        """Parameters of the index-th of n samples: distinct seeds so seeded n>1 gives n different samples, and
        each its own processors (fork_processor)."""
        import dataclasses

        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed,
                                   logits_processors=[fork_processor(p) for p in self.logits_processors])
