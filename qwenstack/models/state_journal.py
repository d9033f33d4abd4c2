"""Recurrent state of linear-attention layers (gated delta rule): its per-slot tensors and the journal that
lets speculative verification keep exactly the accepted tokens.

Decisions:
- LinearAttentionState holds one layer's conv and recurrent state for every slot; the runner allocates it
  (through the model's make_state_cache) and the scheduler decides which sequence holds which slot.
- The journal lives beside the state rather than in a model file: the engine gets one through the
  RecurrentStateModel protocol (`make_state_journal`), so speculative decoding never imports a model.
- Verification defers the drafting sequences' updates instead of snapshotting states: each linear layer
  records the per-token delta-rule inputs (a few KB per token), and `commit(keep)` replays the recurrent
  form from the untouched slot over the kept tokens only (the rest made inert). Chosen over k+1 copies of a
  2 MB-per-layer state and over rerunning the main model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenstack.models.attention import AttentionBatch
from qwenstack.models.linear_attention import recurrent_gated_delta_rule


@dataclass
class LinearAttentionState:
    """One linear-attention layer's memory for every state slot (engine-owned, updated in place)."""

    conv_state: torch.Tensor  # [num_slots, conv_dim, K-1], activation dtype: the last K-1 conv inputs
    recurrent_state: torch.Tensor  # [num_slots, Hv, Dk, Dv], float32 by default: the delta-rule memory S


def padded_rows(batch: AttentionBatch, seqs: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows [S, W] of the chosen sequences, padded by repeating each one's last row, and live [S, W]."""
    lens = [batch.query_lens[i] for i in seqs]
    width = max(lens)
    rows = [[batch.query_starts[i] + min(t, n - 1) for t in range(width)] for i, n in zip(seqs, lens)]
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    live = torch.arange(width, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
    return rows_t, live


def conv_tail(conv_in: torch.Tensor, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The conv state after counts[i] of x's columns: the last K-1 of cat(conv_in, x[..., :counts[i]])."""
    window = torch.cat([conv_in, x.to(conv_in.dtype)], dim=-1)  # [S, C, K-1+W]
    span = conv_in.shape[-1]
    cols = (counts[:, None] + torch.arange(span, device=counts.device)[None, :])[:, None, :]
    return window.gather(-1, cols.expand(-1, window.shape[1], -1))


def inert_after(live: torch.Tensor, k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded [S, W, ...] delta-rule inputs with every non-live token made inert: k = 0, beta = 0 and g = 0
    write and decay nothing, so the final state is the state after the live tokens, exactly."""
    return k * live[..., None, None], g * live[..., None], beta * live[..., None]


class StateJournal:
    """Deferred state updates for speculative verification (see the module docstring).

    `deferred` lists the batch positions of the sequences whose slots must not move during the pass; each
    linear layer then records their raw per-token inputs (pre-conv q|k|v, k, v, g, beta: a few KB per token,
    not a copy of the state). `commit(keep)` advances deferred sequence i by its first keep[i] tokens: the
    conv state is the last K-1 inputs of that prefix, the recurrent state is the recurrent form replayed from
    the slot with the remaining tokens made inert (k = 0, beta = 0, g = 0 writes and decays nothing).
    """

    def __init__(self, deferred: list[int]) -> None:
        self.deferred = deferred
        self._entries: list[tuple[LinearAttentionState, tuple[torch.Tensor, ...]]] = []
        self._slots: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None  # [D, Tmax] token rows of the deferred sequences (padded)
        self._lens: list[int] = []

    def _index(self, batch: AttentionBatch, slots: torch.Tensor) -> torch.Tensor:
        if self._rows is None:
            self._lens = [batch.query_lens[i] for i in self.deferred]
            self._rows, _ = padded_rows(batch, self.deferred, slots.device)
            self._slots = slots[torch.tensor(self.deferred, dtype=torch.long, device=slots.device)]
        return self._rows

    def record(self, state: LinearAttentionState, batch: AttentionBatch, slots: torch.Tensor,
               *inputs: torch.Tensor) -> None:
        """inputs: mixed [T, C], k [T, Hk, Dk], v [T, Hv, Dv], g and beta [T, Hv] of the whole pass."""
        rows = self._index(batch, slots)
        self._entries.append((state, tuple(x[rows] for x in inputs)))  # each [D, Tmax, ...]

    def commit(self, keep: list[int]) -> None:
        """Advances deferred sequence i by its first keep[i] (1..query_len) tokens; call once, after the pass."""
        if len(keep) != len(self.deferred) or any(not 1 <= n <= q for n, q in zip(keep, self._lens or keep)):
            raise ValueError(f"keep must give 1..query_len tokens per deferred sequence, got {keep}")
        if not self._entries:
            return
        assert self._rows is not None and self._slots is not None
        slots, device = self._slots, self._rows.device
        keep_t = torch.tensor(keep, device=device)
        live = torch.arange(self._rows.shape[1], device=device)[None, :] < keep_t[:, None]  # [D, Tmax]
        for state, (mixed, k, v, g, beta) in self._entries:
            conv = state.conv_state.index_select(0, slots)  # [D, C, K-1]
            state.conv_state.index_copy_(0, slots, conv_tail(conv, mixed.transpose(1, 2), keep_t))
            k, g, beta = inert_after(live, k, g, beta)
            rec = state.recurrent_state.index_select(0, slots)
            _, rec = recurrent_gated_delta_rule(k, k, v, g, beta, rec)
            state.recurrent_state.index_copy_(0, slots, rec.to(state.recurrent_state.dtype))
        self._entries.clear()


__all__ = ["LinearAttentionState", "StateJournal", "conv_tail", "inert_after", "padded_rows"]
