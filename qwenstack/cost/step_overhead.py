"""What a CPU decode step costs beyond reading weights, measured with tiny models built in memory.

A one-token step of a small model is not bound by its weights alone: every layer runs a few dozen small
ops (norms, rotary, attention on the cache, residuals) and the Python around them, and every MoE layer
routes, sorts and loops over its active experts. On a 0.6B model that is a fifth of the step. The
planner adds it to the bytes / kernel-rate time:

    step(L, L_moe, k) = step + L * layer + L_moe * (moe_layer + k * expert)

(every layer pays `layer`; a sparse layer pays `moe_layer` more, which may be negative since it has no
dense MLP, and `expert` per active expert).

The four terms come from decoding with tiny Qwen3 and Qwen3-MoE models (weights of a few KiB, so reading
them costs nothing) through the real engine: two dense depths give `step` and `layer`, two MoE top-k values
give `expert` and `moe_layer`. Qwen3-Next's linear-attention layers are counted as dense layers (their
overhead is of the same order; the planner says so). A few seconds, cached with the bandwidth figures.
"""
from __future__ import annotations

import time
from typing import Any

import torch

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 256, 4, 2, 128, 1024
DENSE_DEPTHS = (2, 10)
MOE_DEPTH, MOE_TOP_K = 4, (2, 8)


def _tiny_config(layers: int, **moe: Any) -> dict[str, Any]:
    config: dict[str, Any] = dict(
        model_type="qwen3", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=4096,
        rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    if moe:
        config.update(model_type="qwen3_moe", tie_word_embeddings=False, moe_intermediate_size=64,
                      decoder_sparse_step=1, norm_topk_prob=True, mlp_only_layers=[], **moe)
    return config


def decode_step_times(model: torch.nn.Module, prompt: list[int], new_tokens: int,
                      kv_cache_memory: int = 64 * 2**20) -> list[float]:
    """Seconds of each decode step after the first token of one greedy sequence through the engine (after a
    short warm-up request), for a model already loaded."""
    from qwenstack.engine.engine import EngineConfig, LLMEngine
    from qwenstack.engine.params import SamplingParams

    class _NoText:
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return ""

    engine = LLMEngine(model, _NoText(), [], EngineConfig(kv_cache_memory=kv_cache_memory, max_num_seqs=1))
    engine.generate_all([prompt], [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)])  # warm up
    engine.add_request("timed", prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    stamps = []
    while engine.has_unfinished_requests():
        engine.step()
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _step_seconds(config: dict[str, Any], steps: int, dtype: torch.dtype) -> float:
    """Seconds of the quickest one-sequence decode step of a tiny random model built from `config` (a busy
    machine only ever adds time to a step, so the quickest is the closest to what the step itself costs)."""
    from qwenstack.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model = model.to(dtype)
    return min(decode_step_times(model, list(range(3, 19)), steps + 1, 16 * 2**20))


def measure_step_overhead(steps: int = 24, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """{"step", "layer", "moe_layer", "expert"} in seconds. step, layer and expert are at least 0, and so is a
    sparse layer's whole cost (layer + moe_layer + top-k x expert): timing noise can invert a tiny
    difference, and the planner must never take time off a step for a layer."""
    shallow, deep = (_step_seconds(_tiny_config(n), steps, dtype) for n in DENSE_DEPTHS)
    layer = max(0.0, (deep - shallow) / (DENSE_DEPTHS[1] - DENSE_DEPTHS[0]))
    step = max(0.0, shallow - DENSE_DEPTHS[0] * layer)
    few, many = (_step_seconds(_tiny_config(MOE_DEPTH, num_experts=8, num_experts_per_tok=k), steps, dtype)
                 for k in MOE_TOP_K)
    expert = max(0.0, (many - few) / (MOE_DEPTH * (MOE_TOP_K[1] - MOE_TOP_K[0])))
    sparse_layer = max(0.0, (few - step) / MOE_DEPTH)  # one sparse layer running MOE_TOP_K[0] experts
    moe_layer = sparse_layer - layer - MOE_TOP_K[0] * expert
    return {"step": step, "layer": layer, "moe_layer": moe_layer, "expert": expert}
