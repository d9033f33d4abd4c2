"""Qwen3-MoE decoder (model_type "qwen3_moe"): the Qwen3 block with a sparse MoE in place of the MLP.

A layer is sparse when it is not in `mlp_only_layers` and (layer + 1) is a multiple of
`decoder_sparse_step`; otherwise it keeps a dense SwiGLU of `intermediate_size`. No shared expert.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from qwenstack.errors import ConfigError
from qwenstack.models.layers import SwiGLU
from qwenstack.models.moe import SparseMoE
from qwenstack.models.qwen3 import Qwen3Args, Qwen3ForCausalLM


@dataclass(kw_only=True)
class Qwen3MoeArgs(Qwen3Args):
    model_type: ClassVar[str] = "qwen3_moe"
    aliases: ClassVar[dict[str, str]] = {"num_local_experts": "num_experts"}
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool  # required: transformers defaults it to False, the released models use true
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    def validate(self, config: dict[str, Any]) -> None:
        super().validate(config)
        if not isinstance(self.mlp_only_layers, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.mlp_only_layers):
            raise ConfigError(f"field 'mlp_only_layers' must be a list of layer numbers, found "
                              f"{json.dumps(self.mlp_only_layers)}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) is more than num_experts "
                              f"({self.num_experts}): a token cannot be routed to more experts than there are")

    def sliding_layers(self, config: dict[str, Any]) -> list[int]:
        # transformers' Qwen3-MoE has no max_window_layers nor layer_types: with use_sliding_window and a
        # sliding_window, every layer slides.
        return list(range(self.num_hidden_layers)) if config.get("sliding_window") is not None else []

    def is_sparse_layer(self, layer_idx: int) -> bool:
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    args_class = Qwen3MoeArgs
    args: Qwen3MoeArgs

    def make_mlp(self, layer_idx: int) -> nn.Module:
        a = self.args
        if a.is_sparse_layer(layer_idx):
            return SparseMoE(a.hidden_size, a.moe_intermediate_size, a.num_experts, a.num_experts_per_tok, a.norm_topk_prob)
        return SwiGLU(a.hidden_size, a.intermediate_size)
