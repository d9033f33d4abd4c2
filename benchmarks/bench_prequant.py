"""Single-stream decode of pre-quantized checkpoints (an AWQ-shaped and an FP8-shaped Qwen3-0.6B) against our
own int4 / int8 of the same weights, in the same run.

    python benchmarks/make_checkpoint.py qwen3-0.6b /tmp/bench/qwen3-0.6b --shard-mb 4000
    QWENSTACK_BENCH_THREADS=1 python benchmarks/bench_prequant.py /tmp/bench/qwen3-0.6b --name qwen3-0.6b

The random 0.6B checkpoint is written in AWQ (4-bit, group 128) and FP8 (e4m3, 128x128 blocks) form by
tests/quantized_checkpoints.py (the formats' writers), then loaded as a user's download would be:
AWQ's codes are repacked into our int4-g128 (same kernel as our own int4), FP8 is dequantized and
requantized to our int8. Peers: the original weights quantized by us to int4-g128 and int8. Like the
published AWQ/FP8 releases, every variant keeps the (tied) lm_head in bfloat16, so each pair reads the same
bytes per token in the same layout (AWQ's pair: 4-bit codes and bfloat16 group scales; FP8's: int8 per
output channel). Figures: greedy tokens after the first, one sequence, 16-token prompt, per second of wall
time and per second of this process's CPU time; medians of --repeats rounds, each variant timed once per
round, in an order that rotates from round to round. On a machine shared with other work run it with one
thread (QWENSTACK_BENCH_THREADS=1): two OpenMP threads not scheduled together wait on each other at every
barrier, and with one thread the CPU-time rate is what time slicing by others cannot inflate.
"""
from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the format writers
from bench_engine import random_prompt  # noqa: E402
from bench_quant import decode_rates  # noqa: E402
from common import OUT_DIR, save, threads  # noqa: E402
from quantized_checkpoints import write_quantized  # noqa: E402

from qwenstack.models.registry import load_model  # noqa: E402
from qwenstack.quantization import decode_weight_bytes, quantize_model  # noqa: E402


def markdown(results: dict[str, Any]) -> str:
    lines = [f"## Pre-quantized checkpoints: {results['model']}", "",
             f"{results['threads']} threads, {results['decode_tokens']} greedy tokens after a "
             f"{results['prompt_tokens']}-token prompt, median of {results['repeats']} interleaved rounds.", "",
             "| variant | loaded as | decode tok/s | x our own | tok per CPU-second | x our own (CPU) "
             "| weights read MiB/token |", "|---|---|---|---|---|---|---|"]
    for row in results["decode"]:
        ratios = [f"{row[k]:.2f}" if k in row else "-" for k in ("vs_own", "cpu_vs_own")]
        lines.append(f"| {row['variant']} | {row['loaded_as']} | {row['tok_s']:.2f} | {ratios[0]} | "
                     f"{row['tok_per_cpu_s']:.2f} | {ratios[1]} | {row['weight_mib_per_token']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="a bfloat16 checkpoint (benchmarks/make_checkpoint.py)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the AWQ/FP8 checkpoints go (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(threads())
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="prequant-"))
    written = {method: work / method for method in ("awq", "fp8")}
    for method, out in written.items():
        if not (out / "config.json").is_file():
            print(f"writing the {method} checkpoint to {out}", flush=True)
            write_quantized(args.model_dir, out, method, dtype=torch.bfloat16)
    # variant: (how it is made, which own variant it is compared with)
    models: dict[str, torch.nn.Module] = {}
    loaded_as: dict[str, str] = {}
    for variant, method in (("own int4-g128", "int4"), ("own int8", "int8")):
        model = load_model(args.model_dir, dtype=torch.bfloat16)
        loaded_as[variant] = quantize_model(model, method, keep=["lm_head"]).summary()
        models[variant] = model
    for variant, method in (("AWQ checkpoint", "awq"), ("FP8 checkpoint", "fp8")):
        model = load_model(written[method], dtype=torch.bfloat16)
        loaded_as[variant] = model.prequantized.summary()  # type: ignore[union-attr]
        models[variant] = model
    weight_bytes = {v: decode_weight_bytes(m) for v, m in models.items()}
    vocab = next(iter(models.values())).args.vocab_size  # type: ignore[union-attr]
    prompt = [t % vocab for t in random_prompt(random.Random(0), 16, 100000)]
    for model in models.values():
        decode_rates(model, prompt, 4)  # warm up
    runs: dict[str, list[float]] = {v: [] for v in models}
    cpu_runs: dict[str, list[float]] = {v: [] for v in models}
    names = list(models)
    for r in range(args.repeats):
        # The order rotates every round, so no variant always runs right after the same one.
        for variant in names[r % len(names):] + names[:r % len(names)]:
            wall, cpu = decode_rates(models[variant], prompt, args.decode_tokens)
            runs[variant].append(wall)
            cpu_runs[variant].append(cpu)
    peers = {"AWQ checkpoint": "own int4-g128", "FP8 checkpoint": "own int8"}
    results: dict[str, Any] = {"kind": "prequant", "model": args.name, "threads": threads(), "repeats": args.repeats,
                               "decode_tokens": args.decode_tokens, "prompt_tokens": len(prompt), "decode": []}
    medians = {v: statistics.median(r) for v, r in runs.items()}
    cpu_medians = {v: statistics.median(r) for v, r in cpu_runs.items()}
    for variant in models:
        row = {"variant": variant, "loaded_as": loaded_as[variant], "tok_s": medians[variant],
               "runs_tok_s": runs[variant], "tok_per_cpu_s": cpu_medians[variant], "runs_tok_per_cpu_s": cpu_runs[variant],
               "weight_mib_per_token": weight_bytes[variant] / 2**20}
        if variant in peers:
            row["vs_own"] = medians[variant] / medians[peers[variant]]
            row["cpu_vs_own"] = cpu_medians[variant] / cpu_medians[peers[variant]]
        results["decode"].append(row)
        print(row, flush=True)
    del models
    gc.collect()
    path = save(f"prequant-{args.name}", results)
    (OUT_DIR / f"prequant-{args.name}.md").write_text(markdown(results))
    print(markdown(results))
    print(path)


if __name__ == "__main__":
    main()
