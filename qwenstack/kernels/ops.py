"""The native ops, each a thin wrapper over torch.ops.qwenstack with the torch reference's signature.

One fallback contract: an op that may not apply returns None (rms_norm, qk_norm_rope: the caller runs its
torch path), and an op a caller chose through its `*_available()` check raises RuntimeError if called
without it. Availability comes from kernels/build.py, per .cpp file.
"""
from __future__ import annotations

from typing import Callable

import torch

from qwenstack.kernels.build import isa_level, native_op

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A KV pool may also hold float8_e5m2 (--kv-cache-dtype fp8): the attention ops convert its rows as they read them.
_KV_DTYPES = (*_DTYPES, torch.float8_e5m2)


def _required(name: str):  # noqa: ANN202 - the op's callable
    op = native_op(name)
    if op is None:
        raise RuntimeError(f"the native {name} kernel is not available (see the log and QWENSTACK_DISABLE_KERNELS)")
    return op


def paged_decode_available() -> bool:
    """Whether the native decode kernel can be used (builds it on first call unless disabled)."""
    return native_op("paged_decode_attention") is not None


def use_paged_decode(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether this decode step can go to the native kernel: CPU tensors of a supported dtype, head_dim a
    multiple of 16, no autograd (the op has no backward)."""
    return (
        q.device.type == "cpu"
        and kv_cache.device.type == "cpu"
        and q.dtype in _DTYPES
        and kv_cache.dtype in _KV_DTYPES
        and q.shape[-1] % 16 == 0
        and kv_cache.stride(-1) == 1
        and not (q.requires_grad and torch.is_grad_enabled())
        and paged_decode_available()
    )


def paged_decode_attention(
    q: torch.Tensor,  # [B, q_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, kv_heads, head_dim]
    block_tables: torch.Tensor,  # [B, max_blocks] int32/int64
    context_lens: torch.Tensor | list[int],  # [B]
    scale: float,
) -> torch.Tensor:  # [B, q_heads, head_dim], q's dtype
    """softmax(q k^T * scale) v for one query token per sequence, reading keys and values from the paged pool
    in place. Query head h uses kv head h // (q_heads // kv_heads); sums are float32."""
    op = _required("paged_decode_attention")
    if not isinstance(context_lens, torch.Tensor):
        context_lens = torch.tensor(context_lens, dtype=torch.long)
    return op(q, kv_cache, block_tables, context_lens, float(scale))


def paged_prefix_attention(
    q: torch.Tensor,  # [T, q_heads, head_dim]: the new tokens of every sequence, in order
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, kv_heads, head_dim]
    block_tables: torch.Tensor,  # [B, max_blocks]
    context_lens: list[int],  # [B], the new tokens included
    query_lens: list[int],  # [B], new tokens per sequence (sum = T)
    scale: float,
) -> torch.Tensor:  # [T, q_heads, head_dim], q's dtype
    """Causal attention of each sequence's new tokens over its whole cached context, read in place: token
    j of sequence b sees keys [0, context_lens[b] - query_lens[b] + j]."""
    op = _required("paged_prefix_attention")
    return op(q, kv_cache, block_tables, torch.tensor(context_lens, dtype=torch.long),
              torch.tensor(query_lens, dtype=torch.long), float(scale))


def segment_attention(
    q: torch.Tensor,  # [Nq, q_heads, head_dim]
    k: torch.Tensor,  # [Nk, kv_heads, head_dim]
    v: torch.Tensor,  # [Nk, kv_heads, head_dim]
    q_starts: list[int],  # [segments + 1]: 0, ..., Nq
    kv_starts: list[int] | None,  # [segments + 1]: 0, ..., Nk; None: the same as q_starts
    causal: bool,
    scale: float,
) -> torch.Tensor | None:  # [Nq, q_heads, head_dim] bfloat16, contiguous
    """softmax(q k^T * scale) v of each segment's query rows over its key rows, in one native call on bfloat16
    dot products (dense_attention_cpu.cpp). Causal: query i of a segment sees its keys up to
    kv_len - q_len + i (the last query, every key). None where it does not apply (not bfloat16 CPU tensors,
    autograd, head_dim not a multiple of 16 up to 256, a CPU without AVX512-BF16, kernels unavailable,
    nothing to attend): use SDPA."""
    if not (
        q.device.type == "cpu"
        and len(q_starts) > 1 and q.shape[0] > 0
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.shape[-1] % 16 == 0 and q.shape[-1] <= 256
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
        and isa_level() in ("avx512_bf16", "avx512_amx")
    ):
        return None
    op = native_op("segment_attention")
    if op is None:
        return None
    q_bounds = torch.tensor(q_starts, dtype=torch.long)
    kv_bounds = q_bounds if kv_starts is None else torch.tensor(kv_starts, dtype=torch.long)
    return op(q, k, v, q_bounds, kv_bounds, causal, float(scale))


LINEAR_WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.int8)


def linear_rows_available() -> bool:
    """Whether the native linear kernel can be used (builds it on first call unless disabled)."""
    return native_op("linear_rows") is not None


def linear_rows(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T, times scales [N] per output column when given (int8 weights), in x's dtype;
    sums in float32. Reads the weights once whatever M: for a few rows (decoding), not for prefill."""
    op = _required("linear_rows")
    return op(x, weight, _NO_SCALES if scales is None else scales)


_NO_SCALES = torch.empty(0)
def linear_tiled(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T for W in pack_tiles' layout, in x's dtype; sums in float32. Reads the weights once per
    32 rows of x: for decode batches, not for prefill."""
    op = _required("linear_tiled")
    return op(x, packed)


def has_amx() -> bool:
    """Whether the kernels are built with AMX tiles (the linear kernels' batched loops use them)."""
    return linear_rows_available() and isa_level() == "avx512_amx"


def int4_tiles_preferred() -> bool:
    """Whether int4 weights are best tile-packed on this machine: the kernels are built with AVX512-BF16, whose
    dot products (and AVX512-BW's word permutes) the tiled int4 loop is written for. Lower levels run that
    layout in scalar loops; torch's int4 kernel is faster there."""
    return linear_rows_available() and isa_level() in ("avx512_bf16", "avx512_amx")


def int8_tiles_preferred() -> bool:
    """Whether int8 weights are best tile-packed on this machine: the kernels are built with AVX512-VNNI, whose
    byte dot products the tiled int8 loop is written for. Lower levels run that layout in scalar loops, 2.5 to
    4.5 times slower at one row than the row-major kernel's vectors (AVX2 and plain AVX-512, 3072 x 1024)."""
    return linear_rows_available() and isa_level() in ("avx512_bf16", "avx512_amx")


def linear_tiled_int8(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (W * scales[:, None]).T for int8 W in pack_tiles_int8's layout, in x's dtype (activations as
    int16 per row, exact int32 sums). Any number of rows: AMX-INT8 tiles from 3 rows where the CPU has them."""
    op = _required("linear_tiled_int8")
    return op(x, packed, scales)


def linear_tiled_int4(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T for int4 W = (q - 8) * scale + zero per group (formats.Int4Weight), q in
    pack_tiles_int4's layout and scale_zeros bfloat16 in pack_scale_zeros_int4's ([N / 16, K / group, 16, 2]),
    in x's dtype; bfloat16 activations, float32 sums. Any number of rows, one vector loop."""
    op = _required("linear_tiled_int4")
    return op(x, packed, scale_zeros)


def stream_sum(x: torch.Tensor, streams: int) -> torch.Tensor | None:
    """x.sum() of a 1-D float32 CPU tensor as [1], each thread's share read as `streams` (1, 2, 4, 8 or 16)
    runs side by side: a probe of the machine's read rate (memory_cpu.cpp). None where it does not build."""
    op = native_op("stream_sum")
    return None if op is None else op(x, streams)


_NORM_DTYPES = (torch.bfloat16, torch.float16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool) -> torch.Tensor | None:
    """RMSNorm over the last dimension as models/layers.RMSNorm computes it, in one native call; None where
    the kernel does not apply (not CPU, autograd, mixed dtypes, float32, kernels unavailable): use the torch
    path. float32 stays on torch: its sum of squares in another order moves float32 logits by ~1e-7 per
    layer, which the parity tests against transformers would see; in 16-bit dtypes the rounding hides it."""
    if x.dim() < 1 or not _elementwise_applies(x, weight):
        return None
    op = native_op("rms_norm")
    if op is None:
        return None
    if x.dim() in (2, 3):
        return op(x, weight, float(eps), zero_centered)
    return op(x.reshape(-1, x.shape[-1]), weight, float(eps), zero_centered).view(x.shape)


def _elementwise_applies(*tensors: torch.Tensor) -> bool:
    """The rules of the 16-bit elementwise kernels (the norms, rotary, SwiGLU's activation): CPU tensors of
    one dtype, bfloat16 or float16, and no autograd. Plain loops: a decode step asks about five times per
    layer, and generator expressions made these checks cost as much as the kernels' own calls."""
    first = tensors[0]
    dtype = first.dtype
    if first.device.type != "cpu" or dtype not in _NORM_DTYPES:
        return False
    for t in tensors:
        if t.dtype != dtype:
            return False
    if torch.is_grad_enabled():
        for t in tensors:
            if t.requires_grad:
                return False
    return True


def qk_norm_rope(
    q: torch.Tensor,  # [S, heads, D], D contiguous (a view of the fused projection)
    k: torch.Tensor,  # [S, kv_heads, D]
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,  # [S, R]
    sin: torch.Tensor,
    eps: float,
    zero_centered: bool,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An attention layer's QK-RMSNorm then rotate-half rotary embedding in one native call, rounded as the
    torch path rounds (bit-identical in bfloat16/float16); None where it does not apply (the rules of
    rms_norm above): use the torch path."""
    if q.dim() != 3 or k.dim() != 3 or q.stride(-1) != 1 or k.stride(-1) != 1:
        return None
    if not _elementwise_applies(q, k, q_weight, k_weight, cos, sin):
        return None
    op = native_op("qk_norm_rope")
    if op is None:
        return None
    return op(q, k, q_weight, k_weight, cos, sin, float(eps), zero_centered)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 zero_centered: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x + delta, RMSNorm(x + delta)) in one native call, the sum rounded to x's dtype as torch's add rounds
    it; None where it does not apply (the rules of rms_norm): use the torch path."""
    if x.shape != delta.shape or x.dim() < 1 or not _elementwise_applies(x, delta, weight):
        return None
    op = native_op("add_rms_norm")
    if op is None:
        return None
    if x.dim() == 2:
        return op(x, delta, weight, float(eps), zero_centered)
    shape = x.shape
    total, normed = op(x.reshape(-1, shape[-1]), delta.reshape(-1, shape[-1]), weight, float(eps), zero_centered)
    return total.view(shape), normed.view(shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension, in one native call (within one
    unit of the 16-bit dtype of torch's ops); None where it does not apply (the rules of rms_norm)."""
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2 or gate_up.stride(-1) != 1 or not _elementwise_applies(gate_up):
        return None
    op = native_op("silu_mul")
    if op is None:
        return None
    if gate_up.dim() == 2:
        return op(gate_up)
    shape = gate_up.shape
    return op(gate_up.reshape(-1, shape[-1])).view(*shape[:-1], shape[-1] // 2)


def _rows_op(name: str, logits: torch.Tensor):  # noqa: ANN202 - the op's callable, or None
    """The sampling op `name` where it takes these logits (CPU rows [R, V] of a dtype it reads), else None."""
    if logits.device.type != "cpu" or logits.dtype not in _DTYPES or logits.dim() != 2:
        return None
    return native_op(name)


def top_k_rows(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row of logits [R, V] as float32 [R, k], descending, and their ids [R, k]:
    the native selection (equal values by ascending id), or torch.topk where it does not apply (a
    device or dtype the op does not take; ties then in torch's order)."""
    op = _rows_op("top_k_rows", logits)
    if op is None:
        values, ids = torch.topk(logits, k)
        return values.float(), ids
    return op(logits, k)


def softmax_draw_rows(logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor | None:
    """One token per row of logits [R, V] drawn from softmax(logits / temperatures) [R] float32 at the points
    uniforms [R] float64 of the rows' running sums (engine/sampler.py draw_rows' rule), in one native call over
    the logits as they are (no float32 copy); -1 for a row without a finite maximum or with a NaN. None where the op
    does not apply (no native kernel, a device or dtype it does not take): the caller's torch path then."""
    op = _rows_op("softmax_draw_rows", logits)
    if op is None:
        return None
    return op(logits, temperatures.to(torch.float32).contiguous(), uniforms.to(torch.float64).contiguous())


def logsumexp_rows(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """log sum exp(logits / temperatures) of each row of logits [R, V] (temperatures [R]) as float32 [R]: the
    native pass over the logits as they are, or torch's logsumexp on a float32 copy where it does not apply."""
    temperatures = temperatures.to(torch.float32).contiguous()
    op = _rows_op("logsumexp_rows", logits)
    if op is None:
        return (logits.float() / temperatures[:, None]).logsumexp(-1)
    return op(logits, temperatures)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """Stores k and v [T, kv_heads, head_dim] at their slots of the paged pool in one native call, as
    models/attention.py's write_kv; False (nothing written) where it does not apply: CPU tensors of the
    pool's dtype (or 16/32-bit floats into a float8_e5m2 pool, rounded as .to() does), head_dim contiguous, no
    autograd."""
    dtype = kv_cache.dtype
    if kv_cache.device.type != "cpu" or dtype not in _KV_DTYPES or k.dtype != v.dtype:
        return False
    if k.dtype != dtype and not (dtype == torch.float8_e5m2 and k.dtype in _DTYPES):
        return False
    if k.device.type != "cpu" or v.device.type != "cpu" or slot_mapping.dtype not in (torch.int32, torch.long):
        return False
    if kv_cache.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return False
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        return False
    op = native_op("write_kv")
    if op is None:
        return False
    op(kv_cache, k, v, slot_mapping)
    return True


_NO_ROWS = torch.empty(0, dtype=torch.bool)  # the decode ops' "no sequence is fresh"


def conv_decode(
    x: torch.Tensor,  # [B, C]
    weight: torch.Tensor,  # [C, 1, K]
    conv_state: torch.Tensor,  # [S, C, K-1] in x's dtype, updated in place at `slots`
    slots: torch.Tensor,  # [B] long, distinct
    fresh: torch.Tensor | None,  # [B] bool: a zero window; None: none
) -> torch.Tensor | None:  # [B, C] in x's dtype
    """One token of the depthwise causal conv1d + SiLU per sequence on the conv states where they lie
    (models/linear_attention.py's conv_decode_in_place, in one native call); None (nothing touched) where it
    does not apply: CPU tensors of the float dtypes, x's channels contiguous, contiguous state and weight, the
    state in x's dtype, no autograd."""
    if x.device.type != "cpu" or conv_state.device.type != "cpu" or weight.device.type != "cpu":
        return None
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES or conv_state.dtype != x.dtype or weight.dim() != 3:
        return None
    if x.dim() != 2 or x.stride(-1) != 1 or not conv_state.is_contiguous() or not weight.is_contiguous():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or conv_state.requires_grad):
        return None
    op = native_op("conv_decode")
    if op is None:
        return None
    no_fresh = _NO_ROWS if fresh is None else fresh
    weight_rows = weight.view(weight.shape[0], weight.shape[-1])
    return op(x, weight_rows, conv_state, slots.long().contiguous(), no_fresh)


def gated_delta_decode(
    q: torch.Tensor,  # [B, Hk, Dk]
    k: torch.Tensor,  # [B, Hk, Dk]
    v: torch.Tensor,  # [B, Hv, Dv]
    g: torch.Tensor,  # [B, Hv] float32
    beta: torch.Tensor,  # [B, Hv]
    state: torch.Tensor,  # [S, Hv, Dk, Dv] float32, updated in place at `slots`
    slots: torch.Tensor,  # [B] long, distinct
    fresh: torch.Tensor | None,  # [B] bool: start from a zero state; None: none does
) -> torch.Tensor | None:  # [B, Hv, Dv] in q's dtype
    """One token of the gated delta rule per sequence on the states where they lie (models/linear_attention.py's
    recurrent_decode_in_place, in one native call: qwenstack/kernels/gated_delta_cpu.cpp); None (nothing
    touched) where it does not apply: CPU tensors, q/k/v of one dtype with their last dimension contiguous, a
    contiguous float32 state, no autograd."""
    op = _gated_delta_op("gated_delta_decode", q, k, v, g, beta, state)
    if op is None:
        return None
    no_fresh = _NO_ROWS if fresh is None else fresh
    return op(q, k, v, g, beta, state, slots.long().contiguous(), no_fresh)


def gated_delta_chunked(
    q: torch.Tensor,  # [T, Hk, Dk]
    k: torch.Tensor,  # [T, Hk, Dk]
    v: torch.Tensor,  # [T, Hv, Dv]
    g: torch.Tensor,  # [T, Hv] float32
    beta: torch.Tensor,  # [T, Hv]
    starts: list[int],  # [B + 1] offsets into T
    state: torch.Tensor,  # [B, Hv, Dk, Dv] float32 contiguous: the starting states, updated in place
    chunk_size: int,
) -> torch.Tensor | None:  # [T, Hv, Dv] in q's dtype
    """The gated delta rule over whole pieces of sequences, chunk by chunk (models/linear_attention.py's
    chunk_gated_delta_rule_varlen, in one native call: qwenstack/kernels/gated_delta_cpu.cpp), each sequence's
    state updated in place to its final one; None (nothing touched) where it does not apply: the rules of
    gated_delta_decode."""
    op = _gated_delta_op("gated_delta_chunked", q, k, v, g, beta, state)
    if op is None:
        return None
    return op(q, k, v, g, beta, torch.tensor(starts, dtype=torch.long), state, chunk_size)


def _gated_delta_op(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                    beta: torch.Tensor, state: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """The native op `name` if the gated delta kernels' rules hold for these tensors, else None."""
    if q.device.type != "cpu" or state.device.type != "cpu" or q.dtype not in _DTYPES or beta.dtype not in _DTYPES:
        return None
    if k.dtype != q.dtype or v.dtype != q.dtype or g.dtype != torch.float32 or state.dtype != torch.float32:
        return None
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or not state.is_contiguous():
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or state.requires_grad):
        return None
    return native_op(name)


# Rows up to which the tiled kernel's vector loops (builds without AMX) take a product in one call (models/
# cpu_linear.py's TiledLinear: in pieces up to twice as many, then F.linear on the matrix unpacked for the
# call). Since their batch passes take rows in chunks that stay in L2 (linear_tiled_cpu.cpp), they run about
# as fast as oneDNN's GEMM from 256 to 2,048 rows (~400-420 GFLOPS on 2 AVX512-BF16 cores). Qwen3-0.6B's
# prefill in the engine, processes of each limit alternated: 512 tokens in one call 1.04x two calls of 256;
# 1,061 tokens in one call 0.95-1.0x F.linear unpacked; 2,048 in one call 0.96x, where oneDNN's GEMM is a
# few percent ahead and the unpacking costs a few percent of the product.
VECTOR_LOOP_MAX_ROWS = 512
# The same where the loops have no bfloat16 dot products (AVX2, plain AVX-512: bound by their conversions),
# and, with AMX, the most rows an expert moe_tiled (vector loops only) takes: more go expert by expert
# through linear_tiled's tile loop.
SLOW_LOOP_MAX_ROWS = 16


def moe_tiled(
    x: torch.Tensor,  # [T, H] bfloat16: the layer's tokens
    token_of: torch.Tensor,  # [R] int64: the token of each (token, expert) pair, pairs sorted by expert
    weights: torch.Tensor,  # [R] bfloat16: each pair's routing weight
    counts: torch.Tensor,  # [E] int64: pairs of each expert, in order
    gate_up: torch.Tensor,  # [E, 2I / 16, H / 32, 16, 16, 2] bfloat16, tile-packed per expert
    down: torch.Tensor,  # [E, H / 16, I / 32, 16, 16, 2] bfloat16
) -> torch.Tensor | None:  # [T, H] bfloat16
    """A MoE layer's experts in one native call (qwenstack/kernels/linear_tiled_cpu.cpp): each token's weighted
    sum of its experts' SwiGLU, bit for bit x[token_of], the loop of linear_tiled and silu_mul over the experts,
    `*= weights` and index_add_ into zeros. None where it does not apply: CPU bfloat16, at most moe_max_rows()
    pairs an expert, no autograd."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or gate_up.dtype != torch.bfloat16 or x.dim() != 2:
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    limit = moe_max_rows()
    if limit is not None and counts.numel() and int(counts.max()) > limit:
        return None
    op = native_op("moe_tiled")
    if op is None:
        return None
    return op(x, token_of, weights, counts, gate_up, down)


def experts_swiglu(
    x: torch.Tensor,  # [R, H] bfloat16, rows sorted by expert
    counts: torch.Tensor,  # [E] int64: rows of each expert, in order
    gate_up: tuple[torch.Tensor, torch.Tensor],  # the stack's tile-packed codes and scales (see below)
    down: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor | None:  # [R, H] bfloat16
    """Every expert's SwiGLU over its rows in one native call (qwenstack/kernels/decode_layer_cpu.cpp), for
    quantized stacks tile-packed as int8 (codes, scales [E, N]) or int4 (codes, scales and zero points
    [E, N / 16, K / group, 16, 2]): bit for bit the loop over the experts of their products and silu_mul. None where it
    does not apply: CPU bfloat16 rows, no autograd, the op built."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 2:
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    op = native_op("experts_swiglu")
    if op is None:
        return None
    return op(x, counts, gate_up[0], gate_up[1], down[0], down[1])


def vector_loop_max_rows() -> int:
    """Up to how many rows the tiled kernel's vector loops beat F.linear on the unpacked matrix in this build."""
    return VECTOR_LOOP_MAX_ROWS if isa_level() == "avx512_bf16" else SLOW_LOOP_MAX_ROWS


def moe_max_rows() -> int | None:
    """Up to how many rows an expert moe_tiled takes in this build; None: any number.
    The AVX512-BF16 vector loops take prefill-sized groups too. What the loop over experts does with an expert
    past VECTOR_LOOP_MAX_ROWS is F.linear on its matrices unpacked for the call, and a prefill chunk sends a few
    such experts per layer, so the whole layer left the one call: its experts in one call instead took 0.75x
    the time (30B-A3B shape, 4 layers, ~2,000-row prefill chunks, 2 cores without AMX)."""
    # AMX builds (level avx512_amx) take more rows expert by expert through the tile loop.
    return None if isa_level() == "avx512_bf16" else SLOW_LOOP_MAX_ROWS

