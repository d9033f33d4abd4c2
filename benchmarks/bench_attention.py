"""Decode attention over the paged KV pool: the torch reference (gather blocks into a padded batch, then
SDPA) against the native CPU kernel (reads the pool in place through the block tables).

    python benchmarks/bench_attention.py [--threads 2] [--repeats 20] [--save]

One layer of Qwen3-0.6B's attention shape (16 query heads, 8 kv heads, head_dim 128, bf16 cache and
query, block size 16), batches of 1/16/64 sequences at a context of 256 and 1,024 tokens, with blocks
scattered over the pool as a running engine leaves them. Reports the best of N calls (the machine may be
shared: best-of is the least noisy statistic) and the effective bandwidth of the KV read, K and V bytes of
every context token divided by the time, against a streaming read of the same machine.

On a shared machine, `--threads 1 --clock cpu` times by the process's CPU time, which leaves out the time
other tenants hold the core (not their effect on caches and memory bandwidth).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_bandwidth, save, threads  # noqa: E402

from qwenstack import kernels  # noqa: E402
from qwenstack.models.attention import AttentionBatch, gathered_decode_attention  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 8, 128, 16


def make_case(batch: int, context: int, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    per_seq = (context + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks = batch * per_seq + 64
    kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[: batch * per_seq].view(batch, per_seq)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=g).to(dtype)
    attn = AttentionBatch([1] * batch, [context] * batch, block_tables=tables, block_size=BLOCK_SIZE)
    return {"q": q, "kv_cache": kv_cache, "tables": tables, "lens": torch.full((batch,), context), "batch": attn}


def best_time(fn: Callable[[], Any], repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=threads())
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: process CPU time, meaningful with --threads 1 on a shared machine")
    parser.add_argument("--save", action="store_true", help="write benchmarks/out/attention-decode.json")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu sums the time of all threads: use it with --threads 1")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if not kernels.paged_decode_available():
        sys.exit("the native kernel is not available (see the log above, or QWENSTACK_DISABLE_KERNELS)")
    bandwidth = read_bandwidth()
    print(f"threads {args.threads}, {args.dtype}, {args.clock} clock, best of {args.repeats}, "
          f"streaming read {bandwidth / 1e9:.1f} GB/s")
    print(f"{'B':>3} {'ctx':>5} {'KV MB':>7} | {'reference ms':>12} {'GB/s':>6} | "
          f"{'kernel ms':>9} {'GB/s':>6} | speedup")
    rows = []
    scale = HEAD_DIM**-0.5
    for b in args.batches:
        for ctx in args.contexts:
            c = make_case(b, ctx, dtype)
            kv_bytes = 2 * b * ctx * KV_HEADS * HEAD_DIM * c["kv_cache"].element_size()
            ref = best_time(lambda: gathered_decode_attention(c["q"], c["kv_cache"], c["batch"], scale, True),
                            args.repeats, clock)
            ker = best_time(
                lambda: kernels.paged_decode_attention(c["q"], c["kv_cache"], c["tables"], c["lens"], scale),
                args.repeats, clock,
            )
            row = {"batch": b, "context": ctx, "kv_bytes": kv_bytes, "reference_s": ref, "kernel_s": ker,
                   "reference_gbps": kv_bytes / ref / 1e9, "kernel_gbps": kv_bytes / ker / 1e9}
            rows.append(row)
            print(f"{b:>3} {ctx:>5} {kv_bytes / 1e6:>7.1f} | {ref * 1e3:>12.3f} {row['reference_gbps']:>6.1f} | "
                  f"{ker * 1e3:>9.3f} {row['kernel_gbps']:>6.1f} | {ref / ker:>6.1f}x")
    if args.save:
        path = save("attention-decode", {"dtype": args.dtype, "threads": args.threads, "clock": args.clock,
                                         "read_bandwidth_gbps": bandwidth / 1e9, "rows": rows})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
