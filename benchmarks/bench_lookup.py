"""Prompt-lookup speculative decoding (speculative_method "ngram"), single stream, against plain decoding and
against transformers' own prompt lookup (`generate(prompt_lookup_num_tokens=K)`), in interleaved rounds.

    python benchmarks/bench_lookup.py /tmp/bench/qwen3-0.6b --name NAME [--k 4] [--tokens 200] [--rounds 3]
        [--batches 4,16]

What lookup gains depends on how much the answer repeats what came before, which random weights cannot show
as a trained model would. So four drafts sources are timed on the same prompt and greedy run:
- `lookup`: the real thing. A random model's greedy output falls into loops after a while, so lookup finds
  drafts in its own output; transformers' prompt lookup, on the same tokens, is the peer.
- `oracle`: drafts are the plain run's own continuation (every draft right): the ceiling, what a verify pass
  of k + 1 tokens costs against k + 1 decode steps.
- `wrong`: drafts that are never right (every verify rejects all k): the floor, lookup's cost where it misses.
- `plain`: no speculation.
Tokens/s are medians of the rounds; each line says whether its greedy tokens equal the plain run's. Then
`--batches`: that many sequences (128-token prompts, 96 new tokens) decoding together, plain against lookup with
the engine's defaults (no drafts past prompt_lookup_max_batch sequences) and with drafts at any batch size.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import IdDecoder, weight_bytes_per_token  # noqa: E402
from common import alternate, read_bandwidth, save, threads  # noqa: E402

from qwenstack.engine import speculative  # noqa: E402
from qwenstack.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from qwenstack.engine.params import SamplingParams  # noqa: E402
from qwenstack.models.registry import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--k", type=int, default=4, help="drafts per step")
    parser.add_argument("--tokens", type=int, default=200, help="tokens generated per run")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--batches", default="", help="comma-separated batch sizes for the batched case")
    args = parser.parse_args()
    torch.set_num_threads(threads())

    model = load_model(args.model_dir, dtype=torch.bfloat16)
    rng = random.Random(0)
    prompt = [rng.randrange(1000, 100_000) for _ in range(args.prompt_tokens)]
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    real_lookup = speculative.prompt_lookup

    def engine(k: int) -> LLMEngine:
        config = EngineConfig(kv_cache_memory=2**30, speculative_tokens=k, speculative_method="ngram")
        return LLMEngine(model, IdDecoder(), [], config)

    engine(0).generate_all([prompt], [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)])  # warm-up
    # The plain run's tokens, from a fresh engine as every timed run is (a warm one would take the prompt from
    # its prefix cache: another prefill split, other bfloat16 roundings, and in time other greedy tokens).
    reference = engine(0).generate_all([prompt], [params])[0].outputs[0].token_ids

    def oracle(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
        done = len(tokens) - len(prompt)
        return reference[done:done + k]

    def wrong(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
        return [3] * k  # a token the model never writes here (checked: acceptance is reported)

    variants: dict[str, Callable[[], Any]] = {
        "plain": lambda: run(0, real_lookup), "lookup": lambda: run(args.k, real_lookup),
        "oracle": lambda: run(args.k, oracle), "wrong": lambda: run(args.k, wrong)}
    stats: dict[str, dict[str, Any]] = {}

    def run(k: int, proposer: Callable[..., list[int]]) -> float:
        speculative.prompt_lookup = proposer
        try:
            eng = engine(k)
            start = time.perf_counter()
            out = eng.generate_all([prompt], [params])[0].outputs[0].token_ids
            seconds = time.perf_counter() - start
        finally:
            speculative.prompt_lookup = real_lookup
        name = {real_lookup: "lookup" if k else "plain", oracle: "oracle", wrong: "wrong"}[proposer]
        s = eng.stats()
        stats[name] = {"identical_to_plain": out == reference, "drafted": s.get("spec_draft_tokens", 0),
                       "accepted": s.get("spec_accepted_tokens", 0)}
        return len(out) / seconds

    if not args.no_transformers:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16).eval()
        ids = torch.tensor([prompt])

        def hf_run(lookup_tokens: int | None) -> float:
            options = {"prompt_lookup_num_tokens": lookup_tokens} if lookup_tokens else {}
            with torch.inference_mode():
                start = time.perf_counter()
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                                  min_new_tokens=args.tokens, do_sample=False, **options)
                seconds = time.perf_counter() - start
            new = out[0, len(prompt):].tolist()
            stats["transformers lookup" if lookup_tokens else "transformers"] = {"identical_to_plain": new == reference}
            return len(new) / seconds

        hf_run(None)  # warm-up
        variants["transformers"] = lambda: hf_run(None)
        variants["transformers lookup"] = lambda: hf_run(args.k)

    bandwidth = read_bandwidth()
    rounds = alternate(variants, args.rounds, lambda measure: measure())
    bound = bandwidth / weight_bytes_per_token(model)
    results: dict[str, Any] = {"k": args.k, "tokens": args.tokens, "prompt_tokens": args.prompt_tokens,
                               "read_bandwidth_gb_s": bandwidth / 1e9, "bandwidth_bound_tok_s": bound, "variants": {}}
    for name, runs in rounds.items():
        median = statistics.median(runs)
        entry = {"tok_s": median, "runs_tok_s": runs, "of_bound": median / bound, **stats.get(name, {})}
        results["variants"][name] = entry
        acc = f", {entry['accepted']}/{entry['drafted']} drafts accepted" if entry.get("drafted") else ""
        print(f"{name:20s} {median:6.1f} tok/s ({median / bound:.0%} of the bandwidth bound {bound:.1f}){acc}; "
              f"greedy tokens as plain: {entry.get('identical_to_plain')}")
    plain = results["variants"]["plain"]["tok_s"]
    for name in ("lookup", "oracle", "wrong"):
        results["variants"][name]["over_plain"] = results["variants"][name]["tok_s"] / plain
    if "transformers lookup" in results["variants"]:
        results["lookup_over_transformers_lookup"] = (results["variants"]["lookup"]["tok_s"]
                                                      / results["variants"]["transformers lookup"]["tok_s"])
    print({k: round(v["over_plain"], 2) for k, v in results["variants"].items() if "over_plain" in v},
          "lookup / transformers lookup:", round(results.get("lookup_over_transformers_lookup", 0), 2))
    results["batched"] = batched(model, [int(b) for b in args.batches.split(",") if b], args.k, args.rounds)
    print(save(f"lookup-{args.name}", results))


def batched(model: Any, sizes: list[int], k: int, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rng = random.Random(1)
    params = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    for size in sizes:
        prompts = [[rng.randrange(1000, 100_000) for _ in range(128)] for _ in range(size)]
        drafts: dict[str, tuple[int, int]] = {}

        def run(options: dict[str, Any]) -> float:
            config = EngineConfig(kv_cache_memory=2**30, speculative_method="ngram", **options)
            engine = LLMEngine(model, IdDecoder(), [], config)
            start = time.perf_counter()
            outs = engine.generate_all(prompts, [params] * size)
            seconds = time.perf_counter() - start
            s = engine.stats()
            drafts[str(options)] = (s.get("spec_draft_tokens", 0), s.get("spec_accepted_tokens", 0))
            return sum(len(o.outputs[0].token_ids) for o in outs) / seconds

        variants = {"plain": {}, "lookup": {"speculative_tokens": k},
                    "lookup, any batch": {"speculative_tokens": k, "prompt_lookup_max_batch": None}}
        rounds_of = alternate(variants, rounds, run)
        plain = statistics.median(rounds_of["plain"])
        out[str(size)] = {}
        for name, runs in rounds_of.items():
            median = statistics.median(runs)
            drafted, accepted = drafts[str(variants[name])]
            out[str(size)][name] = {"tok_s": median, "runs_tok_s": runs, "over_plain": median / plain,
                                    "drafted": drafted, "accepted": accepted}
            print(f"{size:3d} sequences, {name:18s} {median:6.1f} tok/s ({median / plain:.2f}x plain), "
                  f"{accepted}/{drafted} drafts accepted")
    return out


if __name__ == "__main__":
    main()
