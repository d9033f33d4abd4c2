"""A decoder layer's small native ops of this tree against another git revision's, in one process.

`silu_mul` (SwiGLU's activation, 3,072 wide), `add_rms_norm` (the residual add and the norm, 1,024) and
`qk_norm_rope` (QK-norm and rotary, 16 + 8 heads of 128): Qwen3-0.6B's shapes at 1 row (single stream), 64 rows
(a batched decode step) and 2,048 rows (a prefill step). The other revision's rms_norm_cpu.cpp and
swiglu_cpu.cpp are built under a second op namespace (bench_kernel_ab.build_base) and the two sides alternate
round by round on the same inputs; each figure is the median of the rounds' mean microseconds a call. Also says
whether the two sides' outputs are bit for bit the same.

    python benchmarks/bench_small_ops.py --base HEAD~1 [--rows 1,64,2048] [--rounds 9] [--name NAME]

Writes benchmarks/out/small-ops-NAME.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernel_ab import build_base  # noqa: E402
from common import alternate, save, threads  # noqa: E402

from qwenstack import kernels  # noqa: E402

SOURCES = {"silu_mul": "swiglu_cpu.cpp", "add_rms_norm": "rms_norm_cpu.cpp", "qk_norm_rope": "rms_norm_cpu.cpp"}
HIDDEN, INTERMEDIATE, Q_HEADS, KV_HEADS, HEAD_DIM = 1024, 3072, 16, 8, 128


def inputs(name: str, rows: int, gen: torch.Generator) -> tuple[Any, ...]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    if name == "silu_mul":
        return (randn(rows, 2 * INTERMEDIATE),)
    if name == "add_rms_norm":
        return randn(rows, HIDDEN), randn(rows, HIDDEN), randn(HIDDEN), 1e-6, False
    return (randn(rows, Q_HEADS, HEAD_DIM), randn(rows, KV_HEADS, HEAD_DIM), randn(HEAD_DIM), randn(HEAD_DIM),
            randn(rows, HEAD_DIM), randn(rows, HEAD_DIM), 1e-6, False)


def same_outputs(a: Any, b: Any) -> bool:
    pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
    return all(torch.equal(x, y) for x, y in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision whose kernels are the baseline")
    parser.add_argument("--rows", default="1,64,2048")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--name", default="small-ops")
    args = parser.parse_args()
    torch.set_num_threads(threads())
    base = {name: build_base(args.base, name, source) for name, source in SOURCES.items()}
    this = {name: kernels.native_op(name) for name in SOURCES}
    if any(op is None for op in this.values()):
        raise SystemExit("this tree's native kernels did not build")
    print(f"{threads()} threads, base {args.base}")
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        for name in SOURCES:
            call = inputs(name, rows, torch.Generator().manual_seed(rows))
            repeats = max(1, 20_000 // rows)

            def measure(op: Callable[..., Any]) -> float:
                start = time.perf_counter()
                for _ in range(repeats):
                    op(*call)
                return (time.perf_counter() - start) / repeats * 1e6

            times = alternate({"base": base[name], "this": this[name]}, args.rounds, measure)
            base_us, this_us = statistics.median(times["base"]), statistics.median(times["this"])
            row = {"op": name, "rows": rows, "base_us": base_us, "this_us": this_us, "base_over_this": base_us / this_us,
                   "identical": same_outputs(base[name](*call), this[name](*call))}
            results.append(row)
            print(f"{name:13s} rows {rows:5d}: base {base_us:9.1f} us  this {this_us:9.1f} us  "
                  f"{base_us / this_us:.2f}x  identical={row['identical']}")
    print("wrote", save(f"small-ops-{args.name}", {"base": args.base, "rounds": args.rounds, "results": results}))


if __name__ == "__main__":
    main()
