"""The native top-k selection (qwenstack/kernels/sampling_cpu.cpp) against a stable descending sort: the same
values and ids in float32, bfloat16 and float16 (bfloat16 logits tie often, and ties go by ascending id), rows
wider and narrower than a vector, rows in a strided view, -inf and NaN logits, every k from 1 to the row, and
the refusals."""
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
