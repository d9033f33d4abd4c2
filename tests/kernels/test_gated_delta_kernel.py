"""The native Gated DeltaNet decode step (qwenstack/kernels/gated_delta_cpu.cpp) against its torch references,
models/linear_attention's conv_decode_in_place and recurrent_decode_in_place: the same outputs and the same
states (float32 sums in another order, so within rounding), only the named slots written, a fresh sequence's
old state never read (even NaN), grouped value heads, strided views of the projection, sizes that leave a
scalar tail; and the cases that stay on torch."""
from __future__ import annotations

import pytest
import torch

from checkpoints import next_config
from kernel_utils import require_native_kernels
from qwenstack import kernels
from qwenstack.models.fast_paths import native_conv_in_place, native_decode_in_place, prepare_for_cpu
from qwenstack.models.linear_attention import conv_decode_in_place, recurrent_decode_in_place


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    require_native_kernels()


def _inputs(B: int, Hk: int, Hv: int, Dk: int, Dv: int, dtype: torch.dtype, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    # q | k | v side by side in one row per sequence, as the conv output is split: strided views.
    mixed = torch.randn(B, 2 * Hk * Dk + Hv * Dv, generator=gen).to(dtype)
    q, k, v = mixed.split([Hk * Dk, Hk * Dk, Hv * Dv], dim=-1)
    return dict(
        q=q.view(B, Hk, Dk), k=k.view(B, Hk, Dk), v=v.view(B, Hv, Dv),
        g=-torch.rand(B, Hv, generator=gen) * 2,  # log decay, <= 0
        beta=torch.rand(B, Hv, generator=gen).to(dtype),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 2, 4, 32, 48), (2, 1, 1, 24, 20), (5, 4, 4, 16, 16)])
def test_matches_the_reference_and_writes_only_its_slots(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    B, Hk, Hv, Dk, Dv = shape
    inputs = _inputs(B, Hk, Hv, Dk, Dv, dtype, seed=sum(shape))
    pool = torch.randn(B + 3, Hv, Dk, Dv, generator=torch.Generator().manual_seed(1)) * 0.5
    slots = torch.randperm(B + 3, generator=torch.Generator().manual_seed(2))[:B]
    fresh = torch.zeros(B, dtype=torch.bool)
    fresh[-1] = True
    pool[slots[-1]] = float("nan")  # a reused slot: never read for a fresh sequence
    want_pool, got_pool = pool.clone(), pool.clone()
    with torch.inference_mode():
        want = recurrent_decode_in_place(**inputs, state=want_pool, slots=slots, fresh=fresh)
        got = kernels.gated_delta_decode(**inputs, state=got_pool, slots=slots, fresh=fresh)
    assert got is not None and got.shape == (B, Hv, Dv) and got.dtype == dtype
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_pool[slots], want_pool[slots], rtol=1e-5, atol=1e-5)
    others = torch.ones(B + 3, dtype=torch.bool)
    others[slots] = False
    assert torch.equal(got_pool[others], pool[others])
    assert torch.isfinite(got_pool[slots]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kernel_size", [4, 1])
def test_conv_matches_the_reference_and_writes_only_its_slots(dtype: torch.dtype, kernel_size: int) -> None:
    B, C, S = 5, 40, 9
    gen = torch.Generator().manual_seed(kernel_size)
    x = torch.randn(B, 2 * C, generator=gen).to(dtype)[:, :C]  # a strided row, as a view of the projection
    weight = torch.randn(C, 1, kernel_size, generator=gen).to(dtype)
    pool = torch.randn(S, C, kernel_size - 1, generator=gen).to(dtype)
    slots = torch.tensor([7, 0, 3, 8, 5])
    fresh = torch.tensor([False, True, False, False, True])
    pool[0] = float("nan")  # fresh: never read
    want_pool, got_pool = pool.clone(), pool.clone()
    with torch.inference_mode():
        want = conv_decode_in_place(x, weight, want_pool, slots, fresh)
        got = kernels.conv_decode(x, weight, got_pool, slots, fresh)
    assert got is not None and got.shape == (B, C) and got.dtype == dtype
    # conv1d's four products in another order, and another exp: at most a unit of the 16-bit dtype apart
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1 / 64, atol=1e-3)
    torch.testing.assert_close(got, want, **tol)
    assert torch.equal(got_pool, want_pool)  # the raw inputs, moved along: exact, NaN slot overwritten


def test_steps_in_a_row_stay_with_the_reference() -> None:
    """Thirty decode steps from the same state: the rounding of one step does not grow over the next ones."""
    B, Hk, Hv, Dk, Dv = 2, 2, 4, 32, 32
    want_pool = torch.zeros(4, Hv, Dk, Dv)
    got_pool = want_pool.clone()
    slots = torch.tensor([3, 1])
    with torch.inference_mode():
        for step in range(30):
            inputs = _inputs(B, Hk, Hv, Dk, Dv, torch.float32, seed=100 + step)
            want = recurrent_decode_in_place(**inputs, state=want_pool, slots=slots, fresh=None)
            got = native_decode_in_place(**inputs, state=got_pool, slots=slots, fresh=None)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_pool, want_pool, rtol=1e-5, atol=1e-5)


def test_a_slot_outside_the_pool_is_refused_before_any_write() -> None:
    inputs = _inputs(2, 1, 1, 16, 16, torch.float32, seed=0)
    pool = torch.zeros(2, 1, 16, 16)
    with pytest.raises(RuntimeError, match="outside the state's 2 slots"):
        kernels.gated_delta_decode(**inputs, state=pool, slots=torch.tensor([0, 2]), fresh=None)
    assert torch.equal(pool, torch.zeros(2, 1, 16, 16))
    conv_pool = torch.zeros(2, 16, 3)
    with pytest.raises(RuntimeError, match="outside the state's 2 slots"):
        kernels.conv_decode(torch.ones(2, 16), torch.ones(16, 1, 4), conv_pool, torch.tensor([-1, 0]), None)
    assert torch.equal(conv_pool, torch.zeros(2, 16, 3))


def test_cases_that_stay_on_torch() -> None:
    inputs = _inputs(2, 1, 1, 16, 16, torch.float32, seed=0)
    slots = torch.tensor([0, 1])
    assert kernels.gated_delta_decode(**inputs, state=torch.zeros(2, 1, 16, 16, dtype=torch.float64),
                                      slots=slots, fresh=None) is None  # a state that is not float32
    assert kernels.gated_delta_decode(**inputs, state=torch.zeros(2, 1, 16, 32)[..., :16],
                                      slots=slots, fresh=None) is None  # a state that is not contiguous
    leaf = dict(inputs, q=inputs["q"].clone().requires_grad_())
    assert kernels.gated_delta_decode(**leaf, state=torch.zeros(2, 1, 16, 16), slots=slots, fresh=None) is None


def test_the_preparation_swaps_it_into_qwen3_next_layers() -> None:
    from qwenstack.models.qwen3_next import GatedDeltaNet, Qwen3NextArgs

    args = Qwen3NextArgs.from_dict({**next_config(), "model_type": "qwen3_next"})
    layer = GatedDeltaNet(args)
    assert (layer.conv_step, layer.decode_step) == (conv_decode_in_place, recurrent_decode_in_place)
    assert prepare_for_cpu(layer, linears=False).recurrent_layers == 1
    assert (layer.conv_step, layer.decode_step) == (native_conv_in_place, native_decode_in_place)
