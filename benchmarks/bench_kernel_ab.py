"""The tile-packed linear kernel of this tree against the one of another git revision, in one process.

On a VM shared with other work the read bandwidth moves by 2x within minutes, so two processes run one
after the other compare the minutes more than the kernels. This script builds the other revision's
linear_tiled_cpu.cpp under a second op namespace (qwenstack_base), loads both, and alternates them round by
round on the same weights:
- the 113 one-row products of a Qwen3-0.6B-shaped decode step (28 layers' qkv, o, gate_up, down and the
  tied 151936-row head), as GB/s of weights read;
- with --model, single-stream decode of that checkpoint through the engine, each round switching the op
  the tiled linears call.

    python benchmarks/bench_kernel_ab.py --base HEAD~1 --rows 1,2 --rounds 12
    python benchmarks/bench_kernel_ab.py --base HEAD~1 --model /tmp/bench/qwen3-0.6b --rounds 8
"""
from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import threads  # noqa: E402

from qwenstack import kernels  # noqa: E402
from qwenstack.kernels.build import _ISA_FLAGS, isa_level  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = "qwenstack/kernels"
SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]  # qkv, o, gate_up, down
LAYERS, HEAD_ROWS = 28, 151936

Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build_base(revision: str) -> Op:
    """The revision's linear_tiled as torch.ops.qwenstack_base.linear_tiled (its headers from the same
    revision)."""
    work = Path(tempfile.mkdtemp(prefix="kernel-ab-"))
    for name in ("linear_tiled_cpu.cpp", "cpu_vec.h", "cpu_amx.h"):
        text = subprocess.run(["git", "show", f"{revision}:{KERNEL_DIR}/{name}"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout
        if name.endswith(".cpp"):
            text = text.replace("STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m)",
                                "STABLE_TORCH_LIBRARY(qwenstack_base, m)")
            text = text.replace("STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m)",
                                "STABLE_TORCH_LIBRARY_IMPL(qwenstack_base, CPU, m)")
        (work / name).write_text(text)
    from torch.utils import cpp_extension

    commit = subprocess.run(["git", "rev-parse", "--short", revision], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout.strip()
    cpp_extension.load(name=f"qwenstack_ab_{commit}_{isa_level()}", sources=[str(work / "linear_tiled_cpu.cpp")],
                       extra_cflags=["-O3", *_ISA_FLAGS.get(isa_level(), [])], is_python_module=False)
    return torch.ops.qwenstack_base.linear_tiled


def alternate(ops: dict[str, Op], rounds: int, measure: Callable[[Op], float]) -> dict[str, list[float]]:
    """measure(op) for each op in every round, the order flipped every other round."""
    results: dict[str, list[float]] = {name: [] for name in ops}
    names = list(ops)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(measure(ops[name]))
    return results


def report(what: str, unit: str, results: dict[str, list[float]]) -> None:
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, values in results.items():
        print(f"{what} {name:>4}: median {medians[name]:.2f} {unit}  ({' '.join(f'{v:.1f}' for v in values)})")
    print(f"{what}: this tree / base = {medians['this'] / medians['base']:.2f}")


def sweep_rates(ops: dict[str, Op], rows: int, rounds: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    mats = [kernels.pack_tiles(torch.randn(n, k, dtype=torch.bfloat16) * 0.02)
            for _ in range(LAYERS) for n, k in SHAPES]
    mats.append(kernels.pack_tiles(torch.randn(HEAD_ROWS, 1024, dtype=torch.bfloat16) * 0.02))
    nbytes = sum(m.numel() * m.element_size() for m in mats)
    xs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for _, k in SHAPES}
    for m in mats[:4]:
        x = xs[m.shape[1] * kernels.TILE_K]
        assert torch.equal(ops["base"](x, m), ops["this"](x, m)), "the two kernels disagree"

    def rate(op: Op) -> float:
        start = time.perf_counter()
        for m in mats:
            op(xs[m.shape[1] * kernels.TILE_K], m)
        return nbytes / (time.perf_counter() - start) / 1e9

    for op in ops.values():
        rate(op)  # warm up
    return alternate(ops, rounds, rate)


def decode_rates(ops: dict[str, Op], model_dir: Path, rounds: int, tokens: int) -> dict[str, list[float]]:
    import bench_engine

    from qwenstack.loading import load_model

    model = load_model(model_dir, dtype=torch.bfloat16)
    prompt = bench_engine.random_prompt(random.Random(0), 16, model.args.vocab_size)
    bench_engine.ours_decode(model, prompt, 4)  # warm up; prepares the tiled form
    original = kernels.linear_tiled

    def rate(op: Op) -> float:
        kernels.linear_tiled = op  # what models/cpu_linear.py calls
        try:
            return bench_engine.ours_decode(model, prompt, tokens)
        finally:
            kernels.linear_tiled = original

    return alternate(ops, rounds, rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision whose kernel is the baseline")
    parser.add_argument("--rows", default="1,2", help="activation rows of the product sweep (empty: none)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--model", type=Path, help="also A/B single-stream decode of this checkpoint")
    parser.add_argument("--decode-tokens", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(threads())
    if kernels.native_op("linear_tiled") is None:
        raise SystemExit("the native kernels do not build here")
    ops = {"base": build_base(args.base), "this": kernels.linear_tiled}
    print(f"{threads()} threads, ISA level {isa_level()}, base {args.base}")
    for rows in [int(r) for r in args.rows.split(",") if r]:
        report(f"{rows}-row products", "GB/s", sweep_rates(ops, rows, args.rounds))
    if args.model:
        report("single-stream decode", "tok/s", decode_rates(ops, args.model, args.rounds, args.decode_tokens))


if __name__ == "__main__":
    main()
