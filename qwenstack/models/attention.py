"""Attention over a packed batch of sequences whose keys and values live in a paged KV cache.

Decisions:
- One forward pass takes the new tokens of several sequences packed into one [T, ...] tensor; an
  AttentionBatch says where each sequence starts, how long its context is, and where its KV lives. It is an
  explicit argument (no global forward context), so two engines can share a process.
- The KV cache of one layer is one tensor [2, num_blocks, block_size, kv_heads, head_dim] owned by the
  engine. New keys and values are written at `slot_mapping` (block * block_size + offset). Its dtype is the
  model's, or float8_e5m2 (--kv-cache-dtype fp8: half the bytes, rounded as .to() rounds); keys and values read
  back from it are converted to the queries' dtype, and a fresh prompt attends over its own keys unrounded.
- The reference path is torch's scaled_dot_product_attention: one batched call when every sequence is a
  fresh prompt of the same length (training, equal prefills), one batched call over gathered blocks when
  every sequence decodes one token, and a per-sequence call otherwise (mixed prefill, chunked prefill,
  prefix-cache hits).
- This file is the reference and knows no kernel. A kernel that reads the blocks in place (instead of
  gathering them: the gather copies more bytes per step than the weights) comes in as `in_place`, an
  InPlaceAttention the load-time preparation chose (models/fast_paths.py: the native CPU kernels); it takes
  a whole decode step, or in a mixed batch the sequences with few new tokens (the decodes beside a prefill
  chunk, a prompt whose prefix came from the cache) and the longer prompts and chunks over their keys (a
  fresh prompt's own, or gathered from the cache), and answers None / no rows where it does not apply.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class AttentionBatch:
    query_lens: list[int]  # new tokens per sequence in this pass
    context_lens: list[int]  # tokens per sequence once this pass is done (cached + new)
    slot_mapping: torch.Tensor | None = None  # [T] long: KV slot of each new token; None = no cache
    block_tables: torch.Tensor | None = None  # [B, max_blocks] long, padded with 0
    block_size: int = 0
    # [B] long: the recurrent-state slot of each sequence, for models with linear-attention layers
    # (Qwen3-Next). A sequence with context_len == query_len starts from a zero state; otherwise its slot
    # must hold the state after its first context_len - query_len tokens. None = no state cache.
    state_slots: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.query_lens) != len(self.context_lens):
            raise ValueError("query_lens and context_lens must have one entry per sequence")
        self.num_seqs = len(self.query_lens)
        self.num_tokens = sum(self.query_lens)
        self.max_context_len = max(self.context_lens, default=0)
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        self.query_starts = starts
        self.is_decode = all(q == 1 for q in self.query_lens) and self.block_tables is not None
        self.is_fresh_prefill = all(q == c for q, c in zip(self.query_lens, self.context_lens))
        self.is_uniform_fresh_prefill = self.is_fresh_prefill and len(set(self.query_lens)) == 1

    @functools.cached_property
    def context_lens_tensor(self) -> torch.Tensor:
        """context_lens as a CPU long tensor: made once per step for every layer's kernel call."""
        return torch.tensor(self.context_lens, dtype=torch.long)

    @classmethod
    def for_prompts(cls, lengths: list[int]) -> "AttentionBatch":
        """A batch of fresh prompts with no KV cache (training, scoring, the no-cache reference)."""
        return cls(query_lens=list(lengths), context_lens=list(lengths))

    def last_token_indices(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Row of the last new token of each sequence: where next-token logits come from."""
        return torch.tensor([s - 1 for s in self.query_starts[1:]], dtype=torch.long, device=device)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Stores new keys/values [T, kv_heads, head_dim] at their slots in the paged cache."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    k, v = k.to(kv_cache.dtype), v.to(kv_cache.dtype)
    if kv_cache.dtype.itemsize == 1:  # index_copy_ has no float8 kernel: copy the bytes
        flat, k, v = flat.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [length, kv_heads, head_dim] of one sequence, read through its block table."""
    block_size = kv_cache.shape[2]
    num_blocks = (length + block_size - 1) // block_size
    blocks = block_table[:num_blocks]
    k = kv_cache[0].index_select(0, blocks).flatten(0, 1)[:length]
    v = kv_cache[1].index_select(0, blocks).flatten(0, 1)[:length]
    return k, v


class InPlaceAttention(Protocol):
    """A kernel that attends over the paged cache where it lies (no gather). paged_attention calls it only
    with a KV cache and block tables."""

    def write(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
        """Stores the new keys and values as write_kv does; False (nothing written) where it does not apply."""

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch,
               scale: float) -> torch.Tensor | None:
        """One new token per sequence: the output [B, q_heads, head_dim], or None where it does not apply."""

    def few_new_tokens(self, q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, scale: float,
                       out: torch.Tensor) -> set[int]:
        """Writes the rows of `out` of the sequences it takes in a mixed batch; returns their indices."""

    def causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_starts: list[int], kv_starts: list[int],
               scale: float) -> torch.Tensor | None:
        """Causal attention of sequence b's new tokens, q rows [q_starts[b], q_starts[b + 1]), over its keys and
        values, rows [kv_starts[b], kv_starts[b + 1]) of k and v (its last new token sees them all): the
        output [T, q_heads, head_dim], or None where it does not apply."""


def paged_attention(
    q: torch.Tensor,  # [T, q_heads, head_dim]
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,  # [T, kv_heads, head_dim]
    kv_cache: torch.Tensor | None,
    batch: AttentionBatch,
    scale: float,
    in_place: InPlaceAttention | None = None,
) -> torch.Tensor:  # [T, q_heads, head_dim]
    if kv_cache is not None and batch.slot_mapping is not None:
        if in_place is None or not in_place.write(kv_cache, k, v, batch.slot_mapping):
            write_kv(kv_cache, k, v, batch.slot_mapping)
    gqa = q.shape[1] != k.shape[1]
    if batch.is_fresh_prefill and in_place is not None:
        out = in_place.causal(q, k, v, batch.query_starts, batch.query_starts, scale)
        if out is not None:
            return out
    if batch.is_uniform_fresh_prefill:
        b, s = batch.num_seqs, batch.query_lens[0]
        qb = q.view(b, s, *q.shape[1:]).transpose(1, 2)
        kb = k.view(b, s, *k.shape[1:]).transpose(1, 2)
        vb = v.view(b, s, *v.shape[1:]).transpose(1, 2)
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(q.shape)
    if batch.is_decode and kv_cache is not None:
        out = in_place.decode(q, kv_cache, batch, scale) if in_place is not None else None
        return out if out is not None else gathered_decode_attention(q, kv_cache, batch, scale, gqa)
    out = torch.empty_like(q)
    done = in_place.few_new_tokens(q, kv_cache, batch, scale, out) \
        if in_place is not None and kv_cache is not None and batch.block_tables is not None else set()
    for i, (q_len, ctx_len) in enumerate(zip(batch.query_lens, batch.context_lens)):
        if i in done:
            continue
        start, end = batch.query_starts[i], batch.query_starts[i + 1]
        qi = q[start:end]
        if q_len == ctx_len:
            ki, vi = k[start:end], v[start:end]
        else:
            if kv_cache is None or batch.block_tables is None:
                raise ValueError("a sequence with cached context needs a KV cache and a block table")
            ki, vi = gather_kv(kv_cache, batch.block_tables[i], ctx_len)
            ki, vi = ki.to(q.dtype), vi.to(q.dtype)
        oi = in_place.causal(qi, ki, vi, [0, q_len], [0, ctx_len], scale) if in_place is not None else None
        out[start:end] = oi if oi is not None else causal_sdpa(qi, ki, vi, scale, gqa)
    return out


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, gqa: bool) -> torch.Tensor:
    """One sequence's new tokens q [q_len, heads, head_dim] over its keys and values [ctx_len, kv_heads,
    head_dim], the last new token seeing every key; [q_len, heads, head_dim]."""
    q_len, ctx_len = q.shape[0], k.shape[0]
    mask = None
    if q_len != ctx_len:  # query j sits at position ctx_len - q_len + j and sees keys up to that position
        rows = torch.arange(ctx_len - q_len, ctx_len, device=q.device)[:, None]
        mask = torch.arange(ctx_len, device=q.device)[None, :] <= rows
    # With a batch dimension: 3-D inputs send CPU SDPA to its unfused math path (5-8x slower here on 256-512
    # tokens).
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     windows: list[tuple[int, int, int]]) -> torch.Tensor:
    """Bidirectional attention within windows of tokens and no KV cache (a vision tower's frames, an audio
    encoder's windows): windows are (start, length, count) runs of `count` consecutive windows of `length`
    tokens from `start`, covering the N tokens in order. q, k, v [N, heads, head_dim] -> [N, heads, head_dim],
    contiguous; scale 1/sqrt(head_dim). One SDPA call per run, its windows batched."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for start, length, count in windows:
        span = slice(start, start + length * count)
        qs, ks, vs = (t[span].unflatten(0, (count, length)).transpose(1, 2) for t in (q, k, v))
        out[span] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).flatten(0, 1)
    return out


def window_starts(windows: list[tuple[int, int, int]], total: int) -> list[int] | None:
    """The first token of every window and then `total`, or None where the windows do not tile [0, total)."""
    starts = [0]
    for start, length, count in windows:
        if start != starts[-1] or length < 1 or count < 1:
            return None
        starts.extend(start + length * (i + 1) for i in range(count))
    return starts if starts[-1] == total and len(starts) > 1 else None


def gathered_decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, scale: float, gqa: bool
) -> torch.Tensor:
    """One new token per sequence: gather every sequence's blocks into one padded batch, mask the padding."""
    assert batch.block_tables is not None
    block_size = kv_cache.shape[2]
    max_blocks = (batch.max_context_len + block_size - 1) // block_size
    tables = batch.block_tables[:, :max_blocks]
    b = batch.num_seqs
    k = kv_cache[0][tables].view(b, max_blocks * block_size, *kv_cache.shape[3:]).transpose(1, 2)
    v = kv_cache[1][tables].view(b, max_blocks * block_size, *kv_cache.shape[3:]).transpose(1, 2)
    lens = torch.tensor(batch.context_lens, device=q.device)
    mask = (torch.arange(max_blocks * block_size, device=q.device)[None, :] < lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=gqa
    )
    return out.squeeze(2)
