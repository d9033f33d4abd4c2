"""What every native-kernel test module checks first: the C++ library built (qwenstack/kernels)."""
from __future__ import annotations

import platform
import sys

import pytest

from qwenstack import kernels


def bf16_kernel_level() -> bool:
    """Whether this CPU's kernel build has the AVX512-BF16 loops (segment_attention answers None elsewhere,
    and the callers keep SDPA: tests of that refusal run everywhere)."""
    return kernels.isa_level() in ("avx512_bf16", "avx512_amx")


# For tests of what the AVX512-BF16 kernels compute: there is nothing to run on a CPU without them.
requires_bf16_kernels = pytest.mark.skipif(not bf16_kernel_level(), reason="the kernel needs AVX512-BF16")


def count_segment_attention(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The q_starts of every call into kernels.segment_attention from now on (the calls still run)."""
    calls: list[list[int]] = []
    real = kernels.segment_attention
    monkeypatch.setattr(kernels, "segment_attention", lambda *args: calls.append(args[3]) or real(*args))
    return calls


def require_native_kernels() -> None:
    """Skips when kernels are switched off or the platform has none; on Linux x86-64, where they must build,
    a failed build fails the tests instead of skipping them, so CI notices."""
    if kernels.kernels_disabled():
        pytest.skip("QWENSTACK_DISABLE_KERNELS is set")
    missing = [name for name in kernels.build.op_sources() if kernels.native_op(name) is None]  # one library per .cpp
    if missing:
        if sys.platform.startswith("linux") and platform.machine() == "x86_64":
            pytest.fail(f"native CPU kernels did not build: {', '.join(missing)} (see the warnings logged above)")
        pytest.skip("the native CPU kernels are not available on this platform")
