"""The offline Python API, familiar to vLLM users:

    llm = LLM("Qwen/Qwen3-0.6B")            # or a local directory; no argument: the bundled demo model
    llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
    llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=64), enable_thinking=False)
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from qwenstack.config import read_config
from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.engine.outputs import RequestOutput
from qwenstack.engine.params import SamplingParams
from qwenstack.models.registry import load_model, parse_dtype
from qwenstack.resolve import resolve_model
from qwenstack.tokenizer import Tokenizer

log = logging.getLogger("qwenstack")

DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo-model"
DEMO_NOTICE = ("Using the bundled demo model (a tiny Shakespeare-trained Qwen3, not a useful assistant). "
               "To run a real Qwen3, name one, e.g. `qwenstack serve Qwen/Qwen3-0.6B`.")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    if model is None:
        print(DEMO_NOTICE, flush=True)
        model = DEMO_MODEL_DIR
    from qwenstack.from_gguf import gguf_source

    gguf_file = gguf_source(model)
    if gguf_file is not None:
        return _load_gguf(model, gguf_file, dtype=dtype, device=device or default_device(), quantization=quantization)
    path = resolve_model(model)
    device = device or default_device()
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
    name = str(model) if not Path(str(model)).is_dir() else Path(str(model)).resolve().name
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


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        max_model_len: int | None = None,
        kv_cache_memory: int | None = None,
        enable_prefix_caching: bool = True,
        quantization: str | None = None,
        **engine_options: Any,
    ) -> None:
        self.loaded = load(model, dtype=dtype, device=device, quantization=quantization,
                           speculative=engine_options.get("speculative_tokens", 0) > 0)
        config = EngineConfig(max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching, **engine_options)
        if kv_cache_memory is not None:
            config.kv_cache_memory = kv_cache_memory
        self.tokenizer = self.loaded.tokenizer
        self.engine = LLMEngine(self.loaded.model, self.tokenizer, self.tokenizer.eos_token_ids, config)

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]] | list[int],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Prompts as strings or token-id lists; one SamplingParams for all or one per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        token_prompts = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if sampling_params is None:
            params: list[SamplingParams] = [SamplingParams() for _ in token_prompts]
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(token_prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(token_prompts):
                raise ValueError("give one SamplingParams for all prompts or exactly one per prompt")
        outputs = self.engine.generate_all(token_prompts, params)
        for out, p in zip(outputs, prompts):
            out.prompt = p if isinstance(p, str) else None
        return outputs

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        enable_thinking: bool = True,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(c, tools=tools, add_generation_prompt=True,  # type: ignore[arg-type]
                                               enable_thinking=enable_thinking, **template_kwargs)
            for c in conversations
        ]
        return self.generate(prompts, sampling_params)
