"""Single-stream decode with the flat decode loop (models/fast_paths.py FlatDecodeLoop) against the same prepared
layers called one module after another, in one process, round by round, per weight format. Where the loop makes
one native call per layer (kernels/decode_layer_cpu.cpp: every product tile-packed bfloat16 or int8), the same
loop calling the layer's ops one by one runs as a third path.

On a VM shared with other work the read bandwidth moves by 2x within minutes, so the two paths alternate in
every round on the same loaded model (the order flipped every other round) and medians are reported, with
each round's ratio. Both paths compute the same bits (tests/models/test_flat_decode.py).

    python benchmarks/make_checkpoint.py qwen3-0.6b /tmp/bench/qwen3-0.6b
    python benchmarks/bench_decode_loop.py /tmp/bench/qwen3-0.6b --name qwen3-0.6b --levels bfloat16,int8
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import ours_decode, random_prompt  # noqa: E402
from common import alternate, save, threads  # noqa: E402

from qwenstack.loading import load_model  # noqa: E402
from qwenstack.models.fast_paths import FlatDecodeLoop  # noqa: E402
from qwenstack.models.qwen3 import run_decoder_layers  # noqa: E402
from qwenstack.quantization import quantize_model  # noqa: E402


def alternate_paths(model: torch.nn.Module, prompt: list[int], tokens: int, rounds: int) -> dict[str, list[float]]:
    """Decode tok/s with the flat loop, with the loop of ops where the flat loop is one call per layer, and with the
    layers, each once per round."""
    stack = model.model
    ours_decode(model, prompt, 4)  # warm up: prepares the CPU forms and builds the loop
    loop = stack.run_layers
    if not isinstance(loop, FlatDecodeLoop):
        raise SystemExit("the flat decode loop does not apply to this model here")
    def layers(*args: Any) -> torch.Tensor:
        # Not run_decoder_layers itself: each round's new engine prepares the model again, and the preparation
        # puts a flat loop where it finds the reference function.
        return run_decoder_layers(*args)

    def decode_with(path: Callable[..., torch.Tensor]) -> float:
        stack.run_layers = path
        return ours_decode(model, prompt, tokens)

    paths: dict[str, Callable[..., torch.Tensor]] = {"flat loop": loop, "layers": layers}
    if loop.decode_layer is not None:
        ops_loop = copy.copy(loop)
        ops_loop.decode_layer = None
        paths["loop of ops"] = ops_loop
    runs = alternate(paths, rounds, decode_with)
    stack.run_layers = loop
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--levels", default="bfloat16,int8", help="bfloat16 and quantization methods")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(threads())
    results: dict[str, Any] = {"kind": "decode_loop", "model": args.name, "rounds": args.rounds, "levels": {}}
    for level in [lv.strip() for lv in args.levels.split(",") if lv.strip()]:
        model = load_model(args.model_dir, dtype=torch.bfloat16)
        if level != "bfloat16":
            quantize_model(model, level)
        prompt = random_prompt(random.Random(0), 16, model.args.vocab_size)
        runs = alternate_paths(model, prompt, args.decode_tokens, args.rounds)
        medians = {name: statistics.median(values) for name, values in runs.items()}
        ratios = [a / b for a, b in zip(runs["flat loop"], runs["layers"])]
        results["levels"][level] = {"tok_s": medians, "runs_tok_s": runs,
                                    "ratio": medians["flat loop"] / medians["layers"], "round_ratios": ratios}
        print(f"{level}: flat loop {medians['flat loop']:.2f} tok/s, layers {medians['layers']:.2f} tok/s, "
              f"ratio {medians['flat loop'] / medians['layers']:.3f} (rounds {' '.join(f'{r:.2f}' for r in ratios)})",
              flush=True)
        if "loop of ops" in runs:
            one_call = [a / b for a, b in zip(runs["flat loop"], runs["loop of ops"])]
            results["levels"][level]["one_call_ratio"] = medians["flat loop"] / medians["loop of ops"]
            results["levels"][level]["one_call_round_ratios"] = one_call
            print(f"{level}: one call per layer against the loop of ops ({medians['loop of ops']:.2f} tok/s): "
                  f"{medians['flat loop'] / medians['loop of ops']:.3f} (rounds {' '.join(f'{r:.2f}' for r in one_call)})",
                  flush=True)
        del model
    print(save(f"decode-loop-{args.name}", results))


if __name__ == "__main__":
    main()
