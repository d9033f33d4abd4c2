"""Native CPU kernels, compiled from the C++ next to this file the first time they are needed: paged decode
attention (paged_attention_cpu.cpp), linear layers for a few activation rows (linear_cpu.cpp) and RMSNorm
(rms_norm_cpu.cpp).

Decisions:
- Built with torch.utils.cpp_extension.load (needs a C++ compiler and ninja) into torch's extension cache
  (~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR): about 6 s of CPU once per machine and torch
  version, then a 0.3 s load per process. The C++ uses torch's stable API (torch >= 2.10) and registers
  torch.ops.qwenstack.paged_decode_attention without pybind11; its headers compile in a third of the time
  of ATen's.
- SIMD is written with GCC/Clang generic vectors, so the flags pick the instructions. They follow torch's
  own dispatch level (torch.backends.cpu.get_cpu_capability()): AVX512 builds with the AVX-512 F/BW/VL/DQ
  set torch's AVX512 kernels use, AVX2 with AVX2/FMA/F16C, anything else (other x86, ARM) with plain -O3.
  An AVX512 CPU that also has AVX512-BF16 and AVX512-VNNI (Cooper Lake, Sapphire Rapids and later, Zen 4)
  builds at its own level, which adds the bfloat16 and int8 dot-product loops of the linear kernel.
  Not -march=native: the level is part of the library name, so a cache shared between machines (NFS home,
  a copied image) never hands one CPU a binary built for another.
- Availability is decided once per process. A failed build (no compiler, no ninja, no source file) logs
  one line and the callers keep using the pure-torch reference path. QWENSTACK_DISABLE_KERNELS=1 forces
  that path; it is read once per process (a decode step asks hundreds of times), and tests that flip it
  patch `kernels_disabled` itself.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(name) for name in ("paged_attention_cpu.cpp", "linear_cpu.cpp",
                                                         "linear_tiled_cpu.cpp", "rms_norm_cpu.cpp")]
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "avx512_bf16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                    "-mavx512bf16", "-mavx512vnni"],
    "avx512_amx": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                   "-mavx512bf16", "-mavx512vnni", "-mamx-tile", "-mamx-bf16", "-mamx-int8"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}


@functools.cache
def kernels_disabled() -> bool:
    return os.environ.get("QWENSTACK_DISABLE_KERNELS", "").strip() not in ("", "0")


ISA_LEVELS = ("generic", "avx2", "avx512", "avx512_bf16", "avx512_amx")


@functools.cache
def _isa() -> str:
    """The build level for this CPU; QWENSTACK_KERNEL_ISA picks a lower one (tests build every level the
    machine can run, so the loops of each are exercised). Fixed for the process, and cached: layers ask per
    call (kernels.has_amx), and reading the CPU's capabilities took microseconds each time."""
    forced = os.environ.get("QWENSTACK_KERNEL_ISA", "").strip()
    if forced:
        if forced not in ISA_LEVELS:
            raise ValueError(f"QWENSTACK_KERNEL_ISA={forced!r}: expected one of {', '.join(ISA_LEVELS)}")
        if forced == "avx512_amx" and not _amx_permitted():
            raise ValueError("QWENSTACK_KERNEL_ISA=avx512_amx: the kernel refused this process the AMX tile registers")
        return forced
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic"
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    if capability == "AVX512" and _has_cpu_features("avx512_bf16", "avx512_vnni"):
        # AMX also needs the kernel's permission to use the tile registers (asked once per process).
        if _has_cpu_features("amx_tile", "amx_bf16", "amx_int8") and _amx_permitted():
            return "avx512_amx"
        return "avx512_bf16"
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "generic")


@functools.cache
def _amx_permitted() -> bool:
    init_amx = getattr(torch._C._cpu, "_init_amx", None)
    return bool(init_amx and init_amx())


def _has_cpu_features(*names: str) -> bool:
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.8
    if get_capabilities is None:
        return False
    capabilities = get_capabilities()
    return all(bool(capabilities.get(name)) for name in names)


def _build() -> None:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        # pip's ninja sits next to the interpreter; a venv used without activation is not on PATH.
        bin_dir = Path(sys.executable).parent
        if (bin_dir / "ninja").exists():
            os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    if tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2]) < (2, 10):
        raise RuntimeError(f"needs torch >= 2.10 (stable C++ API), this is {torch.__version__}")
    isa = _isa()
    name = re.sub(r"\W", "_", f"qwenstack_cpu_kernels_{isa}_torch{torch.__version__}")
    cpp_extension.load(
        name=name,
        sources=[str(source) for source in _SOURCES],
        extra_cflags=["-O3", *_ISA_FLAGS.get(isa, [])],
        is_python_module=False,
        verbose=False,
    )


@functools.cache
def _library_loaded() -> bool:
    start = time.perf_counter()
    try:
        _build()
    except Exception as exc:  # any build or load failure means: use the reference path
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("native CPU kernels unavailable, using the torch path: %s", first_line[:300])
        return False
    log.info("native CPU kernels ready (%s, %.1f s)", _isa(), time.perf_counter() - start)
    return True


def _op(name: str) -> Callable[..., torch.Tensor] | None:
    if kernels_disabled() or not _library_loaded():
        return None
    return _resolved(name)


@functools.cache
def _resolved(name: str) -> Callable[..., torch.Tensor]:
    return getattr(torch.ops.qwenstack, name).default  # the overload itself: skips a dispatch on each call


def _paged_decode_op() -> Callable[..., torch.Tensor] | None:
    return _op("paged_decode_attention")


def paged_decode_available() -> bool:
    """Whether the native decode kernel can be used (builds it on first call unless disabled)."""
    return _paged_decode_op() is not None


def use_paged_decode(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether this decode step can go to the native kernel: CPU tensors of a supported dtype, head_dim a
    multiple of 16, no autograd (the op has no backward)."""
    return (
        q.device.type == "cpu"
        and kv_cache.device.type == "cpu"
        and q.dtype in _DTYPES
        and kv_cache.dtype in _DTYPES
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
    op = _paged_decode_op()
    if op is None:
        raise RuntimeError(
            "the native paged attention kernel is not available (see the log and QWENSTACK_DISABLE_KERNELS)"
        )
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
    op = _paged_prefix_op()
    if op is None:
        raise RuntimeError(
            "the native paged attention kernel is not available (see the log and QWENSTACK_DISABLE_KERNELS)"
        )
    return op(q, kv_cache, block_tables, torch.tensor(context_lens, dtype=torch.long),
              torch.tensor(query_lens, dtype=torch.long), float(scale))


def _paged_prefix_op() -> Callable[..., torch.Tensor] | None:
    return _op("paged_prefix_attention")


LINEAR_WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.int8)


def linear_rows_available() -> bool:
    """Whether the native linear kernel can be used (builds it on first call unless disabled)."""
    return _op("linear_rows") is not None


def linear_rows(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T, times scales [N] per output column when given (int8 weights), in x's dtype;
    sums in float32. Reads the weights once whatever M: for a few rows (decoding), not for prefill."""
    op = _op("linear_rows")
    if op is None:
        raise RuntimeError("the native linear kernel is not available (see the log and QWENSTACK_DISABLE_KERNELS)")
    return op(x, weight, _NO_SCALES if scales is None else scales)


_NO_SCALES = torch.empty(0)
TILE_N, TILE_K = 16, 32  # the tile-packed layout's block: 16 output rows x 32 columns (linear_tiled_cpu.cpp)


def can_tile(weight: torch.Tensor) -> bool:
    """Whether a weight [N, K] has a tile-packed form: bfloat16, N a multiple of 16 and K of 32."""
    return weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.shape[0] % TILE_N == 0 \
        and weight.shape[1] % TILE_K == 0


def pack_tiles(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> [N / 16, K / 32, 16, 16, 2]: packed[n / 16][k / 32][(k % 32) / 2][n % 16][k % 2], the
    same elements in the order linear_tiled reads them (one contiguous 1 KiB block per 16 rows x 32 columns)."""
    n, k = weight.shape
    pairs = weight.detach().contiguous().view(torch.int32).view(n // TILE_N, TILE_N, k // TILE_K, TILE_K // 2)
    return pairs.permute(0, 2, 3, 1).contiguous().view(weight.dtype).view(n // TILE_N, k // TILE_K, TILE_K // 2, TILE_N, 2)


def unpack_tiles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_tiles: a new [N, K] matrix. (Pairs of columns move as one int32: eight times
    faster than moving single bfloat16 elements.)"""
    nb, kb = packed.shape[:2]
    pairs = packed.view(torch.int32).view(nb, kb, TILE_K // 2, TILE_N)
    return pairs.permute(0, 3, 1, 2).reshape(nb * TILE_N, kb * TILE_K // 2).contiguous().view(packed.dtype)


def tiled_rows(packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the matrix in pack_tiles' layout, [*ids.shape, K]: an embedding lookup on a tile-packed
    table (each row's column pairs are one int32 every 16 int32 of its blocks, gathered in one indexing)."""
    nb, kb = packed.shape[:2]
    pairs = packed.view(torch.int32).view(nb, kb, TILE_K // 2, TILE_N)
    flat = ids.reshape(-1)
    rows = pairs[flat // TILE_N, :, :, flat % TILE_N]  # [T, K / 32, 16]
    return rows.reshape(flat.numel(), kb * TILE_K // 2).view(packed.dtype).view(*ids.shape, kb * TILE_K)


def linear_tiled(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T for W in pack_tiles' layout, in x's dtype; sums in float32. Reads the weights once per
    32 rows of x: for decode batches, not for prefill."""
    op = _op("linear_tiled")
    if op is None:
        raise RuntimeError("the native linear kernel is not available (see the log and QWENSTACK_DISABLE_KERNELS)")
    return op(x, packed)


INT8_TILE_MAX_K = 65536
INT8_TILE_K = 64  # the int8 layout's block: 16 output rows x 64 columns (linear_tiled_cpu.cpp)


def can_tile_int8(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether int8 matrices of shape [*, N, K] have a tile-packed form: N a multiple of 16, K of 64 and at
    most INT8_TILE_MAX_K (the kernel's int32 sums)."""
    return len(shape) >= 2 and shape[-2] % TILE_N == 0 and shape[-1] % INT8_TILE_K == 0 \
        and shape[-1] <= INT8_TILE_MAX_K


def has_amx() -> bool:
    """Whether the kernels are built with AMX tiles (the linear kernels' batched loops use them)."""
    return linear_rows_available() and _isa() == "avx512_amx"


def int8_tiles_preferred() -> bool:
    """Whether int8 weights are best tile-packed on this machine: the kernels are built with AVX512-VNNI, whose
    byte dot products the tiled int8 loop is written for. Lower levels run that layout in scalar loops, 2.5 to
    4.5 times slower at one row than the row-major kernel's vectors (AVX2 and plain AVX-512, 3072 x 1024)."""
    return linear_rows_available() and _isa() in ("avx512_bf16", "avx512_amx")


def pack_tiles_int8(qweight: torch.Tensor) -> torch.Tensor:
    """int8 [*, N, K] -> uint8 [*, N / 16, K / 64, 16, 16, 4]: packed[n / 16][k / 64][(k % 64) / 4][n % 16][k % 4]
    = w[n][k] + 128, the order and offset linear_tiled_int8 reads (one 1 KiB block per 16 rows x 64 columns,
    a B operand of AMX-INT8; the offset makes the weights the unsigned operand of the byte products)."""
    *stack, n, k = qweight.shape
    offset = qweight.detach().contiguous().view(torch.uint8) ^ 0x80  # two's complement w + 128
    quads = offset.view(torch.int32).view(*stack, n // TILE_N, TILE_N, k // INT8_TILE_K, 16)
    dims = len(stack)
    order = (*range(dims), dims, dims + 2, dims + 3, dims + 1)
    return quads.permute(order).contiguous().view(torch.uint8).view(*stack, n // TILE_N, k // INT8_TILE_K, 16, TILE_N, 4)


def unpack_tiles_int8(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_tiles_int8: a new [*, N, K] matrix (groups of 4 columns move as one int32)."""
    *stack, nb, kb = packed.shape[:-3]
    dims = len(stack)
    quads = packed.contiguous().view(torch.int32).view(*stack, nb, kb, 16, TILE_N)
    order = (*range(dims), dims, dims + 3, dims + 1, dims + 2)
    rows = quads.permute(order).reshape(*stack, nb * TILE_N, kb * INT8_TILE_K // 4).contiguous().view(torch.uint8)
    return (rows ^ 0x80).view(torch.int8)


def linear_tiled_int8(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (W * scales[:, None]).T for int8 W in pack_tiles_int8's layout, in x's dtype (activations as
    int16 per row, exact int32 sums). Any number of rows: AMX-INT8 tiles from 3 rows where the CPU has them."""
    op = _op("linear_tiled_int8")
    if op is None:
        raise RuntimeError("the native linear kernel is not available (see the log and QWENSTACK_DISABLE_KERNELS)")
    return op(x, packed, scales)


_NORM_DTYPES = (torch.bfloat16, torch.float16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool) -> torch.Tensor | None:
    """RMSNorm over the last dimension as models/layers.RMSNorm computes it, in one native call; None where
    the kernel does not apply (not CPU, autograd, mixed dtypes, float32, kernels unavailable): use the torch
    path. float32 stays on torch: its sum of squares in another order moves float32 logits by ~1e-7 per
    layer, which the parity tests against transformers would see; in 16-bit dtypes the rounding hides it."""
    if x.device.type != "cpu" or x.dtype != weight.dtype or x.dtype not in _NORM_DTYPES or x.dim() < 1:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None
    op = _op("rms_norm")
    if op is None:
        return None
    shape = x.shape
    if x.dim() == 3:
        return op(x, weight, float(eps), zero_centered)
    rows = x.reshape(1, -1, shape[-1])
    return op(rows, weight, float(eps), zero_centered).view(shape)


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
    tensors = (q, k, q_weight, k_weight, cos, sin)
    if q.device.type != "cpu" or q.dtype not in _NORM_DTYPES or any(t.dtype != q.dtype for t in tensors):
        return None
    if q.dim() != 3 or k.dim() != 3 or q.stride(-1) != 1 or k.stride(-1) != 1:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    op = _op("qk_norm_rope")
    if op is None:
        return None
    out = op(q, k, q_weight, k_weight, cos, sin, float(eps), zero_centered)
    return out[:, :q.shape[1]], out[:, q.shape[1]:]
