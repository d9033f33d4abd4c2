"""Qwen3 and Qwen3-MoE against transformers on tiny random checkpoints: logits for a packed batch of
prompts of different lengths, and greedy decoding through the paged KV cache."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpoints import build_hf_checkpoint, dense_config, hf_greedy, load_hf, moe_config
from qwenstack.engine.reference import greedy_generate
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.registry import load_model

PROMPTS = [[5, 17, 33, 2, 101, 7, 8], [300, 4], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27], [42]]

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "dense-tied-gqa2": ("qwen3", dense_config()),
    "dense-untied-mha": ("qwen3", dense_config(tie_word_embeddings=False, num_key_value_heads=4)),
    "dense-mqa": ("qwen3", dense_config(num_key_value_heads=1)),
    "dense-gqa4-yarn": ("qwen3", dense_config(num_attention_heads=8, num_key_value_heads=2, rope_parameters=YARN,
                                              max_position_embeddings=256)),
    "moe-norm-topk": ("qwen3_moe", moe_config(norm_topk_prob=True)),
    "moe-no-norm-topk": ("qwen3_moe", moe_config(norm_topk_prob=False, num_experts_per_tok=3)),
    "moe-mixed-sparse": ("qwen3_moe", moe_config(mlp_only_layers=[0], num_hidden_layers=3)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_type, config = CASES[request.param]
    return build_hf_checkpoint(tmp_path_factory.mktemp(request.param), model_type, config, seed=1)


def packed_logits(model: torch.nn.Module, prompts: list[list[int]]) -> list[torch.Tensor]:
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.tensor([i for p in prompts for i in range(len(p))])
    lens = [len(p) for p in prompts]
    logits = model.compute_logits(model.forward(ids, positions, AttentionBatch(lens, lens), None))
    return list(logits.split(lens))


@torch.inference_mode()
def test_logits_match_transformers(checkpoint: Path) -> None:
    ours = load_model(checkpoint, dtype=torch.float32)
    ref = load_hf(checkpoint)
    for prompt, got in zip(PROMPTS, packed_logits(ours, PROMPTS)):
        want = ref(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_greedy_tokens_match_transformers_generate(checkpoint: Path) -> None:
    ours = load_model(checkpoint, dtype=torch.float32)
    ref = load_hf(checkpoint)
    new_tokens = 40
    got = greedy_generate(ours, PROMPTS, new_tokens, block_size=4)
    for prompt, tokens in zip(PROMPTS, got):
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == out[0, len(prompt):].tolist()


@torch.inference_mode()
def test_yarn_long_positions_match(tmp_path: Path) -> None:
    """Positions past the original context, where YaRN's interpolated frequencies matter."""
    config = dense_config(rope_parameters=YARN, max_position_embeddings=256)
    path = build_hf_checkpoint(tmp_path, "qwen3", config, seed=3)
    ours, ref = load_model(path, dtype=torch.float32), load_hf(path)
    prompt = [(7 * i) % 500 + 3 for i in range(200)]
    torch.testing.assert_close(packed_logits(ours, [prompt])[0], ref(torch.tensor([prompt])).logits[0], atol=1e-4, rtol=0)


@torch.inference_mode()
def test_bfloat16_close_to_transformers(tiny_qwen3: Path) -> None:
    ours = load_model(tiny_qwen3, dtype=torch.bfloat16)
    ref = load_hf(tiny_qwen3, dtype=torch.bfloat16)
    prompt = PROMPTS[2]
    got = packed_logits(ours, [prompt])[0].float()
    want = ref(torch.tensor([prompt])).logits[0].float()
    assert (got - want).abs().max().item() < 0.1


YARN_ADDED = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("theta", [None, 1e6], ids=["theta-from-default", "theta-in-rope-scaling"])
@torch.inference_mode()
def test_rope_scaling_added_to_a_rope_parameters_config(tmp_path: Path, theta: float | None) -> None:
    """A transformers-5 config.json (rope_parameters) to which rope_scaling was added for YaRN, as Qwen's model cards
    say: transformers runs rope_scaling (it replaces rope_parameters whole); we ran the plain rope."""
    config = dense_config(max_position_embeddings=256)
    path = build_hf_checkpoint(tmp_path, "qwen3", config, seed=3)
    on_disk = json.loads((path / "config.json").read_text())
    if theta is not None:
        on_disk["rope_parameters"]["rope_theta"] = theta
    on_disk["rope_scaling"] = {**YARN_ADDED, **({} if theta is None else {"rope_theta": theta})}
    (path / "config.json").write_text(json.dumps(on_disk))
    ours, ref = load_model(path, dtype=torch.float32), load_hf(path)
    assert ref.config.rope_parameters["rope_type"] == "yarn"
    prompt = [(7 * i) % 500 + 3 for i in range(200)]
    torch.testing.assert_close(packed_logits(ours, [prompt])[0], ref(torch.tensor([prompt])).logits[0],
                               atol=1e-4, rtol=0)


def test_yarn_context_past_max_position_embeddings(tmp_path: Path) -> None:
    """YaRN stretches the context to original_max_position_embeddings x factor (vLLM's max_model_len for it; a
    Qwen3 config with YaRN added is run at 131,072 of its 40,960 positions): a prompt past max_position_embeddings
    runs, and greedily as transformers does. We refused it."""
    from qwenstack import LLM, SamplingParams

    config = dense_config(rope_parameters=YARN, max_position_embeddings=96)
    path = build_hf_checkpoint(tmp_path, "qwen3", config, seed=3)
    llm = LLM(str(path), dtype="float32", kv_cache_memory=4 << 20)
    assert llm.engine.max_model_len == 256
    prompt = [(7 * i) % 500 + 3 for i in range(150)]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == hf_greedy(load_hf(path), [prompt], 6)[0]
