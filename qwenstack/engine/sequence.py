"""Per-sequence state: tokens, where their KV lives, how much of it is computed, and why it finished.

A request with n > 1 becomes n sequences that share the request id; each samples on its own.
Torch-free: a seeded request's generator is made by the runner at its first sample (engine/sampler.py,
`sequence_generator`) and only carried here, so the scheduling layer imports without torch.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from qwenstack.engine.params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely


# Per position: the chosen (or prompt) token's logprob plus the top alternatives, token id -> Logprob.
PositionLogprobs = dict[int, Logprob]


@dataclass
class SequenceMetrics:
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_prompt_tokens: int = 0


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved against the context limit
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_registered_blocks: int = 0  # full blocks already entered in the prefix cache
    state_slot: int | None = None  # recurrent-state slot while running (models with linear attention); scheduler-owned
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None  # the stop token or string that ended it
    generator: Any = None  # the runner's torch.Generator for a seeded request (sampler.sequence_generator)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    metrics: SequenceMetrics = field(default_factory=SequenceMetrics)
    num_preemptions: int = 0
    # Per-request extras for architectures that need them (multimodal plans, speculative drafts).
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]
