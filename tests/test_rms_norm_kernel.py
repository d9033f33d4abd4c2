"""The native RMSNorm (qwenstack/kernels/rms_norm_cpu.cpp) against the torch reference of
models/layers.RMSNorm: bit-identical in bfloat16 and float16 (both round the same float32 values; float32
stays on the torch path); plain and zero-centered weights, 2-D to 4-D inputs, strided q/k head views,
and the cases that must stay on the torch path (autograd, mixed dtypes)."""
from __future__ import annotations

import pytest
import torch

from kernel_utils import require_native_kernels
from qwenstack import kernels
from qwenstack.models.layers import RMSNorm


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    require_native_kernels()


def reference(norm: RMSNorm, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(kernels, "kernels_disabled", lambda: True)
        return norm(x)


def make_norm(dim: int, dtype: torch.dtype, zero_centered: bool) -> RMSNorm:
    norm = RMSNorm(dim, 1e-6, zero_centered=zero_centered).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim) * 0.1 + (0.0 if zero_centered else 1.0))
    return norm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("shape", [(1, 128), (7, 128), (3, 4, 128), (2, 3, 5, 128), (5, 36)])
def test_matches_reference(dtype: torch.dtype, zero_centered: bool, shape: tuple[int, ...],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(len(shape) * 100 + shape[-1])
    norm = make_norm(shape[-1], dtype, zero_centered)
    x = (torch.randn(shape) * 3).to(dtype)
    with torch.inference_mode():
        got = kernels.rms_norm(x, norm.weight, norm.eps, zero_centered)
        want = reference(norm, x, monkeypatch)
    assert got is not None and got.shape == x.shape and got.dtype == dtype
    # The float32 sums differ only in order; after rounding to 8 or 11 bits that almost never shows.
    assert (got != want).float().mean().item() <= 0.01
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_strided_head_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """q_norm/k_norm see [T, heads, head_dim] views into the fused qkv output."""
    qkv = torch.randn(5, 3 * 2 * 64).to(torch.bfloat16)
    q = qkv[:, 128:256].view(5, 2, 64)
    assert not q.is_contiguous()
    norm = make_norm(64, torch.bfloat16, False)
    with torch.inference_mode():
        got = norm(q)
        want = reference(norm, q, monkeypatch)
    assert torch.equal(got, want)


def test_torch_path_where_the_kernel_does_not_apply() -> None:
    norm = make_norm(32, torch.float32, False)
    x = torch.randn(3, 32, requires_grad=True)
    assert kernels.rms_norm(x, norm.weight, 1e-6, False) is None  # autograd needs the torch ops
    norm(x).sum().backward()
    assert x.grad is not None
    with torch.inference_mode():
        assert kernels.rms_norm(torch.randn(3, 32).to(torch.bfloat16), norm.weight, 1e-6, False) is None
        assert kernels.rms_norm(torch.randn(3, 32), norm.weight, 1e-6, False) is None  # float32: torch's sums
