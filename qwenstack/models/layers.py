"""Layers shared by every Qwen3 architecture: RMSNorm, rotary embeddings, SwiGLU, attention.

Decisions:
- Module and parameter names follow the Hugging Face checkpoint keys. Where we fuse projections for
  speed (q/k/v into qkv_proj, gate/up into gate_up_proj), the module declares which checkpoint tensors fill
  which rows of the fused weight (`checkpoint_sources`); the loader does the rest.
- Numerics mirror transformers where it matters for parity: RMSNorm in float32 then cast back before the
  weight; cos/sin computed in float32 from the positions and cast to the activation dtype.
- Rotary tables are computed per call from the positions rather than cached for the whole context:
  262,144 positions x head_dim would be hundreds of MB, and the per-step cost is a few hundred FLOPs a token.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from qwenstack.config import RopeConfig
from qwenstack.errors import ConfigError
from qwenstack.models.attention import AttentionBatch, paged_attention

if TYPE_CHECKING:
    from qwenstack.weights import Source


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, zero_centered: bool = False) -> None:
        super().__init__()
        # zero_centered: the weight is stored as an offset from 1 (Qwen3-Next's norms).
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))
        self.eps = eps
        self.zero_centered = zero_centered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (h * (1.0 + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, this norm of it): a residual add and the norm that follows it (the preparation's
        native norm does both in one pass)."""
        total = x + delta
        return total, self(total)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim / 2] and the cos/sin scale, as transformers computes them."""
    dim = int(head_dim * rope.partial_rotary_factor)
    base = rope.rope_theta
    # Explicit CPU device: the model may be built under a meta-device context.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float32) / dim
    inv_freq = 1.0 / (base**exponents)
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        assert rope.factor is not None
        return inv_freq / rope.factor, 1.0
    # YaRN (https://arxiv.org/abs/2309.00071): blend interpolated and extrapolated frequencies by a ramp.
    factor = rope.factor
    original = rope.original_max_position_embeddings
    assert original is not None
    if factor is None:
        raise ValueError("yarn rope needs a factor")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where the original frequency is kept (high-frequency dims)
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding over the first `rotary_dim` channels of each head."""

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        inv_freq, self.scale = rope_inverse_frequencies(rope, head_dim)
        self.rotary_dim = inv_freq.numel() * 2
        self.head_dim = head_dim
        # Kept out of the state dict and the meta-device build: a plain attribute moved with the inputs.
        self._inv_freq = inv_freq
        self._last: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # One instance is shared by all layers of a model: the tables of the last positions tensor are
        # kept (with a reference to it, so the identity check cannot be fooled by a reused id).
        last = self._last
        if last is not None and last[0] is positions and last[1] == dtype:
            return last[2], last[3]
        inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[:, None].float() * inv_freq[None, :]  # [T, rotary_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)
        self._last = (positions, dtype, cos, sin)
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos/sin [T, rotary_dim]. Channels past rotary_dim pass through."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def fused_rows(prefix: str, fused: str, parts: list[tuple[str, int]], suffix: str = "weight") -> dict[str, list[list["Source"]]]:
    """Sources for a weight whose rows stack several checkpoint tensors (q|k|v, gate|up)."""
    from qwenstack.weights import Source

    sources, offset = [], 0
    for name, rows in parts:
        sources.append(Source(f"{prefix}{name}.{suffix}", (slice(offset, offset + rows),)))
        offset += rows
    return {f"{prefix}{fused}.{suffix}": [sources]}


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one matrix product."""

    activation = staticmethod(silu_and_mul)  # the preparation (models/fast_paths.py) sets a native one

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_up_proj(x)))

    def checkpoint_sources(self, prefix: str) -> dict[str, list[list["Source"]]]:
        i = self.intermediate_size
        return fused_rows(prefix, "gate_up_proj", [("gate_proj", i), ("up_proj", i)])


class AttentionOps:
    """What an attention layer does between its projections - QK-RMSNorm and rotary, then attention over the
    paged cache - as torch's reference math. The load-time preparation (models/fast_paths.py) gives each
    layer the native subclass where it applies; the layers call these and never ask which they have."""

    def norm_and_rotate(self, q_norm: RMSNorm, k_norm: RMSNorm, q: torch.Tensor, k: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q_norm(q), cos, sin), apply_rotary(k_norm(k), cos, sin)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
               batch: AttentionBatch, scale: float) -> torch.Tensor:
        return paged_attention(q, k, v, kv_cache, batch, scale)


class Attention(nn.Module):
    """Grouped-query attention with per-head QK RMSNorm (Qwen3), q/k/v fused into one projection."""

    ops = AttentionOps()  # stateless; the preparation sets an instance's own

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rms_norm_eps: float,
        rope: RopeConfig,
        bias: bool = False,
        rotary: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ConfigError(f"config.json's num_attention_heads ({num_heads}) must be a multiple of "
                              f"num_key_value_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.bias = bias
        self.qkv_proj = nn.Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, hidden_size, bias=bias)
        self.q_norm = RMSNorm(head_dim, rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, rms_norm_eps)
        # Pass the model's shared RotaryEmbedding so cos/sin are computed once per forward, not per layer.
        self.rotary = rotary if rotary is not None else RotaryEmbedding(rope, head_dim)
        self.scale = head_dim**-0.5

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, kv_cache: torch.Tensor | None
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.norm_and_rotate(q.view(-1, self.num_heads, self.head_dim),
                                    k.view(-1, self.num_kv_heads, self.head_dim), positions)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = self.ops.attend(q, k, v, kv_cache, batch, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))

    def norm_and_rotate(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """QK-RMSNorm then the rotary embedding of q [T, heads, D] and k [T, kv_heads, D]."""
        cos, sin = self.rotary.cos_sin(positions, q.dtype)
        return self.ops.norm_and_rotate(self.q_norm, self.k_norm, q, k, cos, sin)

    def checkpoint_sources(self, prefix: str) -> dict[str, list[list["Source"]]]:
        parts = [("q_proj", self.q_size), ("k_proj", self.kv_size), ("v_proj", self.kv_size)]
        sources = fused_rows(prefix, "qkv_proj", parts)
        if self.bias:
            sources.update(fused_rows(prefix, "qkv_proj", parts, suffix="bias"))
        return sources
