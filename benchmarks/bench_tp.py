"""Tensor parallelism on this machine: TP=2 against TP=1 on the same random checkpoint, rounds interleaved.

    python benchmarks/bench_tp.py --shape qwen3-0.6b --rounds 3
    python benchmarks/bench_tp.py --shape qwen3-30b-a3b-4l --rounds 2

Builds the checkpoint of a published shape (benchmarks/shapes.py, random bfloat16 weights, the demo model's
tokenizer) in --work-dir unless it is there. Each round starts a TP=1 engine, measures, closes it, then the
same for TP=2 (two ranks over gloo on this machine: the driver and one spawned worker), so both see the same
moment of a shared machine; the figures are the medians over rounds.
- decode: single-stream tokens/s after the first token (steps timed one by one), and the driver's time in
  collectives per decode step (ParallelGroup.stats: 2 all-reduces per layer, the embedding's, the logits
  all-gather and the step broadcast);
- throughput: a small offline mix (8 requests, prompts 16-96 tokens, outputs 16-48, fixed seed) in one batch.
TP=2 shares the cores: start_parallel gives each rank half of torch's threads, so on two cores each rank
computes on one core and waits for the other at every all-reduce. TP on one machine only pays when the
ranks have their own memory bandwidth; here it measures the communication, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, threads  # noqa: E402
from make_checkpoint import write_random_checkpoint  # noqa: E402
from shapes import SHAPES  # noqa: E402

from qwenstack.distributed.config import ParallelConfig  # noqa: E402
from qwenstack.distributed.executor import start_parallel  # noqa: E402
from qwenstack.distributed.worker import ModelSource  # noqa: E402
from qwenstack.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from qwenstack.engine.params import SamplingParams  # noqa: E402
from qwenstack.loading import load  # noqa: E402

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "qwenstack" / "assets" / "demo-model"
KV_CACHE_MEMORY = 256 * 2**20  # per rank; far more than the mix needs


@dataclass
class Round:
    tp: int
    threads: int  # torch threads per rank
    decode_tok_s: float
    comm_ms_per_decode_step: float
    collectives_per_decode_step: float
    throughput_tok_s: float


def build(shape: str, work_dir: Path) -> Path:
    path = work_dir / f"{shape}-bf16"
    if not (path / "config.json").is_file():
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        write_random_checkpoint(SHAPES[shape], path, torch.bfloat16, 600 * 2**20, tokenizer_from=DEMO_TOKENIZER)
    return path


def engine_for(path: Path, tp: int) -> tuple[LLMEngine, object | None]:
    config = EngineConfig(kv_cache_memory=KV_CACHE_MEMORY, max_num_seqs=16)
    if tp == 1:
        loaded = load(str(path), dtype="bfloat16", device="cpu")
        return LLMEngine(loaded.model, loaded.tokenizer, [], config), None
    loaded, executor = start_parallel(ModelSource(str(path), dtype="bfloat16"), ParallelConfig(tensor_parallel_size=tp))
    return LLMEngine(loaded.model, loaded.tokenizer, [], config, runner_factory=executor.make_runner), executor


def measure(path: Path, tp: int, decode_prompt: list[int], new_tokens: int, mix: list[tuple[list[int], int]],
            num_threads: int) -> Round:
    # start_parallel divides the threads it finds among the ranks (and leaves the driver at its share).
    torch.set_num_threads(num_threads * tp)
    engine, executor = engine_for(path, tp)
    stats = executor.group.stats if executor is not None else None  # type: ignore[attr-defined]
    try:
        engine.generate_all([decode_prompt[:8]], [SamplingParams(temperature=0, max_tokens=2)])  # warm up
        engine.add_request("decode", decode_prompt, SamplingParams(temperature=0, max_tokens=new_tokens,
                                                                   ignore_eos=True))
        engine.step()  # prefill and the first token: not part of decode
        seconds0, calls0 = (stats.seconds, stats.calls) if stats else (0.0, 0)
        start, steps = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        decode = steps / (time.perf_counter() - start)
        comm_ms = (stats.seconds - seconds0) * 1e3 / steps if stats else 0.0
        calls = (stats.calls - calls0) / steps if stats else 0.0
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in mix]
        start = time.perf_counter()
        results = engine.generate_all([p for p, _ in mix], params)
        throughput = sum(len(r.outputs[0].token_ids) for r in results) / (time.perf_counter() - start)
    finally:
        engine.close()
    return Round(tp, num_threads, decode, comm_ms, calls, throughput)


def main() -> None:
    parser = argparse.ArgumentParser(description="TP=2 against TP=1 on this machine")
    parser.add_argument("--shape", choices=("qwen3-0.6b", "qwen3-30b-a3b-4l"), default="qwen3-0.6b")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench"))
    args = parser.parse_args()
    torch.set_num_threads(threads())
    path = build(args.shape, args.work_dir)
    rng = random.Random(0)
    vocab = min(SHAPES[args.shape]["vocab_size"], 100000)
    decode_prompt = [rng.randrange(1000, vocab) for _ in range(16)]
    mix = [([rng.randrange(1000, vocab) for _ in range(rng.randint(16, 96))], rng.randint(16, 48)) for _ in range(8)]
    rounds: list[Round] = []
    # TP=1 on both cores, TP=1 on one core (what each TP=2 rank gets), TP=2 with one core per rank.
    variants = [(1, threads()), (1, 1), (2, max(1, threads() // 2))]
    for r in range(args.rounds):
        for tp, n in variants:  # interleaved: each round sees all three in the same minute of a shared machine
            rounds.append(measure(path, tp, decode_prompt, args.new_tokens, mix, n))
            print(json.dumps(asdict(rounds[-1])), file=sys.stderr, flush=True)

    def median(tp: int, n: int, key: str) -> float:
        return statistics.median(getattr(x, key) for x in rounds if (x.tp, x.threads) == (tp, n))

    keys = ("decode_tok_s", "throughput_tok_s", "comm_ms_per_decode_step", "collectives_per_decode_step")
    summary: dict[str, dict[str, float] | float] = {
        key: {f"tp{tp}x{n}threads": median(tp, n, key) for tp, n in variants} for key in keys}
    tp2 = f"tp2x{variants[2][1]}threads"
    for base in (f"tp1x{variants[0][1]}threads", f"tp1x{variants[1][1]}threads"):
        summary[f"tp2_over_{base}"] = {k: summary[k][tp2] / summary[k][base]  # type: ignore[index]
                                       for k in ("decode_tok_s", "throughput_tok_s")}
    summary["comm_share_of_tp2_decode_step"] = (summary["comm_ms_per_decode_step"][tp2] / 1e3  # type: ignore[index]
                                                * summary["decode_tok_s"][tp2])  # type: ignore[index]
    out = save(f"tp-{args.shape}", {"shape": args.shape, "rounds": [asdict(x) for x in rounds], "summary": summary,
                                     "note": "machine shared with other engineers; medians of interleaved rounds",
                                     "threads": threads(), "machine_detail": machine()})
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
