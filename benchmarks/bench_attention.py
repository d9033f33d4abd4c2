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

With --layers N each call reads the next of N layers' caches, as a model's step does, so the KV comes from
memory rather than from the caches the previous call left warm. --base REV compares this tree's kernel
with revision REV's (built under another op namespace, bench_kernel_ab.build_base) in one process,
alternated round by round, as medians of --rounds passes over the layers:

    python benchmarks/bench_attention.py --base HEAD~1 --batches 64 --contexts 150 --layers 28
    python benchmarks/bench_attention.py --base HEAD~1 --batches 40 --contexts 300 --layers 4 --q-heads 32 --kv-heads 4

--fp8 alone compares the kernel over a float8_e5m2 pool (--kv-cache-dtype fp8: the same values rounded, half the
bytes) with the same call over the --dtype pool, alternated in one process, as milliseconds per pass over the
layers:

    python benchmarks/bench_attention.py --fp8 --batches 1 16 64 128 --contexts 136 300 1024 --layers 28

With --base, --fp8 runs both revisions over float8 pools instead.
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
from common import alternate, read_bandwidth, save, threads  # noqa: E402

from qwenstack import kernels  # noqa: E402
from qwenstack.models.attention import AttentionBatch, gathered_decode_attention  # noqa: E402

HEAD_DIM, BLOCK_SIZE = 128, 16


def make_case(batch: int, context: int, dtype: torch.dtype, q_heads: int = 16, kv_heads: int = 8, layers: int = 1,
              seed: int = 0, cache_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """cache_dtype: the pool's (default: dtype, the queries')."""
    g = torch.Generator().manual_seed(seed)
    per_seq = (context + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks = batch * per_seq + 64
    caches = [torch.randn(2, num_blocks, BLOCK_SIZE, kv_heads, HEAD_DIM, generator=g).to(cache_dtype or dtype)
              for _ in range(layers)]
    tables = torch.randperm(num_blocks, generator=g)[: batch * per_seq].view(batch, per_seq)
    q = torch.randn(batch, q_heads, HEAD_DIM, generator=g).to(dtype)
    attn = AttentionBatch([1] * batch, [context] * batch, block_tables=tables, block_size=BLOCK_SIZE)
    return {"q": q, "kv_cache": caches[0], "caches": caches, "tables": tables, "lens": torch.full((batch,), context),
            "batch": attn, "kv_bytes": 2 * batch * context * kv_heads * HEAD_DIM * caches[0].element_size()}


def compare_with_base(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """This tree's paged_decode_attention against revision args.base's, alternated, as GB/s of KV read (with
    --fp8, over a float8_e5m2 pool)."""
    from bench_kernel_ab import build_base

    ops = {"base": build_base(args.base, "paged_decode_attention", "paged_attention_cpu.cpp"),
           "this": kernels.native_op("paged_decode_attention")}
    scale = HEAD_DIM**-0.5
    rows = []
    for b in args.batches:
        for ctx in args.contexts:
            c = make_case(b, ctx, dtype, args.q_heads, args.kv_heads, args.layers,
                          cache_dtype=torch.float8_e5m2 if args.fp8 else None)

            def rate(op: Callable[..., torch.Tensor]) -> float:
                start = time.perf_counter()
                for cache in c["caches"]:
                    op(c["q"], cache, c["tables"], c["lens"], scale)
                return c["kv_bytes"] * len(c["caches"]) / (time.perf_counter() - start) / 1e9

            for op in ops.values():
                rate(op)  # warm up
            runs = alternate(ops, args.rounds, rate)
            medians = {name: statistics.median(values) for name, values in runs.items()}
            rows.append({"batch": b, "context": ctx, "runs_gbps": runs, "median_gbps": medians,
                         "ratio": medians["this"] / medians["base"]})
            print(f"{b:>3} {ctx:>5}: base {medians['base']:.1f} GB/s, this {medians['this']:.1f} GB/s, "
                  f"{medians['this'] / medians['base']:.2f}x  (this: {' '.join(f'{v:.1f}' for v in runs['this'])})")
    if args.save:
        name = f"attention-decode-ab-{args.q_heads}q{args.kv_heads}kv-{args.layers}l"
        record = {"base": args.base, "dtype": args.dtype, "threads": args.threads, "layers": args.layers,
                  "q_heads": args.q_heads, "kv_heads": args.kv_heads, "rows": rows}
        print("wrote", save(name, record))


def compare_with_fp8_pool(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """The kernel over each case's pool in `dtype` against the same pool rounded to float8_e5m2, alternated."""
    op = kernels.native_op("paged_decode_attention")
    scale = HEAD_DIM**-0.5
    rows = []
    for b in args.batches:
        for ctx in args.contexts:
            c = make_case(b, ctx, dtype, args.q_heads, args.kv_heads, args.layers)
            pools = {dtype_name(dtype): c["caches"], "fp8": [cache.to(torch.float8_e5m2) for cache in c["caches"]]}

            def ms(caches: list[torch.Tensor]) -> float:
                start = time.perf_counter()
                for cache in caches:
                    op(c["q"], cache, c["tables"], c["lens"], scale)
                return (time.perf_counter() - start) * 1e3

            for caches in pools.values():
                ms(caches)  # warm up
            runs = alternate(pools, args.rounds, ms)
            medians = {name: statistics.median(values) for name, values in runs.items()}
            base = medians[dtype_name(dtype)]
            rows.append({"batch": b, "context": ctx, "runs_ms": runs, "median_ms": medians,
                         "speedup": base / medians["fp8"]})
            print(f"{b:>3} {ctx:>5}: {dtype_name(dtype)} {base:.2f} ms, fp8 {medians['fp8']:.2f} ms, "
                  f"{base / medians['fp8']:.2f}x as fast ({args.layers} layers)")
    if args.save:
        name = f"attention-decode-fp8-{args.q_heads}q{args.kv_heads}kv-{args.layers}l"
        record = {"dtype": args.dtype, "threads": args.threads, "layers": args.layers, "q_heads": args.q_heads,
                  "kv_heads": args.kv_heads, "rows": rows}
        print("wrote", save(name, record))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    parser.add_argument("--q-heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=1, help="with --base: layers' caches read in turn (see above)")
    parser.add_argument("--base", help="git revision whose kernel to compare with, alternated in one process")
    parser.add_argument("--fp8", action="store_true",
                        help="the kernel over a float8_e5m2 pool against the --dtype pool, alternated")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the --base or --fp8 comparison")
    parser.add_argument("--save", action="store_true", help="write benchmarks/out/attention-decode*.json")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu sums the time of all threads: use it with --threads 1")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if not kernels.paged_decode_available():
        sys.exit("the native kernel is not available (see the log above, or QWENSTACK_DISABLE_KERNELS)")
    if args.base:  # before --fp8 alone: with --base it picks the pools' dtype
        compare_with_base(args, dtype)
        return
    if args.fp8:
        compare_with_fp8_pool(args, dtype)
        return
    bandwidth = read_bandwidth()
    print(f"threads {args.threads}, {args.dtype}, {args.clock} clock, best of {args.repeats}, "
          f"streaming read {bandwidth / 1e9:.1f} GB/s")
    print(f"{'B':>3} {'ctx':>5} {'KV MB':>7} | {'reference ms':>12} {'GB/s':>6} | "
          f"{'kernel ms':>9} {'GB/s':>6} | speedup")
    rows = []
    scale = HEAD_DIM**-0.5
    for b in args.batches:
        for ctx in args.contexts:
            c = make_case(b, ctx, dtype, args.q_heads, args.kv_heads)
            kv_bytes = c["kv_bytes"]
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
