"""The sampler of this tree against another git revision's and against transformers' sampling, in one process.

A sampled decode step turns [rows, 151,936] logits into one token a row. This times that step alone, on the
same bfloat16 logits (the lm_head's output), for the settings clients send: temperature only (the OpenAI
API's default), Qwen3's recommended temperature 0.6 / top-k 20 / top-p 0.95, top-p alone, min-p; unseeded
and seeded rows. Two kinds of logits: `flat` (normal, standard deviation 3: a random model's, whose top-p
nucleus holds hundreds of tokens) and `peaked` (standard deviation 2 plus 32 tokens a row raised by 8 to 16:
a trained model's next token, a few candidates holding most of the mass). Peers, interleaved round by round:
- `base`: qwenstack/engine/sampler.py of --base (loaded from git as its own module);
- `transformers`: its generate()'s sampling for the same settings (TemperatureLogitsWarper, TopKLogitsWarper,
  TopPLogitsWarper, MinPLogitsWarper on float32 scores, softmax, torch.multinomial), batched over the rows.

    python benchmarks/bench_sampler.py --base HEAD~1 --rows 16,64 --rounds 7 --logits flat,peaked

Writes benchmarks/out/sampler-NAME.json: per case, the median wall and CPU milliseconds of each side and the
ratios (peer / this tree).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, threads  # noqa: E402

from qwenstack.engine import sampler as this_sampler  # noqa: E402
from qwenstack.engine.params import SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 151936
CASES: dict[str, dict[str, Any]] = {
    "temperature 1": dict(temperature=1.0),
    "qwen3 defaults (t 0.6, top-k 20, top-p 0.95)": dict(temperature=0.6, top_k=20, top_p=0.95),
    "top-p 0.8 (t 0.7)": dict(temperature=0.7, top_p=0.8),
    "min-p 0.05 (t 1)": dict(temperature=1.0, min_p=0.05),
}


def base_sampler(revision: str) -> ModuleType:
    """The revision's qwenstack/engine/sampler.py as a module of its own (it imports the rest from this tree)."""
    source = subprocess.run(["git", "show", f"{revision}:qwenstack/engine/sampler.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "base_sampler.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("base_sampler", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["base_sampler"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def transformers_sample(settings: dict[str, Any]) -> Callable[[torch.Tensor, torch.Generator], list[int]]:
    """transformers' sampling of generate() for these settings, over all rows at once."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(settings["temperature"])])
    if settings.get("top_k"):
        warpers.append(TopKLogitsWarper(settings["top_k"]))
    if settings.get("top_p", 1.0) < 1.0:
        warpers.append(TopPLogitsWarper(settings["top_p"]))
    if settings.get("min_p"):
        warpers.append(MinPLogitsWarper(settings["min_p"]))

    def sample(logits: torch.Tensor, generator: torch.Generator) -> list[int]:
        scores = warpers(None, logits.float())  # generate() takes the last position's logits in float32
        return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0].tolist()

    return sample


def qwenstack_sample(module: ModuleType, settings: dict[str, Any], rows: int,
                     seeded: bool) -> Callable[[torch.Tensor, torch.Generator], list[int]]:
    params = SamplingParams(max_tokens=16, seed=0 if seeded else None, **settings)

    def sample(logits: torch.Tensor, generator: torch.Generator) -> list[int]:
        requests = [module.SampleRequest(params, [1, 2, 3], [4, 5],
                                         torch.Generator().manual_seed(r) if seeded else None, [])
                    for r in range(rows)]
        return module.sample(logits, requests, generator)[0]

    return sample


def make_logits(kind: str, rows: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rows)
    if kind == "flat":
        return (torch.randn(rows, VOCAB, generator=generator) * 3).to(torch.bfloat16)
    logits = torch.randn(rows, VOCAB, generator=generator) * 2
    for row in logits:
        row[torch.randint(VOCAB, (32,), generator=generator)] += torch.rand(32, generator=generator) * 8 + 8
    return logits.to(torch.bfloat16)


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD~1")
    parser.add_argument("--name", default="s19")
    parser.add_argument("--rows", default="16,64")
    parser.add_argument("--logits", default="flat,peaked")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(threads())
    base = base_sampler(args.base)
    print(f"{torch.get_num_threads()} threads, base {args.base}", flush=True)
    results: list[dict[str, Any]] = []
    for kind, rows in [(k, int(r)) for k in args.logits.split(",") for r in args.rows.split(",")]:
        logits = make_logits(kind, rows)
        for case, settings in CASES.items():
            for seeded in (False, True):
                sides = {"this": qwenstack_sample(this_sampler, settings, rows, seeded),
                         "base": qwenstack_sample(base, settings, rows, seeded)}
                if not args.no_transformers and not seeded:
                    sides["transformers"] = transformers_sample(settings)
                times: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
                generator = torch.Generator().manual_seed(0)
                for side, fn in sides.items():  # warm-up
                    fn(logits, generator)
                order = list(sides)
                for round_ in range(args.rounds):
                    # Each side first in turn: a side's large frees let glibc hand memory back, and whoever
                    # runs next faults its pages in again.
                    for side in order[round_ % len(order):] + order[:round_ % len(order)]:
                        times[side].append(timed(lambda: sides[side](logits, generator)))
                row: dict[str, Any] = {"logits": kind, "rows": rows, "case": case, "seeded": seeded}
                for side, pairs in times.items():
                    row[f"{side}_wall_ms"] = statistics.median(w for w, _ in pairs)
                    row[f"{side}_cpu_ms"] = statistics.median(c for _, c in pairs)
                for side in sides:
                    if side != "this":
                        row[f"{side}_over_this_wall"] = row[f"{side}_wall_ms"] / row["this_wall_ms"]
                print(row, flush=True)
                results.append(row)
    print(f"wrote {save(f'sampler-{args.name}', {'base': args.base, 'rounds': args.rounds, 'cases': results})}")


if __name__ == "__main__":
    main()
