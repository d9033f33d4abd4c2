"""The one preparation pass at load: swaps the native fast paths into a model whose files are plain torch.

Model files (layers.py, attention.py, qwen3*.py) are the reference math and never ask which kernel they got.
`prepare_for_cpu` walks the model once, where it runs on CPU, and swaps in:
- linears and the tied embedding: the fastest CPU form here (models/cpu_linear.py measures and picks);
- RMSNorm: NativeRMSNorm, the same weight read by one native call (qwenstack/kernels/rms_norm_cpu.cpp), the
  residual add before a norm in the same call;
- SwiGLU: its activation (silu(gate) * up) in one native call (qwenstack/kernels/swiglu_cpu.cpp);
- attention layers: NativeAttentionOps, QK-RMSNorm and rotary in one native call, new keys and values
  written to the paged cache in one, and attention over the paged cache read where it lies
  (qwenstack/kernels/paged_attention_cpu.cpp) instead of gathered;
- Gated DeltaNet layers (Qwen3-Next): a decode step's conv and recurrence on the state slots where they lie,
  one native call each (qwenstack/kernels/gated_delta_cpu.cpp).
Each native path keeps its torch reference as the fallback for a call it cannot take (autograd, float32
norms, a dtype or block size the kernel does not handle, kernels unavailable or disabled), so a prepared
model computes what the reference computes (bit-identical for the rotary and attention kernels, within
16-bit rounding for the norms: tests/kernels). Preparing twice is harmless.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from qwenstack import kernels
from qwenstack.models.attention import AttentionBatch, paged_attention
from qwenstack.models.cpu_linear import prepare_cpu_linears
from qwenstack.models.layers import AttentionOps, RMSNorm, SwiGLU, silu_and_mul
from qwenstack.models.linear_attention import conv_decode_in_place, recurrent_decode_in_place

log = logging.getLogger("qwenstack.models")

# Up to this many new tokens, a sequence's attention runs in the native kernel (every key row loaded once
# for all its tokens, no gather); longer prompts and chunks go to SDPA's blocked products.
KERNEL_MAX_QUERY = 64
KERNEL_MAX_BLOCK = 16  # the multi-token kernel holds one block of scores in registers (the engine's default)


class NativeRMSNorm(RMSNorm):
    """RMSNorm in one native call where the kernel applies (CPU, 16-bit, no autograd), the reference elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        native = kernels.rms_norm(x, self.weight, self.eps, self.zero_centered)
        return native if native is not None else super().forward(x)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        native = kernels.add_rms_norm(x, delta, self.weight, self.eps, self.zero_centered)
        return native if native is not None else super().add_and_norm(x, delta)


def native_conv_in_place(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, slots: torch.Tensor,
                         fresh: torch.Tensor | None) -> torch.Tensor:
    """A Gated DeltaNet decode step's conv in one native call where the kernel applies, the reference elsewhere."""
    native = kernels.conv_decode(x, weight, conv_state, slots, fresh)
    return native if native is not None else conv_decode_in_place(x, weight, conv_state, slots, fresh)


def native_decode_in_place(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           state: torch.Tensor, slots: torch.Tensor, fresh: torch.Tensor | None) -> torch.Tensor:
    """A Gated DeltaNet decode step in one native call where the kernel applies, the reference elsewhere."""
    native = kernels.gated_delta_decode(q, k, v, g, beta, state, slots, fresh)
    return native if native is not None else recurrent_decode_in_place(q, k, v, g, beta, state, slots, fresh)


def native_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation in one native call where the kernel applies, the reference elsewhere."""
    native = kernels.silu_mul(gate_up)
    return native if native is not None else silu_and_mul(gate_up)


class NativePagedAttention:
    """The paged-attention kernels as models/attention.py's InPlaceAttention."""

    def write(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
        return kernels.write_kv(kv_cache, k, v, slot_mapping)

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch,
               scale: float) -> torch.Tensor | None:
        if not kernels.use_paged_decode(q, kv_cache):
            return None
        return kernels.paged_decode_attention(q, kv_cache, batch.block_tables, batch.context_lens_tensor, scale)

    def few_new_tokens(self, q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, scale: float,
                       out: torch.Tensor) -> set[int]:
        """The sequences with at most KERNEL_MAX_QUERY new tokens in one call, one query row per new token."""
        if kv_cache.shape[2] > KERNEL_MAX_BLOCK or not kernels.use_paged_decode(q, kv_cache):
            return set()
        seqs = [i for i, n in enumerate(batch.query_lens) if n <= KERNEL_MAX_QUERY]
        if not seqs:
            return set()
        starts = batch.query_starts
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in seqs]).to(q.device)
        tables = batch.block_tables[torch.tensor(seqs, dtype=torch.long, device=q.device)]
        out[rows] = kernels.paged_prefix_attention(q[rows], kv_cache, tables, [batch.context_lens[i] for i in seqs],
                                                   [batch.query_lens[i] for i in seqs], scale)
        return set(seqs)


class NativeAttentionOps(AttentionOps):
    """AttentionOps with the fused QK-norm-rotary kernel and the in-place paged attention."""

    in_place = NativePagedAttention()

    def norm_and_rotate(self, q_norm: RMSNorm, k_norm: RMSNorm, q: torch.Tensor, k: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if q_norm.eps == k_norm.eps and q_norm.zero_centered == k_norm.zero_centered:
            fused = kernels.qk_norm_rope(q, k, q_norm.weight, k_norm.weight, cos, sin, q_norm.eps,
                                         q_norm.zero_centered)
            if fused is not None:
                return fused
        return super().norm_and_rotate(q_norm, k_norm, q, k, cos, sin)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
               batch: AttentionBatch, scale: float) -> torch.Tensor:
        return paged_attention(q, k, v, kv_cache, batch, scale, in_place=self.in_place)


NATIVE_ATTENTION_OPS = NativeAttentionOps()  # stateless, shared by every prepared layer


@dataclass
class Prepared:
    """What one preparation pass swapped."""

    linears: int = 0
    norms: int = 0
    activations: int = 0
    attention_layers: int = 0
    recurrent_layers: int = 0


def prepare_for_cpu(model: nn.Module, linears: bool = True) -> Prepared:
    """Swaps the native fast paths into `model` if it runs on CPU (a no-op elsewhere). linears=False keeps the
    linears as they are (the speech loop's models, whose codes are checked token for token against their
    reference with F.linear's sums)."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu":
        return Prepared()
    # Every native op built now (all files at once) rather than one by one as the first request needs them.
    kernels.build_all()
    done = Prepared(linears=prepare_cpu_linears(model) if linears else 0)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is RMSNorm:
                native = NativeRMSNorm(child.weight.shape[0], child.eps, child.zero_centered)
                native.weight = child.weight  # the same Parameter: names and storage unchanged
                setattr(module, name, native)
                done.norms += 1
        if isinstance(module, SwiGLU):
            module.activation = native_silu_and_mul
            done.activations += 1
        if getattr(module, "decode_step", None) is recurrent_decode_in_place:  # Gated DeltaNet (Qwen3-Next)
            module.conv_step = native_conv_in_place
            module.decode_step = native_decode_in_place
            done.recurrent_layers += 1
        if isinstance(getattr(module, "ops", None), AttentionOps):
            module.ops = NATIVE_ATTENTION_OPS
            done.attention_layers += 1
    log.info("CPU fast paths: %s", done)
    return done
