"""--kv-cache-dtype fp8: the KV pool in float8_e5m2 holds twice the tokens in the same memory, and the engine
(native kernels: the rounding write, in-place decode and prefix attention, the one-call decode layer) decodes as
the torch reference with the same rounded cache."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoints import build_hf_checkpoint, next_config
from qwenstack.cli import main
from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.engine.params import SamplingParams
from qwenstack.engine.reference import greedy_generate
from qwenstack.engine.runner import kv_cache_dtype
from qwenstack.models.registry import load_model
from qwenstack.tokenizer import Tokenizer

PROMPTS = [[5, 9, 13], list(range(3, 40)), [7] * 17, list(range(100, 160))]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_checkpoint(tmp_path_factory.mktemp("next"), "qwen3_next", next_config(), seed=2)


def engine(path: Path, dtype: torch.dtype, **options) -> LLMEngine:
    tok = Tokenizer.from_dir(path)
    config = EngineConfig(**{"block_size": 4, "kv_cache_memory": 2**21, **options})
    return LLMEngine(load_model(path, dtype=dtype), tok, tok.eos_token_ids, config)


def test_an_fp8_pool_holds_twice_the_tokens_in_the_same_memory(tiny_qwen3: Path) -> None:
    auto, fp8 = engine(tiny_qwen3, torch.bfloat16), engine(tiny_qwen3, torch.bfloat16, kv_cache_dtype="fp8")
    assert {c.dtype for c in fp8.runner.kv_caches} == {torch.float8_e5m2}
    assert fp8.block_manager.num_blocks == 2 * auto.block_manager.num_blocks
    assert fp8.runner.kv_cache_bytes() == auto.runner.kv_cache_bytes() <= 2**21


@pytest.mark.parametrize("checkpoint", ["tiny_qwen3", "tiny_qwen3_moe", "tiny_next"])
def test_the_engine_decodes_as_the_reference_over_the_same_fp8_cache(request: pytest.FixtureRequest,
                                                                      checkpoint: str) -> None:
    """Prompts in one step (the short ones beside the long ones, which the prefix kernel would read from the
    rounded cache: a prompt attends over its own keys unrounded, alone or not), decode steps and a prefix-cache
    hit (the last prompt again) over the float8 pool; the reference is the model as built (torch only) with a
    float8 cache. The float8 cache changes some answer against the unrounded one, so it is really in use. In float32,
    where the native and torch paths give the same tokens; bfloat16's one native call per layer is held to the
    prepared layers' bits over a float8 cache in tests/models/test_flat_decode.py. Qwen3-Next keeps its recurrent
    state in the model's dtype (and no prefix cache); only its full-attention layers' KV is rounded."""
    dtype, path = torch.float32, request.getfixturevalue(checkpoint)
    expected = greedy_generate(load_model(path, dtype=dtype), PROMPTS, 16, block_size=4, kv_dtype=torch.float8_e5m2)
    eng = engine(path, dtype, kv_cache_dtype="fp8")
    outs = eng.generate_all(PROMPTS, [GREEDY] * len(PROMPTS))
    assert [o.outputs[0].token_ids for o in outs] == expected
    if not eng.runner.has_state:
        again = eng.generate_all(PROMPTS[-1:], [GREEDY])[0]
        assert again.metrics.num_cached_tokens > 0 and again.outputs[0].token_ids == expected[-1]
    assert greedy_generate(load_model(path, dtype=dtype), PROMPTS, 16, block_size=4) != expected


def test_other_names_are_refused_with_what_to_use(tiny_qwen3: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert kv_cache_dtype("fp8_e5m2", torch.bfloat16) == torch.float8_e5m2
    assert kv_cache_dtype("auto", torch.float16) == torch.float16
    with pytest.raises(ValueError, match="e4m3 needs per-tensor scales.*use 'fp8'"):
        kv_cache_dtype("fp8_e4m3", torch.bfloat16)
    with pytest.raises(ValueError, match="must be one of auto, fp8, fp8_e5m2, got 'int8'"):
        engine(tiny_qwen3, torch.float32, kv_cache_dtype="int8")
    with pytest.raises(SystemExit):
        main(["generate", str(tiny_qwen3), "Hello", "--kv-cache-dtype", "fp8_e4m3"])
    assert "invalid choice: 'fp8_e4m3'" in capsys.readouterr().err
    assert main(["generate", str(tiny_qwen3), "Hello", "--kv-cache-dtype", "fp8", "--max-tokens", "3",
                 "--kv-cache-memory", "1MiB"]) == 0


def test_server_wiring(tiny_qwen3: Path) -> None:
    """`qwenstack serve --kv-cache-dtype fp8` reaches the served model's engine, and LLM takes vLLM's keyword."""
    from qwenstack.cli import build_parser, discover_commands
    from qwenstack.commands.ps import kv_kind
    from qwenstack.commands.serve import serve_config_from_args
    from qwenstack.llm import LLM
    from qwenstack.serving.config import ModelSpec
    from qwenstack.serving.introspect import model_status
    from qwenstack.serving.served import kv_capacity
    from qwenstack.serving.served import load_served_model

    args = build_parser(discover_commands()[0]).parse_args(["serve", "m", "--kv-cache-dtype", "fp8"])
    assert serve_config_from_args(args)["models"][0]["kv_cache_dtype"] == "fp8"
    served = load_served_model(ModelSpec(model=str(tiny_qwen3), dtype="float32", device="cpu", kv_cache_dtype="fp8"),
                               2**21)
    try:
        assert served.engine.engine.runner.kv_caches[0].dtype == torch.float8_e5m2
        status = model_status(served)  # /api/ps, which `qwenstack ps` prints
        assert (status["dtype"], status["kv_cache_dtype"]) == ("float32", "float8_e5m2")
        assert kv_kind(status) == ", float8_e5m2" and kv_kind({**status, "kv_cache_dtype": "float32"}) == ""
        tokens = status["kv_blocks"] * status["block_size"]  # the start-up log's line
        assert kv_capacity(served).startswith(f"KV cache: {tokens:,} tokens in float8_e5m2, ")
    finally:
        served.engine.shutdown()
    llm = LLM(tiny_qwen3, dtype="float32", kv_cache_memory=2**21, kv_cache_dtype="fp8")
    assert llm.engine.runner.kv_caches[0].dtype == torch.float8_e5m2
    assert len(llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids) <= 4
