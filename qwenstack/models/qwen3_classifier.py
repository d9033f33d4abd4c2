"""Qwen3 sequence classifiers (transformers' Qwen3ForSequenceClassification, Qwen3MoeForSequenceClassification):
the decoder with its lm_head replaced by `score`, a [num_labels, hidden] matrix read at a text's last token.

The published kind is Qwen3-Reranker converted to one label (vLLM's examples, e.g. the "-seq-cls" repositories):
score.weight = lm_head["yes"] - lm_head["no"], so sigmoid(score) is the original's softmax P(yes) with one row
multiplied instead of the vocabulary; fine-tuned classifiers (sentiment, intent, safety) carry more labels.

What makes a checkpoint one (registry.checkpoint_task): config.json's architectures names a
...ForSequenceClassification, or its tensors hold score.weight. Tensor names are transformers' (model.layers...,
score.weight), so a missing one is named as the checkpoint would name it.

Like an embedding model it generates nothing (`is_embedding_model`: the engine gives it no KV pool to speak of);
the engine pools its last-token logits (LLMEngine.classify), skipping trailing pad tokens as transformers does.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from qwenstack.models.qwen3 import Qwen3Args, Qwen3ForCausalLM
from qwenstack.models.qwen3_moe import Qwen3MoeArgs, Qwen3MoeForCausalLM


class Qwen3ForSequenceClassification(Qwen3ForCausalLM):
    is_embedding_model: ClassVar[bool] = True  # no generation: a forward pass per text, no KV cache
    # Never quantized (quantize_model): a few rows save nothing, and each label's logit would lose precision.
    full_precision_modules: ClassVar[tuple[str, ...]] = ("score",)

    def __init__(self, args: Qwen3Args) -> None:
        super().__init__(args)
        del self.lm_head  # no attribute at all: code that reads lm_head None as "tied" must not see one
        self.ignored_checkpoint_patterns = ()
        self.labels = args.labels
        self.pad_token_id = args.pad_token_id
        self.score = nn.Linear(args.hidden_size, len(args.labels), bias=False)

    def compute_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The labels' logits [T, num_labels] of hidden rows [T, H] (there is no vocabulary to choose from)."""
        if token_ids is not None:
            raise ValueError("a sequence classifier has no vocabulary logits, only its labels'")
        return self.score(hidden)


class Qwen3MoeForSequenceClassification(Qwen3ForSequenceClassification, Qwen3MoeForCausalLM):
    """The same head on the Qwen3-MoE decoder (its sparse MLPs come from Qwen3MoeForCausalLM.make_mlp)."""

    args_class = Qwen3MoeArgs
    args: Qwen3MoeArgs
