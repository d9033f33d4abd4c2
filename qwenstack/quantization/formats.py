"""Weight-only quantized matrices: int8 per output channel, int4 in groups along the input, fp8 (CUDA).

Each format holds a stack of matrices [*stack, N, K] (one nn.Linear: no stack; MoE experts: [E]) and
multiplies activations x [M, K] by one of them: `matmul(x, index) -> [M, N]`. Weights are stored as
buffers, never parameters: nothing here trains, and `model.parameters()` keeps listing the full-precision
tensors (the first of which, the embedding, tells the engine the activation dtype and device).

Decisions:
- Every format has a fast path (a fused kernel) and a reference path (dequantize, then F.linear) that runs
  on any device; the fast path is chosen once, at quantization time, only where the kernel takes the
  shape, and tests check the two agree.
- int8 is symmetric per output channel: w ~ q * s, q in [-128, 127]. The fast path, where qwenstack's
  native kernels are built with AVX512-VNNI (kernels.int8_tiles_preferred), stores matrices of 16-row x 64-column multiples (every Qwen3 linear and
  expert) tile-packed (kernels.pack_tiles_int8) and multiplies any number of rows with
  kernels.linear_tiled_int8 (int16 activations, exact int32 sums; AMX-INT8 tiles from 3 rows). It read
  the 0.6B shape's weights at one row in 0.75 of the row-major kernel's time, and from 16 rows took a fifth
  to a ninth of `_weight_int8pack_mm`'s. Other shapes stay row-major: the native row-major kernel up to
  INT8_NATIVE_MAX_ROWS rows and torch's `_weight_int8pack_mm` (CPU) above: activations and scales must
  share one dtype (bf16, fp16 or fp32), and in bfloat16 K must be a multiple of 16 (torch 2.13 on AVX-512
  reads past the row otherwise: we saw infinities and segmentation faults at K = 24 and K = 1032).
- int4 is asymmetric per group of `group_size` input channels, in the layout of torch's tinygemm kernels:
  w ~ (q - 8) * scale + zero, q in [0, 15], scale and zero [K / G, N, 2] in the activation dtype. The fast
  path, where qwenstack's native kernels are built with AVX512-BF16 (kernels.int4_tiles_preferred) and the
  scales are bfloat16, stores the codes tile-packed (kernels.pack_tiles_int4: N a multiple of 16, G of 8)
  and multiplies any number of rows with kernels.linear_tiled_int4 (bfloat16 activations, float32 sums):
  on the 0.6B shape's matrices it ran at 1.3-1.5x torch's kernel's speed at one row and 2x from 16 to 1,024.
  Elsewhere the fast path is `_weight_int4pack_mm_for_cpu` (N a multiple of 16, G in 32/64/128/256), whose
  packed layout is the kernel's own (permuted for AVX-512); the reference path packs two nibbles per byte.
- Scales are rounded to the activation dtype *before* the weights are rounded against them, so the
  stored scale is exactly the one the codes were computed with.
- fp8 (e4m3) is per output channel with float32 scales; on GPUs with fp8 tensor cores (compute capability
  8.9+) the fast path is `torch._scaled_mm` with activations quantized per token on the fly (as vLLM's
  dynamic fp8), elsewhere on CUDA the weight is dequantized per call. It is refused on CPU.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qwenstack import kernels

INT4_KERNEL_GROUPS = (32, 64, 128, 256)
# Up to this many rows int8 goes to qwenstack's native kernel (kernels/linear_cpu.cpp), which beat
# `_weight_int8pack_mm` here at every row count measured (1 to 32: 1.3x at one row, 1.25x at 32).
INT8_NATIVE_MAX_ROWS = 64
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _index(t: torch.Tensor, index: int | None) -> torch.Tensor:
    return t if index is None else t[index]


class QuantizedWeight(nn.Module):
    """A stack of [N, K] matrices in a compressed format."""

    method: ClassVar[str] = ""

    def __init__(self, out_features: int, in_features: int, use_kernel: bool) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.use_kernel = use_kernel

    def matmul(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """x [M, K] -> x @ W[index].T [M, N], in x's dtype."""
        raise NotImplementedError

    def dequantize(self, index: int | None = None) -> torch.Tensor:
        """The matrix W[index] [N, K] these codes stand for (float32)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def tiled_operands(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The codes and scales as the native tile-packed ops take them (decode_layer, experts_swiglu), where
        this weight is tile-packed; None otherwise."""
        return None

    def extra_repr(self) -> str:
        return f"{self.method}, out={self.out_features}, in={self.in_features}, kernel={self.use_kernel}"


class Int8Weight(QuantizedWeight):
    method = "int8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, use_kernel: bool, tiled: bool = False) -> None:
        out_features, in_features = ((qweight.shape[-5] * kernels.TILE_N, qweight.shape[-4] * kernels.INT8_TILE_K)
                                     if tiled else qweight.shape[-2:])
        super().__init__(out_features, in_features, use_kernel)
        self.tiled = tiled
        # int8 [*, N, K], or tiled: uint8 [*, N / 16, K / 64, 16, 16, 4] (kernels.pack_tiles_int8)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)  # [*, N], activation dtype

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype | None = None,
                 use_kernel: bool | None = None) -> "Int8Weight":
        """weight [*, N, K] (any float dtype) -> codes; scales kept in `dtype` (default: weight's)."""
        dtype = dtype or weight.dtype
        qweight = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scales = torch.empty(weight.shape[:-1], dtype=dtype, device=weight.device)
        stack = weight.reshape(-1, *weight.shape[-2:])
        # One matrix at a time: the float32 working copy stays one expert's size.
        for w, q, s in zip(stack, qweight.view(-1, *weight.shape[-2:]), scales.view(-1, weight.shape[-2])):
            w = w.float()
            scale = (w.abs().amax(dim=-1) / 127.0).clamp(min=1e-10).to(dtype)
            s.copy_(scale)
            q.copy_(torch.round(w / scale.float()[:, None]).clamp(-128, 127).to(torch.int8))
        return cls.from_codes(qweight, scales, use_kernel)

    @classmethod
    def from_codes(cls, qweight: torch.Tensor, scales: torch.Tensor, use_kernel: bool | None = None) -> "Int8Weight":
        """Codes int8 [*, N, K] and their scales [*, N], stored in the fastest form for this shape (also how a
        tensor-parallel shard is rebuilt from a slice of the codes: qwenstack.distributed.slicing)."""
        tiled = qweight.device.type == "cpu" and use_kernel is not False and kernels.can_tile_int8(qweight.shape) \
            and kernels.int8_tiles_preferred()
        if tiled:
            return cls(kernels.pack_tiles_int8(qweight.contiguous()), scales.contiguous(), True, tiled=True)
        if use_kernel is None:
            use_kernel = int8_kernel_applies(qweight.shape[-1], scales.dtype, qweight.device)
        return cls(qweight.contiguous(), scales.contiguous(), use_kernel)

    def tiled_operands(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.qweight, self.scales) if self.tiled else None

    def codes(self) -> torch.Tensor:
        """The int8 codes [*, N, K], row-major whatever the stored form."""
        return kernels.unpack_tiles_int8(self.qweight) if self.tiled else self.qweight

    def matmul(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        qweight, scales = _index(self.qweight, index), _index(self.scales, index)
        if self.tiled:
            return kernels.linear_tiled_int8(x, qweight, scales)
        if self.use_kernel and x.shape[0] <= INT8_NATIVE_MAX_ROWS and kernels.linear_rows_available():
            return kernels.linear_rows(x, qweight, scales)
        if self.use_kernel:
            out_dtype = x.dtype
            y = torch._weight_int8pack_mm(x.to(scales.dtype).contiguous(), qweight, scales)
            return y.to(out_dtype)
        # Per-output-channel scales commute with the product: scale the [M, N] result, not the weight.
        return F.linear(x, qweight.to(x.dtype)) * scales.to(x.dtype)

    def dequantize(self, index: int | None = None) -> torch.Tensor:
        qweight = _index(self.qweight, index)
        if self.tiled:
            qweight = kernels.unpack_tiles_int8(qweight)
        return qweight.float() * _index(self.scales, index).float()[..., None]

    def extra_repr(self) -> str:
        return super().extra_repr() + (", tile-packed" if self.tiled else "")


def int8_kernel_applies(in_features: int, dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return dtype != torch.bfloat16 or in_features % 16 == 0


class Int4Weight(QuantizedWeight):
    method = "int4"

    def __init__(self, packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int, in_features: int,
                 use_kernel: bool, tiled: bool = False) -> None:
        super().__init__(packed.shape[-4] * kernels.TILE_N if tiled else packed.shape[-2], in_features, use_kernel)
        self.group_size = group_size
        self.tiled = tiled
        # tiled: int16 [*, N / 16, K / 8, 16, 2] (kernels.pack_tiles_int4); kernel: torch's CPU kernel's packing;
        # reference: uint8 [*, N, K/2], even k in the low nibble.
        self.register_buffer("packed", packed)
        # scale, zero in the activation dtype: [*, K/G, N, 2]; tiled: [*, N / 16, K/G, 16, 2]
        # (kernels.pack_scale_zeros_int4; group_scale_zeros() gives them in [*, K/G, N, 2] whatever the form)
        self.register_buffer("scale_zeros", scale_zeros)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int, dtype: torch.dtype | None = None,
                 use_kernel: bool | None = None) -> "Int4Weight":
        dtype = dtype or weight.dtype
        *stack_shape, n, k = weight.shape
        if k % group_size or k % 2:
            raise ValueError(f"int4 needs in_features ({k}) divisible by the group size ({group_size}) and by 2")
        tiled, use_kernel = _int4_form(weight.shape, group_size, dtype, weight.device, use_kernel)
        packed_list, sz_list = [], []
        for w in weight.reshape(-1, n, k):  # one matrix at a time: the working copies stay one expert's size
            q, sz = _int4_codes(w.float(), group_size, dtype)
            packed_list.append(_pack_int4(q, tiled, use_kernel))
            sz_list.append(kernels.pack_scale_zeros_int4(sz) if tiled else sz)
        packed = torch.stack(packed_list).reshape(*stack_shape, *packed_list[0].shape)
        scale_zeros = torch.stack(sz_list).reshape(*stack_shape, *sz_list[0].shape)
        return cls(packed, scale_zeros, group_size, k, use_kernel, tiled=tiled)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, group_size: int,
                   dtype: torch.dtype, use_kernel: bool | None = None) -> "Int4Weight":
        """Codes already quantized elsewhere (AWQ, GPTQ): w = (q - z) * s per group, q in 0..15.

        codes [*, N, K] (any integer dtype); scales, zero_points [*, N, K / G] (z in code units, possibly
        fractional). Our layout stores w = (q - 8) * s + zero, so zero = (8 - z) * s: the codes are kept
        as they are, and the weights are exact up to the rounding of s and zero to `dtype`."""
        *stack_shape, n, k = codes.shape
        sz_list = []
        for s, z in zip(scales.reshape(-1, n, k // group_size), zero_points.reshape(-1, n, k // group_size)):
            s = s.float()
            zero = (8.0 - z.float()) * s
            sz_list.append(torch.stack([s.to(dtype), zero.to(dtype)], dim=-1).transpose(0, 1).contiguous())
        scale_zeros = torch.stack(sz_list).reshape(*stack_shape, *sz_list[0].shape)
        return cls.from_scale_zeros(codes.to(torch.uint8), scale_zeros, group_size, use_kernel)

    @classmethod
    def from_scale_zeros(cls, codes: torch.Tensor, scale_zeros: torch.Tensor, group_size: int,
                         use_kernel: bool | None = None) -> "Int4Weight":
        """Codes uint8 [*, N, K] in 0..15 with our own scale_zeros [*, K/G, N, 2], stored in the fastest form for
        this shape (also how a tensor-parallel shard is rebuilt from a slice: the scales stay the ones computed
        on the full matrix). Tile-packed (kernels.pack_tiles_int4) where the native kernels are built for it
        (kernels.int4_tiles_preferred) and the scales are bfloat16; torch's int4 kernel's packing where that
        takes the shape; two codes a byte for the reference path elsewhere."""
        *stack_shape, n, k = codes.shape
        tiled, use_kernel = _int4_form(codes.shape, group_size, scale_zeros.dtype, codes.device, use_kernel)
        packed = [_pack_int4(q.contiguous(), tiled, use_kernel) for q in codes.reshape(-1, n, k)]
        packed_stack = torch.stack(packed).reshape(*stack_shape, *packed[0].shape)
        scale_zeros = kernels.pack_scale_zeros_int4(scale_zeros) if tiled else scale_zeros.contiguous()
        return cls(packed_stack, scale_zeros, group_size, k, use_kernel, tiled=tiled)

    def tiled_operands(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.packed, self.scale_zeros) if self.tiled else None

    def group_scale_zeros(self) -> torch.Tensor:
        """The scales and zero points [*, K/G, N, 2], whatever the stored form."""
        return kernels.unpack_scale_zeros_int4(self.scale_zeros) if self.tiled else self.scale_zeros

    def codes(self) -> torch.Tensor:
        """The codes uint8 [*, N, K] in 0..15. From torch's kernel's opaque packing they are read back through
        the dequantized matrix: q = (w - zero) / scale + 8, exact after rounding."""
        if self.tiled:
            return kernels.unpack_tiles_int4(self.packed)
        stack = tuple(self.scale_zeros.shape[:-3])
        n, k, g = self.out_features, self.in_features, self.group_size
        packed_all = self.packed.reshape(-1, *self.packed.shape[len(stack):])
        sz_all = self.scale_zeros.reshape(-1, *self.scale_zeros.shape[len(stack):])
        out = []
        for packed, sz in zip(packed_all, sz_all):
            if not self.use_kernel:
                q = _unpack_int4(packed)
            else:
                eye = torch.eye(k, dtype=sz.dtype, device=packed.device)
                w = torch._weight_int4pack_mm_for_cpu(eye, packed, g, sz).t().float().reshape(n, k // g, g)
                scale, zero = sz[..., 0].t().float()[..., None], sz[..., 1].t().float()[..., None]
                q = torch.round((w - zero) / scale + 8).clamp(0, 15).reshape(n, k)
            out.append(q.to(torch.uint8))
        return torch.stack(out).reshape(*stack, n, k)

    def matmul(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        packed, sz = _index(self.packed, index), _index(self.scale_zeros, index)
        if self.tiled:
            return kernels.linear_tiled_int4(x, packed, sz)
        if self.use_kernel:
            out_dtype = x.dtype
            y = torch._weight_int4pack_mm_for_cpu(x.to(sz.dtype).contiguous(), packed, self.group_size, sz)
            return y.to(out_dtype)
        return F.linear(x, self._dequantized(_unpack_int4(packed), sz).to(x.dtype))

    def _dequantized(self, codes: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        """codes [N, K] and their scale_zeros [K/G, N, 2] -> (q - 8) * scale + zero [N, K] in sz's dtype."""
        n, k, g = self.out_features, self.in_features, self.group_size
        q = codes.reshape(n, k // g, g).to(sz.dtype)
        scale, zero = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]  # [N, K/G, 1]
        return ((q - 8) * scale + zero).reshape(n, k)

    def dequantize(self, index: int | None = None) -> torch.Tensor:
        packed, sz = _index(self.packed, index), _index(self.scale_zeros, index)
        if self.tiled:
            return self._dequantized(kernels.unpack_tiles_int4(packed), kernels.unpack_scale_zeros_int4(sz)).float()
        if not self.use_kernel:
            return self._dequantized(_unpack_int4(packed), sz).float()
        # The kernel's packing is opaque; multiplying the identity reads every column back out.
        eye = torch.eye(self.in_features, dtype=sz.dtype, device=packed.device)
        return torch._weight_int4pack_mm_for_cpu(eye, packed, self.group_size, sz).t().float()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group={self.group_size}" + (", tile-packed" if self.tiled else "")


def int4_kernel_applies(out_features: int, in_features: int, group_size: int, dtype: torch.dtype,
                        device: torch.device) -> bool:
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16)
            and out_features % 16 == 0 and group_size in INT4_KERNEL_GROUPS and in_features % group_size == 0)


def _int4_form(shape: torch.Size, group_size: int, dtype: torch.dtype, device: torch.device,
               use_kernel: bool | None) -> tuple[bool, bool]:
    """(tiled, use_kernel) for int4 matrices [*, N, K] with scales in `dtype`: tile-packed where the native
    kernels are built for it (kernels.int4_tiles_preferred) and the scales are bfloat16, else torch's int4
    kernel where it takes the shape (unless use_kernel is False), else the reference path."""
    if (device.type == "cpu" and use_kernel is not False and dtype == torch.bfloat16
            and kernels.can_tile_int4(shape, group_size) and kernels.int4_tiles_preferred()):
        return True, True
    if use_kernel is None:
        use_kernel = int4_kernel_applies(shape[-2], shape[-1], group_size, dtype, device)
    return False, use_kernel


def _pack_int4(q: torch.Tensor, tiled: bool, use_kernel: bool) -> torch.Tensor:
    """codes [N, K] uint8 in 0..15 -> tile-packed (kernels.pack_tiles_int4), torch's kernel's packing, or two
    nibbles per byte (even k low) for the reference path."""
    if tiled:
        return kernels.pack_tiles_int4(q)
    if use_kernel:
        return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of _pack_int4's reference packing: uint8 [N, K/2] -> codes [N, K]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


class PermutedInput(QuantizedWeight):
    """A quantized stack whose input channels are stored in another order: W[:, k] = inner[:, rank[k]].

    GPTQ's act-order (desc_act) quantizes the input channels in a chosen order, so a group's channels are
    scattered; stored in that order the groups are contiguous again, and each product gathers x's columns
    in the same order first (x[:, order], one index_select of the activations per call)."""

    def __init__(self, inner: QuantizedWeight, order: torch.Tensor) -> None:
        super().__init__(inner.out_features, inner.in_features, inner.use_kernel)
        self.method = inner.method
        self.inner = inner
        self.register_buffer("order", order)  # int64 [*, K]: column j of inner is column order[j] of W

    def matmul(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        return self.inner.matmul(x.index_select(-1, _index(self.order, index)), index)

    def dequantize(self, index: int | None = None) -> torch.Tensor:
        inner = self.inner.dequantize(index)
        order = _index(self.order, index).unsqueeze(-2).expand_as(inner)
        return torch.empty_like(inner).scatter_(-1, order, inner)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", input channels reordered"


def _int4_codes(w: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float32 -> codes [N, K] uint8 in 0..15 and scale_zeros [K/G, N, 2] in `dtype`."""
    n, k = w.shape
    groups = w.view(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-10).to(dtype)
    zero = (lo + 8.0 * scale.float()).to(dtype)
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8.0).clamp(0, 15)
    scale_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/G, N, 2]
    return q.to(torch.uint8).view(n, k), scale_zeros


class Fp8Weight(QuantizedWeight):
    method = "fp8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, use_kernel: bool) -> None:
        super().__init__(qweight.shape[-2], qweight.shape[-1], use_kernel)
        self.register_buffer("qweight", qweight)  # float8_e4m3fn [*, N, K]
        self.register_buffer("scales", scales)  # float32 [*, N]

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype | None = None,
                 use_kernel: bool | None = None) -> "Fp8Weight":
        qweight = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
        scales = torch.empty(weight.shape[:-1], dtype=torch.float32, device=weight.device)
        stack = weight.reshape(-1, *weight.shape[-2:])
        for w, q, s in zip(stack, qweight.view(-1, *weight.shape[-2:]), scales.view(-1, weight.shape[-2])):
            w = w.float()
            scale = (w.abs().amax(dim=-1) / FP8_MAX).clamp(min=1e-12)
            s.copy_(scale)
            q.copy_((w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))
        if use_kernel is None:
            use_kernel = fp8_kernel_applies(weight.shape[-2], weight.shape[-1], weight.device)
        return cls(qweight, scales, use_kernel)

    def matmul(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        qweight, scales = _index(self.qweight, index), _index(self.scales, index)
        if self.use_kernel and x.dtype == torch.bfloat16:
            # Dynamic per-token activation scales; rowwise-scaled fp8 GEMM with a bf16 result.
            x_scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)  # [M, 1]
            x_q = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            return torch._scaled_mm(x_q, qweight.t(), scale_a=x_scale, scale_b=scales[None, :],
                                    out_dtype=torch.bfloat16)
        return F.linear(x, qweight.to(x.dtype)) * scales.to(x.dtype)

    def dequantize(self, index: int | None = None) -> torch.Tensor:
        return _index(self.qweight, index).float() * _index(self.scales, index)[..., None]


def fp8_kernel_applies(out_features: int, in_features: int, device: torch.device) -> bool:
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9) and out_features % 16 == 0 and in_features % 16 == 0
