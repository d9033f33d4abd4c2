"""Published Qwen3 configurations (values from shared/reference/qwen3-family.md), and cut-down variants
that fit the benchmark machine. Only shapes: the weights the benchmarks use are random."""
from __future__ import annotations

from typing import Any

QWEN3_COMMON = dict(vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=40960, hidden_act="silu",
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=151643,
                    eos_token_id=151645, attention_bias=False, head_dim=128)

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(QWEN3_COMMON, model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    # Qwen3-0.6B's 28 layers and attention heads with the hidden size cut to 64: a decode step calls every op a
    # 0.6B step calls but reads 44 MB of weights (the attention projections keep their head widths, the head its
    # vocabulary), so its time is mostly what a step costs besides its weights (bench_decode_loop).
    "qwen3-0.6b-h64": dict(QWEN3_COMMON, model_type="qwen3", hidden_size=64, intermediate_size=192,
                           num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    # Qwen3-30B-A3B with 4 of its 48 layers: per-layer cost and expert routing as released.
    "qwen3-30b-a3b-4l": dict(QWEN3_COMMON, model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                             num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4,
                             tie_word_embeddings=False, moe_intermediate_size=768, num_experts=128,
                             num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    # Qwen3-Next-80B-A3B with 4 of its 48 layers (3 linear attention + 1 full attention), and 128 of its 512
    # experts so that transformers and qwenstack fit in 24 GiB side by side. Each token still activates 10
    # experts of the released size plus the shared expert, so the bytes read per decoded token are the
    # released model's per-layer figure.
    "qwen3-next-80b-a3b-4l": dict(QWEN3_COMMON, model_type="qwen3_next", hidden_size=2048, intermediate_size=5120,
                                  num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                                  tie_word_embeddings=False, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                                  num_experts=128, num_experts_per_tok=10, norm_topk_prob=True, decoder_sparse_step=1,
                                  mlp_only_layers=[], linear_conv_kernel_dim=4, linear_key_head_dim=128,
                                  linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
                                  full_attention_interval=4, max_position_embeddings=262144,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                                                   "partial_rotary_factor": 0.25},
                                  layer_types=["linear_attention"] * 3 + ["full_attention"]),
    # Qwen3-VL-2B: the Qwen3 text decoder with interleaved M-RoPE, a 24-block ViT, DeepStack after layers 0-2.
    "qwen3-vl-2b": dict(
        model_type="qwen3_vl", image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653, tie_word_embeddings=True,
        text_config=dict(QWEN3_COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=262144,
                         tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                           patch_size=16, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
                           deepstack_visual_indexes=[5, 11, 17], in_channels=3, hidden_act="gelu_pytorch_tanh"),
    ),
}
