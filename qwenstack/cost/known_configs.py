"""Published Qwen3 configurations, for planning without a download (`qwenstack plan Qwen/Qwen3-235B-A22B`).

Values are those of the released config.json files as collected in shared/reference/qwen3-family.md
(sections 2-4). A config.json found on disk or in the Hugging Face cache always wins over this table;
the planner says which it used.

One entry is not a release: `qwen3-1t-hypothetical`. Qwen3-Max (over a trillion parameters, 262,144
tokens of context) has no published architecture, so to answer "what would a trillion-parameter Qwen3
need?" we scale the Qwen3-MoE layout: Qwen3-235B-A22B's depth (94 layers) and expert recipe (top-8,
no shared expert, softmax router), Qwen3-Coder-480B-A35B's width (hidden 6144, 96 query / 8 key-value
heads of 128), 224 experts of intermediate size 2560 per layer, and a 262,144-token context. That is
1.011 T parameters, 52.9 B active per token. Every figure the planner derives from it is an estimate for
a model of that shape, not for Qwen3-Max.
"""
from __future__ import annotations

from typing import Any

_QWEN3 = dict(vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=40960, hidden_act="silu",
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=151643,
              eos_token_id=151645, attention_bias=False, head_dim=128, dtype="bfloat16")


def _dense(hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool) -> dict[str, Any]:
    return dict(_QWEN3, model_type="qwen3", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie)


def _moe(hidden: int, layers: int, heads: int, kv: int, experts: int, top_k: int, moe_inter: int,
         dense_inter: int, **extra: Any) -> dict[str, Any]:
    return dict(_QWEN3, model_type="qwen3_moe", hidden_size=hidden, intermediate_size=dense_inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False,
                moe_intermediate_size=moe_inter, num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                decoder_sparse_step=1, mlp_only_layers=[], **extra)


_NEXT_80B = dict(
    _QWEN3, model_type="qwen3_next", hidden_size=2048, intermediate_size=5120, num_hidden_layers=48,
    num_attention_heads=16, num_key_value_heads=2, head_dim=256, tie_word_embeddings=False,
    moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=512, num_experts_per_tok=10,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], linear_conv_kernel_dim=4,
    linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
    full_attention_interval=4, max_position_embeddings=262144,
    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
)

# name (lower case, without the "Qwen/" prefix) -> config.json values
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": _dense(1024, 3072, 28, 16, 8, tie=True),
    "qwen3-1.7b": _dense(2048, 6144, 28, 16, 8, tie=True),
    "qwen3-4b": _dense(2560, 9728, 36, 32, 8, tie=True),
    "qwen3-8b": _dense(4096, 12288, 36, 32, 8, tie=False),
    "qwen3-14b": _dense(5120, 17408, 40, 40, 8, tie=False),
    "qwen3-32b": _dense(5120, 25600, 64, 64, 8, tie=False),
    "qwen3-30b-a3b": _moe(2048, 48, 32, 4, 128, 8, 768, 6144),
    "qwen3-235b-a22b": _moe(4096, 94, 64, 4, 128, 8, 1536, 12288),
    # The 2507 releases: the same architectures with a 262,144-token native context.
    "qwen3-30b-a3b-instruct-2507": _moe(2048, 48, 32, 4, 128, 8, 768, 6144, max_position_embeddings=262144),
    "qwen3-30b-a3b-thinking-2507": _moe(2048, 48, 32, 4, 128, 8, 768, 6144, max_position_embeddings=262144),
    "qwen3-235b-a22b-instruct-2507": _moe(4096, 94, 64, 4, 128, 8, 1536, 12288, max_position_embeddings=262144),
    "qwen3-235b-a22b-thinking-2507": _moe(4096, 94, 64, 4, 128, 8, 1536, 12288, max_position_embeddings=262144),
    "qwen3-next-80b-a3b-instruct": _NEXT_80B,
    "qwen3-next-80b-a3b-thinking": _NEXT_80B,
    "qwen3-1t-hypothetical": _moe(6144, 94, 96, 8, 224, 8, 2560, 16384, max_position_embeddings=262144),
}
ALIASES = {"qwen3-next-80b-a3b": "qwen3-next-80b-a3b-instruct", "qwen3-max-hypothetical": "qwen3-1t-hypothetical",
           "qwen3-1t": "qwen3-1t-hypothetical"}
HYPOTHETICAL = {
    "qwen3-1t-hypothetical": (
        "HYPOTHETICAL: Qwen3-Max's architecture is unpublished. This is a 1-trillion-parameter Qwen3-MoE "
        "scaled from Qwen3-235B-A22B (94 layers, top-8 of 224 experts, hidden 6144, 96/8 heads; see "
        "qwenstack/cost/known_configs.py); its figures describe that shape, not Qwen3-Max."),
}


def known_config(name: str) -> tuple[str, dict[str, Any]] | None:
    """(canonical name, config) for a published name such as 'Qwen/Qwen3-235B-A22B', else None."""
    key = name.strip().lower()
    key = key.split("/", 1)[1] if key.startswith("qwen/") else key
    key = ALIASES.get(key, key)
    if key not in KNOWN_CONFIGS:
        return None
    return key, dict(KNOWN_CONFIGS[key])
