"""Tiny random sequence classifiers in transformers' layout (Qwen3ForSequenceClassification and the MoE's, saved
with save_pretrained), a Qwen3-Reranker converted to one label the way vLLM's conversion script does it
(score = lm_head["yes"] - lm_head["no"]), and transformers' reference logits."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from checkpoints import _randomise_norms, dense_config, moe_config, write_tokenizer

SENTIMENT = ("negative", "neutral", "positive")


def build_classifier_checkpoint(out_dir: Path, model_type: str = "qwen3", labels: tuple[str, ...] = SENTIMENT,
                                seed: int = 0, **overrides: Any) -> Path:
    import transformers

    cfg_cls, model_cls, config = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForSequenceClassification, dense_config),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForSequenceClassification, moe_config),
    }[model_type]
    torch.manual_seed(seed)
    cfg = cfg_cls(**config(**overrides), id2label=dict(enumerate(labels)),
                  label2id={name: i for i, name in enumerate(labels)})
    model = model_cls(cfg).float()
    _randomise_norms(model, seed)
    with torch.no_grad():  # scores far from zero, so a wrong row or pooling position shows
        model.score.weight.normal_(0, 0.5)
    model.save_pretrained(out_dir)
    write_tokenizer(out_dir)
    return out_dir


def convert_reranker(reranker_dir: Path, out_dir: Path) -> Path:
    """A Qwen3-Reranker as a one-label Qwen3ForSequenceClassification, as vLLM's convert script (and the
    published "-seq-cls" repositories) make it: the backbone as is, score = lm_head["yes"] - lm_head["no"]."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(reranker_dir)
    causal = transformers.AutoModelForCausalLM.from_pretrained(reranker_dir, dtype=torch.float32)
    config = causal.config
    config.architectures = ["Qwen3ForSequenceClassification"]
    config.num_labels = 1
    classifier = transformers.Qwen3ForSequenceClassification(config).float()
    classifier.model.load_state_dict(causal.model.state_dict())
    head = causal.get_output_embeddings().weight
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    with torch.no_grad():
        classifier.score.weight.copy_((head[yes] - head[no]).unsqueeze(0))
    classifier.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def hf_classifier_logits(model_dir: Path, prompts: list[list[int]]) -> torch.Tensor:
    """transformers' logits [N, labels] of token-id prompts, one at a time (its pooling: the last non-pad)."""
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.cat([model(torch.tensor([ids])).logits for ids in prompts])
