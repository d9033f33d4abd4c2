"""Qwen3 dense decoder (model_type "qwen3"): GQA with per-head QK-RMSNorm, SwiGLU, RoPE, no biases.

Checkpoint keys are the transformers ones (model.layers.{i}.self_attn.q_proj.weight, ...); q/k/v and
gate/up are fused on load. With tie_word_embeddings the lm_head reuses the embedding matrix and no
lm_head.weight is expected on disk.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from qwenstack.config import ModelArgs, RopeConfig
from qwenstack.errors import ConfigError, UnsupportedModelError
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.base import KVCacheSpec, lm_logits, output_head
from qwenstack.models.layers import Attention, RMSNorm, RotaryEmbedding, SwiGLU


@dataclass(kw_only=True)
class Qwen3Args(ModelArgs):
    model_type: ClassVar[str] = "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None
    rms_norm_eps: float
    max_position_embeddings: int
    head_dim: int | None = None  # absent in some configs: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    use_sliding_window: bool = False
    rope: RopeConfig = field(init=False)
    # What a Qwen3ForSequenceClassification checkpoint's head needs (transformers keeps them on every config):
    labels: tuple[str, ...] = field(init=False, default=())  # id2label in id order
    pad_token_id: int | None = field(init=False, default=None)  # pooling skips trailing pads, as transformers

    def validate(self, config: dict[str, Any]) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"config.json has no head_dim, and hidden_size ({self.hidden_size}) is not a "
                                  f"multiple of num_attention_heads ({self.num_attention_heads}) to derive it from")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act '{self.hidden_act}' is not supported (Qwen3 uses silu)")
        if self.use_sliding_window and self.sliding_layers(config):
            raise UnsupportedModelError(
                f"use_sliding_window=true with sliding_window={config.get('sliding_window')} is not supported "
                f"for {self.model_type} (no released Qwen3 enables it)")
        self.rope = RopeConfig.from_config(config, self.model_type)
        self.labels = classifier_labels(config)
        pad = config.get("pad_token_id")
        self.pad_token_id = pad if isinstance(pad, int) and not isinstance(pad, bool) else None

    def sliding_layers(self, config: dict[str, Any]) -> list[int]:
        """The layers transformers would give a sliding window: with use_sliding_window, those from
        max_window_layers on (or as layer_types says). Configs carry the switch with max_window_layers at the
        layer count: none slides."""
        layers = config.get("num_hidden_layers", 0)
        kinds = config.get("layer_types")
        if isinstance(kinds, list):
            return [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
        if config.get("sliding_window") is None:
            return []
        return list(range(min(config.get("max_window_layers", layers), layers), layers))


def classifier_labels(config: dict[str, Any]) -> tuple[str, ...]:
    """A sequence classifier's label names in id order, as transformers reads them: id2label when given (its
    keys are the ids, as strings), else num_labels (default 2) named LABEL_0, LABEL_1, ... Lenient: every
    Qwen3 config carries these, and only a classifier uses them (its score.weight's rows must then match)."""
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        keys = list(id2label)
        if all(isinstance(k, str) and k.lstrip("-").isdigit() for k in keys):
            keys.sort(key=int)
        return tuple(str(id2label[k]) for k in keys)
    count = config.get("num_labels")
    count = count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 2
    return tuple(f"LABEL_{i}" for i in range(count))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). The MLP is dense or sparse."""

    def __init__(self, args: Qwen3Args, mlp: nn.Module, rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        assert args.num_key_value_heads is not None and args.head_dim is not None
        self.self_attn = Attention(
            args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
            args.rms_norm_eps, args.rope, bias=args.attention_bias, rotary=rotary,
        )
        self.mlp = mlp
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, kv_cache: torch.Tensor | None
    ) -> torch.Tensor:
        x, h = self.post_attention_layernorm.add_and_norm(
            x, self.self_attn(self.input_layernorm(x), positions, batch, kv_cache))
        return x + self.mlp(h)


def run_decoder_layers(layers: Sequence[nn.Module], x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                       kv_caches: list[torch.Tensor] | None) -> torch.Tensor:
    """The hidden states through each layer in turn (before the final norm)."""
    for i, layer in enumerate(layers):
        x = layer(x, positions, batch, None if kv_caches is None else kv_caches[i])
    return x


class Qwen3Model(nn.Module):
    # The preparation (models/fast_paths.py) may give an instance its own: decode steps as one flat loop of
    # native ops, everything else through this reference.
    run_layers = staticmethod(run_decoder_layers)

    def __init__(self, args: Qwen3Args, make_mlp: Any) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        assert args.head_dim is not None
        rotary = RotaryEmbedding(args.rope, args.head_dim)
        self.layers = nn.ModuleList([DecoderLayer(args, make_mlp(i), rotary) for i in range(args.num_hidden_layers)])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv_caches: list[torch.Tensor] | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return self.norm(self.run_layers(self.layers, x, positions, batch, kv_caches))


class Qwen3ForCausalLM(nn.Module):
    args_class: ClassVar[type[Qwen3Args]] = Qwen3Args

    def __init__(self, args: Qwen3Args) -> None:
        super().__init__()
        self.args = args
        self.model = Qwen3Model(args, self.make_mlp)
        self.lm_head, self.ignored_checkpoint_patterns = output_head(args.hidden_size, args.vocab_size,
                                                                    args.tie_word_embeddings)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        return SwiGLU(self.args.hidden_size, self.args.intermediate_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv_caches: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, batch, kv_caches)

    def compute_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        return lm_logits(hidden, self.lm_head, self.model.embed_tokens, token_ids)

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec.of_decoder(self.args)
