"""MTP speculative decoding: decode tokens/s and acceptance, with and without speculation, on one checkpoint.

    python benchmarks/bench_speculative.py MODEL_DIR [--k 0 1 2 3] [--concurrency 1 8] [--tokens 64]

MODEL_DIR is a Qwen3-Next checkpoint with its `mtp.*` tensors (the released ones have them). The speed-up
depends on how often the head guesses right, so it means something only on trained weights: on random
weights the head is almost always rejected and speculation only costs. Greedy outputs are checked against
k = 0 (they must be token-identical) and the acceptance rate comes from the engine's stats.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, threads  # noqa: E402

from qwenstack.config import read_config  # noqa: E402
from qwenstack.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from qwenstack.engine.params import SamplingParams  # noqa: E402
from qwenstack.models.qwen3_next_mtp import load_mtp_head  # noqa: E402
from qwenstack.models.registry import load_model, parse_dtype  # noqa: E402
from qwenstack.tokenizer import Tokenizer  # noqa: E402


def run(model_dir: Path, k: int, prompts: list[list[int]], tokens: int, dtype: torch.dtype,
        device: str) -> dict[str, Any]:
    model = load_model(model_dir, dtype=dtype, device=device)
    if k:
        load_mtp_head(model, model_dir, dtype, device)
    tok = Tokenizer.from_dir(model_dir)
    engine = LLMEngine(model, tok, tok.eos_token_ids, EngineConfig(kv_cache_memory=2**30, speculative_tokens=k))
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    engine.generate_all([prompts[0]], [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)])  # warm-up
    start = time.perf_counter()
    outs = engine.generate_all(prompts, [params] * len(prompts))
    seconds = time.perf_counter() - start
    stats = engine.stats()
    drafted, accepted = stats.get("spec_draft_tokens", 0), stats.get("spec_accepted_tokens", 0)
    return {"k": k, "concurrency": len(prompts), "tokens_per_s": len(prompts) * tokens / seconds,
            "drafted": drafted, "accepted": accepted, "acceptance": accepted / drafted if drafted else None,
            "outputs": [o.outputs[0].token_ids for o in outs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--k", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--save", action="store_true", help="write benchmarks/out/speculative.json")
    args = parser.parse_args()
    torch.set_num_threads(threads())
    rng = random.Random(0)
    vocab = read_config(args.model_dir)["vocab_size"]
    results = []
    for n in args.concurrency:
        prompts = [[rng.randrange(3, min(vocab, 1000)) for _ in range(args.prompt_len)] for _ in range(n)]
        baseline = None
        for k in args.k:
            r = run(args.model_dir, k, prompts, args.tokens, parse_dtype(args.dtype), args.device)
            baseline = r["outputs"] if baseline is None else baseline
            r["identical_to_first"] = r.pop("outputs") == baseline
            rate = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
            print(f"concurrency {n:3d}  k={k}  {r['tokens_per_s']:8.1f} tok/s  accepted {rate:>4}  "
                  f"identical={r['identical_to_first']}", flush=True)
            results.append(r)
    if args.save:
        print(save("speculative", {"model": str(args.model_dir), "results": results}))


if __name__ == "__main__":
    main()
