"""The one preparation pass at load: swaps the native fast paths into a model whose files are plain torch.

Model files (layers.py, attention.py, qwen3*.py) are the reference math and never ask which kernel they got.
`prepare_for_cpu` walks the model once, where it runs on CPU, and swaps in:
- linears and the tied embedding: the fastest CPU form here (models/cpu_linear.py measures and picks);
- RMSNorm: NativeRMSNorm, the same weight read by one native call (qwenstack/kernels/rms_norm_cpu.cpp), the
  residual add before a norm in the same call;
- SwiGLU: its activation (silu(gate) * up) in one native call (qwenstack/kernels/swiglu_cpu.cpp);
- attention layers: NativeAttentionOps, QK-RMSNorm and rotary in one native call, new keys and values
  written to the paged cache in one, and attention over the paged cache read where it lies
  (qwenstack/kernels/paged_attention_cpu.cpp) instead of gathered; prompts and long chunks on bfloat16 dot
  products (qwenstack/kernels/dense_attention_cpu.cpp);
- attention within windows and no cache (the vision tower's frames, the audio encoder's windows): one native
  call on bfloat16 dot products (qwenstack/kernels/dense_attention_cpu.cpp) instead of SDPA's flash loop;
- Gated DeltaNet layers (Qwen3-Next): a decode step's conv and recurrence on the state slots where they lie,
  one native call each (qwenstack/kernels/gated_delta_cpu.cpp);
- a stack of Qwen3 decoder layers (models/qwen3.py run_layers): decode steps as FlatDecodeLoop, the same
  native ops called straight from one loop, without the modules and wrappers between them, and where every
  product is a tile-packed bfloat16, int8 or int4 matrix or int4 on torch's kernel, one native call per layer
  (qwenstack/kernels/decode_layer_cpu.cpp).
Each native path keeps its torch reference as the fallback for a call it cannot take (autograd, float32
norms, a dtype or block size the kernel does not handle, kernels unavailable or disabled), so a prepared
model computes what the reference computes (bit-identical for the rotary and attention kernels, within
16-bit rounding for the norms: tests/kernels). Preparing twice is harmless.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from qwenstack import kernels
from qwenstack.models.attention import AttentionBatch, paged_attention, window_attention, window_starts
from qwenstack.models.cpu_linear import TiledLinear, prepare_cpu_linears, tiled_max_rows
from qwenstack.models.layers import AttentionOps, RMSNorm, SwiGLU, silu_and_mul
from qwenstack.models.linear_attention import (
    chunk_gated_delta_rule_varlen, conv_decode_in_place, recurrent_decode_in_place, sequence_offsets,
)
from qwenstack.models.qwen3 import DecoderLayer, run_decoder_layers
from qwenstack.quantization.formats import Int4Weight, QuantizedWeight

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


# The native chunked rule's chunk length. Any length computes the same rule (chunks only regroup its float32
# sums); the kernel reads 32 or 16 tokens fastest here: 28 ms at 32 against 33 at the torch form's 64 and 47
# at 24 (not whole vectors), one layer of Qwen3-Next's 32 heads of 128 over 1,024 tokens, 2 AVX512 cores.
NATIVE_CHUNK_TOKENS = 32


def native_chunked_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                          cu_seqlens: torch.Tensor | list[int], initial_state: torch.Tensor | None = None,
                          chunk_size: int = 64, use_qk_l2norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked gated delta rule over packed sequences (prefill) in one native call where the kernel applies
    (in chunks of NATIVE_CHUNK_TOKENS), the reference elsewhere (in chunks of chunk_size): (out [T, Hv, Dv],
    final states [B, Hv, Dk, Dv] float32)."""
    offsets = sequence_offsets(cu_seqlens, q.shape[0])
    if use_qk_l2norm and q.device.type == "cpu":  # (the kernel always normalises q and k)
        B, Hv, Dk, Dv = len(offsets) - 1, v.shape[1], k.shape[-1], v.shape[-1]
        state = (torch.zeros(B, Hv, Dk, Dv) if initial_state is None
                 else initial_state.to(torch.float32, copy=True).contiguous())  # the caller's stays as it was
        native = kernels.gated_delta_chunked(q, k, v, g, beta, offsets, state, NATIVE_CHUNK_TOKENS)
        if native is not None:
            return native, state
    return chunk_gated_delta_rule_varlen(q, k, v, g, beta, offsets, initial_state, chunk_size, use_qk_l2norm)


def native_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            windows: list[tuple[int, int, int]]) -> torch.Tensor:
    """Attention within windows (a vision tower's frames, an audio encoder's windows) in one native call
    where the kernel applies (bfloat16, AVX512-BF16), the reference elsewhere."""
    starts = window_starts(windows, q.shape[0])
    native = None if starts is None else kernels.segment_attention(q, k, v, starts, None, False, q.shape[-1] ** -0.5)
    return native if native is not None else window_attention(q, k, v, windows)


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
        """The sequences with at most KERNEL_MAX_QUERY new tokens in one call, one query row per new token. Over a
        float8 cache, not a fresh prompt: it attends over its own keys unrounded, as it does alone in a step."""
        if kv_cache.shape[2] > KERNEL_MAX_BLOCK or not kernels.use_paged_decode(q, kv_cache):
            return set()
        rounded = kv_cache.dtype != q.dtype
        seqs = [i for i, (n, length) in enumerate(zip(batch.query_lens, batch.context_lens))
                if n <= KERNEL_MAX_QUERY and not (rounded and n == length)]
        if not seqs:
            return set()
        starts = batch.query_starts
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in seqs]).to(q.device)
        tables = batch.block_tables[torch.tensor(seqs, dtype=torch.long, device=q.device)]
        out[rows] = kernels.paged_prefix_attention(q[rows], kv_cache, tables, [batch.context_lens[i] for i in seqs],
                                                   [batch.query_lens[i] for i in seqs], scale)
        return set(seqs)

    def causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_starts: list[int], kv_starts: list[int],
               scale: float) -> torch.Tensor | None:
        """Prompts in one call on bfloat16 dot products (dense_attention_cpu.cpp), causal within each."""
        return kernels.segment_attention(q, k, v, q_starts, kv_starts, True, scale)


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

RowsProduct = Callable[[torch.Tensor], torch.Tensor]


def tiled_weights(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A bias-free tile-packed linear's weights as the native ops take them: (packed bfloat16, an empty scales
    tensor), (packed int8, its scales [N]) or (packed int4, its scales and zero points, tile-packed too); None
    for any other form (oneDNN-packed, int4 in torch's packing, a tensor-parallel shard with its all-reduce)."""
    if type(linear) is TiledLinear and linear.bias is None:
        return linear.packed, torch.empty(0)
    quantized = getattr(linear, "quantized", None)
    if not isinstance(quantized, QuantizedWeight) or getattr(linear, "bias", None) is not None:
        return None
    return quantized.tiled_operands()


def decode_layer_weights(linear: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A bias-free linear's weights as decode_layer takes them: the tile-packed forms (tiled_weights), or int4 in
    torch's CPU packing (packed, scales and zero points) where its scales are in the layer's dtype, as the op
    takes its activations; None for any other form."""
    weights = tiled_weights(linear)
    if weights is not None:
        return weights
    quantized = getattr(linear, "quantized", None)
    if (type(quantized) is Int4Weight and quantized.use_kernel and not quantized.tiled
            and getattr(linear, "bias", None) is None and quantized.packed.dim() == 2
            and quantized.scale_zeros.dtype == dtype):
        return quantized.packed, quantized.scale_zeros
    return None


def rows_product(linear: nn.Module) -> tuple[RowsProduct, int]:
    """The most direct call for `linear` on [rows, in] rows, and up to how many rows it takes: the native op
    itself for a tile-packed bfloat16, int8 or int4 matrix (tiled_weights), the module's forward for any other
    form."""
    weights = tiled_weights(linear)
    if weights is not None:
        packed, scales = weights
        if scales.numel() == 0:
            op = kernels.native_op("linear_tiled")
            if op is not None:
                return (lambda x: op(x, packed)), tiled_max_rows()
        else:
            op = kernels.native_op("linear_tiled_int8" if scales.dim() == 1 else "linear_tiled_int4")
            if op is not None:
                return (lambda x: op(x, packed, scales)), sys.maxsize
    return linear.forward, sys.maxsize


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling the module runs more than its forward (forward or pre-forward hooks)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    """Whether hooks registered for every module are set (torch.nn.modules.module.register_module_forward_hook)."""
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


@dataclass
class DecodeLayerOps:
    """One dense decoder layer as FlatDecodeLoop calls it: its products and the weights of its native ops."""

    qkv: RowsProduct
    o: RowsProduct
    mlp: RowsProduct  # a SwiGLU's two products around the native activation, or the MLP module's forward (MoE)
    heads: list[int]  # the fused projection's split per head: [q_heads, kv_heads, kv_heads]
    head_dim: int
    scale: float
    input_norm: NativeRMSNorm
    post_norm: NativeRMSNorm
    q_norm: NativeRMSNorm
    k_norm: NativeRMSNorm
    # decode_layer's arguments from input_norm to kv_heads, where the whole layer is one native call; else None
    native: tuple | None = None


# The native ops a flat decode step calls, resolved once when the loop is built.
FLAT_DECODE_OPS = ("rms_norm", "add_rms_norm", "qk_norm_rope", "write_kv", "paged_decode_attention", "silu_mul")


class FlatDecodeLoop:
    """A decode step through a stack of Qwen3 decoder layers (dense or MoE) as one flat loop of the native ops
    that the prepared layers would call, in the same order on the same tensors, so the result is bit-identical; the
    residual add after each MLP goes into the next layer's norm call (add_rms_norm rounds the sum as torch's
    add does). Called as models/qwen3.py's run_layers; any other step (prefill, a mixed batch, autograd, a
    dtype or batch the ops do not take) goes through the reference loop.

    Why: on the 0.6B shape a single-stream step spent ~5 ms of ~45 between the products, in the modules'
    calls and the ops' Python wrappers (their per-call checks hold for the whole step); this loop checks once
    per step, and decodes 1.09x (bf16) and 1.15x (int8) as fast as the layers (benchmarks/bench_decode_loop.py,
    benchmarks/RESULTS.md). The weights are bound when the loop is built, at the end of the preparation."""

    def __init__(self, layers: list[DecodeLayerOps], rotary: nn.Module, dtype: torch.dtype, max_rows: int) -> None:
        self.layers, self.rotary, self.dtype, self.max_rows = layers, rotary, dtype, max_rows
        self.ops = {name: kernels.native_op(name) for name in FLAT_DECODE_OPS}
        # One native call per layer where every layer takes it (the others keep the loop of ops below).
        self.decode_layer = None if any(layer.native is None for layer in layers) else kernels.native_op("decode_layer")

    @classmethod
    def build(cls, layers: Sequence[nn.Module]) -> "FlatDecodeLoop | None":
        """The loop for prepared `layers`, or None where some layer is not a Qwen3 decoder layer in the native
        fast paths (float32, a norm or the attention left to torch, a hybrid layer), some module of a layer has
        hooks (a tensor-parallel shard's all-reduce; hooks added after the preparation are not seen), or an op
        is unavailable."""
        if not layers or any(kernels.native_op(name) is None for name in FLAT_DECODE_OPS) or _global_hooks():
            return None
        plan, max_rows = [], sys.maxsize
        rotary = layers[0].self_attn.rotary if type(layers[0]) is DecoderLayer else None
        for layer in layers:
            ops = cls._layer_ops(layer, rotary)
            if ops is None:
                return None
            plan.append(ops[0])
            max_rows = min(max_rows, ops[1])
        dtype = plan[0].input_norm.weight.dtype
        norms = [n for p in plan for n in (p.input_norm, p.post_norm, p.q_norm, p.k_norm)]
        if dtype not in (torch.bfloat16, torch.float16) or any(n.weight.dtype != dtype for n in norms):
            return None
        return cls(plan, rotary, dtype, max_rows)

    @staticmethod
    def _layer_ops(layer: nn.Module, rotary: nn.Module | None) -> tuple[DecodeLayerOps, int] | None:
        # The loop calls no module of the layer, so a hook on one (tensor parallelism's all-reduce) would not run.
        if type(layer) is not DecoderLayer or any(_has_hooks(m) for m in layer.modules()):
            return None
        attn = layer.self_attn
        norms = (layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm, attn.k_norm)
        if (attn.ops is not NATIVE_ATTENTION_OPS or attn.rotary is not rotary or attn.head_dim % 16
                or any(type(n) is not NativeRMSNorm for n in norms)
                or (attn.q_norm.eps, attn.q_norm.zero_centered) != (attn.k_norm.eps, attn.k_norm.zero_centered)):
            return None  # (the fused QK-norm-rotary op takes one eps for both, as NativeAttentionOps asks)
        (qkv, qkv_rows), (o, o_rows) = rows_product(attn.qkv_proj), rows_product(attn.o_proj)
        mlp, mlp_rows = FlatDecodeLoop._mlp_call(layer.mlp)
        ops = DecodeLayerOps(qkv, o, mlp, heads=[attn.num_heads, attn.num_kv_heads, attn.num_kv_heads],
                             head_dim=attn.head_dim, scale=attn.scale, input_norm=norms[0], post_norm=norms[1],
                             q_norm=norms[2], k_norm=norms[3], native=FlatDecodeLoop._native_layer(layer))
        return ops, min(qkv_rows, o_rows, mlp_rows)

    @staticmethod
    def _native_layer(layer: DecoderLayer) -> tuple | None:
        """decode_layer's weight arguments for `layer`, or None where it is not one native call: a product in
        another form (oneDNN-packed, int4 off its kernel or with act-order, a shard), an MLP that is not a SwiGLU
        (MoE), or norms that disagree on the one eps and zero-centring the op takes for the two layer norms."""
        attn, mlp = layer.self_attn, layer.mlp
        if type(mlp) is not SwiGLU or mlp.activation is not native_silu_and_mul:
            return None
        norm, post, qn = layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm
        products = [decode_layer_weights(m, norm.weight.dtype)
                    for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(p is None for p in products) or norm.eps != post.eps or not (
                norm.zero_centered == post.zero_centered == qn.zero_centered):
            return None
        return (norm.weight, post.weight, qn.weight, attn.k_norm.weight, float(norm.eps), float(qn.eps),
                norm.zero_centered, *(t for p in products for t in p), attn.num_heads, attn.num_kv_heads)

    @staticmethod
    def _mlp_call(mlp: nn.Module) -> tuple[RowsProduct, int]:
        """A prepared SwiGLU as its two products around the native activation; any other MLP (the sparse MoE
        blocks) as its forward, the call the layer makes."""
        if type(mlp) is not SwiGLU or mlp.activation is not native_silu_and_mul:
            return mlp.forward, sys.maxsize
        (gate_up, gate_up_rows), (down, down_rows) = rows_product(mlp.gate_up_proj), rows_product(mlp.down_proj)
        silu_mul = kernels.native_op("silu_mul")
        return (lambda h: down(silu_mul(gate_up(h)))), min(gate_up_rows, down_rows)

    def applies(self, x: torch.Tensor, batch: AttentionBatch, kv_caches: list[torch.Tensor] | None) -> bool:
        """Whether this step is one the loop takes: decode rows of the layers' dtype into a paged cache of it (or of
        float8_e5m2, which the native write_kv rounds to)."""
        if (not batch.is_decode or batch.is_fresh_prefill or kv_caches is None or batch.slot_mapping is None
                or torch.is_grad_enabled()):
            return False
        if x.dim() != 2 or x.dtype != self.dtype or x.device.type != "cpu" or not 0 < x.shape[0] <= self.max_rows:
            return False
        cache = kv_caches[0]
        return (len(kv_caches) == len(self.layers) and cache.dtype in (self.dtype, torch.float8_e5m2)
                and cache.device.type == "cpu"
                and cache.stride(-1) == 1 and batch.slot_mapping.dtype in (torch.int32, torch.long))

    def __call__(self, layers: Sequence[nn.Module], x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                 kv_caches: list[torch.Tensor] | None) -> torch.Tensor:
        if len(layers) != len(self.layers) or not self.applies(x, batch, kv_caches):
            return run_decoder_layers(layers, x, positions, batch, kv_caches)
        assert kv_caches is not None and batch.slot_mapping is not None
        ops = self.ops
        rms_norm, add_rms_norm, qk_norm_rope = ops["rms_norm"], ops["add_rms_norm"], ops["qk_norm_rope"]
        write_kv, attention = ops["write_kv"], ops["paged_decode_attention"]
        rows = x.shape[0]
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        lens, slots, tables = batch.context_lens_tensor, batch.slot_mapping, batch.block_tables
        if self.decode_layer is not None:
            decode_layer, delta = self.decode_layer, x.new_empty(0)
            for layer, cache in zip(self.layers, kv_caches):
                x, delta = decode_layer(x, delta, *layer.native, cos, sin, cache, slots, tables, lens, layer.scale)
            return x + delta
        first = self.layers[0].input_norm
        h = rms_norm(x, first.weight, float(first.eps), first.zero_centered)
        mlp_out = None
        for layer, cache in zip(self.layers, kv_caches):
            if mlp_out is not None:  # the previous layer's residual add, then this layer's input norm
                norm = layer.input_norm
                x, h = add_rms_norm(x, mlp_out, norm.weight, float(norm.eps), norm.zero_centered)
            q, k, v = layer.qkv(h).view(rows, -1, layer.head_dim).split(layer.heads, 1)
            qn, kn = layer.q_norm, layer.k_norm
            q, k = qk_norm_rope(q, k, qn.weight, kn.weight, cos, sin, float(qn.eps), qn.zero_centered)
            write_kv(cache, k, v, slots)
            out = attention(q, cache, tables, lens, layer.scale)
            norm = layer.post_norm
            x, h = add_rms_norm(x, layer.o(out.view(rows, -1)), norm.weight, float(norm.eps), norm.zero_centered)
            mlp_out = layer.mlp(h)
        return x + mlp_out


@dataclass
class Prepared:
    """What one preparation pass swapped."""

    linears: int = 0
    norms: int = 0
    activations: int = 0
    attention_layers: int = 0
    recurrent_layers: int = 0
    window_attention_layers: int = 0
    decode_loops: int = 0


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
            module.chunk_step = native_chunked_varlen
            done.recurrent_layers += 1
        if getattr(module, "attend_windows", None) is window_attention:  # vision tower, audio encoder
            module.attend_windows = native_window_attention
            done.window_attention_layers += 1
        if isinstance(getattr(module, "ops", None), AttentionOps):
            module.ops = NATIVE_ATTENTION_OPS
            done.attention_layers += 1
    for module in list(model.modules()):  # after the layers' own swaps, which the loop checks for
        if getattr(module, "run_layers", None) is run_decoder_layers:
            loop = FlatDecodeLoop.build(module.layers)
            if loop is not None:
                module.run_layers = loop
                done.decode_loops += 1
    log.info("CPU fast paths: %s", done)
    return done
