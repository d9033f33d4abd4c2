"""Attention within segments of tokens on bfloat16 dot products (qwenstack/kernels/dense_attention_cpu.cpp)
against SDPA: within each segment, bidirectional or causal, grouped-query heads, q/k/v as strided views of
one projection, segments shorter than a key block, across key chunks and many segments; every output as close
to the float32 result as SDPA's own bfloat16 result is. Then the inputs it refuses, and the model-level swap:
window_attention's reference and the prepared vision tower and audio encoder taking the kernel."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_utils import (bf16_kernel_level, count_segment_attention, require_native_kernels,
                          requires_bf16_kernels)
from qwenstack import kernels
from qwenstack.models import fast_paths
from qwenstack.models.attention import causal_sdpa, window_attention, window_starts


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    require_native_kernels()


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_starts: list[int], kv_starts: list[int],
          causal: bool) -> torch.Tensor:
    """SDPA per segment in q's dtype (float32 math for float32 inputs), [Nq, heads, head_dim]; causal as the
    engine's reference (attention.causal_sdpa): query i of q_len sees keys up to kv_len - q_len + i."""
    out = []
    for s in range(len(q_starts) - 1):
        qs = q[q_starts[s]:q_starts[s + 1]]
        ks, vs = (t[kv_starts[s]:kv_starts[s + 1]] for t in (k, v))
        if causal:
            out.append(causal_sdpa(qs, ks, vs, qs.shape[-1] ** -0.5, gqa=True))
        else:
            qb, kb, vb = (t.transpose(0, 1)[None] for t in (qs, ks, vs))
            out.append(F.scaled_dot_product_attention(qb, kb, vb, enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(out)


CASES = [  # (starts, q_heads, kv_heads, head_dim, causal)
    ([0, 100], 4, 4, 64, False),
    ([0, 300], 4, 2, 128, True),  # two key chunks, grouped-query heads
    ([0, 1, 17, 33, 70], 2, 1, 80, True),  # a one-token segment, block-sized ones
    ([0, 513], 3, 3, 16, False),
    ([0, 40, 80, 120, 160, 161], 2, 2, 256, False),
    ([0, 7, 600], 6, 3, 32, True),
]


@requires_bf16_kernels
@pytest.mark.parametrize("starts,q_heads,kv_heads,head_dim,causal", CASES)
def test_matches_sdpa_within_bfloat16_rounding(starts: list[int], q_heads: int, kv_heads: int, head_dim: int,
                                               causal: bool) -> None:
    g = torch.Generator().manual_seed(len(starts) + head_dim)
    n = starts[-1]
    # One projection's output, as a layer produces it: q, k and v are strided views.
    qkv = (torch.randn(n, q_heads + 2 * kv_heads, head_dim, generator=g) * 2).to(torch.bfloat16)
    q, k, v = qkv[:, :q_heads], qkv[:, q_heads:q_heads + kv_heads], qkv[:, q_heads + kv_heads:]
    got = kernels.segment_attention(q, k, v, starts, None, causal, head_dim ** -0.5)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == q.shape and got.is_contiguous()
    exact = _sdpa(q.float(), k.float(), v.float(), starts, starts, causal)
    sdpa_error = (_sdpa(q, k, v, starts, starts, causal).float() - exact).abs().max().item()
    error = (got.float() - exact).abs().max().item()
    assert error <= 1.5 * sdpa_error + 1e-3, (error, sdpa_error)


@requires_bf16_kernels
@pytest.mark.parametrize("causal", [True, False])
def test_queries_over_longer_keys(causal: bool) -> None:
    """New tokens after a cached context: each segment's queries are its last positions (causal), or see all
    its keys; segments of 1 to 300 queries over 1 to 600 keys."""
    g = torch.Generator().manual_seed(7)
    q_starts, kv_starts = [0, 1, 40, 340, 345], [0, 9, 48, 648, 653]
    q = (torch.randn(q_starts[-1], 4, 128, generator=g) * 2).to(torch.bfloat16)
    k, v = ((torch.randn(kv_starts[-1], 2, 128, generator=g) * 2).to(torch.bfloat16) for _ in range(2))
    got = kernels.segment_attention(q, k, v, q_starts, kv_starts, causal, 128 ** -0.5)
    exact = _sdpa(q.float(), k.float(), v.float(), q_starts, kv_starts, causal)
    sdpa_error = (_sdpa(q, k, v, q_starts, kv_starts, causal).float() - exact).abs().max().item()
    assert (got.float() - exact).abs().max().item() <= 1.5 * sdpa_error + 1e-3


def test_refuses_what_it_does_not_handle() -> None:
    q = torch.randn(20, 2, 64, dtype=torch.bfloat16)
    assert kernels.segment_attention(q.float(), q.float(), q.float(), [0, 20], None, False, 0.125) is None
    odd = torch.randn(20, 2, 72, dtype=torch.bfloat16)
    assert kernels.segment_attention(odd, odd, odd, [0, 20], None, False, 0.1) is None
    with torch.enable_grad():
        leaf = q.clone().requires_grad_()
        assert kernels.segment_attention(leaf, q, q, [0, 20], None, False, 0.125) is None
    if not bf16_kernel_level():
        assert kernels.segment_attention(q, q, q, [0, 20], None, False, 0.125) is None
        return
    for bad in ([0, 19], [0, 10, 10, 20], [1, 20]):  # not covering the tokens, an empty segment
        with pytest.raises(RuntimeError, match="q_starts"):
            kernels.segment_attention(q, q, q, bad, None, False, 0.125)
    with pytest.raises(RuntimeError, match="one entry per segment"):
        kernels.segment_attention(q, q, q, [0, 20], [0, 10, 20], False, 0.125)
    with pytest.raises(RuntimeError, match="more queries than keys"):  # causal: the last query sees every key
        kernels.segment_attention(q, q[:10], q[:10], [0, 20], [0, 10], True, 0.125)


def test_window_starts() -> None:
    assert window_starts([(0, 4, 3), (12, 9, 1)], 21) == [0, 4, 8, 12, 21]
    assert window_starts([(0, 4, 3)], 13) is None  # does not reach the end
    assert window_starts([(0, 4, 1), (5, 4, 1)], 9) is None  # a gap
    assert window_starts([], 0) is None


def test_window_attention_reference_is_sdpa_per_window() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(21, 2, 16, generator=g) for _ in range(3))
    windows = [(0, 4, 3), (12, 9, 1)]
    starts = [0, 4, 8, 12, 21]
    torch.testing.assert_close(window_attention(q, k, v, windows), _sdpa(q, k, v, starts, starts, False))


def test_native_window_attention_takes_the_kernel_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(21, 2, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    windows = [(0, 4, 3), (12, 9, 1)]
    calls = count_segment_attention(monkeypatch)
    got = fast_paths.native_window_attention(q, k, v, windows)
    assert calls == [[0, 4, 8, 12, 21]]
    want = window_attention(q, k, v, windows)
    assert (got.float() - want.float()).abs().max().item() < 0.05
    # Windows that do not tile the tokens go to the reference (its rows outside every window are unset).
    partial = fast_paths.native_window_attention(q, k, v, [(0, 4, 3)])
    assert len(calls) == 1 and torch.equal(partial[:12], window_attention(q, k, v, [(0, 4, 3)])[:12])
    # float32 too (the kernel answers None).
    qf, kf, vf = q.float(), k.float(), v.float()
    assert torch.equal(fast_paths.native_window_attention(qf, kf, vf, windows), window_attention(qf, kf, vf, windows))
