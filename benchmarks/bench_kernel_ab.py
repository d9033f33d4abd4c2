"""The tile-packed linear kernel of this tree against the one of another git revision, in one process.

On a VM shared with other work the read bandwidth moves by 2x within minutes, so two processes run one
after the other compare the minutes more than the kernels. This script builds the other revision's
linear_tiled_cpu.cpp (and, for decode, its decode_layer_cpu.cpp) under a second op namespace
(qwenstack_base), loads both, and alternates them round by round on the same weights:
- the 113 one-row products of a Qwen3-0.6B-shaped decode step (28 layers' qkv, o, gate_up, down and the
  tied 151936-row head), as GB/s of weights read;
- with --model, single-stream decode of that checkpoint through the engine, each round switching the ops the
  tiled linears and the one-call decode layers call;
- with --format int8 or int4, the same for those weights (linear_tiled_int8 / linear_tiled_int4; decode of
  the checkpoint quantized to that format).

    python benchmarks/bench_kernel_ab.py --base HEAD~1 --rows 1,2 --rounds 12
    python benchmarks/bench_kernel_ab.py --base HEAD~1 --rows 1,4 --rounds 12 --format int8
    python benchmarks/bench_kernel_ab.py --base HEAD~1 --model /tmp/bench/qwen3-0.6b --rounds 8 --format int4
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
from common import alternate, threads  # noqa: E402

from qwenstack import kernels  # noqa: E402
from qwenstack.kernels.build import _ISA_FLAGS, isa_level  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = "qwenstack/kernels"
SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]  # qkv, o, gate_up, down
LAYERS, HEAD_ROWS = 28, 151936

Op = Callable[..., torch.Tensor]  # linear_tiled(x, packed), linear_tiled_int8(x, packed, scales), ...
OP_OF_FORMAT = {"bfloat16": "linear_tiled", "int8": "linear_tiled_int8", "int4": "linear_tiled_int4"}
COLUMNS_PER_BLOCK = {"bfloat16": kernels.TILE_K, "int8": kernels.INT8_TILE_K, "int4": kernels.INT4_COLUMNS}


def build_base(revision: str, name: str, source: str = "linear_tiled_cpu.cpp") -> Op:
    """The revision's op `name` from its kernel file `source` (the files it includes from the same revision),
    built as torch.ops.qwenstack_base.<name>. Also used by bench_attention.py --base."""
    work = Path(tempfile.mkdtemp(prefix="kernel-ab-"))
    files = subprocess.run(["git", "ls-tree", "--name-only", f"{revision}:{KERNEL_DIR}"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for file in [f for f in files if f.endswith((".cpp", ".h"))]:
        text = subprocess.run(["git", "show", f"{revision}:{KERNEL_DIR}/{file}"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout
        if file.endswith(".cpp"):  # fragments: several base files may each register ops
            text = text.replace("STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m)",
                                "STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack_base, m)")
            text = text.replace("STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m)",
                                "STABLE_TORCH_LIBRARY_IMPL(qwenstack_base, CPU, m)")
        (work / file).write_text(text)
    from torch.utils import cpp_extension

    commit = subprocess.run(["git", "rev-parse", "--short", revision], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout.strip()
    cpp_extension.load(name=f"qwenstack_ab_{Path(source).stem}_{commit}_{isa_level()}", sources=[str(work / source)],
                       extra_cflags=["-O3", *_ISA_FLAGS.get(isa_level(), [])], is_python_module=False)
    return getattr(torch.ops.qwenstack_base, name)


def report(what: str, unit: str, results: dict[str, list[float]]) -> None:
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, values in results.items():
        print(f"{what} {name:>4}: median {medians[name]:.2f} {unit}  ({' '.join(f'{v:.1f}' for v in values)})")
    print(f"{what}: this tree / base = {medians['this'] / medians['base']:.2f}")


def packed_matrices(fmt: str) -> list[tuple[torch.Tensor, ...]]:
    """The 0.6B shape's 113 decode matrices in the kernel's layout: (packed,), (packed, scales) for int8,
    (packed, scale_zeros) for int4 in groups of 128."""
    torch.manual_seed(0)
    shapes = [shape for _ in range(LAYERS) for shape in SHAPES] + [(HEAD_ROWS, 1024)]
    if fmt == "bfloat16":
        return [(kernels.pack_tiles(torch.randn(n, k, dtype=torch.bfloat16) * 0.02),) for n, k in shapes]
    if fmt == "int8":
        return [(kernels.pack_tiles_int8(torch.randint(-127, 128, (n, k), dtype=torch.int8)),
                 torch.rand(n, dtype=torch.bfloat16) * 0.01) for n, k in shapes]
    return [(kernels.pack_tiles_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8)),
             kernels.pack_scale_zeros_int4((torch.rand(k // 128, n, 2) * 0.01).to(torch.bfloat16))) for n, k in shapes]


def sweep_rates(ops: dict[str, Op], rows: int, rounds: int, fmt: str) -> dict[str, list[float]]:
    mats = packed_matrices(fmt)
    nbytes = sum(t.numel() * t.element_size() for m in mats for t in m)
    columns = {m[0]: m[0].shape[1] * COLUMNS_PER_BLOCK[fmt] for m in mats}
    xs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in set(columns.values())}
    for m in mats[:4]:
        x = xs[columns[m[0]]]
        assert torch.equal(ops["base"](x, *m), ops["this"](x, *m)), "the two kernels disagree"

    def rate(op: Op) -> float:
        start = time.perf_counter()
        for m in mats:
            op(xs[columns[m[0]]], *m)
        return nbytes / (time.perf_counter() - start) / 1e9

    for op in ops.values():
        rate(op)  # warm up
    return alternate(ops, rounds, rate)


def decode_rates(ops: dict[str, Op], layer_ops: dict[str, Op], model_dir: Path, rounds: int, tokens: int,
                 fmt: str) -> dict[str, list[float]]:
    import bench_engine

    from qwenstack.loading import load_model
    from qwenstack.models import fast_paths
    from qwenstack.quantization import quantize_model

    model = load_model(model_dir, dtype=torch.bfloat16)
    if fmt != "bfloat16":
        quantize_model(model, fmt)
    prompt = bench_engine.random_prompt(random.Random(0), 16, model.args.vocab_size)
    bench_engine.ours_decode(model, prompt, 4)  # warm up; prepares the tiled form and the flat decode loop
    name = OP_OF_FORMAT[fmt]
    stack, native_op = model.model, fast_paths.kernels.native_op
    prepared_loop, original = stack.run_layers, getattr(kernels, name)

    def rate(which: str) -> float:
        # What the layers call (models/cpu_linear.py, quantization/formats.py) and what the flat decode loop
        # bound when it was built (the products, or the one-call layers, whose products are compiled into
        # decode_layer_cpu.cpp): all switched to that revision's.
        op, layer_op = ops[which], layer_ops[which]
        setattr(kernels, name, op)
        fast_paths.kernels.native_op = lambda op_name: (op if op_name == name else layer_op
                                                        if op_name == "decode_layer" else native_op(op_name))
        try:
            if isinstance(prepared_loop, fast_paths.FlatDecodeLoop):
                stack.run_layers = fast_paths.FlatDecodeLoop.build(stack.layers)
            return bench_engine.ours_decode(model, prompt, tokens)
        finally:
            setattr(kernels, name, original)
            fast_paths.kernels.native_op = native_op
            stack.run_layers = prepared_loop

    return alternate({which: which for which in ops}, rounds, rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision whose kernel is the baseline")
    parser.add_argument("--rows", default="1,2", help="activation rows of the product sweep (empty: none)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--model", type=Path, help="also A/B single-stream decode of this checkpoint")
    parser.add_argument("--decode-tokens", type=int, default=24)
    parser.add_argument("--format", choices=list(OP_OF_FORMAT), default="bfloat16", help="the weights' kernel")
    parser.add_argument("--int8", action="store_true", help="the same as --format int8")
    args = parser.parse_args()
    fmt = "int8" if args.int8 else args.format
    torch.set_num_threads(threads())
    name = OP_OF_FORMAT[fmt]
    if kernels.native_op(name) is None:
        raise SystemExit("the native kernels do not build here")
    ops = {"base": build_base(args.base, name), "this": kernels.native_op(name)}
    print(f"{threads()} threads, ISA level {isa_level()}, base {args.base}, {name}")
    for rows in [int(r) for r in args.rows.split(",") if r]:
        report(f"{rows}-row products", "GB/s", sweep_rates(ops, rows, args.rounds, fmt))
    if args.model:
        layer_ops = {"base": build_base(args.base, "decode_layer", "decode_layer_cpu.cpp"),
                     "this": kernels.native_op("decode_layer")}
        report("single-stream decode", "tok/s",
               decode_rates(ops, layer_ops, args.model, args.rounds, args.decode_tokens, fmt))


if __name__ == "__main__":
    main()
