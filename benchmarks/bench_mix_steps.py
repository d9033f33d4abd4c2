"""Where an offline mix's time goes: bench_engine.py's throughput or short-output mix through our engine, every
step timed and its page faults counted, then summed by kind: the steps that carry prompt tokens, and the
decode-only steps by how many sequences they hold. A profile to read, not a ratio: bench_engine.py measures the
mixes against transformers.

    python benchmarks/bench_mix_steps.py /tmp/bench/qwen3-30b-a3b-4l --mix engine --kv-cache-gib 0.5

Page faults are the process's minor faults (getrusage) during each step: fresh memory that the kernel maps and
zeroes on first touch, which large temporaries freed back to it pay again every step.

`--profile-ops` also runs torch's profiler over the first step that carries a full prompt chunk and the first
decode-only step of at least 56 sequences, and prints each one's heaviest operators (self CPU time): which
products take the step, to hold against the machine's GEMM rate and read bandwidth.
"""
from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine  # noqa: E402
from common import threads  # noqa: E402

from qwenstack.engine.params import SamplingParams  # noqa: E402
from qwenstack.models.registry import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--mix", choices=["engine", "short"], default="engine")
    parser.add_argument("--kv-cache-gib", type=float, default=3.0)
    parser.add_argument("--profile-ops", action="store_true", help="profile one prefill and one full decode step")
    args = parser.parse_args()
    torch.set_num_threads(threads())
    model = load_model(args.model_dir, dtype=torch.bfloat16)
    bench_engine.KV_CACHE_MEMORY = int(args.kv_cache_gib * 2**30)
    vocab = model.args.vocab_size
    # As in bench_engine.py --only throughput (its first draws from seed 0) or --only short.
    prompts, outputs = (bench_engine.engine_mix(random.Random(0), vocab) if args.mix == "engine"
                        else bench_engine.short_mix(vocab))
    engine = bench_engine.make_engine(model, max_num_seqs=64)
    steps: list[tuple[float, int, int, int]] = []  # seconds, decoding sequences, prompt tokens, page faults
    execute = engine.runner.execute

    profiled: set[str] = set()

    def run_step(step):  # type: ignore[no-untyped-def]
        new = list(step.num_new_tokens)
        kind = "prefill" if sum(new) >= engine.config.max_num_batched_tokens else \
            "decode" if max(new) == 1 and len(new) >= 56 else None
        if not args.profile_ops or kind is None or kind in profiled:
            return execute(step)
        profiled.add(kind)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            result = execute(step)
        print(f"{kind} step of {len(new)} sequences, {sum(new)} tokens:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=40))
        return result

    def timed_execute(step):  # type: ignore[no-untyped-def]
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        result = run_step(step)
        seconds = time.perf_counter() - start
        new = list(step.num_new_tokens)
        steps.append((seconds, sum(n == 1 for n in new), sum(n for n in new if n > 1),
                      resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
        return result

    engine.runner.execute = timed_execute
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs]
    start = time.perf_counter()
    engine.generate_all(prompts, params)
    total = time.perf_counter() - start
    print(f"{args.mix} mix: {sum(outputs)} tokens in {total:.1f} s ({sum(outputs) / total:.1f} tok/s), "
          f"{len(steps)} steps", flush=True)
    prefill = [s for s in steps if s[2] > 0]
    print(f"steps with prompt tokens: {len(prefill):4d}, {sum(s[0] for s in prefill):6.1f} s, "
          f"{sum(s[2] for s in prefill)} prompt tokens, {sum(s[3] for s in prefill)} page faults")
    by_rows: dict[int, list[tuple[float, int, int, int]]] = defaultdict(list)
    for s in steps:
        if s[2] == 0:
            by_rows[-(-s[1] // 8) * 8].append(s)
    for rows in sorted(by_rows):
        group = by_rows[rows]
        print(f"decode steps of {rows - 7:2d}-{rows:2d} sequences: {len(group):4d}, {sum(s[0] for s in group):6.1f} s, "
              f"median {statistics.median(s[0] for s in group) * 1e3:6.1f} ms, {sum(s[3] for s in group)} page faults")


if __name__ == "__main__":
    main()
