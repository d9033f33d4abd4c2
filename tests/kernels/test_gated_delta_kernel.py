"""The native Gated DeltaNet decode step and chunked prefill (qwenstack/kernels/gated_delta_cpu.cpp) against
their torch references, models/linear_attention's conv_decode_in_place, recurrent_decode_in_place and
chunk_gated_delta_rule_varlen: the same outputs and the same states (float32 sums in another order, so within
rounding), only the named slots written, a fresh sequence's old state never read (even NaN), grouped value
heads, strided views of the projection, sizes that leave a scalar tail, sequences of any length packed side
by side; and the cases that stay on torch."""
from __future__ import annotations

import pytest
import torch

from checkpoints import next_config
from kernel_utils import require_native_kernels
from qwenstack import kernels
from qwenstack.models.fast_paths import (
    native_chunked_varlen, native_conv_in_place, native_decode_in_place, prepare_for_cpu,
)
from qwenstack.models.linear_attention import (
    chunk_gated_delta_rule_varlen, conv_decode_in_place, recurrent_decode_in_place,
)


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
    assert (layer.conv_step, layer.decode_step, layer.chunk_step) == (
        conv_decode_in_place, recurrent_decode_in_place, chunk_gated_delta_rule_varlen)
    assert prepare_for_cpu(layer, linears=False).recurrent_layers == 1
    assert (layer.conv_step, layer.decode_step, layer.chunk_step) == (
        native_conv_in_place, native_decode_in_place, native_chunked_varlen)


def _packed(lengths: list[int], Hk: int, Hv: int, Dk: int, Dv: int, dtype: torch.dtype, seed: int) -> dict:
    """Sequences of `lengths` tokens packed token-major, q | k | v as strided views of one projection."""
    T = sum(lengths)
    inputs = _inputs(T, Hk, Hv, Dk, Dv, dtype, seed)
    inputs["g"] = inputs["g"] / 4  # decays over tens of tokens, as a trained model's
    inputs["cu_seqlens"] = torch.tensor([0, *lengths]).cumsum(0).tolist()
    return inputs


# Lengths around the 64-token chunk (1, 63, 64, 65, several chunks), an empty piece between others; grouped
# and ungrouped value heads, head sizes that leave a vector tail (40, 24) and Qwen3-Next's 128.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("lengths", "shape"), [
    ([200], (2, 4, 32, 40)),
    ([1, 63, 0, 64, 65], (1, 2, 24, 16)),
    ([130, 7], (2, 2, 128, 128)),
])
def test_chunked_prefill_matches_the_reference(dtype: torch.dtype, lengths: list[int], shape: tuple[int, ...]) -> None:
    Hk, Hv, Dk, Dv = shape
    inputs = _packed(lengths, Hk, Hv, Dk, Dv, dtype, seed=sum(lengths))
    initial = torch.randn(len(lengths), Hv, Dk, Dv, generator=torch.Generator().manual_seed(5)) * 0.1
    before = initial.clone()
    with torch.inference_mode():
        want, want_state = chunk_gated_delta_rule_varlen(**inputs, initial_state=initial)
        got, got_state = native_chunked_varlen(**inputs, initial_state=initial)
        fresh_want, fresh_state_want = chunk_gated_delta_rule_varlen(**inputs)
        fresh_got, fresh_state_got = native_chunked_varlen(**inputs)
    assert got.shape == want.shape and got.dtype == dtype and got_state.dtype == torch.float32
    assert torch.equal(initial, before)  # the caller's states are not written
    # float32 sums in another order (a substitution for the torch form's inverse): ~1e-6 of the largest value;
    # in bfloat16 the output's own rounding
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    for a, b in ((got, want), (fresh_got, fresh_want)):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(got_state, want_state, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fresh_state_got, fresh_state_want, rtol=1e-4, atol=1e-5)
    empty = lengths.index(0) if 0 in lengths else None
    if empty is not None:  # an empty piece keeps its starting state, bit for bit
        assert torch.equal(got_state[empty], initial[empty])


def test_chunked_prefill_in_pieces_equals_at_once() -> None:
    """A prompt prefilled in two pieces (the engine's chunked prefill), the state carried between, against the
    whole prompt at once: the chunks start at other tokens, and the results still agree within rounding."""
    inputs = _packed([150], 2, 4, 32, 32, torch.float32, seed=9)
    with torch.inference_mode():
        whole, whole_state = native_chunked_varlen(**inputs)
        first = {name: (x[:70] if isinstance(x, torch.Tensor) else [0, 70]) for name, x in inputs.items()}
        second = {name: (x[70:] if isinstance(x, torch.Tensor) else [0, 80]) for name, x in inputs.items()}
        a, state = native_chunked_varlen(**first)
        b, final = native_chunked_varlen(**second, initial_state=state)
    torch.testing.assert_close(torch.cat([a, b]), whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final, whole_state, rtol=1e-4, atol=1e-5)


def test_chunked_prefill_cases_that_stay_on_torch_or_are_refused() -> None:
    inputs = _packed([10], 1, 1, 16, 16, torch.float32, seed=0)
    offsets = inputs.pop("cu_seqlens")
    state = torch.zeros(1, 1, 16, 16)
    assert kernels.gated_delta_chunked(**inputs, starts=offsets, state=state.double(), chunk_size=64) is None
    leaf = dict(inputs, q=inputs["q"].clone().requires_grad_())
    assert kernels.gated_delta_chunked(**leaf, starts=offsets, state=state, chunk_size=64) is None
    with pytest.raises(RuntimeError, match="starts must rise from 0 to T = 10"):
        kernels.gated_delta_chunked(**inputs, starts=[0, 11], state=state, chunk_size=64)
    with pytest.raises(RuntimeError, match=r"state must be contiguous float32 \[B, Hv, Dk, Dv\]"):
        kernels.gated_delta_chunked(**inputs, starts=offsets, state=torch.zeros(2, 1, 16, 16), chunk_size=64)
    with pytest.raises(ValueError, match="cu_seqlens must rise"):  # the wrapper checks as the torch form does
        native_chunked_varlen(**inputs, cu_seqlens=[0, 4])


def test_chunk_lengths_only_regroup_the_sums() -> None:
    """The kernel's chunk length (whole vectors or not, shorter or longer than the sequence) gives the same rule."""
    inputs = _packed([100, 37], 2, 4, 32, 40, torch.float32, seed=4)
    offsets = inputs.pop("cu_seqlens")
    results = []
    for chunk in (1, 24, 32, 64, 200):
        state = torch.zeros(2, 4, 32, 40)
        with torch.inference_mode():
            out = kernels.gated_delta_chunked(**inputs, starts=offsets, state=state, chunk_size=chunk)
        results.append((out, state))
    for out, state in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state, results[0][1], rtol=1e-4, atol=1e-5)
