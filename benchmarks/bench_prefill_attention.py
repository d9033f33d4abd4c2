"""Attention without a KV cache, the native kernel (qwenstack/kernels/dense_attention_cpu.cpp segment_attention)
against torch's SDPA on the same bfloat16 tensors, alternated round by round in one process, and against the
machine's attainable bfloat16 rate: a oneDNN GEMM of the vision tower's MLP shape timed in the same rounds.

Shapes: Qwen3-VL-2B's vision tower (16 heads of 64 over one 1024x1024 image's 4,096 patches, bidirectional;
the audio encoder's windows are the same op on short segments), and causal prompts of Qwen3-0.6B's and
Qwen3-VL-2B's text shape (16 query / 8 kv heads of 128) at 256, 1,061 (the VL prompt of one image) and 4,096
tokens. GFLOPS count the products a causal mask leaves (half the square).

    python benchmarks/bench_prefill_attention.py --name s13
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, save, threads  # noqa: E402

from qwenstack import kernels  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    q_heads: int
    kv_heads: int
    head_dim: int
    causal: bool

    @property
    def flops(self) -> float:
        square = 4 * self.q_heads * self.tokens * self.tokens * self.head_dim
        return square / 2 if self.causal else square


CASES = [
    Case("vision tower, 4096 patches", 4096, 16, 16, 64, False),
    Case("prompt, 256 tokens", 256, 16, 8, 128, True),
    Case("prompt, 1061 tokens", 1061, 16, 8, 128, True),
    Case("prompt, 4096 tokens", 4096, 16, 8, 128, True),
]


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(case: Case, rounds: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(case.tokens, case.q_heads, case.head_dim, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(case.tokens, case.kv_heads, case.head_dim, generator=g).to(torch.bfloat16) for _ in range(2))
    scale = case.head_dim ** -0.5
    gqa = case.q_heads != case.kv_heads
    repeats = max(1, int(2e10 / case.flops))  # ~0.1 s a measurement

    def native() -> torch.Tensor:
        out = kernels.segment_attention(q, k, v, [0, case.tokens], None, case.causal, scale)
        if out is None:
            raise SystemExit(f"segment_attention does not run here (kernel level {kernels.isa_level()})")
        return out

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                              v.transpose(0, 1)[None], is_causal=case.causal, scale=scale,
                                              enable_gqa=gqa)

    # The attainable bfloat16 rate: oneDNN's GEMM on the vision MLP's shape (4,096 x 1,024 x 4,096).
    a = torch.randn(4096, 1024, generator=g).to(torch.bfloat16)
    w = torch.randn(1024, 4096, generator=g).to(torch.bfloat16)

    def gemm() -> torch.Tensor:
        return a @ w

    def rate(fn: Callable[[], Any], flops: float) -> float:
        return flops / best_seconds(fn, repeats if fn is not gemm else 1) / 1e9

    gemm_flops = 2.0 * 4096 * 1024 * 4096
    runs = alternate({"native": native, "sdpa": sdpa, "gemm": gemm}, rounds,
                     lambda fn: rate(fn, gemm_flops if fn is gemm else case.flops))
    med = {name: statistics.median(values) for name, values in runs.items()}
    return {"case": case.__dict__, "gflops": med, "runs_gflops": runs,
            "native_vs_sdpa": med["native"] / med["sdpa"],
            "round_ratios": [n / s for n, s in zip(runs["native"], runs["sdpa"])],
            "native_of_gemm": med["native"] / med["gemm"], "sdpa_of_gemm": med["sdpa"] / med["gemm"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(threads())
    results: dict[str, Any] = {"kind": "prefill_attention", "rounds": args.rounds, "isa": kernels.isa_level(),
                               "cases": []}
    for case in CASES:
        r = measure(case, args.rounds)
        results["cases"].append(r)
        g = r["gflops"]
        print(f"{case.name}: native {g['native']:.0f} GFLOPS, SDPA {g['sdpa']:.0f}, ratio {r['native_vs_sdpa']:.2f}x "
              f"(rounds {' '.join(f'{x:.2f}' for x in r['round_ratios'])}); GEMM {g['gemm']:.0f}: native "
              f"{r['native_of_gemm']:.0%} of it, SDPA {r['sdpa_of_gemm']:.0%}", flush=True)
    print(save(f"prefill-attention-{args.name}", results))


if __name__ == "__main__":
    main()
