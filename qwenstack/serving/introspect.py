"""What a running server tells tools about itself beyond the OpenAI API.

- GET /tokenizer_info (vLLM's endpoint; lm-eval's remote tokenizer reads it): the special tokens, the chat
  template and the context length of the served model (`?model=` picks one when several are served).
- GET /api/ps (Ollama's path; `qwenstack ps` reads it): each loaded model with its device, weight and KV
  memory, KV use and queue, plus the process's resident memory. Read without locks: a snapshot for people.
  Each entry also carries Ollama's fields (model, size, size_vram, digest, details, expires_at,
  context_length: ollama/models.py), so `ollama ps` and Ollama's clients read it too; `name` stays the served
  name.
"""
from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request

from qwenstack.serving.ollama import models as ollama_models
from qwenstack.serving.ollama.protocol import OllamaErrorResponse
from qwenstack.serving.openapi import error_model
from qwenstack.serving.state import get_state


def tokenizer_info(served: Any) -> dict[str, Any]:
    tok = served.tokenizer
    added = tok.backend.get_added_tokens_decoder()
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        **{key: tok.special_tokens.get(key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")},
        "chat_template": tok.chat_template,
        "model_max_length": served.max_model_len,
        "vocab_size": tok.vocab_size,
        "added_tokens_decoder": {str(i): {"content": t.content, "special": t.special} for i, t in sorted(added.items())},
    }


def _resident_bytes() -> int | None:
    try:  # Linux: resident pages of this process
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def model_status(served: Any) -> dict[str, Any]:
    engine = served.engine.engine
    tensors = [*engine.model.parameters(), *engine.model.buffers()]
    first = next((t for t in tensors if t.is_floating_point()), None)
    stats = engine.stats()
    kv_bytes = engine.runner.kv_cache_bytes()
    quant = served.hf_config.get("quantization_config") or {}
    return {
        "name": served.name,
        "model_type": served.hf_config.get("model_type"),
        "device": str(first.device) if first is not None else None,
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "quantization": quant.get("quant_method"),
        "weights_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "parameters": sum(t.numel() for t in engine.model.parameters()),
        "kv_cache_bytes": kv_bytes,
        "kv_cache_dtype": str(engine.runner.kv_dtype).removeprefix("torch."),
        "kv_cache_used_bytes": int(kv_bytes * stats["kv_usage"]),
        "kv_usage": stats["kv_usage"],
        "kv_blocks": engine.block_manager.num_blocks,
        "block_size": engine.block_manager.block_size,
        "max_model_len": served.max_model_len,
        "running": stats["num_running"],
        "waiting": stats["num_waiting"],
        "capabilities": served.capabilities,
    }


def ps_entry(served: Any) -> dict[str, Any]:
    status = model_status(served)
    return {**ollama_models.running(served, status), **status}


def router() -> APIRouter:
    api = APIRouter()

    @api.get("/tokenizer_info")
    def get_tokenizer_info(request: Request, model: str | None = None) -> dict[str, Any]:
        return tokenizer_info(get_state(request).registry.resolve(model))

    @api.get("/api/ps")
    @error_model(OllamaErrorResponse)  # Ollama's path: its errors in Ollama's shape (ollama/api.py)
    def ps(request: Request) -> dict[str, Any]:
        registry = get_state(request).registry
        return {"models": [ps_entry(m) for m in list(registry.models.values())],
                "loading": list(registry.loading), "process_resident_bytes": _resident_bytes()}

    return api
