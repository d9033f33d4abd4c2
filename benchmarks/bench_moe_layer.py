"""A MoE layer's experts through this tree's kernels.moe_tiled against another revision's, in one process.

Both ops are loaded side by side (the base built as torch.ops.qwenstack_base.moe_tiled, bench_kernel_ab.py's
build_base) and alternated round by round on the same stacks, routing and tokens: a prefill chunk's tokens and a
decode step's sequences, Qwen3-30B-A3B's expert shapes (128 experts of 2,048 x 768, top 8) by default. A base
whose op takes the sorted rows (x[token_of], counts, stacks: before the gather and the weighted sum moved into
the op) runs with Experts' torch code around it: the gather, `*= weights` and index_add_.

    python benchmarks/bench_moe_layer.py --base HEAD~1 --tokens 2048,64 --rounds 9

Prints milliseconds a layer (medians, every round) and the ratio base / this tree; with --save, writes
benchmarks/out/moe-layer-NAME.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernel_ab import build_base  # noqa: E402
from common import alternate, save, threads  # noqa: E402

from qwenstack import kernels  # noqa: E402

Mix = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def stacks(experts: int, hidden: int, intermediate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bfloat16 gate_up [E, 2I, H] and down [E, H, I] stacks, tile-packed as Experts.prepare_for_cpu does."""
    def pack(e: int, n: int, k: int) -> torch.Tensor:
        stack = torch.randn(e, n, k, dtype=torch.bfloat16) * 0.02
        return torch.stack([kernels.pack_tiles(w) for w in stack])

    return pack(experts, 2 * intermediate, hidden), pack(experts, hidden, intermediate)


def routing(tokens: int, experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Experts' sort of a random top-k routing: token_of and weights [R] in expert order, counts [E]."""
    generator = torch.Generator().manual_seed(seed)
    expert_ids = torch.rand(tokens, experts, generator=generator).topk(top_k, dim=-1).indices
    weights = torch.softmax(torch.rand(tokens, top_k, generator=generator), -1)
    flat = expert_ids.flatten()
    order = torch.argsort(flat, stable=True)
    return order // top_k, weights.flatten()[order].to(torch.bfloat16), torch.bincount(flat, minlength=experts)


def mix_of(op: Callable[..., torch.Tensor], gate_up: torch.Tensor, down: torch.Tensor) -> Mix:
    """The op as Experts.mix calls it; an op of the older form (sorted rows in, rows out) inside the torch code
    that Experts ran around it."""
    schema = op._schema if hasattr(op, "_schema") else op.default._schema  # an overload or its packet
    if len(schema.arguments) == 6:
        return lambda x, token_of, weights, counts: op(x, token_of, weights, counts, gate_up, down)

    def mix(x: torch.Tensor, token_of: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        results = op(x[token_of], counts, gate_up, down)
        results *= weights[:, None]
        return torch.zeros_like(x).index_add_(0, token_of, results)

    return mix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="git revision whose moe_tiled is the baseline")
    parser.add_argument("--tokens", default="2048,64", help="tokens a layer: comma-separated cases")
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--save", metavar="NAME", help="write benchmarks/out/moe-layer-NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(threads())
    gate_up, down = stacks(args.experts, args.hidden, args.intermediate)
    mixes = {"this tree": mix_of(kernels.ops.native_op("moe_tiled"), gate_up, down),
             "base": mix_of(build_base(args.base, "moe_tiled"), gate_up, down)}
    results = {"base": args.base, "threads": threads(), "experts": args.experts, "top_k": args.top_k,
               "hidden": args.hidden, "intermediate": args.intermediate, "cases": []}
    for tokens in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(tokens, args.hidden, dtype=torch.bfloat16)
        token_of, weights, counts = routing(tokens, args.experts, args.top_k, seed=tokens)
        with torch.inference_mode():
            outputs = {name: mix(x, token_of, weights, counts) for name, mix in mixes.items()}  # and warm up
            assert torch.equal(outputs["this tree"], outputs["base"]), "the two revisions disagree"

            def run(mix: Mix) -> float:
                start = time.perf_counter()
                mix(x, token_of, weights, counts)
                return (time.perf_counter() - start) * 1e3

            runs = alternate(mixes, args.rounds, run)
        ms = {name: statistics.median(times) for name, times in runs.items()}
        case = {"tokens": tokens, "ms": ms, "runs_ms": runs, "speedup": ms["base"] / ms["this tree"]}
        results["cases"].append(case)
        print(f"{tokens:5d} tokens: this tree {ms['this tree']:8.2f} ms, base {ms['base']:8.2f} ms, "
              f"{case['speedup']:.2f}x", flush=True)
    if args.save:
        save(f"moe-layer-{args.save}", results)


if __name__ == "__main__":
    main()
