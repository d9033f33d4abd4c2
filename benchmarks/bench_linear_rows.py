"""The tiled bfloat16 linears of Qwen3-0.6B's 28 layers (113 products a decode step, without the head) at
1 to 128 activation rows: how the cost grows with the batch, against the one-row weight stream and the\ncompute rate oneDNN reaches on this machine.

    python benchmarks/bench_linear_rows.py --rows 1,16,32,64,128 --rounds 9

Rounds interleave the row counts, so a slow minute on a shared machine hits each of them alike; medians.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from common import threads
from qwenstack import kernels

HIDDEN = 1024
SHAPES = [(4096, HIDDEN), (HIDDEN, 2048), (6144, HIDDEN), (HIDDEN, 3072)]  # qkv, o, gate_up, down
LAYERS = 28


def compute_roof() -> float:
    """GFLOPS of oneDNN's bfloat16 GEMM at a large square size on these threads (best of 10): the compute
    rate this machine actually reaches, beside the weight stream's rate at one row."""
    x, w = torch.randn(1024, 4096, dtype=torch.bfloat16), torch.randn(4096, 4096, dtype=torch.bfloat16)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return 2 * 1024 * 4096 * 4096 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,16,32,64,128")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(threads())
    torch.manual_seed(0)
    matrices = [kernels.pack_tiles(torch.randn(n, k, dtype=torch.bfloat16) * 0.02)
                for _ in range(LAYERS) for n, k in SHAPES]
    weight_bytes = sum(m.numel() * 2 for m in matrices)
    flops_per_row = weight_bytes  # 2 FLOPs per weight, 2 bytes per weight
    rows = [int(r) for r in args.rows.split(",")]
    inputs = {m: {k: torch.randn(m, k, dtype=torch.bfloat16) for k in (1024, 2048, 3072)} for m in rows}
    times: dict[int, list[float]] = collections.defaultdict(list)
    for _ in range(args.rounds):
        for m in rows:
            start = time.perf_counter()
            for w in matrices:
                kernels.linear_tiled(inputs[m][w.shape[1] * kernels.TILE_K], w)
            times[m].append(time.perf_counter() - start)
    roof = compute_roof()
    print(f"compute roof (F.linear 1024 x 4096 x 4096, bfloat16, best of 10): {roof:.0f} GFLOPS")
    one = statistics.median(times[rows[0]])
    for m in rows:
        t = statistics.median(times[m])
        print(f"rows {m:4d}: median {t * 1e3:6.1f} ms (min {min(times[m]) * 1e3:6.1f})  "
              f"weights {weight_bytes / t / 1e9:5.1f} GB/s  {m * flops_per_row / t / 1e9:5.0f} GFLOPS  "
              f"x{t / one:.2f} of {rows[0]} row(s); the compute alone at the roof: "
              f"{m * flops_per_row / roof / 1e6:5.1f} ms")


if __name__ == "__main__":
    main()
