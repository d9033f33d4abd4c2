"""The native sampling kernels (qwenstack/kernels/sampling_cpu.cpp). Top-k selection against a stable
descending sort: the same values and ids in float32, bfloat16 and float16 (bfloat16 logits tie often, and ties
go by ascending id), rows wider and narrower than a vector, rows in a strided view, -inf and NaN logits, every k
from 1 to the row, and the refusals. The whole-row softmax draw against the rows' cumulative distribution, and
their log mass against torch's logsumexp."""
from __future__ import annotations

import pytest
import torch

from kernel_utils import require_native_kernels
from qwenstack import kernels


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    require_native_kernels()


def reference(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row, equal values by ascending id, NaN first (torch.topk's place for it)."""
    keys = logits.float().nan_to_num(nan=float("inf"), posinf=float("inf"))
    ids = torch.sort(keys, dim=-1, descending=True, stable=True).indices[:, :k]
    return logits.float().gather(1, ids), ids


def assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    values, ids = got
    assert values.dtype == torch.float32 and ids.dtype == torch.long
    assert torch.equal(ids, want[1])
    torch.testing.assert_close(values, want[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,k", [(151_936, 20), (151_936, 1), (5_000, 64), (1_000, 64), (37, 5), (9, 9), (16, 3)])
def test_matches_a_stable_sort(dtype: torch.dtype, vocab: int, k: int) -> None:
    gen = torch.Generator().manual_seed(vocab + k)
    logits = (torch.randn(6, vocab, generator=gen) * 3).to(dtype)
    logits[1] = logits[1].sort().values  # ascending: every logit beats the floor, the most insertions
    logits[2] = logits[2].sort(descending=True).values  # descending: none after the first k
    logits[3] = (torch.randint(-3, 3, (vocab,), generator=gen)).to(dtype)  # ties everywhere
    assert_same(kernels.top_k_rows(logits, k), reference(logits, k))


def test_strided_rows_and_infinities_and_nan() -> None:
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(8, 1000, generator=gen).to(torch.bfloat16)
    rows = table[::2, :]  # a row stride of two rows
    rows[0, :] = float("-inf")  # a fully masked row: the first k ids
    rows[1, 500:] = float("-inf")
    rows[2, 17] = float("nan")
    rows[3, 999] = float("inf")
    got = kernels.top_k_rows(rows, 10)
    assert_same(got, reference(rows, 10))
    assert got[1][0].tolist() == list(range(10)) and got[1][2, 0] == 17 and got[1][3, 0] == 999


def test_no_rows_and_refusals() -> None:
    values, ids = kernels.top_k_rows(torch.zeros(0, 50), 3)
    assert values.shape == ids.shape == (0, 3)
    op = kernels.native_op("top_k_rows")
    with pytest.raises(RuntimeError, match="k must be"):
        op(torch.zeros(2, 50), 51)
    with pytest.raises(RuntimeError, match="k must be"):
        op(torch.zeros(2, 50), 0)
    with pytest.raises(RuntimeError, match="must be float32"):
        op(torch.zeros(2, 50, dtype=torch.int32), 3)


# --- whole-row softmax: draws and log masses ------------------------------------------------------------------

def cdf_interval(logits: torch.Tensor, temperature: float, token: int) -> tuple[float, float]:
    """The share of the row's softmax mass before `token` and up to it (float64 of torch's float32 weights)."""
    scaled = logits.float() / temperature
    weights = (scaled - scaled.max()).exp().double()
    total = weights.sum().item()
    before = weights[:token].sum().item()
    return before / total, (before + weights[token].item()) / total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [151_936, 3_000, 1_024, 37])
def test_softmax_draw_takes_the_token_at_each_uniform(dtype: torch.dtype, vocab: int) -> None:
    """Each row's token is the one whose share of the running sum holds u: u x total falls inside the token's
    interval of the row's cumulative distribution (to the weights' float32 precision), over blocks and inside
    them, at several temperatures."""
    gen = torch.Generator().manual_seed(vocab)
    rows = 12
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    temperatures = torch.tensor([0.3, 0.7, 1.0, 1.5] * 3)
    uniforms = torch.rand(rows, generator=gen, dtype=torch.float64)
    uniforms[0], uniforms[1] = 0.0, 1.0 - 2**-52
    ids = kernels.softmax_draw_rows(logits, temperatures, uniforms)
    assert ids is not None and ids.dtype == torch.long and ids.shape == (rows,)
    for r in range(rows):
        lo, hi = cdf_interval(logits[r], float(temperatures[r]), int(ids[r]))
        u = float(uniforms[r])
        assert lo - 1e-5 <= u <= hi + 1e-5, (r, u, lo, hi)


def test_softmax_draw_follows_the_distribution_and_skips_masked_tokens() -> None:
    """Uniforms on a fine grid give every token its share of draws (a quantile check, no randomness), a masked
    (-inf) token never, and the first and last uniform the first and last token with weight."""
    logits = torch.tensor([[1.0, float("-inf"), 0.0, 2.0, float("-inf"), -1.0]])
    probs = torch.softmax(logits[0] / 0.8, -1)
    grid = (torch.arange(20_000, dtype=torch.float64) + 0.5) / 20_000
    ids = kernels.softmax_draw_rows(logits.expand(20_000, 6).contiguous(), torch.full((20_000,), 0.8), grid)
    counts = torch.bincount(ids, minlength=6).double() / 20_000
    assert counts[1] == 0 and counts[4] == 0
    torch.testing.assert_close(counts, probs.double(), atol=2e-4, rtol=0)
    ends = kernels.softmax_draw_rows(logits.expand(2, 6).contiguous(), torch.full((2,), 0.8),
                                     torch.tensor([0.0, 1.0 - 2**-52], dtype=torch.float64))
    assert ends.tolist() == [0, 5]


def test_softmax_draw_declines_rows_without_a_distribution_and_refuses_bad_input() -> None:
    logits = torch.randn(3, 100)
    logits[0, 7] = float("nan")
    logits[1] = float("-inf")
    ids = kernels.softmax_draw_rows(logits, torch.ones(3), torch.full((3,), 0.5, dtype=torch.float64))
    assert ids[0] == -1 and ids[1] == -1 and 0 <= ids[2] < 100
    no_rows = kernels.softmax_draw_rows(torch.randn(0, 10), torch.ones(0), torch.zeros(0, dtype=torch.float64))
    assert no_rows is not None and no_rows.numel() == 0
    assert kernels.softmax_draw_rows(torch.randn(2, 10, dtype=torch.float64), torch.ones(2),
                                     torch.zeros(2, dtype=torch.float64)) is None  # a dtype it does not take
    op = kernels.native_op("softmax_draw_rows")
    with pytest.raises(RuntimeError, match="temperatures must be float32"):
        op(torch.randn(2, 10), torch.ones(3), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="uniforms must be float64"):
        op(torch.randn(2, 10), torch.ones(2), torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logsumexp_rows_is_torchs(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 151_936, generator=gen) * 4).to(dtype)
    logits[1, :1000] = float("-inf")
    wide = torch.randn(4, 40).to(dtype)[:, ::2]  # a strided view
    temperatures = torch.tensor([0.5, 1.0, 1.3, 0.7, 2.0])
    for rows, t in ((logits, temperatures), (wide, temperatures[:4])):
        want = (rows.float() / t[:, None]).logsumexp(-1)
        torch.testing.assert_close(kernels.logsumexp_rows(rows, t), want, rtol=1e-5, atol=1e-5)
    special = torch.randn(3, 64)
    special[0] = float("-inf")
    special[1, 3] = float("nan")
    got = kernels.logsumexp_rows(special, torch.ones(3))
    assert got[0] == float("-inf") and got[1].isnan() and got[2].isfinite()
