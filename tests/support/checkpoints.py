"""Tiny random checkpoints in the Hugging Face layout, built with transformers (a test-only dependency)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from tokenizer_training import save_tokenizer, train_bpe

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "Paris is the capital of France. Berlin is the capital of Germany. 2 + 2 = 4.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "Ünïcödé: héllo wörld, 你好，世界, こんにちは, emoji 🚀✨",
]
TINY_VOCAB = 512


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    return train_bpe(CORPUS * 4, TINY_VOCAB)


def write_tokenizer(out_dir: Path, chat_template: str | None = None) -> None:
    save_tokenizer(tiny_tokenizer(), out_dir, chat_template)


def dense_config(**overrides: Any) -> dict[str, Any]:
    config = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        eos_token_id=2, bos_token_id=None, pad_token_id=0, initializer_range=0.1,
    )
    config.update(overrides)
    return config


def moe_config(**overrides: Any) -> dict[str, Any]:
    config = dense_config(tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                          moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    config.update(overrides)
    return config


def next_config(**overrides: Any) -> dict[str, Any]:
    """Qwen3-Next: linear|full layers alternating, 2 key heads serving 4 value heads, Dk != Dv, MoE with a
    shared expert, partial rotary (4 of 16 dims)."""
    config = moe_config(full_attention_interval=2, num_hidden_layers=4, shared_expert_intermediate_size=48,
                        linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12,
                        linear_num_key_heads=2, linear_num_value_heads=4,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    config.update(overrides)
    return config


def _randomise_norms(model: torch.nn.Module, seed: int) -> None:
    # transformers initialises norms to ones; random scales make the parity test see their weights.
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            with torch.no_grad():
                p.copy_(0.5 + torch.rand(p.shape, generator=g))


def _recentre_zero_centred_norms(model: torch.nn.Module) -> None:
    # Qwen3-Next scales by (1 + w): shift w so the scales span 0.5..1.5 like the other models' norms.
    # (1.5..2.5 on every norm makes the tiny model ill-conditioned: fp32 itself drifts 1e-4 from fp64.)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "linear_attn.norm" not in name:  # the gated DeltaNet norm is plain w
                p.sub_(1.0)


def build_hf_checkpoint(out_dir: Path, model_type: str, config: dict[str, Any], seed: int = 0,
                        dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                        with_tokenizer: bool = True) -> Path:
    import transformers

    cfg_cls, model_cls = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "qwen3_next": (transformers.Qwen3NextConfig, transformers.Qwen3NextForCausalLM),
    }[model_type]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**config)).to(dtype)
    _randomise_norms(model, seed)
    if model_type == "qwen3_next":
        _recentre_zero_centred_norms(model)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    if with_tokenizer:
        write_tokenizer(out_dir)
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": config.get("eos_token_id")}))
    return out_dir


def load_hf(model_dir: Path, dtype: torch.dtype = torch.float32) -> Any:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.eval()


def hf_greedy(model: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, exactly `new_tokens` long (no stop at eos)."""
    outs = []
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        outs.append(out[0, len(prompt):].tolist())
    return outs
