"""Quantized MoE experts in one native call a layer (kernels.experts_swiglu) against the loop over experts it
replaced (two products, the split and SiLU per expert, from Python): single-stream greedy decode of a MoE
checkpoint quantized to each --levels method, the two paths alternated round by round in one process.

    python benchmarks/make_checkpoint.py qwen3-30b-a3b-4l /tmp/bench/qwen3-30b-a3b-4l
    python benchmarks/bench_experts.py /tmp/bench/qwen3-30b-a3b-4l --name qwen3-30b-a3b-4l --rounds 8

Writes benchmarks/out/experts-NAME.json: tokens/s after the first (medians and every round) and the ratio.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import decode_tok_s  # noqa: E402
from common import alternate, save, threads  # noqa: E402

from qwenstack import kernels  # noqa: E402
from qwenstack.models.registry import load_model  # noqa: E402
from qwenstack.quantization import QuantExperts, quantize_model  # noqa: E402

PATHS = ("one call", "loop")


def compare(model_dir: Path, level: str, rounds: int, decode_tokens: int) -> dict[str, Any] | None:
    """Both paths on the checkpoint quantized to `level`; None where its experts are not tile-packed here."""
    model = load_model(model_dir, dtype=torch.bfloat16)
    quantize_model(model, level)
    stacks = [m for m in model.modules() if isinstance(m, QuantExperts)]
    if not stacks or any(s.gate_up_proj.tiled_operands() is None for s in stacks):
        return None
    prompt = list(range(1000, 1016))
    one_call = kernels.experts_swiglu

    def decode(path: str) -> float:
        # kernels.experts_swiglu answering None is the module's cue to loop over the experts itself
        kernels.experts_swiglu = one_call if path == "one call" else (lambda *_: None)
        try:
            return decode_tok_s(model, prompt, decode_tokens)
        finally:
            kernels.experts_swiglu = one_call

    decode("one call")  # warm up
    runs = alternate({p: p for p in PATHS}, rounds, decode)
    row: dict[str, Any] = {path: {"tok_s": statistics.median(r), "runs_tok_s": r} for path, r in runs.items()}
    row["one_call_over_loop"] = row["one call"]["tok_s"] / row["loop"]["tok_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--levels", default="int4,int8")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(threads())
    results: dict[str, Any] = {"kind": "experts", "model": args.name, "decode_tokens": args.decode_tokens}
    for level in args.levels.split(","):
        row = compare(args.model_dir, level, args.rounds, args.decode_tokens)
        gc.collect()
        if row is None:
            print(f"{level}: the experts are not tile-packed on this machine; nothing to compare", flush=True)
            continue
        results[level] = row
        print(level, {p: round(row[p]["tok_s"], 2) for p in PATHS}, f"{row['one_call_over_loop']:.3f}x", flush=True)
    print(save(f"experts-{args.name}", results))


if __name__ == "__main__":
    main()
