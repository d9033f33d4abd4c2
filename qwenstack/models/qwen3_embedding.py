"""Qwen3-Embedding (Qwen/Qwen3-Embedding-0.6B/4B/8B): a Qwen3 dense backbone with no language-model head.

config.json says model_type "qwen3"; what makes it an embedding model is the checkpoint (see
qwenstack/pooling_config.py is_embedding_checkpoint). The released weights are transformers' Qwen3Model alone:
embed_tokens.weight, layers.{i}..., norm.weight, no `model.` prefix and no lm_head. Our parameters carry those
names, so a missing tensor is named as the checkpoint would name it; `sanitize` also takes the backbone saved
inside a Qwen3ForCausalLM (`model.`-prefixed), whose lm_head, if any, goes unused.

An embedding is the final-norm hidden state at a text's last token (engine/embed.py); the model only gives the
hidden states, like any CausalLM's forward, and refuses to make logits.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from qwenstack.errors import UnsupportedModelError
from qwenstack.models.base import KVCacheSpec
from qwenstack.models.layers import SwiGLU
from qwenstack.models.qwen3 import Qwen3Args, Qwen3Model


class Qwen3EmbeddingModel(Qwen3Model):
    args_class: ClassVar[type[Qwen3Args]] = Qwen3Args
    is_embedding_model: ClassVar[bool] = True  # the engine gives it no KV pool to speak of and no generation
    # A backbone exported from a CausalLM may still carry its head (or a tied copy of the embedding).
    ignored_checkpoint_patterns: ClassVar[tuple[str, ...]] = (r"lm_head\.weight",)

    def __init__(self, args: Qwen3Args) -> None:
        super().__init__(args, lambda layer_idx: SwiGLU(args.hidden_size, args.intermediate_size))
        self.args = args

    @staticmethod
    def sanitize(name: str) -> str:
        """A checkpoint name in the CausalLM layout (model.layers.0...) -> the backbone's (layers.0...)."""
        return name.removeprefix("model.")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise UnsupportedModelError("an embedding model has no language-model head: it cannot generate text")

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec.of_decoder(self.args)
