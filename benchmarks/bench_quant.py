"""Single-stream decode per weight format (bfloat16, int8, int4) against transformers bfloat16 and against
the memory-bandwidth bound of each format's bytes; the planner's estimate beside each; and the quality
table (perplexity, KL, greedy agreement) of the demo model.

    python benchmarks/make_checkpoint.py qwen3-0.6b /tmp/bench/qwen3-0.6b
    QWENSTACK_BENCH_THREADS=16 python benchmarks/bench_quant.py /tmp/bench/qwen3-0.6b --name qwen3-0.6b
    python benchmarks/make_checkpoint.py qwen3-30b-a3b-4l /tmp/bench/qwen3-30b-a3b-4l
    QWENSTACK_BENCH_THREADS=16 python benchmarks/bench_quant.py /tmp/bench/qwen3-30b-a3b-4l --name qwen3-30b-a3b-4l --no-quality
    qwenstack bench report benchmarks/out

Writes benchmarks/out/quant-NAME.json and quant-NAME.md. Definitions:
- decode tok/s: greedy tokens after the first, per second of engine steps, one sequence, 16-token prompt;
  the median of --repeats runs, the formats (and transformers) timed in turn in each round;
- bound: the stream read bandwidth / weight bytes one decode step reads in that format
  (qwenstack.quantization.decode_weight_bytes: every tensor but the embedding lookup, experts at
  top_k/num_experts). The bandwidth is probed at the start of every round, just before that round's
  decodes: "fraction of bound" is the median over rounds of each round's decode / that round's bound (one
  probe per run let a burst of the host's bandwidth, 53 against ~33 GB/s a minute later, set the bound of
  every round), and bound_tok_s the median probe's;
- planner expected: `qwenstack plan`'s estimate for the same config, format and context (bytes at the
  decode-kernel rates measured once per thread count and cached in ~/.cache/qwenstack/bandwidth.json;
  `qwenstack plan MODEL --refresh-bandwidth` measures again);
- quality: qwenstack.evaluation.quality.evaluate_quality on the demo model (or --quality-model), bfloat16 baseline.
"""
from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import hf_decode, make_engine, random_prompt  # noqa: E402
from common import OUT_DIR, read_bandwidth, save, threads  # noqa: E402

from qwenstack.engine.params import SamplingParams  # noqa: E402
from qwenstack.models.registry import load_model  # noqa: E402
from qwenstack.quantization import decode_weight_bytes, quantize_model  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "qwenstack" / "assets" / "demo-model"


def decode_tok_s(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> float:
    """Single-sequence greedy decode speed through the engine (tokens after the first, per second)."""
    return decode_rates(model, prompt, new_tokens)[0]


def decode_rates(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """Single-sequence greedy decode: tokens after the first per second of wall time and per second of this
    process's CPU time (with one thread, the CPU figure is what time slicing by other work cannot inflate)."""
    engine = make_engine(model, kv_cache_memory=256 * 2**20)
    engine.add_request("d", prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    wall, cpu = [], []
    while engine.has_unfinished_requests():
        engine.step()
        wall.append(time.perf_counter())
        cpu.append(time.process_time())
    return (len(wall) - 1) / (wall[-1] - wall[0]), (len(cpu) - 1) / (cpu[-1] - cpu[0])


def planner_expected(model_dir: Path, level: str, context: int) -> float | None:
    from qwenstack.cost.bandwidth import cpu_bandwidth
    from qwenstack.cost.planner import find_config, make_plan

    plan = make_plan(find_config(str(model_dir)), context, 1, None if level == "bfloat16" else level, "bfloat16",
                     cpu_bandwidth(), short_context=context)
    return plan.speeds[-1].expected_tok_s if plan.speeds else None


def markdown(results: dict[str, Any]) -> str:
    lines = [f"## Single-stream decode per weight format: {results['model']}", "",
             f"{results['machine']['threads']} threads, read bandwidth {results['read_bandwidth_gb_s']:.1f} GB/s, "
             f"{results['decode_tokens']} greedy tokens after a {results['prompt_tokens']}-token prompt.", "",
             "| level | decode tok/s | weights read MiB/token | bound tok/s | fraction of bound | planner expected tok/s "
             "| x transformers bf16 |", "|---|---|---|---|---|---|---|"]
    for d in results["decode"]:
        def cell(key: str, fmt: str) -> str:
            return format(d[key], fmt) if d.get(key) is not None else "-"
        lines.append(f"| {d['level']} | {cell('tok_s', '.2f')} | {cell('weight_mib_per_token', '.1f')} | "
                     f"{cell('bound_tok_s', '.2f')} | {cell('fraction_of_bound', '.0%')} | "
                     f"{cell('planner_expected_tok_s', '.2f')} | {cell('vs_transformers', '.2f')} |")
    if "quality" in results:
        from qwenstack.evaluation.quality import LevelQuality, QualityReport

        q = dict(results["quality"])
        q.pop("kind", None)
        report = QualityReport(**{**q, "levels": [LevelQuality(**row) for row in q["levels"]]})
        lines += ["", f"### Quality: {report.describe()}", "", report.table()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="decode per weight format + quality table")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--levels", default="bfloat16,int8,int4", help="bfloat16 and quantization methods")
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per format, interleaved; medians reported")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--quality-model", type=Path, default=DEMO)
    parser.add_argument("--quality-prompts", type=int, default=16)
    parser.add_argument("--quality-tokens", type=int, default=64)
    parser.add_argument("--quality-text-tokens", type=int, default=None, help="cap the held-out text (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(threads())
    levels = [level.strip() for level in args.levels.split(",") if level.strip()]
    prompt = random_prompt(random.Random(0), 16, 100000)
    results: dict[str, Any] = {"kind": "quant", "model": args.name, "decode_tokens": args.decode_tokens,
                               "prompt_tokens": len(prompt), "decode": []}
    # Every format is loaded first, then each is timed `--repeats` times in turn (transformers too), and the
    # medians are reported: the shared VM's bandwidth drifts by 20-30% within minutes, and interleaving
    # spreads that drift over every format instead of charging it to whichever ran at a bad moment.
    models: dict[str, Any] = {}
    summaries: dict[str, Any] = {}
    weight_bytes: dict[str, int] = {}
    for level in levels:
        model = load_model(args.model_dir, dtype=torch.bfloat16)
        summaries[level] = "baseline" if level == "bfloat16" else quantize_model(model, level).summary()
        weight_bytes[level] = decode_weight_bytes(model)  # before the engine puts the linears in CPU form
        models[level] = model
    prompt = [t % next(iter(models.values())).args.vocab_size for t in prompt]
    hf = None
    if not args.no_transformers:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16).eval()
        hf_decode(hf, prompt, 4)
    for model in models.values():
        decode_tok_s(model, prompt, 4)  # warm up
    runs: dict[str, list[float]] = {level: [] for level in [*levels, "transformers-bf16"]}
    bandwidths: list[float] = []
    for _ in range(args.repeats):
        bandwidths.append(read_bandwidth(repeats=3))
        for level, model in models.items():
            runs[level].append(decode_tok_s(model, prompt, args.decode_tokens))
        if hf is not None:
            runs["transformers-bf16"].append(hf_decode(hf, prompt, args.decode_tokens))
    bandwidth = statistics.median(bandwidths)
    results |= {"read_bandwidth_gb_s": bandwidth / 1e9, "read_bandwidth_runs_gb_s": [b / 1e9 for b in bandwidths]}
    for level in models:
        tok_s = statistics.median(runs[level])
        fractions = [t * weight_bytes[level] / b for t, b in zip(runs[level], bandwidths)]
        row = {"level": level, "tok_s": tok_s, "runs_tok_s": runs[level], "weight_bytes_per_token": weight_bytes[level],
               "weight_mib_per_token": weight_bytes[level] / 2**20, "bound_tok_s": bandwidth / weight_bytes[level],
               "fraction_of_bound": statistics.median(fractions), "runs_fraction_of_bound": fractions,
               "planner_expected_tok_s": planner_expected(args.model_dir, level, len(prompt) + args.decode_tokens),
               "quantization": summaries[level]}
        if row["planner_expected_tok_s"]:
            row["planner_over_measured"] = row["planner_expected_tok_s"] / tok_s
        results["decode"].append(row)
        print("decode", {k: v for k, v in row.items() if k != "quantization"}, flush=True)
    del models
    gc.collect()
    if hf is not None:
        theirs = statistics.median(runs["transformers-bf16"])
        del hf
        gc.collect()
        results["decode"].append({"level": "transformers-bf16", "tok_s": theirs, "runs_tok_s": runs["transformers-bf16"]})
        for row in results["decode"][:-1]:
            row["vs_transformers"] = row["tok_s"] / theirs
        print("transformers bf16 decode", theirs, runs["transformers-bf16"], flush=True)
    if not args.no_quality and (args.quality_model / "model.safetensors").is_file():
        from qwenstack.evaluation.quality import evaluate_quality
        from qwenstack.tokenizer import Tokenizer

        reference = load_model(args.quality_model, dtype=torch.bfloat16)
        tokenizer = Tokenizer.from_dir(args.quality_model)
        ids = tokenizer.encode((args.quality_model / "heldout.txt").read_text(encoding="utf-8"))
        if args.quality_text_tokens:
            ids = ids[:args.quality_text_tokens]
        context = min(int(getattr(reference.args, "max_position_embeddings", 512)), 512)
        report = evaluate_quality(reference, ids, [lv for lv in levels if lv != "bfloat16"],
                                  model_name=args.quality_model.name, context_len=context,
                                  num_prompts=args.quality_prompts, new_tokens=args.quality_tokens,
                                  progress=lambda m: print(" ", m, flush=True))
        results["quality"] = report.to_dict()
        print(report.table(), flush=True)
    elif not args.no_quality:
        print(f"no quality table: {args.quality_model} has no model.safetensors", flush=True)
    path = save(f"quant-{args.name}", results)
    (OUT_DIR / f"quant-{args.name}.md").write_text(markdown({**results, "machine": {"threads": threads()}}))
    print(path)


if __name__ == "__main__":
    main()
