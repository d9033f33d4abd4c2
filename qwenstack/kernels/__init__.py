"""Native CPU kernels, compiled from the C++ next to this file the first time they are needed.

Decisions:
- Built with torch.utils.cpp_extension.load (needs a C++ compiler and ninja) into torch's extension cache
  (~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR): about 6 s of CPU once per machine and torch
  version, then a 0.3 s load per process. The C++ uses torch's stable API (torch >= 2.10) and registers
  torch.ops.qwenstack.paged_decode_attention without pybind11; its headers compile in a third of the time
  of ATen's.
- SIMD is written with GCC/Clang generic vectors, so the flags pick the instructions. They follow torch's
  own dispatch level (torch.backends.cpu.get_cpu_capability()): AVX512 builds with the AVX-512 F/BW/VL/DQ
  set torch's AVX512 kernels use, AVX2 with AVX2/FMA/F16C, anything else (other x86, ARM) with plain -O3.
  Not -march=native: the level is part of the library name, so a cache shared between machines (NFS home,
  a copied image) never hands one CPU a binary built for another.
- Availability is decided once per process. A failed build (no compiler, no ninja, no source file) logs
  one line and the callers keep using the pure-torch reference path. QWENSTACK_DISABLE_KERNELS=1 forces
  that path; it is read at each call, so tests can flip it.
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

_SOURCE = Path(__file__).with_name("paged_attention_cpu.cpp")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}


def kernels_disabled() -> bool:
    return os.environ.get("QWENSTACK_DISABLE_KERNELS", "").strip() not in ("", "0")


def _isa() -> str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic"
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "generic")


def _build() -> Callable[..., torch.Tensor]:
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
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", *_ISA_FLAGS.get(isa, [])],
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.qwenstack.paged_decode_attention


@functools.cache
def _paged_decode_op() -> Callable[..., torch.Tensor] | None:
    start = time.perf_counter()
    try:
        op = _build()
    except Exception as exc:  # any build or load failure means: use the reference path
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("native CPU attention kernel unavailable, using the torch path: %s", first_line[:300])
        return None
    log.info("native CPU attention kernel ready (%s, %.1f s)", _isa(), time.perf_counter() - start)
    return op


def paged_decode_available() -> bool:
    """Whether the native decode kernel can be used (builds it on first call unless disabled)."""
    return not kernels_disabled() and _paged_decode_op() is not None


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
    op = None if kernels_disabled() else _paged_decode_op()
    if op is None:
        raise RuntimeError(
            "the native paged attention kernel is not available (see the log and QWENSTACK_DISABLE_KERNELS)"
        )
    if not isinstance(context_lens, torch.Tensor):
        context_lens = torch.tensor(context_lens, dtype=torch.long)
    return op(q, kv_cache, block_tables, context_lens, float(scale))
