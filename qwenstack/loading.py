"""Model loading: a model id or directory (or nothing: the bundled demo model) -> weights and tokenizer on a
device, optionally quantized. The server, the guard, the CLI and the offline `LLM` all load through here."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwenstack.config import read_config
from qwenstack.errors import ConfigError
from qwenstack.models.registry import load_model, parse_dtype
from qwenstack.resolve import DEMO_MODEL_DIR, resolve_model, served_name
from qwenstack.tokenizer import Tokenizer

DEMO_NOTICE = ("Using the bundled demo model (a tiny Shakespeare-trained Qwen3, not a useful assistant). "
               "To run a real Qwen3, name one, e.g. `qwenstack serve Qwen/Qwen3-0.6B`.")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """The device, or ConfigError in one sentence for one torch does not know or this machine lacks."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"unknown device '{device}' (use cpu, or cuda on a machine with an NVIDIA GPU)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' asked for, but torch sees no CUDA GPU here (a CPU build of torch, "
                          "or no GPU): leave --device out to run on the CPU")
    return device


@dataclass
class LoadedModel:
    """A model ready to serve: weights, tokenizer, and where they came from."""

    name: str
    path: Path
    config: dict[str, Any]
    model: torch.nn.Module
    tokenizer: Tokenizer


def load(model: str | Path | None = None, *, dtype: str | torch.dtype | None = None, device: str | None = None,
         quantization: str | None = None, speculative: bool = False) -> LoadedModel:
    """speculative: also load the multi-token-prediction head (Qwen3-Next's mtp.*) that drafts for
    EngineConfig.speculative_tokens; a checkpoint without one is then an error."""
    if dtype == "auto":  # vLLM's default: here bfloat16, the dtype Qwen3 checkpoints ship in
        dtype = None
    if model is None:
        print(DEMO_NOTICE, flush=True)
        model = DEMO_MODEL_DIR
    from qwenstack.from_gguf import gguf_source

    gguf_file = gguf_source(model)
    if gguf_file is not None:
        return _load_gguf(model, gguf_file, dtype=dtype, device=check_device(device or default_device()),
                          quantization=quantization)
    path = resolve_model(model)
    device = check_device(device or default_device())
    config = read_config(path)
    torch_dtype = parse_dtype(dtype) if dtype is not None else torch.bfloat16
    prequantized = bool(config.get("quantization_config"))
    if quantization == "dequantize" and not prequantized:
        raise ValueError("quantization 'dequantize' applies to pre-quantized (FP8, AWQ, GPTQ) checkpoints only")
    # A pre-quantized checkpoint runs in its own format unless another is asked for (then from exact weights).
    weights = load_model(path, dtype=torch_dtype, device=device, dequantize=prequantized and bool(quantization))
    if quantization == "dequantize":
        quantization = None
    if speculative:
        from qwenstack.models.qwen3_next_mtp import load_mtp_head

        load_mtp_head(weights, path, torch_dtype, device)
    if quantization:
        from qwenstack.quantization import quantize_model

        quantize_model(weights, quantization)
    name = served_name(model)
    return LoadedModel(name, path, config, weights, Tokenizer.from_dir(path))


def _load_gguf(model: str | Path, gguf_file: Path, *, dtype: str | torch.dtype | None, device: str,
               quantization: str | None) -> LoadedModel:
    """A GGUF file (or Ollama model): its own quantization mapped to ours unless another is asked for."""
    from qwenstack.from_gguf import served_name
    from qwenstack.from_gguf.model import load_gguf

    torch_dtype = parse_dtype(dtype) if dtype is not None else torch.bfloat16
    weights, tokenizer, config, said = load_gguf(gguf_file, torch_dtype, device, quantize=not quantization)
    print(said, file=sys.stderr, flush=True)
    if quantization and quantization != "dequantize":
        from qwenstack.quantization import quantize_model

        quantize_model(weights, quantization)
    return LoadedModel(served_name(model, gguf_file), gguf_file.parent, config, weights, tokenizer)
