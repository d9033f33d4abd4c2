"""The native SwiGLU activation (qwenstack/kernels/swiglu_cpu.cpp) against models/layers.silu_and_mul: the
same result in bfloat16 and float16 but for an element now and then one unit off (its exp is a polynomial,
torch's another), over the whole range silu sees, strided rows, shapes that leave a scalar tail, and the
cases that must stay on torch (float32, autograd)."""
from __future__ import annotations

import pytest
import torch

from kernel_utils import require_native_kernels
from qwenstack import kernels
from qwenstack.models.fast_paths import native_silu_and_mul, prepare_for_cpu
from qwenstack.models.layers import SwiGLU, silu_and_mul


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    require_native_kernels()


def units_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable 16-bit values lie between a and b (same dtype, finite)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    # Sign-magnitude to a monotone integer line.
    ia = torch.where(ia < 0, -(ia & 0x7FFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return (ia - ib).abs()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 2 * 3072), (7, 2 * 40), (2, 3, 2 * 19)])
def test_matches_reference_within_one_unit(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    torch.manual_seed(shape[-1])
    gate_up = (torch.randn(shape) * 4).to(dtype)
    gate_up.view(-1)[:64] = torch.linspace(-90, 90, 64).to(dtype)  # far into both tails of silu
    with torch.inference_mode():
        got = kernels.silu_mul(gate_up)
        want = silu_and_mul(gate_up)
    assert got is not None and got.shape == want.shape and got.dtype == dtype
    apart = units_apart(got, want)
    assert apart.max().item() <= 1 and (apart > 0).float().mean().item() <= 0.01


def test_denormal_products_are_kept_as_torch_keeps_them() -> None:
    """silu(gate) * up where up is a bfloat16 denormal: the products are denormals too, which the one-instruction
    rounding would read as zero; they must come out as the reference's."""
    tiny = torch.finfo(torch.float32).tiny
    gate_up = torch.randn(2, 2 * 48).to(torch.bfloat16)
    gate_up[0, :48] = 20.0  # silu(20) rounds to 20 in bfloat16
    gate_up[0, 48:] = torch.tensor([tiny * f / 40 for f in torch.linspace(-1, 1, 48).tolist()]).to(torch.bfloat16)
    with torch.inference_mode():
        got = kernels.silu_mul(gate_up)
        want = silu_and_mul(gate_up)
    assert got is not None and got[0].ne(0).any()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_strided_rows_and_the_prepared_module() -> None:
    mlp = SwiGLU(32, 48).to(torch.bfloat16)
    x = torch.randn(5, 32).to(torch.bfloat16)
    with torch.inference_mode():
        want = mlp(x)
        prepare_for_cpu(mlp, linears=False)
        assert mlp.activation is native_silu_and_mul
        got = mlp(x)
        wide = torch.randn(3, 200).to(torch.bfloat16)
        rows = wide[:, :96]  # [3, 2 * 48] with a row stride of 200
        assert torch.equal(kernels.silu_mul(rows), kernels.silu_mul(rows.contiguous()))
    assert units_apart(got, want).max().item() <= 1


def test_float32_and_autograd_stay_on_torch() -> None:
    assert kernels.silu_mul(torch.randn(2, 8)) is None
    gate_up = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
    assert kernels.silu_mul(gate_up) is None
    assert kernels.silu_mul(torch.randn(2, 7).to(torch.bfloat16)) is None  # no even split
    native_silu_and_mul(gate_up).sum().backward()  # falls back to torch, which has a backward
    assert gate_up.grad is not None
