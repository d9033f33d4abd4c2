"""int4 weights in qwenstack's tile-packed layout (kernels.linear_tiled_int4) against torch's int4 kernel
(_weight_int4pack_mm_for_cpu, the form they took before), in one process, rounds alternated:
- products: the 112 linears of Qwen3-0.6B's 28 layers (qkv, o, gate_up, down; int4 in groups of 128) at 1 to
  1,024 activation rows, as ms for all of them and, at one row, GB/s of codes and scales read;
- with --model: the checkpoint quantized to int4 twice (each form), single-stream greedy decode through the
  engine (tokens/s after the first) against the bandwidth bound of the int4 bytes a step reads (probed each
  round), and the prefill of a --prompt-tokens prompt (prompt tokens/s).

    python benchmarks/make_checkpoint.py qwen3-0.6b /tmp/bench/qwen3-0.6b
    python benchmarks/bench_int4.py --name qwen3-0.6b --model /tmp/bench/qwen3-0.6b --rounds 7

Writes benchmarks/out/int4-NAME.json.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import make_engine, ours_prefill, random_prompt  # noqa: E402
from bench_quant import decode_tok_s  # noqa: E402
from common import alternate, read_bandwidth, save, threads  # noqa: E402

from qwenstack import kernels  # noqa: E402
from qwenstack.models.registry import load_model  # noqa: E402
from qwenstack.quantization import decode_weight_bytes, quantize_model  # noqa: E402
from qwenstack.quantization.formats import Int4Weight  # noqa: E402

SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]  # qkv, o, gate_up, down
LAYERS, GROUP = 28, 128
FORMS = ("tiled", "torch")


@contextmanager
def form(name: str) -> Iterator[None]:
    """Quantize in the given form: "tiled" (where this machine prefers it), or "torch" (tiling switched off)."""
    if name == "tiled":
        yield
    else:
        with mock.patch.object(kernels, "int4_tiles_preferred", lambda: False):
            yield


def product_rates(rows_list: list[int], rounds: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    weights: dict[str, list[Int4Weight]] = {name: [] for name in FORMS}
    for _ in range(LAYERS):
        for n, k in SHAPES:
            w = torch.randn(n, k, generator=gen) * 0.02
            for name in FORMS:
                with form(name):
                    weights[name].append(Int4Weight.quantize(w, GROUP, torch.bfloat16))
    assert all(q.tiled for q in weights["tiled"]) and not any(q.tiled for q in weights["torch"])
    nbytes = sum(q.nbytes() for q in weights["tiled"])
    results: dict[str, Any] = {"weight_bytes": nbytes, "rows": {}}
    for rows in rows_list:
        xs = {k: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for k in {k for _, k in SHAPES}}

        def measure(stack: list[Int4Weight]) -> float:
            start = time.perf_counter()
            for q in stack:
                q.matmul(xs[q.in_features])
            return time.perf_counter() - start

        for stack in weights.values():
            measure(stack)  # warm up
        runs = alternate(weights, rounds if rows <= 64 else max(3, rounds // 2), measure)
        row = {name: {"ms": statistics.median(r) * 1e3, "runs_ms": [t * 1e3 for t in r]} for name, r in runs.items()}
        row["tiled_speedup"] = row["torch"]["ms"] / row["tiled"]["ms"]
        if rows == 1:
            for name in FORMS:
                row[name]["gb_s"] = nbytes / (row[name]["ms"] / 1e3) / 1e9
        results["rows"][rows] = row
        print(f"{rows} rows: tiled {row['tiled']['ms']:.2f} ms, torch {row['torch']['ms']:.2f} ms, "
              f"{row['tiled_speedup']:.2f}x", flush=True)
    return results


def engine_rates(model_dir: Path, rounds: int, decode_tokens: int, prompt_tokens: int) -> dict[str, Any]:
    models: dict[str, torch.nn.Module] = {}
    for name in FORMS:
        model = load_model(model_dir, dtype=torch.bfloat16)
        with form(name):
            quantize_model(model, "int4")
        models[name] = model
    weight_bytes = decode_weight_bytes(models["tiled"])
    rng = random.Random(0)
    vocab = models["tiled"].args.vocab_size

    def new_prompt(length: int) -> list[int]:  # a new one each time: the prefix caches would serve a repeat
        return [t % vocab for t in random_prompt(rng, length, 100000)]

    prompt = new_prompt(16)
    engines = {name: make_engine(model) for name, model in models.items()}
    for name in FORMS:
        decode_tok_s(models[name], prompt, 4)
        ours_prefill(engines[name], new_prompt(64))
    bandwidths: list[float] = []
    decode_runs: dict[str, list[float]] = {name: [] for name in FORMS}
    for r in range(rounds):  # the bound probed every round; the order of the forms flipped every other round
        bandwidths.append(read_bandwidth(repeats=3))
        for name in FORMS if r % 2 == 0 else FORMS[::-1]:
            decode_runs[name].append(decode_tok_s(models[name], prompt, decode_tokens))
    prefill_runs = alternate({n: n for n in FORMS}, max(3, rounds // 2),
                             lambda name: ours_prefill(engines[name], new_prompt(prompt_tokens)))
    results: dict[str, Any] = {"weight_bytes_per_token": weight_bytes, "decode_tokens": decode_tokens,
                               "prompt_tokens": prompt_tokens, "read_bandwidth_runs_gb_s": [b / 1e9 for b in bandwidths]}
    for name in FORMS:
        fractions = [t * weight_bytes / b for t, b in zip(decode_runs[name], bandwidths)]
        results[name] = {"decode_tok_s": statistics.median(decode_runs[name]), "decode_runs": decode_runs[name],
                         "fraction_of_bound": statistics.median(fractions), "runs_fraction_of_bound": fractions,
                         "prefill_tok_s": statistics.median(prefill_runs[name]), "prefill_runs": prefill_runs[name]}
        print(name, {k: v for k, v in results[name].items() if not k.endswith("runs")}, flush=True)
    for key in ("decode_tok_s", "prefill_tok_s"):
        results[f"tiled_over_torch_{key}"] = results["tiled"][key] / results["torch"][key]
    results["bound_tok_s"] = statistics.median(bandwidths) / weight_bytes
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--rows", default="1,4,16,64,256,1024")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--model", type=Path, help="a checkpoint to decode and prefill in both forms")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(threads())
    if not kernels.int4_tiles_preferred():
        sys.exit(f"the tiled int4 loop is not this machine's int4 form (kernels built for {kernels.isa_level()})")
    results: dict[str, Any] = {"kind": "int4", "name": args.name,
                               "products": product_rates([int(r) for r in args.rows.split(",")], args.rounds)}
    if args.model:
        results["engine"] = engine_rates(args.model, args.rounds, args.decode_tokens, args.prompt_tokens)
    print(save(f"int4-{args.name}", results))


if __name__ == "__main__":
    main()
