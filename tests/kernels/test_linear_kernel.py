"""The native CPU linear kernels against float64 references: the row-major one (linear_cpu.cpp) for every
weight dtype, row counts on both sides of each loop's boundaries (1-2 vector rows, 3+ AMX tiles, 16/32-row
tile edges), shapes off the 4-row, 16-column and 32-column grids, strided weight slices, thread counts; the
tile-packed ones (linear_tiled_cpu.cpp, bfloat16, int8 and int4) on both sides of their boundaries; every build
level this CPU can run;
and models in the native CPU linear form against the plain form."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernel_utils import require_native_kernels
from qwenstack import kernels
from qwenstack.models.base import prompt_logits
from qwenstack.models.cpu_linear import (NATIVE_MAX_ROWS, NativeLinear, TiledEmbedding, TiledLinear,
                                         prepare_cpu_linears, tiled_max_rows)
from qwenstack.models.moe import Experts
from qwenstack.models.registry import load_model
from qwenstack.quantization import quantize_model

ROWS = [1, 2, 3, 5, 16, 17, 33, 70]
SHAPES = [(64, 96), (100, 128), (33, 64), (48, 40), (256, 1024)]  # (N, K)
# Relative to the largest |output| of the case: the output is rounded to the activation dtype once.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    require_native_kernels()


def reference(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if scales is None else y * scales.double()


def check(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None) -> None:
    got = kernels.linear_rows(x, w, scales)
    assert got.dtype == x.dtype and got.shape == (x.shape[0], w.shape[0])
    want = reference(x, w, scales)
    # int8: the activations are rounded to int16 (2^-16 of each row's largest), far inside bf16's rounding
    # but not float32's.
    rel = max(TOLERANCE[x.dtype], 2e-4) if w.dtype == torch.int8 else TOLERANCE[x.dtype]
    tol = rel * max(want.abs().max().item(), 1e-6)
    assert (got.double() - want).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", ROWS)
def test_float_weights(dtype: torch.dtype, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=gen).to(dtype)
        x = torch.randn(rows, k, generator=gen).to(dtype)
        check(x, w)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", ROWS)
def test_int8_weights_with_scales(x_dtype: torch.dtype, rows: int) -> None:
    gen = torch.Generator().manual_seed(100 + rows)
    for n, k in SHAPES:
        w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        scales = (torch.rand(n, generator=gen) * 0.01).to(x_dtype)
        x = (torch.randn(rows, k, generator=gen) * 3).to(x_dtype)
        check(x, w, scales)


def test_zero_rows_and_extreme_rows() -> None:
    w = torch.randint(-128, 128, (40, 64), dtype=torch.int8)
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    assert torch.equal(kernels.linear_rows(x, w, torch.ones(40)), torch.zeros(2, 40, dtype=torch.bfloat16))
    x[1, 3] = 1e30  # one huge activation: the row's int16 scale follows it
    check(x.float(), w, torch.ones(40))
    assert kernels.linear_rows(torch.zeros(0, 64), w.float()).shape == (0, 40)


def test_strided_expert_slice_and_threads() -> None:
    stack = torch.randn(3, 48, 96).to(torch.bfloat16)
    x = torch.randn(5, 96).to(torch.bfloat16)
    check(x, stack[1])
    rows_view = stack[1][::2]  # every other row: a row stride of two rows
    check(x, rows_view)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.linear_rows(x, stack[2])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, kernels.linear_rows(x, stack[2]))  # the sums' order does not follow the threads


TILED_ROWS = [1, 2, 3, 4, 5, 16, 17, 31, 33, 64, 70, 129, 300]  # vector rows, AMX 16/32-row edges, row chunks
# Odd and even 16-row block counts; 37 blocks: each thread's share in whole runs of the side-by-side weight streams
# plus leftovers.
TILED_SHAPES = [(16, 32), (48, 64), (64, 96), (80, 1024), (256, 4096), (592, 64)]


@pytest.mark.parametrize("rows", TILED_ROWS)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_tiled_kernel(rows: int, x_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows)
    for n, k in TILED_SHAPES:
        w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        packed = kernels.pack_tiles(w)
        assert torch.equal(kernels.unpack_tiles(packed), w)
        x = torch.randn(rows, k, generator=gen).to(x_dtype)
        got = kernels.linear_tiled(x, packed)
        assert got.dtype == x_dtype and got.shape == (rows, n)
        want = x.to(torch.bfloat16).double() @ w.double().T  # activations are rounded to bfloat16 first
        tol = TOLERANCE[torch.bfloat16] * want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= tol


INT8_TILED_SHAPES = [(16, 64), (48, 128), (80, 1024), (256, 3072), (592, 128)]


@pytest.mark.parametrize("rows", TILED_ROWS)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_tiled_int8_kernel(rows: int, x_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows)
    for n, k in INT8_TILED_SHAPES:
        w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        w[0], w[-1] = -128, 127  # the extremes of the offset bytes
        packed = kernels.pack_tiles_int8(w)
        assert packed.dtype == torch.uint8 and packed.shape == (n // 16, k // 64, 16, 16, 4)
        assert torch.equal(kernels.unpack_tiles_int8(packed), w)
        scales = (torch.rand(n, generator=gen) * 0.01).to(x_dtype)
        x = torch.randn(rows, k, generator=gen).to(x_dtype)
        x[0, : k // 2] = x[0, : k // 2].abs() * 4  # a row whose int16 form sits at the limit on one side
        got = kernels.linear_tiled_int8(x, packed, scales)
        assert got.dtype == x_dtype and got.shape == (rows, n)
        want = reference(x, w, scales)
        # Activations as int16 per row (2^-15 of the row's largest); the output rounded to x's dtype once.
        tol = max(TOLERANCE[x_dtype], 2e-4) * want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= tol


def test_tiled_int8_stacks_and_threads() -> None:
    """A stack of expert matrices packs per matrix; the sums' order does not follow the thread count."""
    gen = torch.Generator().manual_seed(3)
    stack = torch.randint(-128, 128, (3, 32, 128), generator=gen, dtype=torch.int8)
    packed = kernels.pack_tiles_int8(stack)
    assert packed.shape == (3, 2, 2, 16, 16, 4) and torch.equal(packed[1], kernels.pack_tiles_int8(stack[1]))
    assert torch.equal(kernels.unpack_tiles_int8(packed), stack)
    assert kernels.can_tile_int8(stack.shape) and not kernels.can_tile_int8((32, 96)) \
        and not kernels.can_tile_int8((40, 128)) and not kernels.can_tile_int8((16, 2 * kernels.INT8_TILE_MAX_K))
    scales = torch.rand(32)
    for rows in (1, 40):
        x = torch.randn(rows, 128, generator=gen)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = kernels.linear_tiled_int8(x, packed[2], scales)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, kernels.linear_tiled_int8(x, packed[2], scales))


# (N, K, group): one 16-row block, odd block counts, 37 blocks (runs of streams plus leftovers), every group size
INT4_TILED_SHAPES = [(16, 32, 32), (48, 128, 32), (80, 1024, 128), (256, 3072, 128), (592, 256, 64), (32, 512, 256),
                     (16, 64, 8)]


def int4_case(gen: torch.Generator, n: int, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random codes [N, K] (with both extremes), bfloat16 scale_zeros [K / group, N, 2], and W as float64."""
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    codes[0], codes[-1] = 0, 15
    scale = (torch.rand(k // group, n, generator=gen) * 0.02 + 1e-3).to(torch.bfloat16)
    zero = (torch.randn(k // group, n, generator=gen) * 0.05).to(torch.bfloat16)
    scale_zeros = torch.stack([scale, zero], dim=-1)
    w = ((codes.double().view(n, k // group, group) - 8) * scale.double().t()[..., None]
         + zero.double().t()[..., None]).view(n, k)
    return codes, scale_zeros, w


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 17, 70])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_tiled_int4_kernel(rows: int, x_dtype: torch.dtype) -> None:
    """Every row tier of the vector loop (1 row a pass, 2, 4 and the leftovers), every group size."""
    gen = torch.Generator().manual_seed(rows)
    for n, k, group in INT4_TILED_SHAPES:
        codes, scale_zeros, w = int4_case(gen, n, k, group)
        packed = kernels.pack_tiles_int4(codes)
        assert packed.dtype == torch.int16 and packed.shape == (n // 16, k // 8, 16, 2)
        assert torch.equal(kernels.unpack_tiles_int4(packed), codes)
        x = torch.randn(rows, k, generator=gen).to(x_dtype)
        tiled_sz = kernels.pack_scale_zeros_int4(scale_zeros)
        assert tiled_sz.shape == (n // 16, k // group, 16, 2)
        assert torch.equal(kernels.unpack_scale_zeros_int4(tiled_sz), scale_zeros)
        got = kernels.linear_tiled_int4(x, packed, tiled_sz)
        assert got.dtype == x_dtype and got.shape == (rows, n)
        want = x.to(torch.bfloat16).double() @ w.T  # activations are rounded to bfloat16 first
        # float32 sums over codes offset by 128 (the bfloat16 of 128 + q), the offset taken back per group: ~1e-6
        # of the largest output here, under float32's tolerance; a float16 or bfloat16 output is rounded once.
        tol = TOLERANCE[x_dtype] * want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= tol


def test_tiled_int4_stacks_threads_and_columns() -> None:
    """A stack of expert matrices packs per matrix; each output's sums are the same bits whether its column
    was read in a group of streams, alone, or on one thread."""
    gen = torch.Generator().manual_seed(4)
    stack = torch.randint(0, 16, (3, 32, 128), generator=gen, dtype=torch.uint8)
    packed = kernels.pack_tiles_int4(stack)
    assert packed.shape == (3, 2, 16, 16, 2) and torch.equal(packed[1], kernels.pack_tiles_int4(stack[1]))
    assert torch.equal(kernels.unpack_tiles_int4(packed), stack)
    assert kernels.can_tile_int4(stack.shape, 32) and not kernels.can_tile_int4((40, 128), 32) \
        and not kernels.can_tile_int4((32, 96), 64) and not kernels.can_tile_int4((32, 96), 12)
    n, k = 37 * kernels.TILE_N, 256
    codes, scale_zeros, _ = int4_case(gen, n, k, 64)
    threads = torch.get_num_threads()
    try:
        for rows in (1, 2, 3, 13):
            x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
            torch.set_num_threads(2)
            tiled_sz = kernels.pack_scale_zeros_int4(scale_zeros)
            whole = kernels.linear_tiled_int4(x, kernels.pack_tiles_int4(codes), tiled_sz)
            alone = torch.cat([kernels.linear_tiled_int4(x, kernels.pack_tiles_int4(codes[i:i + 16]),
                                                         kernels.pack_scale_zeros_int4(scale_zeros[:, i:i + 16]))
                               for i in range(0, n, 16)], dim=1)
            torch.set_num_threads(1)
            one = kernels.linear_tiled_int4(x, kernels.pack_tiles_int4(codes), tiled_sz)
            assert torch.equal(whole, alone) and torch.equal(whole, one), rows
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("rows", "k"), [(1, 128), (2, 128), (3, 128), (7, 128), (13, 128), (61, 4096)])
def test_tiled_sums_follow_neither_threads_nor_streams(rows: int, k: int) -> None:
    """The vector loops read several block columns side by side, grouped by the thread's share, and (without
    AMX) take batches 6, 4, 2 or 1 rows a pass, in chunks of rows that stay in L2 (24 rows of 4,096 columns):
    every output's sums are the same bits whether its column was read in a group, as a leftover, alone or on
    one thread, and whether its row came in a batch, in which chunk, or alone."""
    gen = torch.Generator().manual_seed(rows)
    n = 37 * kernels.TILE_N
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, generator=gen)
    products = {
        "bfloat16": lambda rows_of_w: kernels.linear_tiled(x, kernels.pack_tiles(w[rows_of_w])),
        "int8": lambda rows_of_w: kernels.linear_tiled_int8(x, kernels.pack_tiles_int8(q[rows_of_w]),
                                                            scales[rows_of_w]),
    }
    threads = torch.get_num_threads()
    try:
        for name, product in products.items():
            torch.set_num_threads(2)  # the test run's workers have one thread each
            whole = product(slice(None))
            alone = torch.cat([product(slice(i, i + kernels.TILE_N)) for i in range(0, n, kernels.TILE_N)], dim=1)
            torch.set_num_threads(1)
            one = product(slice(None))
            assert torch.equal(whole, alone) and torch.equal(whole, one), name
        if not kernels.has_amx():  # with AMX, 3+ rows go to the tiles, whose sums run in another order
            packed = kernels.pack_tiles(w)
            single = torch.cat([kernels.linear_tiled(x[i:i + 1], packed) for i in range(rows)])
            assert torch.equal(kernels.linear_tiled(x, packed), single)
    finally:
        torch.set_num_threads(threads)


def test_tiled_linear_module() -> None:
    """Up to tiled_max_rows() rows the kernel; up to twice as many, the kernel in pieces (each row as the
    kernel computes it alone); above, F.linear on the unpacked weight, bit for bit."""
    w, bias = torch.randn(48, 64).to(torch.bfloat16), torch.randn(48).to(torch.bfloat16)
    layer = TiledLinear(w, bias)
    assert kernels.can_tile(w) and not kernels.can_tile(w[:, :40]) and not kernels.can_tile(w.float())
    most = tiled_max_rows()
    x = torch.randn(1, most + 5, 64).to(torch.bfloat16)  # as a 3-D input, the rows flattened
    rows = x[0]
    want = torch.cat([kernels.linear_tiled(rows[:most], layer.packed), kernels.linear_tiled(rows[most:], layer.packed)])
    assert torch.equal(layer(x), (want + bias)[None])
    assert torch.equal(layer(rows), want + bias)
    longer = torch.randn(2 * most + 1, 64).to(torch.bfloat16)
    assert torch.equal(layer(longer), F.linear(longer, w, bias))
    few = x[0, :5]
    assert torch.equal(layer(few), kernels.linear_tiled(few, layer.packed) + bias)
    assert sum(p.numel() for p in layer.parameters()) == w.numel() + bias.numel()  # no second copy
    ids = torch.tensor([[0, 47, 16], [15, 31, 0]])
    assert torch.equal(kernels.tiled_rows(layer.packed, ids), w[ids])  # embedding lookups on the packed table
    table = TiledEmbedding(w)
    assert torch.equal(table(ids), w[ids]) and TiledLinear(w, packed=table.packed).packed is table.packed
    for bad in (torch.tensor([0, -1]), torch.tensor([48])):
        with pytest.raises(IndexError, match="outside the embedding table"):
            table(bad)


def test_bad_arguments_are_errors_not_crashes() -> None:
    with pytest.raises(RuntimeError, match="columns"):
        kernels.linear_rows(torch.randn(2, 64), torch.randn(8, 32))
    with pytest.raises(RuntimeError, match="scales"):
        kernels.linear_rows(torch.randn(2, 64), torch.randint(-1, 1, (8, 64), dtype=torch.int8), torch.ones(7))
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.linear_rows(torch.randn(2, 64), torch.randn(64, 8).T)
    packed = kernels.pack_tiles(torch.randn(16, 64).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="columns"):
        kernels.linear_tiled(torch.randn(2, 32), packed)
    with pytest.raises(RuntimeError, match="packed"):
        kernels.linear_tiled(torch.randn(2, 64), torch.randn(16, 64).to(torch.bfloat16))
    packed8 = kernels.pack_tiles_int8(torch.zeros(16, 128, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="columns"):
        kernels.linear_tiled_int8(torch.randn(2, 64), packed8, torch.ones(16))
    with pytest.raises(RuntimeError, match="scales"):
        kernels.linear_tiled_int8(torch.randn(2, 128), packed8, torch.ones(15))
    with pytest.raises(RuntimeError, match="uint8"):
        kernels.linear_tiled_int8(torch.randn(2, 128), packed8.view(torch.int8), torch.ones(16))
    packed4 = kernels.pack_tiles_int4(torch.zeros(16, 128, dtype=torch.uint8))
    sz = torch.ones(1, 4, 16, 2, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="columns"):
        kernels.linear_tiled_int4(torch.randn(2, 64), packed4, sz)
    with pytest.raises(RuntimeError, match="scale_zeros"):
        kernels.linear_tiled_int4(torch.randn(2, 128), packed4, sz.float())
    with pytest.raises(RuntimeError, match="scale_zeros"):
        kernels.linear_tiled_int4(torch.randn(2, 128), packed4, sz[0])  # the [K / group, N, 2] order
    with pytest.raises(RuntimeError, match="multiples of 8"):
        kernels.linear_tiled_int4(torch.randn(2, 128), packed4, torch.ones(1, 32, 16, 2, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="int16"):
        kernels.linear_tiled_int4(torch.randn(2, 128), packed4.view(torch.uint8), sz)


LEVEL_CHECK = """
import json, sys, torch
from qwenstack import kernels
ok = kernels.linear_rows_available()
worst = 0.0
if ok:
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 2, 3, 17):
        for n, k in ((64, 96), (33, 64), (48, 40)):
            x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
            for w, s in ((torch.randn(n, k, generator=gen).to(torch.bfloat16), None),
                         (torch.randn(n, k, generator=gen).to(torch.float16), None),
                         (torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8), torch.rand(n) * 0.01)):
                want = x.double() @ w.double().T * (1 if s is None else s.double())
                got = kernels.linear_rows(x, w, s).double()
                worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    for rows in (1, 2, 3, 5, 40):  # the tile-packed kernel: vector loop, then AMX where built
        for n, k in ((64, 96), (48, 64)):
            x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
            w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
            want = x.double() @ w.double().T
            got = kernels.linear_tiled(x, kernels.pack_tiles(w)).double()
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
            q = torch.randint(-128, 128, (n, 2 * k), generator=gen, dtype=torch.int8)  # int8: K % 64 == 0
            xq, s = torch.randn(rows, 2 * k, generator=gen).to(torch.bfloat16), torch.rand(n) * 0.01
            want = xq.double() @ q.double().T * s.double()
            got = kernels.linear_tiled_int8(xq, kernels.pack_tiles_int8(q), s).double()
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
            codes = torch.randint(0, 16, (n, 2 * k), generator=gen, dtype=torch.uint8)  # int4, groups of 32
            sz = torch.stack([torch.rand(2 * k // 32, n) * 0.01, torch.randn(2 * k // 32, n) * 0.01], -1)
            sz = sz.to(torch.bfloat16)
            w4 = (codes.double().view(n, -1, 32) - 8) * sz[..., 0].double().t()[..., None] \
                + sz[..., 1].double().t()[..., None]
            want = xq.double() @ w4.view(n, 2 * k).T
            got = kernels.linear_tiled_int4(xq, kernels.pack_tiles_int4(codes), kernels.pack_scale_zeros_int4(sz))
            got = got.double()
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
from qwenstack.models.cpu_linear import tiled_max_rows
print(json.dumps({"isa": kernels.isa_level(), "ok": ok, "worst": worst, "int8_tiles": kernels.int8_tiles_preferred(),
                  "int4_tiles": kernels.int4_tiles_preferred(), "tiled_max_rows": tiled_max_rows()}))
"""


# Builds the kernels once per ISA level in fresh processes: about 100 s on 2 cores, so it runs with -m slow;
# the default run covers this CPU's own level through every kernel test above.
@pytest.mark.slow
def test_every_build_level_this_cpu_runs() -> None:
    """The loops each level compiles (generic vectors, AVX512-BF16/VNNI, AMX) all give the same products."""
    native = kernels.isa_level()
    if native not in kernels.ISA_LEVELS[1:]:
        pytest.skip("only the generic level exists on this CPU")
    levels = ["generic", *kernels.ISA_LEVELS[1:kernels.ISA_LEVELS.index(native)]]
    for level in levels:
        env = {**os.environ, "QWENSTACK_KERNEL_ISA": level}
        out = subprocess.run([sys.executable, "-c", LEVEL_CHECK], env=env, capture_output=True, text=True,
                             timeout=600, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["isa"] == level and result["ok"], out.stderr[-2000:]
        assert result["worst"] < 1e-2, (level, result)
        # Below AVX512-VNNI the tiled int8 layout only has scalar loops: int8 weights stay row-major there.
        assert result["int8_tiles"] == (level in ("avx512_bf16", "avx512_amx")), (level, result)
        assert result["int4_tiles"] == (level in ("avx512_bf16", "avx512_amx")), (level, result)
        # Without bfloat16 dot products the vector loops pay per row: batches above 16 rows go to F.linear.
        want_rows = {"avx512_amx": 512, "avx512_bf16": 512}.get(level, 16)
        assert result["tiled_max_rows"] == want_rows, (level, result)


@pytest.mark.parametrize("fixture", ["tiny_qwen3", "tiny_qwen3_moe"])
def test_native_form_logits_match_plain(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    model = load_model(path, dtype=torch.bfloat16)
    embed_weight = model.model.embed_tokens.weight.detach().clone()
    one_token = torch.tensor([[17]])
    few = torch.tensor([[5, 17, 33, 2, 101, 7, 8, 9]])  # 8 rows: the AMX loop where the CPU has it
    with torch.inference_mode():
        before = [prompt_logits(model, ids).float() for ids in (one_token, few)]
        assert prepare_cpu_linears(model, form="native") > 0
        after = [prompt_logits(model, ids).float() for ids in (one_token, few)]
    assert any(isinstance(m, TiledLinear) for m in model.modules())
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert all(m.tiled for m in model.modules() if isinstance(m, Experts))  # experts tile-packed in place
    if model.args.tie_word_embeddings:  # the tied lm_head multiplies by the embedding's own table, no copy
        table = model.model.embed_tokens
        if kernels.can_tile(embed_weight):
            assert isinstance(table, TiledEmbedding) and isinstance(model.lm_head, TiledLinear)
            assert model.lm_head.packed is table.packed
            with torch.inference_mode():
                assert torch.equal(table(few), embed_weight[few])  # lookups gather the same rows
        else:
            assert isinstance(model.lm_head, NativeLinear) and model.lm_head.weight is table.weight
    for b, a in zip(before, after):
        assert (a - b).abs().max().item() <= 0.05 * b.abs().max().item()
        assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.75


def test_native_linear_takes_f_linear_above_the_row_limit() -> None:
    w = torch.randn(40, 64).to(torch.bfloat16)
    layer = NativeLinear(w)
    x = torch.randn(NATIVE_MAX_ROWS + 1, 64).to(torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, w))  # bit-identical: the GEMM path
    assert layer(x[:3]).shape == (3, 40)


def test_int8_model_uses_native_kernel_and_stays_close(tiny_qwen3: Path) -> None:
    base = load_model(tiny_qwen3, dtype=torch.bfloat16)
    quantized = load_model(tiny_qwen3, dtype=torch.bfloat16)
    quantize_model(quantized, "int8")
    ids = torch.tensor([[5, 17, 33, 2]])
    with torch.inference_mode():
        a, b = prompt_logits(base, ids).float(), prompt_logits(quantized, ids).float()
    assert (a - b).abs().max().item() <= 0.1 * a.abs().max().item()
