"""Qwen3-Next against transformers on the same checkpoint and machine, and what a sequence holds in memory.

    python benchmarks/make_checkpoint.py qwen3-next-80b-a3b-4l /tmp/bench/qwen3-next-80b-a3b-4l
    python benchmarks/bench_next.py /tmp/bench/qwen3-next-80b-a3b-4l

- decode tokens/s, single stream and 32 concurrent requests (transformers: one batch of 32), both models
  loaded and the cases interleaved round by round, medians of --rounds (prefill against transformers:
  bench_engine.py --only prefill on the same checkpoint);
- the chunked gated delta rule of one linear-attention layer over --prefill-tokens tokens at the
  checkpoint's head shape: the native kernel, our torch form and transformers' torch_chunk_gated_delta_rule
  (what it runs on CPU without flash-linear-attention), alternated, medians, with GFLOPS;
- memory held per sequence at 4K and 32K tokens of context: paged KV of the full-attention layers plus
  the fixed recurrent state of the linear layers, against a Qwen3-MoE of the same width whose layers are
  all full attention (Qwen3-30B-A3B's attention shape, same layer count). Computed from the sizes the
  engine allocates (blocks of KV and state slots), which are exact.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import hf_generate, make_engine, random_prompt  # noqa: E402
from common import save, threads  # noqa: E402
from shapes import SHAPES  # noqa: E402

from qwenstack.engine.params import SamplingParams  # noqa: E402
from qwenstack.models.registry import build_model, load_model  # noqa: E402


def ours_decode_rate(model: Any, prompts: list[list[int]], new_tokens: int) -> float:
    """Output tokens/s of the decode phase (after every request has its first token)."""
    engine = make_engine(model, max_num_seqs=len(prompts))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    while any(not s.output_token_ids for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    start, produced = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        produced += sum(len(o.outputs[0].delta_token_ids) for o in engine.step())
    return produced / (time.perf_counter() - start)


def hf_decode_rate(hf: Any, prompts: list[list[int]], new_tokens: int) -> float:
    t = time.perf_counter()
    hf_generate(hf, prompts, 1)
    first = time.perf_counter() - t
    t = time.perf_counter()
    hf_generate(hf, prompts, new_tokens)
    total = time.perf_counter() - t
    return len(prompts) * (new_tokens - 1) / (total - first)


def chunked_rule_rates(config: dict, tokens: int, rounds: int, with_transformers: bool) -> dict[str, Any]:
    """Milliseconds of one layer's chunked rule over `tokens` tokens, each form alternated over `rounds`."""
    from qwenstack.models.fast_paths import NATIVE_CHUNK_TOKENS, native_chunked_varlen
    from qwenstack.models.linear_attention import chunk_gated_delta_rule_varlen

    hk, hv = config["linear_num_key_heads"], config["linear_num_value_heads"]
    dk, dv = config["linear_key_head_dim"], config["linear_value_head_dim"]
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(tokens, hk, dk, generator=gen).bfloat16() for _ in range(2))
    v = torch.randn(tokens, hv, dv, generator=gen).bfloat16()
    g, beta = -torch.rand(tokens, hv, generator=gen) / 4, torch.rand(tokens, hv, generator=gen).bfloat16()
    forms = {"native": lambda: native_chunked_varlen(q, k, v, g, beta, [0, tokens]),
             "torch_form": lambda: chunk_gated_delta_rule_varlen(q, k, v, g, beta, [0, tokens])}
    if with_transformers:
        from transformers.models.qwen3_next import modeling_qwen3_next as hf_next

        group = hv // hk  # transformers repeats the key heads before the call
        hq, hkk = (x.repeat_interleave(group, dim=1)[None] for x in (q, k))
        forms["transformers"] = lambda: hf_next.torch_chunk_gated_delta_rule(
            hq, hkk, v[None], g=g[None], beta=beta[None], chunk_size=64, initial_state=None,
            output_final_state=True, use_qk_l2norm_in_kernel=True)
    times: dict[str, list[float]] = {name: [] for name in forms}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, form in forms.items():
                start = time.perf_counter()
                form()
                times[name].append((time.perf_counter() - start) * 1e3)
    # Per chunk of C tokens and head, the products (k k^T, q k^T, the substitution, w S, q S, p u, k^T u): about
    # C^2 (Dk + (Dv + Dk) / 2 + Dv / 2) + 3 C Dk Dv multiply-adds; the torch forms' chunks are 64 tokens.
    chunks = {"native": NATIVE_CHUNK_TOKENS, "torch_form": 64, "transformers": 64}
    result: dict[str, Any] = {"tokens": tokens, "heads": [hk, hv], "head_dims": [dk, dv], "chunk_tokens": chunks}
    for name, values in times.items():
        c, ms = chunks[name], statistics.median(values)
        flop = 2 * hv * (tokens / c) * (c * c * (dk + (dv + dk) / 2 + dv / 2) + 3 * c * dk * dv)
        result[name] = {"ms": ms, "rounds_ms": values, "gflops": flop / ms / 1e6}
    for name in ("torch_form", "transformers"):
        if name in result:
            result[f"native_speedup_over_{name}"] = result[name]["ms"] / result["native"]["ms"]
    return result


def memory_per_sequence(config: dict, dtype: torch.dtype, context: int) -> dict[str, int]:
    model = build_model(config, "meta")
    kv = model.kv_cache_spec().bytes_per_token(dtype) * context
    state = model.state_bytes_per_slot(dtype) if hasattr(model, "state_bytes_per_slot") else 0
    return {"kv_bytes": kv, "state_bytes": state, "total_bytes": kv + state}


def main() -> None:
    parser = argparse.ArgumentParser(description="Qwen3-Next vs transformers")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of both sides (medians)")
    parser.add_argument("--prefill-tokens", type=int, default=1024, help="tokens of the chunked-rule case")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--name", default="qwen3-next-80b-a3b-4l", help="benchmarks/out/next-NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(threads())
    rng = random.Random(0)
    next_cfg = SHAPES["qwen3-next-80b-a3b-4l"]
    moe_cfg = dict(SHAPES["qwen3-30b-a3b-4l"], hidden_size=next_cfg["hidden_size"], num_hidden_layers=next_cfg["num_hidden_layers"])
    results: dict[str, Any] = {"model": "qwen3-next-80b-a3b-4l", "memory_per_sequence": {}}
    for ctx in (4096, 32768):
        results["memory_per_sequence"][ctx] = {
            "qwen3_next": memory_per_sequence(next_cfg, torch.bfloat16, ctx),
            "qwen3_moe_same_width": memory_per_sequence(moe_cfg, torch.bfloat16, ctx),
        }
    print("memory", results["memory_per_sequence"], flush=True)
    results["chunked_rule"] = chunked_rule_rates(next_cfg, args.prefill_tokens, max(args.rounds, 5),
                                                 not args.no_transformers)
    print("chunked_rule", results["chunked_rule"], flush=True)
    model = load_model(args.model_dir, dtype=torch.bfloat16)
    vocab = model.args.vocab_size
    cases = {"single_stream": [random_prompt(rng, 32, vocab)],
             "concurrent_32": [random_prompt(rng, 32, vocab) for _ in range(32)]}
    ours_decode_rate(model, cases["single_stream"], 3)  # warm-up
    hf = None
    if not args.no_transformers:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16).eval()
        hf_generate(hf, cases["single_stream"], 2)
    # Both models stay loaded and the cases alternate, round by round, so a slow minute of a shared machine
    # falls on both sides alike; medians of the rounds.
    rounds: dict[str, dict[str, list[float]]] = {key: {"ours": [], "transformers": []} for key in cases}
    for r in range(args.rounds):
        for key, prompts in cases.items():
            rounds[key]["ours"].append(ours_decode_rate(model, prompts, args.new_tokens))
            if hf is not None:
                rounds[key]["transformers"].append(hf_decode_rate(hf, prompts, args.new_tokens))
            print(r, key, {side: round(v[-1], 2) for side, v in rounds[key].items() if v}, flush=True)
    for key, sides in rounds.items():
        entry: dict[str, Any] = {"ours_tok_s": statistics.median(sides["ours"]), "rounds": sides}
        if sides["transformers"]:
            entry["transformers_tok_s"] = statistics.median(sides["transformers"])
            entry["ratio"] = entry["ours_tok_s"] / entry["transformers_tok_s"]
        results[key] = entry
    print(results, flush=True)
    print(save(f"next-{args.name}", results))


if __name__ == "__main__":
    main()
