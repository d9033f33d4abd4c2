"""model_type -> model class. One explicit table; aliases listed beside it."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Collection

import torch
from torch import nn

from qwenstack.config import read_config
from qwenstack.errors import UnsupportedModelError
from qwenstack.pooling_config import is_embedding_checkpoint
from qwenstack.weights import checkpoint_tensors, load_weights

# model_type: (module, class)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "qwen3": ("qwenstack.models.qwen3", "Qwen3ForCausalLM"),
    "qwen3_moe": ("qwenstack.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "qwen3_next": ("qwenstack.models.qwen3_next", "Qwen3NextForCausalLM"),
    "qwen3_vl": ("qwenstack.models.qwen3_vl", "Qwen3VLForConditionalGeneration"),
    "qwen3_vl_moe": ("qwenstack.models.qwen3_vl", "Qwen3VLMoeForConditionalGeneration"),
    "qwen3_asr": ("qwenstack.models.qwen3_asr", "Qwen3ASRForConditionalGeneration"),
    "qwen3_omni_moe": ("qwenstack.models.qwen3_omni_moe", "Qwen3OmniMoeForConditionalGeneration"),
}
# model_type: (module, class) of its embedding-only form (a backbone with no lm_head, pooling_config.py)
EMBEDDING_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "qwen3": ("qwenstack.models.qwen3_embedding", "Qwen3EmbeddingModel"),
}
# model_type: (module, class) of its sequence-classification form (a `score` head instead of the lm_head)
CLASSIFIER_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "qwen3": ("qwenstack.models.qwen3_classifier", "Qwen3ForSequenceClassification"),
    "qwen3_moe": ("qwenstack.models.qwen3_classifier", "Qwen3MoeForSequenceClassification"),
}
# What a checkpoint's model does: "generate" (a causal LM), "embed" (a bare backbone), "classify" (a score head)
TASK_ARCHITECTURES: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "generate": ("", ARCHITECTURES), "embed": ("embedding ", EMBEDDING_ARCHITECTURES),
    "classify": ("sequence-classification ", CLASSIFIER_ARCHITECTURES),
}


def model_class(config: dict[str, Any], task: str = "generate") -> Any:
    model_type = config.get("model_type")
    kind, table = TASK_ARCHITECTURES[task]
    if model_type not in table:
        what = f"{kind}checkpoints of model_type '{model_type}' are" if kind else f"model_type '{model_type}' is"
        raise UnsupportedModelError(f"{what} not supported (supported: {', '.join(sorted(table))})")
    module, name = table[model_type]
    return getattr(importlib.import_module(module), name)


def checkpoint_task(model_dir: str | Path, config: dict[str, Any], tensor_names: Collection[str]) -> str:
    """What the checkpoint's model does: "classify" when config.json's architectures names a
    ...ForSequenceClassification or a `score.weight` replaces the lm_head, "embed" for an embedding backbone
    (pooling_config.is_embedding_checkpoint), else "generate"."""
    architectures = config.get("architectures")
    named = [a for a in architectures if isinstance(a, str)] if isinstance(architectures, list) else []
    if any(a.endswith("ForSequenceClassification") for a in named) or "score.weight" in tensor_names:
        return "classify"
    if config.get("model_type") in EMBEDDING_ARCHITECTURES and is_embedding_checkpoint(Path(model_dir), tensor_names):
        return "embed"
    return "generate"


def build_model(config: dict[str, Any], device: str | torch.device = "meta", task: str = "generate") -> nn.Module:
    """The model for a config, with parameters on `device` (meta: shapes only, to be filled by the loader);
    task (checkpoint_task): its generating, embedding-only or classifying form."""
    cls = model_class(config, task)
    args = cls.args_class.from_dict(config)
    with torch.device(device):
        model = cls(args)
    return model.eval()


def load_model(
    model_dir: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
    dequantize: bool = False,
) -> nn.Module:
    """Reads config.json, builds the architecture on the meta device and fills it strictly from the weights.

    A pre-quantized checkpoint (FP8, AWQ, GPTQ: config.json's quantization_config) is mapped to our own
    quantized formats, and what was done is said once on stderr (qwenstack.quantization.prequantized);
    dequantize=True keeps its exactly dequantized weights in `dtype` instead."""
    config = read_config(model_dir)
    dtype = parse_dtype(dtype) if dtype is not None else default_dtype(config)
    tensors = checkpoint_tensors(model_dir)  # headers only: the layout says what the model does (the task)
    model = build_model(config, "meta", checkpoint_task(model_dir, config, tensors))
    if not config.get("quantization_config"):
        load_weights(model, model_dir, dtype, device, tensors=tensors)
        return model
    from qwenstack.quantization.prequantized import load_prequantized, parse_scheme

    scheme = parse_scheme(config)
    assert scheme is not None
    report = load_prequantized(model, model_dir, scheme, dtype, device, dequantize=dequantize)
    print(report.summary(), file=sys.stderr, flush=True)
    model.prequantized = report  # what the loader did, for callers and tests
    return model


def default_dtype(config: dict[str, Any]) -> torch.dtype:
    """The checkpoint's own dtype (dtype/torch_dtype in config.json), float32 when it names none."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return parse_dtype(name)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    key = str(name).replace("torch.", "").lower()
    if key not in table:
        raise ValueError(f"unsupported dtype '{name}' (use float32, bfloat16 or float16)")
    return table[key]
