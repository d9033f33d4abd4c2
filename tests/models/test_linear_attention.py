"""Gated DeltaNet kernels: parity with transformers' torch reference and self-consistency.

The chunked and recurrent forms, a prefix + continuation, and the packed varlen helpers must all
describe the same recurrence; the conv must give the same output however a sequence is split.
"""

import pytest
import torch
import torch.nn.functional as F

from qwenstack.models.linear_attention import (
    causal_conv1d,
    causal_conv1d_varlen,
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_varlen,
    recurrent_gated_delta_rule,
)

ATOL = 1e-5
RTOL = 1e-5


def make_inputs(B: int, T: int, Hk: int, Hv: int, Dk: int, Dv: int, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hk, Dk, generator=gen)
    k = torch.randn(B, T, Hk, Dk, generator=gen)
    v = torch.randn(B, T, Hv, Dv, generator=gen)
    # the model's g = -exp(A_log) * softplus(a + dt_bias): strictly negative, sometimes large
    g = -torch.exp(torch.randn(Hv, generator=gen)) * F.softplus(torch.randn(B, T, Hv, generator=gen))
    beta = torch.sigmoid(torch.randn(B, T, Hv, generator=gen))
    return tuple(x.to(dtype) for x in (q, k, v, g, beta))


def random_state(B: int, Hv: int, Dk: int, Dv: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, Hv, Dk, Dv, generator=torch.Generator().manual_seed(seed)) * 0.5


# --- parity with transformers -------------------------------------------------------------------

import transformers.models.qwen3_next.modeling_qwen3_next as hf  # noqa: E402


@pytest.mark.parametrize("T,Hk,Hv,with_state", [(37, 2, 2, False), (100, 2, 4, True), (64, 4, 4, True)])
def test_chunk_matches_transformers(T, Hk, Hv, with_state):
    q, k, v, g, beta = make_inputs(2, T, Hk, Hv, 16, 8)
    state = random_state(2, Hv, 16, 8) if with_state else None
    ref_out, ref_state = hf.torch_chunk_gated_delta_rule(
        q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    out, final = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(final, ref_state, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("T,Hk,Hv,with_state", [(1, 2, 4, True), (9, 2, 2, False)])
def test_recurrent_matches_transformers(T, Hk, Hv, with_state):
    q, k, v, g, beta = make_inputs(2, T, Hk, Hv, 16, 8, seed=3)
    state = random_state(2, Hv, 16, 8) if with_state else None
    ref_out, ref_state = hf.torch_recurrent_gated_delta_rule(
        q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    out, final = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(final, ref_state, atol=ATOL, rtol=RTOL)


def test_without_l2norm_matches_transformers():
    q, k, v, g, beta = make_inputs(1, 20, 2, 2, 8, 8, seed=4)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # keep the recurrence stable without the kernel norm
    ref_out, _ = hf.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, chunk_size=8, use_qk_l2norm_in_kernel=False)
    out, _ = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=8, use_qk_l2norm=False)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)


def test_bf16_inputs_compute_in_fp32_like_transformers():
    q, k, v, g, beta = make_inputs(1, 70, 2, 2, 16, 16, seed=5, dtype=torch.bfloat16)
    ref_out, ref_state = hf.torch_chunk_gated_delta_rule(
        q, k, v, g=g, beta=beta, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    out, final = chunk_gated_delta_rule(q, k, v, g, beta)
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
    torch.testing.assert_close(out, ref_out)  # bf16 tolerance: only the final rounding may differ
    torch.testing.assert_close(final, ref_state, atol=ATOL, rtol=RTOL)


def test_conv1d_matches_transformers_prefill_and_decode():
    gen = torch.Generator().manual_seed(6)
    C, K, T = 12, 4, 10
    x = torch.randn(2, C, T, generator=gen)
    weight = torch.randn(C, 1, K, generator=gen)
    ref = hf.causal_conv1d_fn(x, weight.squeeze(1), None, activation="silu")
    y, state = causal_conv1d(x, weight)
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=RTOL)

    # transformers' decode state is K wide; its oldest column never reaches the one output
    token = torch.randn(2, C, 1, generator=gen)
    hf_state = torch.cat([torch.zeros(2, C, 1), state], dim=-1)
    ref_step = hf.causal_conv1d_update(token, hf_state, weight.squeeze(1), None, "silu")
    y_step, new_state = causal_conv1d(token, weight, state)
    torch.testing.assert_close(y_step, ref_step, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(new_state, hf_state[..., 1:])  # transformers updated its copy in place


# --- self-consistency ---------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 5, 63, 64, 65, 130])
def test_chunk_equals_recurrent(T):
    q, k, v, g, beta = make_inputs(2, T, 2, 4, 16, 8, seed=T)
    state = random_state(2, 4, 16, 8)
    out_c, final_c = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    out_r, final_r = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    torch.testing.assert_close(out_c, out_r, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(final_c, final_r, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("split", [1, 40, 64, 99])
def test_chunk_with_initial_state_continues_a_sequence(split):
    q, k, v, g, beta = make_inputs(2, 100, 2, 2, 16, 16, seed=7)
    full_out, full_state = chunk_gated_delta_rule(q, k, v, g, beta)
    head = [x[:, :split] for x in (q, k, v, g, beta)]
    tail = [x[:, split:] for x in (q, k, v, g, beta)]
    out1, state1 = chunk_gated_delta_rule(*head)
    out2, state2 = chunk_gated_delta_rule(*tail, initial_state=state1)
    torch.testing.assert_close(torch.cat([out1, out2], dim=1), full_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state2, full_state, atol=ATOL, rtol=RTOL)


def test_prefill_then_decode_equals_one_pass():
    q, k, v, g, beta = make_inputs(1, 12, 2, 2, 8, 8, seed=8)
    full_out, full_state = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=4)
    outs, state = [], None
    out, state = chunk_gated_delta_rule(*(x[:, :7] for x in (q, k, v, g, beta)), chunk_size=4)
    outs.append(out)
    for t in range(7, 12):
        out, state = recurrent_gated_delta_rule(*(x[:, t : t + 1] for x in (q, k, v, g, beta)), initial_state=state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), full_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state, full_state, atol=ATOL, rtol=RTOL)


def test_large_decay_stays_finite():
    # exp of a positive pairwise log-decay would overflow; the causal mask must come first
    q, k, v, g, beta = make_inputs(1, 64, 2, 2, 8, 8, seed=9)
    g = g * 100.0
    out, final = chunk_gated_delta_rule(q, k, v, g, beta)
    out_r, final_r = recurrent_gated_delta_rule(q, k, v, g, beta)
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    torch.testing.assert_close(out, out_r, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("K", [4, 1])
def test_conv1d_in_pieces_equals_at_once(K):
    gen = torch.Generator().manual_seed(10)
    C, T = 6, 11
    x = torch.randn(2, C, T, generator=gen)
    weight = torch.randn(C, 1, K, generator=gen)
    y_full, state_full = causal_conv1d(x, weight)
    assert state_full.shape == (2, C, K - 1)

    # prefill in chunks of 4, then the rest token by token. Same windows, but CPU conv1d/SiLU
    # round the last bit differently depending on tensor length, hence 1e-7 rather than 0.
    ys, state = [], None
    for start, end in [(0, 4), (4, 8)] + [(t, t + 1) for t in range(8, T)]:
        y, state = causal_conv1d(x[..., start:end], weight, state)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, dim=-1), y_full, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(state, state_full, atol=0, rtol=0)  # raw inputs: copied, never computed

    # a sequence shorter than the kernel, and the unbatched form
    y_short, state_short = causal_conv1d(x[0, :, :2], weight)
    torch.testing.assert_close(y_short, y_full[0, :, :2], atol=1e-7, rtol=1e-6)
    y_rest, _ = causal_conv1d(x[0, :, 2:], weight, state_short)
    torch.testing.assert_close(y_rest, y_full[0, :, 2:], atol=1e-7, rtol=1e-6)


def test_varlen_delta_rule_equals_per_sequence():
    lengths = [5, 0, 70, 1]
    Hk, Hv, Dk, Dv = 2, 4, 8, 8
    cu = torch.tensor([0] + lengths).cumsum(0)
    q, k, v, g, beta = (x[0] for x in make_inputs(1, sum(lengths), Hk, Hv, Dk, Dv, seed=11))
    states = random_state(len(lengths), Hv, Dk, Dv)
    out, final = chunk_gated_delta_rule_varlen(q, k, v, g, beta, cu, initial_state=states, chunk_size=16)
    assert out.shape == v.shape and final.shape == states.shape
    for i, (s, e) in enumerate(zip(cu.tolist(), cu[1:].tolist())):
        part = (x[s:e].unsqueeze(0) for x in (q, k, v, g, beta))
        ref_out, ref_state = chunk_gated_delta_rule(*part, initial_state=states[i : i + 1], chunk_size=16)
        torch.testing.assert_close(out[s:e], ref_out[0], atol=0, rtol=0)
        torch.testing.assert_close(final[i], ref_state[0], atol=0, rtol=0)
    torch.testing.assert_close(final[1], states[1])  # the empty sequence keeps its state


def test_varlen_conv1d_equals_per_sequence():
    gen = torch.Generator().manual_seed(12)
    lengths, C, K = [3, 1, 9], 5, 4
    cu = [0, 3, 4, 13]
    x = torch.randn(sum(lengths), C, generator=gen)
    weight = torch.randn(C, 1, K, generator=gen)
    states = torch.randn(len(lengths), C, K - 1, generator=gen)
    y, new_states = causal_conv1d_varlen(x, weight, cu, states)
    for i, (s, e) in enumerate(zip(cu, cu[1:])):
        ref_y, ref_state = causal_conv1d(x[s:e].T.unsqueeze(0), weight, states[i : i + 1])
        torch.testing.assert_close(y[s:e], ref_y[0].T, atol=0, rtol=0)
        torch.testing.assert_close(new_states[i], ref_state[0], atol=0, rtol=0)


def test_bad_offsets_are_rejected():
    q, k, v, g, beta = (x[0] for x in make_inputs(1, 6, 2, 2, 8, 8))
    with pytest.raises(ValueError):
        chunk_gated_delta_rule_varlen(q, k, v, g, beta, [0, 4, 5])
