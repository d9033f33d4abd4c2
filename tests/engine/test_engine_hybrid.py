"""The engine serving Qwen3-Next (paged KV for full-attention layers, a recurrent-state slot per running
sequence for linear layers): continuous batching, chunked prefill and forced preemption against the
reference greedy path and transformers."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch

from checkpoints import build_hf_checkpoint, load_hf, next_config
from failing_requests import refuse_after, run_through_failures
from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.engine.params import SamplingParams
from qwenstack.engine.reference import greedy_generate
from qwenstack.models.registry import load_model
from qwenstack.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_checkpoint(tmp_path_factory.mktemp("next"), "qwen3_next", next_config(), seed=2)


@pytest.fixture(scope="module")
def prompts_and_reference(tiny_next: Path) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.choice([1, 5, 30, 70]))] for _ in range(8)]
    model = load_model(tiny_next, dtype=torch.float32)
    return prompts, greedy_generate(model, prompts, 20, block_size=4)


def make_engine(path: Path, **options) -> LLMEngine:
    model = load_model(path, dtype=torch.float32)
    tok = Tokenizer.from_dir(path)
    return LLMEngine(model, tok, tok.eos_token_ids, EngineConfig(**{"block_size": 4, "kv_cache_memory": 2**20, **options}))


@pytest.mark.parametrize("options", [
    {},
    {"max_num_batched_tokens": 9},  # chunked prefill: prompts continue from their state slot
    {"kv_cache_memory": 24 * 4 * 2 * 2 * 2 * 16 * 4},  # 24 blocks of 4: preemption, recompute from a fresh slot
    {"max_num_seqs": 2},
])
def test_batched_greedy_matches_reference(tiny_next: Path, prompts_and_reference, options: dict) -> None:
    prompts, reference = prompts_and_reference
    engine = make_engine(tiny_next, **options)
    outs = engine.generate_all(prompts, [GREEDY] * len(prompts))
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert sorted(engine.state_slots.free) == list(range(engine.config.max_num_seqs))  # every slot returned
    if "kv_cache_memory" in options:
        assert engine.counters.preemptions > 0


def test_matches_transformers_and_disables_prefix_cache(tiny_next: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="qwenstack.engine"):
        engine = make_engine(tiny_next)
    assert "prefix caching is off" in caplog.text and not engine.block_manager.enable_prefix_caching
    hf = load_hf(tiny_next)
    prompt = [5, 9, 14, 200, 31, 7]
    got = engine.generate_all([prompt], [GREEDY])[0].outputs[0].token_ids
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                       eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got == want
    # The same prompt again gives the same tokens: no stale state, no cache hit.
    assert engine.generate_all([prompt], [GREEDY])[0].outputs[0].token_ids == want


def test_abort_returns_the_state_slot(tiny_next: Path) -> None:
    engine = make_engine(tiny_next)
    engine.add_request("a", list(range(5, 40)), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    engine.step()
    assert len(engine.state_slots.free) == engine.config.max_num_seqs - 1
    engine.abort("a")
    assert len(engine.state_slots.free) == engine.config.max_num_seqs
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_request_that_fails_to_sample_leaves_the_others_tokens(tiny_next: Path, prompts_and_reference) -> None:
    """A request whose processor leaves no token fails mid-decode beside others. The step used to be run again
    without it, and the others' recurrent states took that step's tokens twice (every later token off); now
    the step stands for them, and the failure comes with their outputs."""
    prompts, reference = prompts_and_reference
    engine = make_engine(tiny_next)
    for i, prompt in enumerate(prompts[:4]):
        engine.add_request(str(i), prompt, GREEDY)
    engine.add_request("bad", prompts[5], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                         logits_processors=[refuse_after(3)]))
    tokens, failed = run_through_failures(engine)
    assert failed == ["bad"] and "bad" not in engine.requests
    assert [tokens[str(i)] for i in range(4)] == reference[:4]
    assert sorted(engine.state_slots.free) == list(range(engine.config.max_num_seqs))
