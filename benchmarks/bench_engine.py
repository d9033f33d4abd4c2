"""Engine against transformers on the same checkpoint and machine, in one run.

    python benchmarks/make_checkpoint.py qwen3-0.6b /tmp/bench/qwen3-0.6b
    python benchmarks/bench_engine.py /tmp/bench/qwen3-0.6b --name qwen3-0.6b

Measures, each as a ratio against transformers 5.x generate on the same weights:
- single-stream decode tokens/s (and the fraction of the memory-bandwidth bound: weight bytes read per
  token against the read bandwidth measured in the same run), the median of --decode-rounds rounds of
  ours then transformers;
- prefill tokens/s for one prompt (--prefill-tokens, 256 by default), ours and transformers alternated in
  --prefill-rounds rounds, medians;
- offline throughput: 64 requests, prompts 32-512 tokens, outputs 32-256 (fixed seed), against
  transformers generate in padded batches of 16;
- short-output throughput (`short`): 32 requests, prompts 32-256 tokens, outputs 16-64 (seed 0), against
  transformers in padded batches of 16: a mix where prefill and admission weigh as much as decode; both
  mixes run --mix-rounds rounds of ours then transformers (medians, and each round's ratio);
- batched decode (`batched`): 16, 32, 64 and 128 sequences of 128-token prompts decoding together, tokens/s
  from the median decode-only step, against the weight-read roof (read bandwidth / weight bytes per step x
  sequences: every step reads the weights once whatever the batch), and against the roof with the KV
  cache read as well; plus 64 sequences sampled at temperature 1 and at Qwen3's defaults (t 0.6, top-k 20,
  top-p 0.95);
- shared prefix: 16 requests sharing a 1,024-token system prompt, time to first token of the later
  requests against the first's (ours only: it is a property of the prefix cache);
- a conversation's next turn (`turn`): time to first token of --turn-new new tokens after a --turn-history
  token history served before, ours from the prefix cache against transformers keeping the history's KV
  cache (a DynamicCache, filled outside the clock), alternated in --turn-rounds rounds, medians.
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
from common import alternate, product_rate, read_bandwidth, save, threads, timed  # noqa: E402

from qwenstack.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from qwenstack.engine.params import KV_CACHE_DTYPES, SamplingParams  # noqa: E402
from qwenstack.engine.runner import kv_cache_dtype  # noqa: E402
from qwenstack.models.registry import load_model  # noqa: E402


class IdDecoder:
    """Benchmarks work on token ids; text is not needed."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return ""


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every matrix except the embedding table (a row lookup),
    counting a tied embedding once, as the lm_head; MoE experts count only the top-k active ones."""
    total = 0
    args = model.args
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight") and not getattr(args, "tie_word_embeddings", False):
            continue
        if ".experts." in name:
            total += p.numel() * p.element_size() * args.num_experts_per_tok // args.num_experts
            continue
        total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    return model.kv_cache_spec().bytes_per_token(kv_cache_dtype(KV_CACHE_DTYPE, next(model.parameters()).dtype))


KV_CACHE_MEMORY = 3 * 2**30  # bytes; --kv-cache-gib
KV_CACHE_DTYPE = "auto"  # --kv-cache-dtype: our engines' (transformers keeps its own cache)


def make_engine(model: torch.nn.Module, **options: Any) -> LLMEngine:
    config = EngineConfig(kv_cache_memory=options.pop("kv_cache_memory", KV_CACHE_MEMORY),
                          kv_cache_dtype=KV_CACHE_DTYPE, **options)
    return LLMEngine(model, IdDecoder(), [], config)


def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(1000, min(vocab, 100000)) for _ in range(n)]


# --- ours ---------------------------------------------------------------------------------------------

def engine_mix(rng: random.Random, vocab: int, requests: int = 64) -> tuple[list[list[int]], list[int]]:
    """The throughput mix: prompts of 32-512 tokens, outputs of 32-256 (from `rng`, which earlier parts of a run
    also draw from)."""
    prompts = [random_prompt(rng, rng.randint(32, 512), vocab) for _ in range(requests)]
    return prompts, [rng.randint(32, 256) for _ in range(requests)]


def short_mix(vocab: int) -> tuple[list[list[int]], list[int]]:
    """The short-output mix: 32 requests, prompts of 32-256 tokens, outputs of 16-64, from its own seed (the
    mix does not depend on which other parts ran)."""
    rng = random.Random(0)
    prompts = [random_prompt(rng, rng.randint(32, 256), vocab) for _ in range(32)]
    return prompts, [rng.randint(16, 64) for _ in range(32)]


def ours_decode(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> float:
    engine = make_engine(model)
    engine.add_request("d", prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    times = []
    while engine.has_unfinished_requests():
        engine.step()
        times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])  # tokens/s after the first


def ours_prefill(engine: LLMEngine, prompt: list[int]) -> float:
    """Prompt tokens/s of one prompt and its first token, on an engine that has served before (a server's
    steady state: a fresh engine's first prefill also pays the first touch of its cache pages)."""
    _, seconds = timed(lambda: engine.generate_all([prompt], [SamplingParams(temperature=0, max_tokens=1)]))
    return len(prompt) / seconds


def ours_throughput(model: torch.nn.Module, prompts: list[list[int]], outputs: list[int]) -> float:
    engine = make_engine(model, max_num_seqs=64)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs]
    results, seconds = timed(lambda: engine.generate_all(prompts, params))
    return sum(len(r.outputs[0].token_ids) for r in results) / seconds


# Sampling settings of the batched cases: greedy, and two that clients send.
GREEDY: dict[str, float] = {"temperature": 0.0}
SAMPLED = {"temperature 1": {"temperature": 1.0},  # the OpenAI API's default
           "qwen3 defaults": {"temperature": 0.6, "top_k": 20, "top_p": 0.95}}  # Qwen3's generation_config


def ours_batched_decode(model: torch.nn.Module, prompts: list[list[int]], steps: int,
                        sampling: dict[str, float] = GREEDY) -> dict[str, float]:
    """Tokens/s of decode-only steps with every prompt decoding together (prefill steps are not timed)."""
    batch = len(prompts)
    engine = make_engine(model, max_num_seqs=batch, max_num_batched_tokens=4096)
    params = SamplingParams(max_tokens=steps + 3, ignore_eos=True, **sampling)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    while engine.counters.generation_tokens < batch:  # prefill everyone (the first token comes with it)
        engine.step()
    times, cpu_times = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        engine.step()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    engine.close()
    step = statistics.median(times)
    # CPU seconds over the threads: what the step costs when the cores are ours alone (a shared VM's wall
    # clock counts other work's time slices too).
    cpu_step = statistics.median(cpu_times) / torch.get_num_threads()
    return {"sequences": batch, "step_ms": step * 1e3, "ours_tok_s": batch / step,
            "cpu_step_ms": cpu_step * 1e3, "ours_cpu_tok_s": batch / cpu_step}


def ours_shared_prefix(model: torch.nn.Module, system: list[int], questions: list[list[int]]) -> dict[str, float]:
    engine = make_engine(model)
    ttft = []
    for q in questions:  # one after another, as users arriving over time
        t = time.perf_counter()
        engine.generate_all([system + q], [SamplingParams(temperature=0, max_tokens=1)])
        ttft.append(time.perf_counter() - t)
    later = statistics.median(ttft[1:])
    return {"first_ttft_s": ttft[0], "later_ttft_median_s": later, "later_over_first": later / ttft[0]}


def ours_turn(engine: LLMEngine, history: list[int], new: list[int]) -> float:
    """Seconds to the first token of a conversation's next turn: the history was served before (so the prefix
    cache holds it) and the turn adds `new` tokens. The history is served outside the clock."""
    engine.generate_all([history], [SamplingParams(temperature=0, max_tokens=1)])
    _, seconds = timed(lambda: engine.generate_all([history + new], [SamplingParams(temperature=0, max_tokens=1)]))
    return seconds


# --- transformers ---------------------------------------------------------------------------------

def hf_generate(hf: Any, batch: list[list[int]], new_tokens: int) -> Any:
    width = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])  # left padding, as for generation
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    with torch.inference_mode():
        return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0, eos_token_id=None)


def hf_decode(hf: Any, prompt: list[int], new_tokens: int) -> float:
    _, one = timed(lambda: hf_generate(hf, [prompt], 1))
    _, full = timed(lambda: hf_generate(hf, [prompt], new_tokens))
    return (new_tokens - 1) / (full - one)


def hf_prefill(hf: Any, prompt: list[int]) -> float:
    _, seconds = timed(lambda: hf_generate(hf, [prompt], 1))
    return len(prompt) / seconds


def hf_turn(hf: Any, history: list[int], new: list[int]) -> float:
    """The same next turn for transformers keeping the conversation's KV cache (a DynamicCache filled by the
    history outside the clock): one forward of the new tokens over it and the argmax of the last logits."""
    with torch.inference_mode():
        cache = hf(input_ids=torch.tensor([history]), use_cache=True).past_key_values

        def turn() -> int:
            logits = hf(input_ids=torch.tensor([new]), past_key_values=cache, use_cache=True).logits
            return int(logits[0, -1].argmax())

        _, seconds = timed(turn)
    return seconds


def hf_throughput(hf: Any, prompts: list[list[int]], outputs: list[int], batch_size: int = 16) -> float:
    start = time.perf_counter()
    useful = 0
    for i in range(0, len(prompts), batch_size):
        chunk, wanted = prompts[i:i + batch_size], outputs[i:i + batch_size]
        hf_generate(hf, chunk, max(wanted))  # a static batch runs until its longest request is done
        useful += sum(wanted)
    return useful / (time.perf_counter() - start)


def mix_rounds(model: torch.nn.Module, hf: Any, prompts: list[list[int]], outputs: list[int],
               rounds: int) -> dict[str, Any]:
    """Offline throughput of one request mix: `rounds` rounds of ours then transformers (this VM's speed
    drifts within minutes, so each round's pair shares its minute), medians, and each round's ratio."""
    ours_runs, their_runs = [], []
    for _ in range(rounds):
        ours_runs.append(ours_throughput(model, prompts, outputs))
        if hf is not None:
            their_runs.append(hf_throughput(hf, prompts, outputs))
    mix: dict[str, Any] = {"requests": len(prompts), "output_tokens": sum(outputs),
                           "ours_tok_s": statistics.median(ours_runs), "ours_runs_tok_s": ours_runs}
    if hf is not None:
        theirs = statistics.median(their_runs)
        mix.update(transformers_tok_s=theirs, transformers_runs_tok_s=their_runs, ratio=mix["ours_tok_s"] / theirs,
                   round_ratios=[o / t for o, t in zip(ours_runs, their_runs)])
    return mix


def main() -> None:
    parser = argparse.ArgumentParser(description="engine vs transformers")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--only", default="decode,prefill,throughput,prefix",
                        help="comma-separated: decode, prefill, throughput, short, batched, prefix, turn")
    parser.add_argument("--batched-sizes", default="16,32,64,128")
    parser.add_argument("--batched-steps", type=int, default=8, help="decode steps timed per batch size")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--decode-rounds", type=int, default=3, help="decode timed in this many rounds, medians")
    parser.add_argument("--mix-rounds", type=int, default=1,
                        help="each throughput mix run in this many rounds of ours then transformers, medians")
    parser.add_argument("--prefill-tokens", type=int, default=256, help="prompt length of the prefill case")
    parser.add_argument("--prefill-rounds", type=int, default=3,
                        help="prefill timed in this many rounds, ours and transformers alternated, medians")
    parser.add_argument("--turn-history", type=int, default=2000, help="tokens of history before the next turn")
    parser.add_argument("--turn-new", default="30,64", help="new tokens of the next turn (comma-separated cases)")
    parser.add_argument("--turn-rounds", type=int, default=3)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--kv-cache-gib", type=float, default=3.0)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="our engines' KV cache (fp8: float8_e5m2); the roofs count its bytes")
    args = parser.parse_args()
    torch.set_num_threads(threads())
    only = set(args.only.split(","))
    model = load_model(args.model_dir, dtype=torch.bfloat16)
    global KV_CACHE_MEMORY, KV_CACHE_DTYPE
    KV_CACHE_MEMORY = int(args.kv_cache_gib * 2**30)
    KV_CACHE_DTYPE = args.kv_cache_dtype
    hf = None
    if not args.no_transformers:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16).eval()
    vocab = model.args.vocab_size
    rng = random.Random(0)
    results: dict[str, Any] = {"model": args.name, "weight_bytes_per_token": weight_bytes_per_token(model)}
    if "decode" in only:
        bandwidth = read_bandwidth()
        prompt = random_prompt(rng, 16, vocab)
        ours_decode(model, prompt, 4)  # warm up
        if hf is not None:
            hf_decode(hf, prompt, 4)
        # Rounds of ours then transformers, medians reported: this VM's bandwidth drifts within minutes.
        ours_runs, their_runs = [], []
        for _ in range(args.decode_rounds):
            ours_runs.append(ours_decode(model, prompt, args.decode_tokens))
            if hf is not None:
                their_runs.append(hf_decode(hf, prompt, args.decode_tokens))
        ours = statistics.median(ours_runs)
        bound = bandwidth / results["weight_bytes_per_token"]
        results["decode"] = {"ours_tok_s": ours, "ours_runs_tok_s": ours_runs, "read_bandwidth_gb_s": bandwidth / 1e9,
                             "bound_tok_s": bound, "fraction_of_bound": ours / bound}
        if hf is not None:
            theirs = statistics.median(their_runs)
            results["decode"].update(transformers_tok_s=theirs, transformers_runs_tok_s=their_runs, ratio=ours / theirs)
        print("decode", results["decode"], flush=True)
    if "prefill" in only:
        prompt = random_prompt(rng, args.prefill_tokens, vocab)
        engine = make_engine(model, enable_prefix_caching=False)  # nothing of the prompt is cached between rounds
        sides = {"ours": lambda: ours_prefill(engine, prompt)}
        ours_prefill(engine, prompt)
        if hf is not None:
            hf_prefill(hf, prompt)  # both sides warmed up on the full prompt
            sides["transformers"] = lambda: hf_prefill(hf, prompt)
        runs = alternate(sides, args.prefill_rounds, lambda side: side())
        results["prefill"] = {"prompt_tokens": args.prefill_tokens, "ours_tok_s": statistics.median(runs["ours"]),
                              "ours_runs_tok_s": runs["ours"]}
        if hf is not None:
            theirs = statistics.median(runs["transformers"])
            results["prefill"].update(transformers_tok_s=theirs, transformers_runs_tok_s=runs["transformers"],
                                      ratio=results["prefill"]["ours_tok_s"] / theirs,
                                      round_ratios=[o / t for o, t in zip(runs["ours"], runs["transformers"])])
        print("prefill", results["prefill"], flush=True)
    if "turn" in only:  # a conversation's next turn: TTFT with the history in the prefix cache / kept KV cache
        engine = make_engine(model)
        results["turn"] = []
        for new_tokens in [int(n) for n in args.turn_new.split(",")]:
            def case(side: Callable[[list[int], list[int]], float]) -> float:
                history = random_prompt(rng, args.turn_history, vocab)  # a new conversation each round
                return side(history, random_prompt(rng, new_tokens, vocab))

            sides: dict[str, Callable[[list[int], list[int]], float]] = {"ours": lambda h, n: ours_turn(engine, h, n)}
            if hf is not None:
                sides["transformers"] = lambda h, n: hf_turn(hf, h, n)
            for side in sides.values():
                case(side)  # warm up
            runs = alternate(sides, args.turn_rounds, case)
            row: dict[str, Any] = {"history_tokens": args.turn_history, "new_tokens": new_tokens,
                                   "ours_ttft_s": statistics.median(runs["ours"]), "ours_runs_s": runs["ours"]}
            if hf is not None:
                theirs = statistics.median(runs["transformers"])
                row.update(transformers_ttft_s=theirs, transformers_runs_s=runs["transformers"],
                           ours_over_transformers=row["ours_ttft_s"] / theirs)
            results["turn"].append(row)
            print("turn", row, flush=True)
    if "throughput" in only:
        prompts, outputs = engine_mix(rng, vocab, args.requests)
        results["throughput"] = mix_rounds(model, hf, prompts, outputs, args.mix_rounds)
        print("throughput", results["throughput"], flush=True)
    if "short" in only:
        prompts, outputs = short_mix(vocab)
        results["short_throughput"] = mix_rounds(model, hf, prompts, outputs, args.mix_rounds)
        print("short_throughput", results["short_throughput"], flush=True)
    if "batched" in only:
        bandwidth, rate = read_bandwidth(), product_rate()
        per_step = results["weight_bytes_per_token"]
        batched_rng = random.Random(0)
        ours_batched_decode(model, [random_prompt(batched_rng, 32, vocab) for _ in range(4)], 2)  # warm up
        rows = []
        for batch in (int(b) for b in args.batched_sizes.split(",")):
            row = ours_batched_decode(model, [random_prompt(batched_rng, 128, vocab) for _ in range(batch)],
                                      args.batched_steps)
            roof = bandwidth / per_step * batch
            # What the step must also read: every sequence's KV cache (128-token prompts, a few new tokens).
            # At 64 sequences it is as many bytes as the weights, so the weight-read roof is not reachable.
            kv_read = batch * (128 + args.batched_steps // 2) * kv_bytes_per_token(model)
            roof_kv = bandwidth / (per_step + kv_read) * batch
            # And what the products cost at the matrix units' best rate (2 FLOP per weight and row; bf16 weights
            # are 2 bytes each), when that exceeds their read: the step's floor from compute plus the KV read.
            products_s = max(per_step / bandwidth, per_step * batch / rate)
            compute_roof = batch / (products_s + kv_read / bandwidth)
            row.update(roof_tok_s=roof, fraction_of_roof=row["ours_tok_s"] / roof,
                       fraction_of_roof_cpu=row["ours_cpu_tok_s"] / roof, roof_with_kv_tok_s=roof_kv,
                       fraction_of_roof_with_kv=row["ours_tok_s"] / roof_kv,
                       roof_with_compute_tok_s=compute_roof, fraction_of_roof_with_compute=row["ours_tok_s"] / compute_roof)
            rows.append(row)
            print("batched_decode", row, flush=True)
        # The same at 64 sequences sampling (SAMPLED): 152K-wide rows to draw from, where greedy takes an argmax.
        sampled = {}
        for name, sampling in SAMPLED.items():
            sampled[name] = ours_batched_decode(model, [random_prompt(batched_rng, 128, vocab) for _ in range(64)],
                                                args.batched_steps, sampling)
            print("batched_decode sampled", name, sampled[name], flush=True)
        results["batched_decode"] = {"read_bandwidth_gb_s": bandwidth / 1e9, "product_tflop_s": rate / 1e12,
                                     "rows": rows, "sampled_64": sampled}
    if "prefix" in only:
        system = random_prompt(rng, 1024, vocab)
        questions = [random_prompt(rng, rng.randint(8, 32), vocab) for _ in range(16)]
        results["shared_prefix"] = ours_shared_prefix(model, system, questions)
        print("shared_prefix", results["shared_prefix"], flush=True)
    print(save(f"engine-{args.name}", results))


if __name__ == "__main__":
    main()
