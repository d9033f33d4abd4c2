"""Tensor and expert parallelism over gloo on CPU, in float32: the same greedy tokens as one rank.

Each run sends prompts sharing a 40-token prefix in two waves (the second wave hits the prefix cache), in
one batch per wave, with a KV pool small enough that sequences are preempted and recomputed. The KV budget
is per rank: a TP=2 rank holds half the KV heads, so it gets half the bytes for the same number of blocks
(and the same preemptions). One dense TP=2 run stays in the default suite, and one in bfloat16 (the dtype in
which the CPU fast paths run); the other architectures are slow.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from checkpoints import build_hf_checkpoint, moe_config, next_config
from parallel_utils import greedy_run, make_engine, shared_prefix_prompts

from qwenstack.distributed.config import ParallelConfig
from qwenstack.distributed.group import ParallelGroup
from qwenstack.distributed.shard import shard_model
from qwenstack.engine.engine import EngineConfig
from qwenstack.engine.params import SamplingParams
from qwenstack.errors import UnsupportedModelError
from qwenstack.models.registry import load_model

TP1 = ParallelConfig()
TP2 = ParallelConfig(tensor_parallel_size=2)
EP2 = ParallelConfig(tensor_parallel_size=2, expert_parallel=True)
PROMPTS = shared_prefix_prompts()


def check_identical(path: Path, parallel: ParallelConfig, kv_bytes_tp1: int, kv_bytes_tp2: int,
                    quantization: str | None = None, prompts: list[list[int]] = PROMPTS, **kw) -> None:
    one = greedy_run(path, TP1, prompts, kv_cache_memory=kv_bytes_tp1, quantization=quantization, **kw)
    two = greedy_run(path, parallel, prompts, kv_cache_memory=kv_bytes_tp2, quantization=quantization, **kw)
    assert one.preemptions > 0 and two.preemptions > 0, "the pool should be small enough to preempt"
    assert one.prefix_hits > 0 and two.prefix_hits > 0, "the second wave should hit the prefix cache"
    assert two.comm_seconds > 0
    assert two.tokens == one.tokens


# dense: 2 layers x 2 KV heads x 16 dims x fp32 = 512 B/token on one rank, 8 KiB per 16-token block
DENSE_KV = 7 * 8192


def test_dense_tp2_matches_one_rank(tiny_qwen3: Path) -> None:
    # Fewer prompts and tokens than the slow tests: this one runs in the default suite.
    check_identical(tiny_qwen3, TP2, 5 * 8192, 5 * 4096, prompts=shared_prefix_prompts(4), max_tokens=8)


def test_dense_tp2_over_an_fp8_cache_matches_one_rank(tiny_qwen3: Path) -> None:
    """--kv-cache-dtype fp8 reaches every rank's pool (InitRunner carries it): one rank's float8 tokens, in a
    quarter of the float32 pool's bytes for as many blocks (still small enough to preempt)."""
    check_identical(tiny_qwen3, TP2, 5 * 2048, 5 * 1024, prompts=shared_prefix_prompts(4), max_tokens=8,
                    kv_cache_dtype="fp8")


def test_dense_tp2_bfloat16_decodes_as_one_rank(tiny_qwen3: Path) -> None:
    """In bfloat16 the CPU fast paths are on (float32 keeps the reference stack), and they must still run the
    shard's all-reduce hooks: a flat decode loop that skipped them diverged at the second token. bfloat16 sums
    in another order on two ranks, so only the first tokens of each prompt are held to one rank's."""
    config = EngineConfig(kv_cache_memory=1 << 22, block_size=16)
    prompts = shared_prefix_prompts(4)
    tokens = []
    for parallel in (TP1, TP2):
        engine = make_engine(tiny_qwen3, parallel, config, dtype="bfloat16")
        try:
            outputs = engine.generate_all(prompts, [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)]
                                          * len(prompts))
            tokens.append([o.outputs[0].token_ids[:4] for o in outputs])
        finally:
            engine.close()
    assert tokens[1] == tokens[0]


@pytest.mark.slow
def test_moe_tp2_matches_one_rank(tiny_qwen3_moe: Path) -> None:
    check_identical(tiny_qwen3_moe, TP2, DENSE_KV, DENSE_KV // 2)


@pytest.mark.slow
def test_moe_ep2_matches_one_rank(tiny_qwen3_moe: Path) -> None:
    check_identical(tiny_qwen3_moe, EP2, DENSE_KV, DENSE_KV // 2)


@pytest.mark.slow
def test_dense_tp2_int8_matches_one_rank_int8(tiny_qwen3: Path) -> None:
    # The shards hold the single-rank codes and scales (split after quantization), so int8 under TP=2 gives
    # int8's own tokens, not merely tokens within int8's tolerance of float.
    check_identical(tiny_qwen3, TP2, DENSE_KV, DENSE_KV // 2, quantization="int8")


@pytest.mark.slow
def test_moe_ep2_int8_matches_one_rank_int8(tiny_qwen3_moe: Path) -> None:
    check_identical(tiny_qwen3_moe, EP2, DENSE_KV, DENSE_KV // 2, quantization="int8")


@pytest.mark.slow
def test_next_tp2_matches_one_rank(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Qwen3-Next keeps recurrent state: no prefix cache (the engine turns it off), so only preemption is checked.
    path = build_hf_checkpoint(tmp_path_factory.mktemp("next-tp"), "qwen3_next", next_config())
    one = greedy_run(path, TP1, PROMPTS, kv_cache_memory=6 * 8192)
    two = greedy_run(path, TP2, PROMPTS, kv_cache_memory=6 * 4096)
    assert one.preemptions > 0 and two.preemptions > 0
    assert two.tokens == one.tokens


@pytest.mark.slow
def test_vl_tp2_matches_one_rank_with_images(tmp_path_factory: pytest.TempPathFactory) -> None:
    from vl_checkpoints import build_vl_checkpoint, image_prompt

    from qwenstack.multimodal.inputs import ImageInput, MultimodalInputs

    path = build_vl_checkpoint(tmp_path_factory.mktemp("vl-tp"), "dense", tie=False, seed=4, with_tokenizer=True)
    pixels = torch.randn(24, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(1))
    image = ImageInput.from_pixels(pixels, (1, 4, 6))  # 6 placeholder tokens
    prompts = [image_prompt([[5, 6, 7], [8, 9]], [6]), [40, 41, 42, 43, 44], image_prompt([[10, 11], [12]], [6])]
    mm = [MultimodalInputs([image]), None, MultimodalInputs([image])]
    one = greedy_run(path, TP1, prompts, block_size=4, multimodal=mm)
    two = greedy_run(path, TP2, prompts, block_size=4, multimodal=mm)
    assert two.tokens == one.tokens


def test_shard_refuses_a_split_that_does_not_divide(tmp_path: Path) -> None:
    """Three ranks cannot share 4 query heads: a clear error, not a wrong model (no processes needed)."""
    path = build_hf_checkpoint(tmp_path, "qwen3_moe", moe_config(), with_tokenizer=False)
    model = load_model(path, dtype=torch.float32)
    with pytest.raises(UnsupportedModelError, match="num_attention_heads"):
        shard_model(model, ParallelGroup(rank=1, world_size=3))


def test_expert_parallel_needs_tensor_parallel_ranks() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size > 1"):
        ParallelConfig(expert_parallel=True)


@pytest.mark.slow  # two rank processes behind a server; the dense TP=2 parity test stays in the default run
def test_serve_flags_drive_a_tensor_parallel_model(tiny_qwen3: Path) -> None:
    """`serve MODEL --tensor-parallel-size 2` end to end: the flags become a ModelSpec, load_served_model
    (create_app's loader) starts a worker rank, and the API answers with the tokens one rank gives."""
    import httpx
    from server_utils import BackgroundServer

    from qwenstack.cli import build_parser, discover_commands
    from qwenstack.commands.serve import serve_config_from_args, server_config
    from qwenstack.serving.app import create_app

    commands, _ = discover_commands()
    args = build_parser(commands).parse_args(["serve", str(tiny_qwen3), "--served-model-name", "tiny", "--dtype",
                                              "float32", "--tensor-parallel-size", "2", "--no-ui"])
    config = server_config(serve_config_from_args(args))
    assert config.models[0].tensor_parallel_size == 2
    config.kv_cache_memory = 2**22
    body = {"model": "tiny", "prompt": [5, 17, 33, 8, 90, 41], "max_tokens": 6, "temperature": 0}

    def completion(app_config: object) -> list[str]:
        app = create_app(config=app_config)  # type: ignore[arg-type]
        with BackgroundServer(app) as server:
            for _ in range(600):  # the model loads in the background; /health says when it is ready
                if httpx.get(server.url + "/health").status_code == 200:
                    break
                time.sleep(0.1)
            response = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            return [response.json()["choices"][0]["text"], response.json()["usage"]["completion_tokens"]]

    two = completion(config)
    config.models[0] = replace(config.models[0], tensor_parallel_size=1)
    one = completion(config)
    assert two == one and one[1] == 6


def test_workers_are_sent_only_the_new_tokens() -> None:
    """The driver's step messages carry each held sequence's prompt once and then only its new output tokens;
    the worker rebuilds the full sequences, and forgets (and is sent whole again) a released one."""
    import pickle

    from qwenstack.distributed.worker import TokenCache, TokenSender
    from qwenstack.engine.params import SamplingParams
    from qwenstack.engine.scheduler import ScheduledBatch
    from qwenstack.engine.sequence import Sequence

    params = SamplingParams(temperature=0.0, max_tokens=64)
    long = Sequence(1, "a", 0, list(range(500)), params, 64)
    short = Sequence(2, "b", 0, [7, 8, 9], params, 64)
    sender, cache = TokenSender(), TokenCache()
    sizes = []
    for step in range(4):
        seqs = [long, short] if step != 2 else [long]  # a step may leave a held sequence out
        message = pickle.loads(pickle.dumps(sender.message(ScheduledBatch(seqs, [1] * len(seqs)))))
        sizes.append(len(pickle.dumps(message)))
        rebuilt = cache.apply(message)
        assert [(s.prompt_token_ids, s.output_token_ids) for s in rebuilt.seqs] == \
            [(s.prompt_token_ids, s.output_token_ids) for s in seqs]
        for s in seqs:
            s.output_token_ids.append(1000 + step)
    assert sizes[1] < sizes[0] - 500  # the 500-token prompt went once
    sender.forget(long.seq_id)  # preempted: its blocks and the workers' copy go
    message = sender.message(ScheduledBatch([long], [1]))
    assert message.released == (1,) and message.deltas == frozenset()
    rebuilt = cache.apply(message)
    assert rebuilt.seqs[0].all_token_ids == long.all_token_ids and rebuilt.seqs[0].num_tokens == 504
