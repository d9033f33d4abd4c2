"""Shared pieces of the benchmarks: timing, the machine's read bandwidth, and writing results as JSON and
Markdown (benchmarks/out/*.json; RESULTS.md is assembled from them)."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from qwenstack.cost.bandwidth import read_rate

OUT_DIR = Path(__file__).resolve().parent / "out"


def threads() -> int:
    return int(os.environ.get("QWENSTACK_BENCH_THREADS", min(os.cpu_count() or 1, 2)))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t


T = TypeVar("T")


def alternate(variants: dict[str, T], rounds: int, measure: Callable[[T], float]) -> dict[str, list[float]]:
    """measure(variant) for each variant in every round, the order flipped every other round: on a VM whose
    speed drifts within minutes, each round's figures share their minute."""
    results: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(measure(variants[name]))
    return results


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second for streaming reads of a buffer far larger than the caches (best of `repeats`; the
    planner's probe, qwenstack.cost.bandwidth.read_rate: torch's sum() and several streams per core)."""
    # Random contents: pages of equal contents may be merged by the hypervisor and then read from cache.
    return read_rate(torch.empty(int(gib * 2**30) // 4, dtype=torch.float32).uniform_(), repeats)


def product_rate(rows: int = 128, repeats: int = 30) -> float:
    """Multiply-add FLOP/s of the engine's bfloat16 product at its best: `rows` activation rows (128, where the
    tile loop does the most work per weight block) times a 4,096 x 1,024 matrix (8 MiB, in cache after the
    first call), four calls a timing, best of `repeats`. What the matrix units give when memory is not waited
    on: a batched decode step cannot run its products faster, whatever the bandwidth. (Best of many, because
    a shared VM's rate moves by 1.5x within minutes; the best is the bound that flatters us least.)"""
    from qwenstack import kernels

    weight = torch.randn(4096, 1024, dtype=torch.bfloat16)
    x = torch.randn(rows, 1024, dtype=torch.bfloat16)
    if kernels.native_op("linear_tiled") is not None:
        packed = kernels.pack_tiles(weight)
        product = lambda: kernels.linear_tiled(x, packed)  # noqa: E731
    else:
        product = lambda: torch.nn.functional.linear(x, weight)  # noqa: E731
    product()
    best = min(timed(lambda: [product() for _ in range(4)])[1] for _ in range(repeats))
    return 4 * 2 * rows * weight.numel() / best


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "threads": threads(), "torch": torch.__version__,
            "cores": os.cpu_count()}


def save(name: str, results: dict[str, Any]) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **results}, indent=2, default=str))
    return path
