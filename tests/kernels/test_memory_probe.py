"""The read-rate probe (memory_cpu.cpp) against torch's sum, and the planner's read rate built on it."""
from __future__ import annotations

import pytest
import torch

from kernel_utils import require_native_kernels
from qwenstack import kernels
from qwenstack.cost import bandwidth as bw


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    require_native_kernels()


@pytest.mark.parametrize("streams", [1, 2, 4, 8, 16])
def test_stream_sum_reads_every_element(streams: int) -> None:
    """Every element counted once whatever the stream count, thread count and length (runs that do not
    divide, a tail shorter than a vector)."""
    threads = torch.get_num_threads()
    try:
        for n in (0, 5, 16 * 37 + 3, 100_003, 1 << 20):
            x = torch.arange(n, dtype=torch.float32) % 7 - 3  # small integers: float32 sums are exact
            for t in (1, 2):
                torch.set_num_threads(t)
                assert kernels.stream_sum(x, streams).item() == x.double().sum().item(), (n, t)
    finally:
        torch.set_num_threads(threads)


def test_stream_sum_refuses_what_it_cannot_read() -> None:
    with pytest.raises(RuntimeError, match="streams"):
        kernels.stream_sum(torch.ones(64), 3)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.stream_sum(torch.ones(64, dtype=torch.bfloat16), 4)
    with pytest.raises(RuntimeError, match="1-D"):
        kernels.stream_sum(torch.ones(8, 8), 4)
    assert kernels.stream_sum(torch.ones(64)[::2], 4).item() == 32  # a strided view is read contiguous


def test_read_rate_takes_the_fastest_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner's and the benchmarks' stream figure: the best of torch's sum and the probe's streams."""
    buf = torch.ones(1 << 16)
    timed: list[object] = []

    def fake_best_time(read, repeats: int) -> float:  # noqa: ANN001 - a reader
        timed.append(read)
        return 1.0 / len(timed)  # each reader tried is quicker than the one before

    monkeypatch.setattr(bw, "_best_time", fake_best_time)
    rate = bw.read_rate(buf, repeats=1)
    assert len(timed) == 1 + len(bw.PROBE_STREAMS)
    assert rate == buf.numel() * 4 * len(timed)  # the last, fastest reader's rate
    monkeypatch.setattr(kernels, "stream_sum", lambda x, streams: None)  # no native kernels: sum() alone
    timed.clear()
    assert bw.read_rate(buf, repeats=1) == buf.numel() * 4 and len(timed) == 1
