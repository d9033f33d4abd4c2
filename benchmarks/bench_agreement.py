"""How much greedy agreement on the demo model is noise: the bfloat16 baseline against the same weights in
float32 and against int8, over the 16 prompts of the quality test and over 64, both ways qwenstack.evaluation.quality
measures it (step by step on the baseline's continuations, and free-running).

    python benchmarks/bench_agreement.py            # writes benchmarks/out/agreement-demo.json

Both comparisons use qwenstack.evaluation.quality's prompts and definition (prompts of 32 tokens cut from the demo
model's held-out split, 64 greedy tokens). A float32 run of the very same weights is the noise floor: it
changes nothing but the rounding of the arithmetic.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

import qwenstack  # noqa: E402
from qwenstack.engine.reference import greedy_generate  # noqa: E402
from qwenstack.models.registry import load_model  # noqa: E402
from qwenstack.evaluation.quality import greedy_agreement, prompts_from_stream, step_agreement  # noqa: E402
from qwenstack.quantization import quantize_model  # noqa: E402
from qwenstack.tokenizer import Tokenizer  # noqa: E402

DEMO = Path(qwenstack.__file__).parent / "assets" / "demo-model"


def main() -> None:
    ids = Tokenizer.from_dir(DEMO).encode((DEMO / "heldout.txt").read_text(encoding="utf-8"))
    baseline = load_model(DEMO, dtype=torch.bfloat16)
    others = {"float32": load_model(DEMO, dtype=torch.float32)}
    others["int8"] = load_model(DEMO, dtype=torch.bfloat16)
    quantize_model(others["int8"], "int8")
    results: dict[str, dict[str, float]] = {}
    for num_prompts in (16, 64):
        prompts = prompts_from_stream(ids, num_prompts, 32)
        base = greedy_generate(baseline, prompts, 64)
        for name, model in others.items():
            steps = step_agreement(baseline, model, prompts, base)
            agreement, identical, first = greedy_agreement(base, greedy_generate(model, prompts, 64))
            results.setdefault(name, {})[f"step_agreement_{num_prompts}"] = steps
            results[name][f"agreement_{num_prompts}"] = agreement
            results[name][f"identical_{num_prompts}"] = identical
            print(f"{name} vs bfloat16, {num_prompts} prompts: step by step {steps:.2%}, free-running {agreement:.2%}, "
                  f"identical runs {identical:.0%}, mean first divergence {first:.1f}", flush=True)
    print(save("agreement-demo", {"model": "demo", "baseline": "bfloat16", "new_tokens": 64, "results": results}))


if __name__ == "__main__":
    main()
