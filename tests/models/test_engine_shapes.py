"""The engine as a server runs it (bfloat16, every CPU fast path swapped in, chunked prefill, the prefix cache,
prompts of one to 700 tokens decoding in mixed batches) on checkpoint shapes the other fixtures do not have:
head_dim 64 to 256 and one the kernels refuse (80), one kv head or as many as query heads, widths that are not
powers of two. Per generated token, the log-probability the engine reports is compared with transformers' in
float32 on the same tokens; it may be no further from it than the model as built, in bfloat16 without any fast
path, is (with some slack for another summation order). Thirty random shapes of this kind, tried once with
prompts up to 700 tokens and chunks of 64 to 2,048, all held; these five are kept. The tiny random models have
near ties, and MoE routers that flip in bfloat16, so an exact greedy match is not the bar here:
test_model_parity.py holds that in float32.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpoints import build_hf_checkpoint, dense_config, load_hf, moe_config, next_config
from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.engine.params import SamplingParams
from qwenstack.models.base import prompt_logits
from qwenstack.models.registry import load_model
from qwenstack.tokenizer import Tokenizer

SHAPE = dict(max_position_embeddings=2048)
CASES: dict[str, tuple[str, dict[str, Any], int]] = {  # name: (model_type, config, max_num_batched_tokens)
    "dense-hd128-mqa-chunk64": ("qwen3", dense_config(**SHAPE, hidden_size=128, num_attention_heads=4,
                                                      num_key_value_heads=1, head_dim=128, intermediate_size=200,
                                                      num_hidden_layers=3), 64),
    "moe-hd256-mha": ("qwen3_moe", moe_config(**SHAPE, hidden_size=96, num_attention_heads=2, num_key_value_heads=2,
                                              head_dim=256, moe_intermediate_size=48, num_experts=16,
                                              num_experts_per_tok=4), 256),
    "dense-hd80-gqa2": ("qwen3", dense_config(**SHAPE, hidden_size=96, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=80, intermediate_size=128, tie_word_embeddings=False), 2048),
    "dense-hd64-gqa8": ("qwen3", dense_config(**SHAPE, hidden_size=256, num_attention_heads=8,
                                              num_key_value_heads=1, head_dim=64, intermediate_size=96), 256),
    "next-hd128": ("qwen3_next", next_config(**SHAPE, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=128, linear_key_head_dim=32, linear_value_head_dim=48), 256),
}
NEW_TOKENS = 10


def ordered_prompts(seed: int, vocab: int) -> list[list[int]]:
    """Three prompts sharing a prefix (a prefix-cache hit after the first is served), and four of 1 to 700."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(300)]
    prompts = [shared + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 200))] for _ in range(3)]
    return prompts + [[rng.randrange(3, vocab) for _ in range(n)] for n in (1, 17, 290, 700)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_logprobs_stay_within_bfloat16s_own_error(name: str, tmp_path: Path) -> None:
    model_type, config, batched_tokens = CASES[name]
    checkpoint = build_hf_checkpoint(tmp_path, model_type, config, seed=3)
    reference, as_built = load_hf(checkpoint), load_model(checkpoint, dtype=torch.bfloat16)
    tok = Tokenizer.from_dir(checkpoint)
    engine = LLMEngine(load_model(checkpoint, dtype=torch.bfloat16), tok, [],
                       EngineConfig(kv_cache_memory=64 << 20, max_num_batched_tokens=batched_tokens))
    prompts = ordered_prompts(3, config["vocab_size"])
    engine.generate_all(prompts[:1], [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)])
    outputs = engine.generate_all(prompts, [SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True,
                                                           logprobs=0) for _ in prompts])
    assert outputs[0].metrics.num_cached_tokens > 0 or model_type == "qwen3_next"  # (no prefix cache for hybrids)
    engine_errors, built_errors = [], []
    with torch.inference_mode():
        for prompt, out in zip(prompts, outputs):
            tokens = out.outputs[0].token_ids
            assert len(tokens) == NEW_TOKENS
            ids = torch.tensor([prompt + tokens])
            chosen = torch.tensor(tokens)[:, None]
            ref = torch.log_softmax(reference(ids).logits[0, len(prompt) - 1:-1].float(), -1).gather(1, chosen)[:, 0]
            built = torch.log_softmax(prompt_logits(as_built, ids)[0, len(prompt) - 1:-1].float(), -1)
            ours = torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)])
            engine_errors.append((ours - ref).abs())
            built_errors.append((built.gather(1, chosen)[:, 0] - ref).abs())
    engine_error, built_error = torch.cat(engine_errors), torch.cat(built_errors)
    # On average over the 70 tokens (a 5% error in the decode scores' scale reads 1.9-2.9x here, the real paths
    # 0.8-1.1x), and at every token with a looser bound.
    assert engine_error.mean() <= 1.4 * built_error.mean() + 0.005, (engine_error.mean(), built_error.mean())
    assert engine_error.max() <= 2 * built_error.max() + 0.1, (engine_error.max(), built_error.max())
