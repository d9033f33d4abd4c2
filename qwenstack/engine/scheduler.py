"""Which sequences run in the next step, and how many of their tokens. Policy only: no torch.

Decisions:
- Continuous batching: sequences join and leave between steps. Each step has a token budget; running
  sequences are served first in arrival order (a decode costs one token), so a long new prompt never
  stalls running decodes; what is left of the budget admits waiting sequences, first come first served.
- Chunked prefill: a prompt longer than the remaining budget is computed in pieces over several steps.
- Preemption by recompute: when the KV pool cannot hold the next tokens, the most recently arrived
  running sequence gives its blocks back and returns to the front of the queue; its full blocks stay in
  the prefix cache, so recomputing it is often cheap.
- The waiting queue is bounded; `add` refuses beyond it (the server answers 429).
- The scheduler decides every allocation: KV blocks (BlockManager) and, for models with linear-attention
  layers, one recurrent-state slot per running sequence (SlotPool), taken at admission and returned with the
  blocks on finish or preemption. A sequence is admitted only when both are free.
- Lookahead for speculative decoding (num_lookahead_tokens = k, as vLLM's lookahead slots): a sequence that
  samples this step also gets blocks for the k draft tokens the drafter writes after it, and a decoding one
  may verify up to k pending drafts within the step's leftover budget (ScheduledBatch.num_lookahead_tokens).
  A new sequence is admitted only with room for its first drafts; a running one gets lookahead only from
  blocks beyond one per running sequence, so speculation never costs anyone a preemption.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from qwenstack.engine.block_manager import BlockManager
from qwenstack.engine.sequence import Sequence, SequenceStatus
from qwenstack.engine.slot_pool import SlotPool


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound."""


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 2048  # token budget of one step
    max_waiting: int = 1024  # queue bound
    enable_chunked_prefill: bool = True
    num_lookahead_tokens: int = 0  # k > 0: draft tokens per sequence for speculative decoding (engine/speculative.py)


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Per sequence: pending draft tokens it may verify beside its new tokens (their blocks and budget are taken).
    # Empty when the scheduler runs without lookahead.
    num_lookahead_tokens: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 extra_keys: Callable[[Sequence], list | None] | None = None,
                 state_slots: SlotPool | None = None) -> None:
        """state_slots: the recurrent-state slot pool, for models that keep such state (None otherwise)."""
        self.config = config
        self.blocks = block_manager
        self.state_slots = state_slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Per-block prefix-cache keys beyond the tokens (images), for architectures that need them.
        self.extra_keys = extra_keys or (lambda seq: None)

    def add(self, seqs: list[Sequence], counted: int | None = None) -> None:
        """Queues `seqs`. `counted`: how many sequences the bound counts for them (default all). A request's n
        samples are admitted together: its first queued with counted=n, the others later (once its prompt is
        cached) with counted=0, so that they never meet a queue filled meanwhile."""
        if len(self.waiting) + (len(seqs) if counted is None else counted) > self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} sequences)")
        self.waiting.extend(seqs)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted_now = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new <= 0:  # waiting for a sibling or nothing to do
                i += 1
                continue
            if not self.config.enable_chunked_prefill and num_new < seq.num_tokens - seq.num_computed_tokens:
                break
            while not self.blocks.can_grow(seq.block_table, seq.num_computed_tokens + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                preempted_now = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            self.blocks.grow(seq.block_table, seq.num_computed_tokens + num_new)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            i += 1
        if preempted_now:
            self._reserve_lookahead(batch, budget)
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self.state_slots is not None and not self.state_slots.num_free:
                break
            tokens = seq.all_token_ids
            # Prompt logprobs need every prompt position computed, so such a request skips the prefix cache.
            wants_prompt_logprobs = seq.params.prompt_logprobs is not None
            cached = [] if wants_prompt_logprobs else self.blocks.lookup_prefix(tokens, self.extra_keys(seq))
            num_cached = len(cached) * self.blocks.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.config.enable_chunked_prefill and num_new < seq.num_tokens - num_cached:
                break
            # A sequence that samples this step drafts after it: admit it only with blocks for those drafts too.
            ahead = self._draft_room(seq) if num_cached + num_new == seq.num_tokens else 0
            if not self.blocks.can_grow([], num_cached + num_new + ahead, cached):
                break
            self.waiting.popleft()
            self.blocks.share(seq.block_table, cached)
            self.blocks.grow(seq.block_table, num_cached + num_new + ahead)
            if self.state_slots is not None:
                seq.state_slot = self.state_slots.allocate()
            seq.num_computed_tokens = num_cached
            seq.num_registered_blocks = len(cached)
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.monotonic()
                seq.metrics.num_cached_prompt_tokens = min(num_cached, seq.num_prompt_tokens)
            self.blocks.stats.queries += seq.num_prompt_tokens if not seq.output_token_ids else 0
            self.blocks.stats.hits += min(num_cached, seq.num_prompt_tokens) if not seq.output_token_ids else 0
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        self._reserve_lookahead(batch, budget)
        return batch

    def _draft_room(self, seq: Sequence) -> int:
        """Draft tokens seq may take after this step's sample: k, fewer near max_tokens, none when it never
        drafts (logits processors must see every token in order, so such sequences decode one by one)."""
        if seq.params.logits_processors:
            return 0
        return max(0, min(self.config.num_lookahead_tokens, seq.max_tokens - len(seq.output_token_ids) - 1))

    def _reserve_lookahead(self, batch: ScheduledBatch, budget: int) -> None:
        """Grants each sampling sequence its drafts to verify now (decodes only, within the leftover budget)
        and blocks for them plus the k drafted after them, from blocks beyond one per running sequence."""
        k = self.config.num_lookahead_tokens
        if not k:
            return
        bs = self.blocks.block_size
        reserve = len(self.running)  # next step's growth comes first: lookahead never forces a preemption
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            end = seq.num_computed_tokens + n
            room = self._draft_room(seq) if end == seq.num_tokens else 0
            verify = min(room, budget) if n == 1 and seq.output_token_ids else 0
            spare = max(0, self.blocks.num_free_blocks - reserve)
            # The drafter writes the KV of its k drafts after the verified ones; the table may already hold them.
            cover = min(end + verify + room, (len(seq.block_table) + spare) * bs)
            self.blocks.grow(seq.block_table, cover)
            verify = max(0, min(verify, cover - end))
            batch.num_lookahead_tokens.append(verify)
            budget -= verify

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_table)
        if seq.state_slot is not None:
            assert self.state_slots is not None
            self.state_slots.release(seq.state_slot)
            seq.state_slot = None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence (stop, length, abort) wherever it is, returning its blocks and state slot."""
        if seq.status == SequenceStatus.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = seq.finish_reason or reason
