"""The native CPU paged decode-attention kernel against the torch reference (gather blocks + SDPA): GQA
ratios, head sizes, block sizes, lengths around block boundaries, shuffled block tables, every cache dtype,
thread counts, bad tables, the switch off (QWENSTACK_DISABLE_KERNELS), and greedy decoding of a tiny model with
the kernel on and off.

The first test in a fresh environment compiles the kernel (a few seconds; cached in torch's extension
directory afterwards). On Linux x86-64 a kernel that fails to build fails these tests rather than
skipping them, so CI notices; elsewhere they skip."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernel_utils import require_native_kernels
from qwenstack import kernels
from qwenstack.engine.reference import greedy_generate
from qwenstack.models.attention import AttentionBatch, gathered_decode_attention, gather_kv
from qwenstack.models.fast_paths import NativePagedAttention, prepare_for_cpu
from qwenstack.models.registry import load_model

# Decode splits a context into chunks of 128 tokens (merged after): lengths on both sides of a chunk, of a
# block, and several chunks with a ragged last one.
LENGTHS = [1, 15, 16, 17, 128, 129, 300, 527]
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    require_native_kernels()


def make_pool(lengths: list[int], kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, seed: int = 0,
              spare_blocks: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """A pool with each sequence's blocks at random places (tables padded with 0, as the engine pads)."""
    g = torch.Generator().manual_seed(seed)
    needed = [(n + block_size - 1) // block_size for n in lengths]
    num_blocks = sum(needed) + spare_blocks
    pool = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(lengths), max(needed) + 2, dtype=torch.long)
    used = 0
    for i, n in enumerate(needed):
        tables[i, :n] = order[used:used + n]
        used += n
    return pool, tables


def reference(
    q: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor, lengths: list[int], scale: float
) -> torch.Tensor:
    """Per sequence: gather its blocks, SDPA in float64 on the same (already rounded) values."""
    out = []
    for i, n in enumerate(lengths):
        k, v = gather_kv(pool, tables[i], n)
        o = F.scaled_dot_product_attention(
            q[i, :, None].double(), k.transpose(0, 1).double(), v.transpose(0, 1).double(), scale=scale, enable_gqa=True
        )
        out.append(o[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_matches_reference(dtype: torch.dtype, group: int, head_dim: int) -> None:
    kv_heads = 2
    pool, tables = make_pool(LENGTHS, kv_heads, head_dim, 16, dtype)
    q = torch.randn(len(LENGTHS), kv_heads * group, head_dim).to(dtype)
    scale = head_dim**-0.5
    out = kernels.paged_decode_attention(q, pool, tables, LENGTHS, scale)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, pool, tables, LENGTHS, scale), atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [16, 48, 256])
def test_other_head_dims(dtype: torch.dtype, head_dim: int) -> None:
    """Odd multiples of 16 end with a 16-wide tail chunk (the tiny test models use 16; Qwen3-Next 256)."""
    pool, tables = make_pool(LENGTHS, 2, head_dim, 16, dtype, seed=head_dim)
    q = torch.randn(len(LENGTHS), 6, head_dim).to(dtype)
    out = kernels.paged_decode_attention(q, pool, tables, LENGTHS, head_dim**-0.5)
    expected = reference(q, pool, tables, LENGTHS, head_dim**-0.5)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)


def prefix_reference(q: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor, lengths: list[int],
                     query_lens: list[int], scale: float) -> torch.Tensor:
    """Per sequence: gather its blocks, causal SDPA of its new tokens (the last ones) in float64."""
    out, start = [], 0
    for i, (n, m) in enumerate(zip(lengths, query_lens)):
        k, v = gather_kv(pool, tables[i], n)
        mask = torch.arange(n)[None, :] <= torch.arange(n - m, n)[:, None]
        o = F.scaled_dot_product_attention(
            q[start:start + m].transpose(0, 1).double(), k.transpose(0, 1).double(), v.transpose(0, 1).double(),
            attn_mask=mask, scale=scale, enable_gqa=True)
        out.append(o.transpose(0, 1))
        start += m
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("head_dim", [48, 64, 128])
def test_prefix_attention_matches_causal_reference(dtype: torch.dtype, group: int, block_size: int,
                                                   head_dim: int) -> None:
    """Several new tokens per sequence over a cached prefix (chunks, prefix-cache hits), with decodes (one
    token) and whole fresh prompts in the same call; contexts on and off block boundaries. In bfloat16 on
    AVX512-BF16, head_dim 64 and 128 take the dot-product form (48: the float32 one)."""
    lengths = [1, 5, 16, 17, 40, 300]
    query_lens = [1, 5, 3, 17, 1, 37]
    kv_heads = 2
    pool, tables = make_pool(lengths, kv_heads, head_dim, block_size, dtype, seed=group)
    q = torch.randn(sum(query_lens), kv_heads * group, head_dim).to(dtype)
    out = kernels.paged_prefix_attention(q, pool, tables, lengths, query_lens, head_dim**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    expected = prefix_reference(q, pool, tables, lengths, query_lens, head_dim**-0.5)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)


def test_prefix_attention_rejects_inconsistent_lengths() -> None:
    pool, tables = make_pool([8, 8], 2, 64, 4, torch.float32)
    q = torch.randn(5, 2, 64)
    with pytest.raises(RuntimeError, match="add up"):
        kernels.paged_prefix_attention(q, pool, tables, [8, 8], [2, 2], 1.0)
    with pytest.raises(RuntimeError, match="query_lens"):
        kernels.paged_prefix_attention(q, pool, tables, [8, 3], [1, 4], 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [1, 4, 7, 32, 33])
def test_block_sizes(block_size: int, dtype: torch.dtype) -> None:
    """Partial and odd-sized blocks; in bfloat16 (queries too) on AVX512-BF16 the scores are dot products."""
    lengths = [1, block_size - 1 or 1, block_size, block_size + 1, 3 * block_size + 5]
    pool, tables = make_pool(lengths, 4, 128, block_size, dtype, seed=block_size)
    q = torch.randn(len(lengths), 8, 128).to(dtype)
    out = kernels.paged_decode_attention(q, pool, tables, lengths, 0.1)
    torch.testing.assert_close(out.double(), reference(q, pool, tables, lengths, 0.1), atol=TOLERANCE[dtype], rtol=0)


def test_engine_path_matches_padded_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prepared layers' decode (int32 tables, bf16 cache, float32 queries, Qwen3-0.6B's head shape)
    against the reference's gather path; with the kernels disabled it declines and the reference runs."""
    pool, tables = make_pool(LENGTHS, 8, 128, 16, torch.bfloat16, seed=3)
    q = torch.randn(len(LENGTHS), 16, 128)
    batch = AttentionBatch([1] * len(LENGTHS), LENGTHS, block_tables=tables.int(), block_size=16)
    out = NativePagedAttention().decode(q, pool, batch, 128**-0.5)
    assert out is not None
    monkeypatch.setattr(kernels.build, "kernels_disabled", lambda: True)
    assert NativePagedAttention().decode(q, pool, batch, 128**-0.5) is None
    batch.block_tables = tables  # the gather path indexes with long tables
    expected = gathered_decode_attention(q, pool, batch, 128**-0.5, True)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="not available"):
        kernels.paged_decode_attention(q, pool, tables, LENGTHS, 1.0)


def test_strided_pool_int32_and_threads() -> None:
    """A pool that is a view (every other kv head of a larger one), int32 tables and lengths, and the same
    result with one thread and with several."""
    lengths = [300, 5, 64, 1]
    full, tables = make_pool(lengths, 8, 64, 16, torch.bfloat16, seed=5)
    pool = full[:, :, :, ::2]
    assert not pool.is_contiguous()
    q = torch.randn(len(lengths), 8, 64, dtype=torch.bfloat16)
    expected = reference(q, pool, tables, lengths, 0.125)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = kernels.paged_decode_attention(q, pool, tables.int(), torch.tensor(lengths, dtype=torch.int32), 0.125)
    finally:
        torch.set_num_threads(threads)
    multi = kernels.paged_decode_attention(q, pool, tables, lengths, 0.125)
    torch.testing.assert_close(single.double(), expected, atol=2e-2, rtol=0)
    assert torch.equal(single, multi)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_same_result_alone_in_any_batch_and_with_any_threads(dtype: torch.dtype) -> None:
    """A sequence's output does not depend on what else is in the batch or on the thread count (its
    context chunks depend on its length alone; a sequence alone with spare threads splits its kv heads, and
    heads share no sums), bit for bit."""
    lengths = [700, 3, 129, 40, 100]
    pool, tables = make_pool(lengths, 4, 128, 16, dtype, seed=11)
    q = torch.randn(len(lengths), 8, 128).to(dtype)
    batched = kernels.paged_decode_attention(q, pool, tables, lengths, 0.088)
    threads = torch.get_num_threads()
    try:
        for alone_threads in (1, 2, 4):
            torch.set_num_threads(alone_threads)
            for i, n in enumerate(lengths):
                alone = kernels.paged_decode_attention(q[i:i + 1], pool, tables[i:i + 1], [n], 0.088)
                assert torch.equal(alone[0], batched[i]), (alone_threads, n)
    finally:
        torch.set_num_threads(threads)


def test_empty_context_and_bad_tables() -> None:
    pool, tables = make_pool([20, 20], 2, 32, 16, torch.float32)
    q = torch.randn(2, 4, 32)
    out = kernels.paged_decode_attention(q, pool, tables, [0, 20], 1.0)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    bad = tables.clone()
    bad[1, 1] = pool.shape[1]
    with pytest.raises(RuntimeError, match="is not a block of the pool"):
        kernels.paged_decode_attention(q, pool, bad, [20, 20], 1.0)
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        kernels.paged_decode_attention(q, pool, tables, [20, 16 * tables.shape[1] + 1], 1.0)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        kernels.paged_decode_attention(torch.randn(2, 3, 32), pool, tables, [20, 20], 1.0)


def test_greedy_decoding_same_with_and_without_kernel(tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model as built (torch), prepared (the kernels), and prepared with the kernels disabled."""
    prompts = [[5, 9, 13], list(range(3, 40)), [7] * 17]
    expected = greedy_generate(load_model(tiny_qwen3, dtype=torch.float32), prompts, 12, block_size=4)
    model = load_model(tiny_qwen3, dtype=torch.float32)
    prepare_for_cpu(model, linears=False)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    kernel = kernels.paged_decode_attention
    monkeypatch.setattr(kernels, "paged_decode_attention", counted)
    assert greedy_generate(model, prompts, 12, block_size=4) == expected
    assert calls, "the decode steps did not reach the kernel"
    monkeypatch.setattr(kernels.build, "kernels_disabled", lambda: True)
    assert greedy_generate(model, prompts, 12, block_size=4) == expected


def test_a_file_that_fails_to_compile_disables_only_its_own_ops(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each .cpp is its own extension: a broken one leaves the others' ops running."""
    broken = tmp_path / "broken_test_cpu.cpp"
    broken.write_text('STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) { m.def("broken_test_op(Tensor x) -> Tensor"); }\n'
                      "this is not C++;\n")
    sources = {**kernels.build.op_sources(), "broken_test_op": broken}
    monkeypatch.setattr(kernels.build, "op_sources", lambda: sources)
    assert kernels.native_op("broken_test_op") is None
    assert kernels.native_op("rms_norm") is not None and kernels.paged_decode_available()
    assert set(kernels.build.op_sources()) >= {"paged_decode_attention", "paged_prefix_attention", "linear_rows",
                                                "linear_tiled", "linear_tiled_int8", "rms_norm", "qk_norm_rope"}


def test_build_all_builds_every_file_at_once_and_reports_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken_all_cpu.cpp"
    broken.write_text("this is not C++;\n")
    monkeypatch.setattr(kernels.build, "SOURCES", (*kernels.build.SOURCES, broken))
    built = kernels.build_all()
    assert built == {**{source.name: True for source in kernels.build.SOURCES[:-1]}, "broken_all_cpu.cpp": False}
    monkeypatch.setattr(kernels.build, "kernels_disabled", lambda: True)
    assert kernels.build_all() == {}


def test_every_build_carries_a_digest_of_all_kernel_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch rebuilds an extension when its listed source changes, not its includes: the flags carry a digest of
    every kernel file, so a changed header, or an op file that decode_layer_cpu.cpp compiles in, rebuilds."""
    import shutil

    calls = []
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kwargs: calls.append(kwargs))
    kernels.build._build(kernels.build.KERNEL_DIR / "decode_layer_cpu.cpp")
    assert f"-DQWENSTACK_KERNEL_SOURCES={kernels.build.kernel_sources_digest()}" in calls[0]["extra_cflags"]
    copy = tmp_path / "kernels"
    shutil.copytree(kernels.build.KERNEL_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    digest = kernels.build.sources_digest(copy)
    assert digest == kernels.build.kernel_sources_digest()
    (copy / "notes.txt").write_text("not a kernel file")
    assert kernels.build.sources_digest(copy) == digest
    with (copy / "cpu_vec.h").open("a") as header:
        header.write("// a comment\n")
    assert kernels.build.sources_digest(copy) != digest


def test_a_build_lock_left_by_a_stopped_process_is_cleared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process stopped mid-build leaves torch's lock file, and every later start waited on it forever: a lock
    none of whose markers is a live process is removed; one held by a live process, or unmarked and recent, is
    kept; each build marks the folder while it runs and unmarks it after."""
    import os
    import subprocess
    import sys

    build = kernels.build
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    lock = tmp_path / "lock"
    lock.touch()
    (tmp_path / f"lock.owner.{os.getpid()}").touch()
    assert not build.clear_stale_lock(tmp_path) and lock.exists()  # a live builder: wait for it
    (tmp_path / f"lock.owner.{os.getpid()}").unlink()
    assert not build.clear_stale_lock(tmp_path) and lock.exists()  # unmarked and recent: maybe another program
    (tmp_path / f"lock.owner.{dead_pid}").touch()
    assert build.clear_stale_lock(tmp_path)
    assert not lock.exists() and not list(tmp_path.glob("lock.owner.*"))
    lock.touch()
    old = lock.stat().st_mtime - build.UNMARKED_LOCK_SECONDS - 1
    os.utime(lock, (old, old))
    assert build.clear_stale_lock(tmp_path) and not lock.exists()  # unmarked and old
    assert not build.clear_stale_lock(tmp_path)  # no lock at all

    # Waiting: a live builder's lock is waited for until it goes; then the build marks, loads and unmarks.
    lock.touch()
    (tmp_path / f"lock.owner.{os.getpid()}").touch()
    polls = []

    def builder_finishes(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 3:
            lock.unlink()
            (tmp_path / f"lock.owner.{os.getpid()}").unlink()

    monkeypatch.setattr(build.time, "sleep", builder_finishes)
    build.wait_for_build_lock(tmp_path)
    assert len(polls) == 3 and not lock.exists()
    marked = []
    monkeypatch.setattr("torch.utils.cpp_extension._get_build_directory", lambda name, verbose: str(tmp_path))
    monkeypatch.setattr("torch.utils.cpp_extension.load",
                        lambda **kwargs: marked.extend(p.name for p in tmp_path.glob("lock.owner.*")))
    lock.touch()
    (tmp_path / f"lock.owner.{dead_pid}").touch()  # a build killed before this one
    build._build(build.KERNEL_DIR / "rms_norm_cpu.cpp")
    assert marked == [f"lock.owner.{os.getpid()}"] and not lock.exists()
    assert not list(tmp_path.glob("lock.owner.*"))


ATTENTION_LEVEL_CHECK = """
import json, sys, torch
sys.path[:0] = sys.argv[1:]
from test_kernels import LENGTHS, make_pool, prefix_reference, reference
from qwenstack import kernels
worst = 0.0
for dtype in (torch.float32, torch.bfloat16):
    for group, head_dim in ((1, 64), (2, 128), (4, 48), (8, 128)):  # generic vectors stop at 128
        pool, tables = make_pool(LENGTHS, 2, head_dim, 16, dtype, seed=group)
        q = torch.randn(len(LENGTHS), 2 * group, head_dim).to(dtype)
        out = kernels.paged_decode_attention(q, pool, tables, LENGTHS, head_dim**-0.5).double()
        worst = max(worst, (out - reference(q, pool, tables, LENGTHS, head_dim**-0.5)).abs().max().item())
        query_lens = [min(n, 3) for n in LENGTHS]
        q = torch.randn(sum(query_lens), 2 * group, head_dim).to(dtype)
        out = kernels.paged_prefix_attention(q, pool, tables, LENGTHS, query_lens, head_dim**-0.5).double()
        expected = prefix_reference(q, pool, tables, LENGTHS, query_lens, head_dim**-0.5)
        worst = max(worst, (out - expected).abs().max().item())
print(json.dumps({"isa": kernels.isa_level(), "worst": worst}))
"""


# One build per ISA level in fresh processes (about a minute each on 2 cores): -m slow. The vector width
# changes the decode loops (the fold of W partial vectors, registers per row), so each level is checked,
# decode and several new tokens; levels without AVX512-BF16 also take the float32 loops for bfloat16 (a
# score scale applied twice there once passed every test at this CPU's own level).
@pytest.mark.slow
def test_decode_attention_at_every_build_level_this_cpu_runs() -> None:
    import json
    import os
    import subprocess
    import sys

    native = kernels.isa_level()
    if native not in kernels.ISA_LEVELS[1:]:
        pytest.skip("only the generic level exists on this CPU")
    here = Path(__file__).parent
    for level in ["generic", *kernels.ISA_LEVELS[1:kernels.ISA_LEVELS.index(native)]]:
        env = {**os.environ, "QWENSTACK_KERNEL_ISA": level}
        out = subprocess.run([sys.executable, "-c", ATTENTION_LEVEL_CHECK, str(here), str(here.parent / "support")],
                             env=env, capture_output=True, text=True, timeout=600, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["isa"] == level and result["worst"] < 2e-2, (level, result)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_write_kv_stores_what_the_torch_path_stores(dtype: torch.dtype) -> None:
    """The native KV write against models/attention.py's write_kv (two index_copy_): strided k/v views of a
    fused projection, int32 and int64 slots, and a slot outside the pool refused with nothing written."""
    from qwenstack.models.attention import write_kv

    gen = torch.Generator().manual_seed(3)
    pool = torch.randn(2, 6, 4, 2, 16, generator=gen).to(dtype)
    qkv = torch.randn(5, 3 * 2 * 16, generator=gen).to(dtype)
    k, v = qkv[:, 32:64].view(5, 2, 16), qkv[:, 64:].view(5, 2, 16)
    assert not k.is_contiguous()
    for slots in (torch.tensor([0, 7, 22, 5, 13]), torch.tensor([23, 1, 2, 3, 4], dtype=torch.int32)):
        want, got = pool.clone(), pool.clone()
        write_kv(want, k, v, slots.long())
        assert kernels.write_kv(got, k, v, slots)
        assert torch.equal(got, want)
    before = pool.clone()
    with pytest.raises(RuntimeError, match="not in the pool"):
        kernels.write_kv(pool, k[:2], v[:2], torch.tensor([3, 24]))
    assert torch.equal(pool, before)
    assert not kernels.write_kv(pool, k.float() if dtype != torch.float32 else k.half(), v, torch.tensor([0] * 5))


FP8 = torch.float8_e5m2


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [48, 128])
@pytest.mark.parametrize("group", [2, 4])
def test_fp8_pool_decode_and_prefix_attention_match_the_reference(q_dtype: torch.dtype, head_dim: int,
                                                                  group: int) -> None:
    """A float8_e5m2 pool (--kv-cache-dtype fp8) read in place: the same attention as SDPA over its values. With
    bfloat16 queries, 4 query heads a kv head and head_dim 128, decode's scores are bfloat16 dot products of the
    converted key rows (on AVX512-BF16); the other cases convert to float32."""
    pool, tables = make_pool(LENGTHS, 2, head_dim, 16, FP8, seed=head_dim)
    q = torch.randn(len(LENGTHS), 2 * group, head_dim).to(q_dtype)
    out = kernels.paged_decode_attention(q, pool, tables, LENGTHS, head_dim**-0.5)
    assert out.dtype == q_dtype
    tolerance = TOLERANCE[q_dtype]
    torch.testing.assert_close(out.double(), reference(q, pool, tables, LENGTHS, head_dim**-0.5), atol=tolerance,
                               rtol=0)
    lengths, query_lens = [1, 17, 40, 300], [1, 5, 1, 37]
    pool, tables = make_pool(lengths, 2, head_dim, 16, FP8, seed=1)
    q = torch.randn(sum(query_lens), 2 * group, head_dim).to(q_dtype)
    out = kernels.paged_prefix_attention(q, pool, tables, lengths, query_lens, head_dim**-0.5)
    expected = prefix_reference(q, pool, tables, lengths, query_lens, head_dim**-0.5)
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_write_kv_rounds_into_an_fp8_pool_as_torch_does(dtype: torch.dtype) -> None:
    """Keys and values rounded to float8_e5m2 bit for bit as .to(torch.float8_e5m2): ties to even, e5m2's
    subnormals, the largest finite value, overflow to infinity, NaN, signed zeros; the torch write_kv the same."""
    from qwenstack.models.attention import write_kv

    special = torch.tensor([0.0, -0.0, 1.125, 1.375, 1.0625, -2.5, 3e-5, 1.52587890625e-05, 2.2e-5, -7.6e-6, 5e-8,
                            57344.0, 61440.0, 65000.0, -1e9, float("inf"), float("nan"), 0.3, -0.7, 100.0])
    gen = torch.Generator().manual_seed(5)
    values = torch.cat([special, torch.randn(5 * 2 * 16 * 2 - special.numel(), generator=gen) * 4])
    k, v = values.to(dtype).view(2, 5, 2, 16).unbind(0)
    pool = torch.zeros(2, 6, 4, 2, 16, dtype=FP8)
    slots = torch.tensor([0, 7, 22, 5, 13])
    want, got = pool.clone(), pool.clone()
    write_kv(want, k, v, slots)
    assert kernels.write_kv(got, k, v, slots)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    expected = torch.stack([k, v]).to(FP8).view(torch.uint8)
    flat = got.view(2, 24, 2, 16).view(torch.uint8)
    assert torch.equal(flat[:, slots], expected)
    assert (flat[:, slots] == 0x7C).any() and (flat[:, slots] & 0x7C == 0).logical_and(flat[:, slots] & 3 != 0).any()
