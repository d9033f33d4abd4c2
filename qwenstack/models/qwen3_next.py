"""Qwen3-Next (model_type "qwen3_next"): a hybrid of Gated DeltaNet (linear attention) and gated full attention.

Architecture (transformers 5.24 `modeling_qwen3_next.py` is the spec):
- Layer i is "full_attention" or "linear_attention" per `layer_types`, or, when absent, full when
  (i + 1) % full_attention_interval == 0 (released: 3 linear + 1 full, repeated).
- Gated full attention: q_proj emits per head [q | gate]; per-head zero-centred QK norm; partial rotary
  (the first partial_rotary_factor * head_dim channels); out * sigmoid(gate) before o_proj. Keys and values
  live in the engine's paged KV cache exactly as for Qwen3.
- Gated DeltaNet: in_proj_qkvz and in_proj_ba grouped per key head; depthwise causal conv1d + SiLU over
  q|k|v; L2-normalised q/k; beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias) in fp32; the gated
  delta rule; weight * rmsnorm(o) * silu(z) (NOT zero-centred); out_proj.
- Every other norm is zero-centred, (1 + w). MLPs: sparse MoE plus a sigmoid-gated shared expert, or a
  dense SwiGLU on `mlp_only_layers` / off the `decoder_sparse_step`.
- `mtp.*` tensors (the multi-token-prediction head) are accepted and ignored, as transformers does, unless
  speculative decoding loads them (qwenstack.models.qwen3_next_mtp).
- Projections stay in the checkpoint's grouped-per-key-head layout and are split with views each step
  (cheap), so the loader needs no row permutation.

Recurrent state (the interface the engine programs against):
- `forward(input_ids [T], positions [T], batch: AttentionBatch, kv_caches)`, kv_caches = None (no cache:
  every sequence must be a fresh prompt) or a list with ONE ENTRY PER LAYER, in layer order: for a
  full-attention layer the paged KV tensor [2, num_blocks, block_size, kv_heads, head_dim] (as Qwen3), for
  a linear-attention layer a `LinearAttentionState` holding conv_state [num_slots, conv_dim, K-1] and
  recurrent_state [num_slots, Hv, Dk, Dv] for every state slot.
- `make_state_cache(num_slots, dtype, device)` returns that per-layer list with a LinearAttentionState at
  each linear layer and None at each full-attention layer; `kv_cache_spec()` counts only the attention
  layers. `layer_caches(kv_tensors, states)` (qwenstack.models.base) zips the two into the forward's list.
- `batch.state_slots` [B] long names each sequence's slot (distinct within a pass). A sequence with
  context_len == query_len is fresh: its state starts at zero, whatever the slot holds (slots need no
  clearing). Otherwise (decode, chunked prefill) the slot must hold the state after exactly the first
  context_len - query_len tokens. After the pass each slot holds the state after context_len tokens:
  states are updated in place, so a pass cannot be replayed, and a prefix-cache hit (context_len >
  query_len on a sequence whose slot never saw that prefix) would silently read a wrong state.
- A pass where every sequence has one new token runs the recurrent (decode) form batched over sequences;
  any other pass runs the chunked form per sequence (chunks of 64, varlen), starting from the slot state.
- Speculative verification (`forward(..., state_journal=make_state_journal(deferred))`, the journal itself in
  models/state_journal.py): the deferred sequences' slots are left untouched and each linear layer records
  their per-token delta-rule inputs instead; `journal.commit(keep)` later advances each deferred slot by
  exactly its first `keep` tokens (the accepted ones). Rejected drafts never reach a slot. Such a
  pass, when no sequence brings more than SHORT_PASS_TOKENS tokens, runs the recurrent form on all sequences
  padded to one width (padding after each end, inert) instead of the per-sequence chunked form, which would
  pad every 1 + k tokens to a 64-token chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qwenstack.errors import ConfigError
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.base import KVCacheSpec, lm_logits
from qwenstack.models.layers import Attention, RMSNorm, SwiGLU, fused_rows
from qwenstack.models.linear_attention import (
    causal_conv1d,
    causal_conv1d_varlen,
    chunk_gated_delta_rule_varlen,
    conv_decode_in_place,
    recurrent_decode_in_place,
    recurrent_gated_delta_rule,
    slot_states,
)
from qwenstack.models.moe import SparseMoE
from qwenstack.models.state_journal import (
    LinearAttentionState, StateJournal, conv_tail, inert_after, padded_rows,
)
from qwenstack.models.qwen3_moe import Qwen3MoeArgs

if TYPE_CHECKING:
    from qwenstack.weights import Source

LAYER_TYPES = ("linear_attention", "full_attention")


@dataclass(kw_only=True)
class Qwen3NextArgs(Qwen3MoeArgs):
    model_type: ClassVar[str] = "qwen3_next"
    shared_expert_intermediate_size: int
    linear_conv_kernel_dim: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    layer_types: list[str] | None = None  # written by transformers 5.x; else derived from the interval
    full_attention_interval: int | None = None  # released config.json files carry this instead

    def validate(self, config: dict[str, Any]) -> None:
        # The rope dict as RopeConfig reads it: rope_scaling, when given, replaces rope_parameters.
        rope_fields = {**(config.get("rope_scaling") or config.get("rope_parameters") or {}), **config}
        if "partial_rotary_factor" not in rope_fields:
            raise ConfigError("config.json for qwen3_next has no 'partial_rotary_factor' (released models use 0.25)")
        super().validate(config)
        n = self.num_hidden_layers
        if self.layer_types is None:
            if self.full_attention_interval is None:
                raise ConfigError("config.json for qwen3_next needs 'layer_types' or 'full_attention_interval'")
            if self.full_attention_interval < 1:
                raise ConfigError(f"full_attention_interval must be >= 1, got {self.full_attention_interval}")
            interval = self.full_attention_interval
            self.layer_types = [LAYER_TYPES[(i + 1) % interval == 0] for i in range(n)]
        if len(self.layer_types) != n or any(t not in LAYER_TYPES for t in self.layer_types):
            raise ConfigError(f"layer_types must list {n} entries of {LAYER_TYPES}, got {self.layer_types}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(
                f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                f"linear_num_key_heads ({self.linear_num_key_heads})"
            )

    def sliding_layers(self, config: dict[str, Any]) -> list[int]:
        return []  # transformers' Qwen3-Next has no sliding window: use_sliding_window is not read

    def is_linear_layer(self, layer_idx: int) -> bool:
        assert self.layer_types is not None
        return self.layer_types[layer_idx] == "linear_attention"


class GatedAttention(Attention):
    """Qwen3 attention plus an output gate: q_proj emits [q | gate] per head, out * sigmoid(gate)."""

    def __init__(self, args: Qwen3NextArgs) -> None:
        assert args.num_key_value_heads is not None and args.head_dim is not None
        super().__init__(
            args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
            args.rms_norm_eps, args.rope, bias=args.attention_bias,
        )
        # Replace the parent's projection and plain norms. q_proj rows come first in the fused weight:
        # 2 * q_size of them, [q | gate] per head.
        self.qkv_proj = nn.Linear(args.hidden_size, 2 * self.q_size + 2 * self.kv_size, bias=args.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps, zero_centered=True)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps, zero_centered=True)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, kv_cache: torch.Tensor | None
    ) -> torch.Tensor:
        q_gate, k, v = self.qkv_proj(x).split([2 * self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, gate = q_gate.view(-1, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q, k = self.norm_and_rotate(q, k.view(-1, self.num_kv_heads, self.head_dim), positions)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = self.ops.attend(q, k, v, kv_cache, batch, self.scale).reshape(-1, self.q_size)
        return self.o_proj(out * torch.sigmoid(gate.reshape(-1, self.q_size)))

    def checkpoint_sources(self, prefix: str) -> dict[str, list[list["Source"]]]:
        parts = [("q_proj", 2 * self.q_size), ("k_proj", self.kv_size), ("v_proj", self.kv_size)]
        sources = fused_rows(prefix, "qkv_proj", parts)
        if self.bias:
            sources.update(fused_rows(prefix, "qkv_proj", parts, suffix="bias"))
        return sources


class GatedRMSNorm(nn.Module):
    """weight * rmsnorm(x) * silu(gate): plain weight (starts at 1), not zero-centred."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (h * F.silu(gate.float())).to(dtype)


SHORT_PASS_TOKENS = 16  # verification passes this short run the recurrent form, padded, batched over sequences


@dataclass
class _StateIndex:
    """Per-pass view of batch.state_slots, computed once and shared by every linear layer."""

    slots: torch.Tensor | None  # [B] long
    fresh: torch.Tensor | None  # [B] bool: start from zero; None when no sequence is fresh
    all_fresh: bool
    decode: bool  # one new token per sequence: the recurrent form
    journal: StateJournal | None = None
    # A plain decode step on the state cache, no journal, not every sequence fresh: the states are updated
    # where they lie (GatedDeltaNet.conv_step / decode_step) instead of gathered and scattered.
    in_place: bool = False
    write_rows: torch.Tensor | None = None  # [B'] batch positions that write their state now; None = all
    # Short verification passes: (rows [B, W], live [B, W]) to run every sequence padded and batched
    padded: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_batch(cls, batch: AttentionBatch, has_cache: bool,
                   journal: StateJournal | None = None) -> "_StateIndex":
        fresh = [q == c for q, c in zip(batch.query_lens, batch.context_lens)]
        all_fresh = all(fresh)
        if not has_cache:
            if not all_fresh:
                raise ValueError("a sequence continuing from earlier tokens needs its state: pass kv_caches "
                                 "(see make_state_cache) and batch.state_slots")
            if journal is not None:
                raise ValueError("a state journal needs the state cache (kv_caches and batch.state_slots)")
            return cls(None, None, True, False)
        if batch.state_slots is None or batch.state_slots.shape != (batch.num_seqs,):
            raise ValueError(f"batch.state_slots must name one state slot per sequence ({batch.num_seqs})")
        slots = batch.state_slots
        mask = torch.tensor(fresh, device=slots.device) if any(fresh) and not all_fresh else None
        index = cls(slots, mask, all_fresh, all(q == 1 for q in batch.query_lens))
        if journal is not None and journal.deferred:
            if any(fresh[i] for i in journal.deferred):
                raise ValueError("a deferred (speculative) sequence must continue from its slot, not start fresh")
            deferred = set(journal.deferred)
            index.journal = journal
            index.write_rows = torch.tensor([i for i in range(batch.num_seqs) if i not in deferred],
                                            dtype=torch.long, device=slots.device)
            if not index.decode and max(batch.query_lens) <= SHORT_PASS_TOKENS:
                index.padded = padded_rows(batch, list(range(batch.num_seqs)), slots.device)
        index.in_place = index.decode and index.journal is None and not all_fresh
        return index


class GatedDeltaNet(nn.Module):
    """Linear attention with a gated delta rule; names follow the checkpoint (linear_attn.*)."""

    # A plain decode step's two halves on the state slots, and the chunked rule of prefill; the preparation
    # (models/fast_paths.py) sets native ones.
    conv_step = staticmethod(conv_decode_in_place)
    decode_step = staticmethod(recurrent_decode_in_place)
    chunk_step = staticmethod(chunk_gated_delta_rule_varlen)

    def __init__(self, args: Qwen3NextArgs) -> None:
        super().__init__()
        self.num_k_heads, self.num_v_heads = args.linear_num_key_heads, args.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = args.linear_key_head_dim, args.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel_size = args.linear_conv_kernel_dim
        h = args.hidden_size
        # per key head: [q Dk | k Dk | v (Hv/Hk)*Dv | z (Hv/Hk)*Dv] and [b Hv/Hk | a Hv/Hk]
        self.in_proj_qkvz = nn.Linear(h, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(h, 2 * self.num_v_heads, bias=False)
        # depthwise over q|k|v; only the weight [C, 1, K] is used (by causal_conv1d)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel_size, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, args.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, h, bias=False)

    def make_state(self, num_slots: int, dtype: torch.dtype, device: torch.device | str,
                   recurrent_dtype: torch.dtype = torch.float32) -> LinearAttentionState:
        return LinearAttentionState(
            torch.zeros(num_slots, self.conv_dim, self.kernel_size - 1, dtype=dtype, device=device),
            torch.zeros(num_slots, self.num_v_heads, self.head_k_dim, self.head_v_dim, dtype=recurrent_dtype,
                        device=device),
        )

    def split_projections(
        self, qkvz: torch.Tensor, ba: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grouped per key head -> mixed q|k|v [T, conv_dim], z [T, Hv, Dv], b and a [T, Hv]."""
        t, group = qkvz.shape[0], self.num_v_heads // self.num_k_heads
        dk, gv = self.head_k_dim, group * self.head_v_dim
        q, k, v, z = qkvz.view(t, self.num_k_heads, 2 * dk + 2 * gv).split([dk, dk, gv, gv], dim=-1)
        b, a = ba.view(t, self.num_k_heads, 2 * group).split([group, group], dim=-1)
        mixed = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=-1)
        return mixed, z.reshape(t, self.num_v_heads, self.head_v_dim), b.reshape(t, -1), a.reshape(t, -1)

    def forward(
        self, x: torch.Tensor, batch: AttentionBatch, state: LinearAttentionState | None, index: _StateIndex
    ) -> torch.Tensor:
        t = x.shape[0]
        mixed, z, b, a = self.split_projections(self.in_proj_qkvz(x), self.in_proj_ba(x))
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # fp32: exp(A_log) overflows fp16
        if index.in_place and state is not None:
            out = self._decode_in_place(mixed, g, beta, state, index)
        else:
            out = self._gather_and_scatter(mixed, g, beta, batch, state, index)
        out = self.norm(out, z)  # [T, Hv, Dv]
        return self.out_proj(out.reshape(t, self.value_dim))

    def _heads(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The conv's output [T, conv_dim] -> q, k [T, Hk, Dk] and v [T, Hv, Dv] (views)."""
        q, k, v = y.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        t = y.shape[0]
        return (q.view(t, self.num_k_heads, self.head_k_dim), k.view(t, self.num_k_heads, self.head_k_dim),
                v.view(t, self.num_v_heads, self.head_v_dim))

    def _decode_in_place(self, mixed: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         state: LinearAttentionState, index: _StateIndex) -> torch.Tensor:
        """A plain decode step: each sequence's conv and recurrent state updated in its slot, where it lies."""
        assert index.slots is not None
        y = self.conv_step(mixed, self.conv1d.weight, state.conv_state, index.slots, index.fresh)
        q, k, v = self._heads(y)
        return self.decode_step(q, k, v, g, beta, state.recurrent_state, index.slots, index.fresh)

    def _gather_and_scatter(self, mixed: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, batch: AttentionBatch,
                            state: LinearAttentionState | None, index: _StateIndex) -> torch.Tensor:
        """Any pass: the states gathered from their slots, the chunked, padded or recurrent form, the new states
        scattered back (or recorded in the journal for deferred sequences)."""
        conv_in, rec_in = self._read_state(state, index)
        weight = self.conv1d.weight
        if index.decode:
            y, conv_out = causal_conv1d(mixed.unsqueeze(-1), weight, conv_in)  # [B, C, 1]
            y = y.squeeze(-1)
        elif index.padded is not None:  # [B, C, W], padding after each sequence's end: no window reaches it
            rows, live = index.padded
            x = mixed[rows].transpose(1, 2)
            if conv_in is None:
                conv_in = x.new_zeros(x.shape[0], x.shape[1], self.kernel_size - 1)
            y, _ = causal_conv1d(x, weight, conv_in)
            conv_out = conv_tail(conv_in, x, live.sum(-1))
            y = y.transpose(1, 2)[live]
        else:
            y, conv_out = causal_conv1d_varlen(mixed, weight, batch.query_starts, conv_in)
        q, k, v = self._heads(y)
        if index.decode:  # token i is sequence i: the batch is the sequences
            out, rec_out = recurrent_gated_delta_rule(
                q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), g.unsqueeze(1), beta.unsqueeze(1), rec_in
            )
            out = out.squeeze(1)
        elif index.padded is not None:
            rows, live = index.padded
            kp, gp, bp = inert_after(live, k[rows], g[rows], beta[rows])
            out, rec_out = recurrent_gated_delta_rule(q[rows], kp, v[rows], gp, bp, rec_in)
            out = out[live]
        else:
            out, rec_out = self.chunk_step(q, k, v, g, beta, batch.query_starts, rec_in)
        if state is not None:
            assert index.slots is not None
            slots, rows = index.slots, index.write_rows
            if index.journal is not None:  # deferred sequences keep their slot until journal.commit
                assert rows is not None
                index.journal.record(state, batch, slots, mixed, k, v, g, beta)
                slots, conv_out, rec_out = slots[rows], conv_out[rows], rec_out[rows]
            state.conv_state.index_copy_(0, slots, conv_out.to(state.conv_state.dtype))
            state.recurrent_state.index_copy_(0, slots, rec_out.to(state.recurrent_state.dtype))
        return out

    @staticmethod
    def _read_state(
        state: LinearAttentionState | None, index: _StateIndex
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Each sequence's starting conv and recurrent state; None means zeros for all."""
        if state is None or index.all_fresh:
            return None, None
        assert index.slots is not None
        return (slot_states(state.conv_state, index.slots, index.fresh),
                slot_states(state.recurrent_state, index.slots, index.fresh))


class SharedExpertMoE(SparseMoE):
    """Sparse MoE plus an always-on expert scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(self, args: Qwen3MoeArgs, shared_expert_intermediate_size: int) -> None:
        # Sizes from any Qwen3-MoE args plus the shared expert's width (Qwen3-Next, Qwen3-Omni's Talker).
        super().__init__(args.hidden_size, args.moe_intermediate_size, args.num_experts, args.num_experts_per_tok,
                         args.norm_topk_prob)
        self.shared_expert = SwiGLU(args.hidden_size, shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().forward(x) + shared


LayerCache = torch.Tensor | LinearAttentionState | None


class HybridDecoderLayer(nn.Module):
    """Pre-norm block around either linear attention (linear_attn) or gated full attention (self_attn)."""

    def __init__(self, args: Qwen3NextArgs, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_linear = args.is_linear_layer(layer_idx)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(args)
        else:
            self.self_attn = GatedAttention(args)
        if args.is_sparse_layer(layer_idx):
            self.mlp: nn.Module = SharedExpertMoE(args, args.shared_expert_intermediate_size)
        else:
            self.mlp = SwiGLU(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, zero_centered=True)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, zero_centered=True)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, cache: LayerCache,
                index: _StateIndex) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.is_linear:
            if cache is not None and not isinstance(cache, LinearAttentionState):
                raise TypeError(f"layer {self.layer_idx} is linear attention: its cache entry must be a "
                                f"LinearAttentionState (make_state_cache), got {type(cache).__name__}")
            h = self.linear_attn(h, batch, cache, index)
        else:
            if cache is not None and not isinstance(cache, torch.Tensor):
                raise TypeError(f"layer {self.layer_idx} is full attention: its cache entry must be a paged KV "
                                f"tensor, got {type(cache).__name__}")
            h = self.self_attn(h, positions, batch, cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3NextModel(nn.Module):
    def __init__(self, args: Qwen3NextArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList([HybridDecoderLayer(args, i) for i in range(args.num_hidden_layers)])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, zero_centered=True)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv_caches: list[LayerCache] | None,
        inputs_embeds: torch.Tensor | None = None,
        state_journal: StateJournal | None = None,
    ) -> torch.Tensor:
        if kv_caches is not None and len(kv_caches) != len(self.layers):
            raise ValueError(f"kv_caches must have one entry per layer ({len(self.layers)}: paged KV tensors at "
                             f"full-attention layers, LinearAttentionState at linear ones), got {len(kv_caches)}")
        index = _StateIndex.from_batch(batch, kv_caches is not None, state_journal)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, batch, None if kv_caches is None else kv_caches[i], index)
        return self.norm(x)


class Qwen3NextForCausalLM(nn.Module):
    args_class: ClassVar[type[Qwen3NextArgs]] = Qwen3NextArgs

    def __init__(self, args: Qwen3NextArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Qwen3NextModel(args)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # The multi-token-prediction head is not part of forward: qwen3_next_mtp.load_mtp_head attaches it as
        # `self.mtp` when speculative decoding asks for it.
        ignored = [r"mtp\..*"]
        if args.tie_word_embeddings:
            ignored.append(r"lm_head\.weight")
        self.ignored_checkpoint_patterns: tuple[str, ...] = tuple(ignored)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv_caches: list[LayerCache] | None,
        state_journal: StateJournal | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, batch, kv_caches, state_journal=state_journal)

    def compute_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        return lm_logits(hidden, self.lm_head, self.model.embed_tokens, token_ids)

    def kv_cache_spec(self) -> KVCacheSpec:
        """Paged KV for the full-attention layers only; linear layers use make_state_cache."""
        a = self.args
        assert a.num_key_value_heads is not None and a.head_dim is not None and a.layer_types is not None
        return KVCacheSpec(a.layer_types.count("full_attention"), a.num_key_value_heads, a.head_dim)

    def make_state_cache(
        self, num_slots: int, dtype: torch.dtype, device: torch.device | str = "cpu",
        recurrent_dtype: torch.dtype = torch.float32,
    ) -> list[LinearAttentionState | None]:
        """Per layer: a LinearAttentionState with `num_slots` zeroed slots, or None at full-attention layers."""
        return [layer.linear_attn.make_state(num_slots, dtype, device, recurrent_dtype) if layer.is_linear else None
                for layer in self.model.layers]

    def make_state_journal(self, deferred: list[int]) -> StateJournal:
        """Speculative verification: the slots of the sequences at batch positions `deferred` wait for commit."""
        return StateJournal(deferred)

    def state_bytes_per_slot(self, dtype: torch.dtype, recurrent_dtype: torch.dtype = torch.float32) -> int:
        """Memory one state slot takes across all linear layers (for sizing the slot pool)."""
        a = self.args
        conv = (2 * a.linear_num_key_heads * a.linear_key_head_dim + a.linear_num_value_heads * a.linear_value_head_dim)
        conv *= (a.linear_conv_kernel_dim - 1) * torch.empty((), dtype=dtype).element_size()
        rec = a.linear_num_value_heads * a.linear_key_head_dim * a.linear_value_head_dim
        rec *= torch.empty((), dtype=recurrent_dtype).element_size()
        assert a.layer_types is not None
        return a.layer_types.count("linear_attention") * (conv + rec)


__all__ = ["Qwen3NextArgs", "Qwen3NextForCausalLM", "LinearAttentionState", "StateJournal"]
