"""What --kv-cache-dtype fp8 costs in quality, on the demo model (trained on Shakespeare; the random benchmark
checkpoints have no quality to lose). The baseline is the model as served, bfloat16 with a bfloat16 cache.

    python benchmarks/bench_kv_cache_quality.py [--prompts 64] [--new-tokens 64]   # out/kv-cache-quality.json

For each variant, over prompts of 32 tokens cut from the demo model's held-out split (qwenstack.evaluation.quality's
prompts) and the baseline's greedy continuation of each:
- teacher-forced, every new token a decode step over the cache (the prompt is prefilled over its own keys, so
  what the cache's rounding changes shows in the decode steps): the mean KL divergence KL(baseline || variant)
  of the next-token distribution, in nats, and the fraction of steps where both pick the same token;
- free-running: each decodes on its own; agreement with the baseline token by token, identical runs, and the mean
  position of the first divergence (qwenstack.evaluation.quality.greedy_agreement).
The noise floor is the same weights in float32 with a float32 cache: it changes nothing but the arithmetic's
rounding. (A float16 cache would show nothing: bfloat16 keys and values of this model's range fit it exactly.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

import qwenstack  # noqa: E402
from qwenstack.engine.reference import greedy_generate  # noqa: E402
from qwenstack.evaluation.quality import greedy_agreement, prompts_from_stream  # noqa: E402
from qwenstack.models.registry import load_model  # noqa: E402
from qwenstack.tokenizer import Tokenizer  # noqa: E402

DEMO = Path(qwenstack.__file__).parent / "assets" / "demo-model"
VARIANTS = {  # name: (model dtype, cache dtype)
    "float32 weights and cache (noise floor)": (torch.float32, torch.float32),
    "fp8 cache (float8_e5m2)": (torch.bfloat16, torch.float8_e5m2),
}


def forced_logits(model: torch.nn.Module, prompts: list[list[int]], continuations: list[list[int]],
                  kv_dtype: torch.dtype) -> list[torch.Tensor]:
    """Each prompt's next-token logits [new tokens, vocab] (float32) while it reads its continuation."""
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]

    def keep(active: list[int], logits: torch.Tensor) -> None:
        for s, row in zip(active, logits.float()):
            rows[s].append(row)

    greedy_generate(model, prompts, len(continuations[0]), kv_dtype=kv_dtype, forced=continuations, on_logits=keep)
    return [torch.stack(r) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    ids = Tokenizer.from_dir(DEMO).encode((DEMO / "heldout.txt").read_text(encoding="utf-8"))
    prompts = prompts_from_stream(ids, args.prompts, 32)
    baseline = load_model(DEMO, dtype=torch.bfloat16)
    continuations = greedy_generate(baseline, prompts, args.new_tokens)
    base_logits = forced_logits(baseline, prompts, continuations, torch.bfloat16)
    results = {}
    for name, (dtype, kv_dtype) in VARIANTS.items():
        model = baseline if dtype == torch.bfloat16 else load_model(DEMO, dtype=dtype)
        logits = forced_logits(model, prompts, continuations, kv_dtype)
        kl, same, steps = 0.0, 0, 0
        for b, v in zip(base_logits, logits):
            log_p, log_q = torch.log_softmax(b, -1), torch.log_softmax(v, -1)
            kl += float((log_p.exp() * (log_p - log_q)).sum())
            same += int((b.argmax(-1) == v.argmax(-1)).sum())
            steps += b.shape[0]
        own = greedy_generate(model, prompts, args.new_tokens, kv_dtype=kv_dtype)
        agreement, identical, first = greedy_agreement(continuations, own)
        results[name] = {"mean_kl_nats": kl / steps, "step_agreement": same / steps, "agreement": agreement,
                         "identical": identical, "mean_first_divergence": first}
        print(f"{name}: teacher-forced KL {kl / steps:.2e} nats, same token {same / steps:.2%}; free-running "
              f"{agreement:.2%}, identical runs {identical:.0%}, first divergence at {first:.1f}", flush=True)
    print(save("kv-cache-quality", {"model": "demo", "baseline": "bfloat16 weights and cache", "prompts": args.prompts,
                                    "new_tokens": args.new_tokens, "results": results}))


if __name__ == "__main__":
    main()
