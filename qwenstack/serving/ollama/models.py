"""What Ollama's model routes say about a served model: its Ollama name, details, digest, and the entries of
/api/tags, /api/show and /api/ps (introspect.py serves /api/ps with these fields beside qwenstack's own).

Decisions:
- Names: Ollama names are `name:tag`, and its clients send back what /api/tags listed (LangChain checks a
  model against that list). A served name without a tag is listed as `NAME:latest`, and a request for
  `NAME:latest` reaches `NAME`; a request for the bare name works too.
- `details`: format "safetensors" (the weights as this server holds them), family the checkpoint's model_type,
  parameter_size from the parameter count (e.g. "596.05M", "8.2B"), quantization_level the quantization
  method or the weights' dtype as GGUF spells it ("BF16", "F32"), both in capitals as Ollama writes them.
- The digest is a sha256 of the served name and config.json (stable across restarts; `ollama ps` shows its
  first 12 characters). `size` is the weights' bytes (/api/tags), plus the KV cache (/api/ps); `size_vram` is
  all of it on a GPU, 0 on the CPU (what `ollama ps` turns into its PROCESSOR column). Models stay loaded,
  so `expires_at` is far in the future (`ollama ps` shows "Forever").
- capabilities (/api/show): "completion", plus "tools" and "thinking" when the chat template has them,
  "vision" for vision models; an embedding model has "embedding" only.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from qwenstack.serving.served import ServedModel

LATEST = ":latest"
NEVER_UNLOADED = "2318-01-01T00:00:00Z"  # more than 20 years ahead: "Forever" to Ollama's clients
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # as GGUF names them


def ollama_name(name: str) -> str:
    """The name Ollama's clients see: `name:tag`, with `latest` when the served name has no tag."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + LATEST


def timestamp(seconds: float | None = None) -> str:
    """An RFC 3339 UTC time, as Ollama writes `created_at` and `modified_at`."""
    moment = datetime.fromtimestamp(seconds, timezone.utc) if seconds is not None else datetime.now(timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def digest(served: ServedModel) -> str:
    spec = json.dumps({"name": served.name, "config": served.hf_config}, sort_keys=True, default=str)
    return hashlib.sha256(spec.encode("utf-8")).hexdigest()


def _parameter_size(count: int) -> str:
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}B"
    if count >= 1_000_000:
        return f"{count / 1e6:.2f}M"
    return f"{count / 1e3:.2f}K"


def details(served: ServedModel, status: dict[str, Any]) -> dict[str, Any]:
    """Ollama's `details` of a model, from introspect.model_status's numbers."""
    family = str(served.hf_config.get("model_type") or "qwen3")
    kind = status.get("quantization") or DTYPES.get(status.get("dtype") or "", status.get("dtype") or "")
    return {"parent_model": "", "format": "safetensors",
            "family": family, "families": [family], "parameter_size": _parameter_size(status["parameters"]),
            "quantization_level": str(kind).upper()}


def listed(served: ServedModel, status: dict[str, Any]) -> dict[str, Any]:
    """A model's entry in /api/tags."""
    name = ollama_name(served.name)
    return {"name": name, "model": name, "modified_at": timestamp(served.created), "size": status["weights_bytes"],
            "digest": digest(served), "details": details(served, status)}


def running(served: ServedModel, status: dict[str, Any]) -> dict[str, Any]:
    """Ollama's fields of a model's entry in /api/ps (`name` stays the served name `qwenstack ps` prints)."""
    size = status["weights_bytes"] + status["kv_cache_bytes"]
    on_gpu = bool(status.get("device")) and not str(status["device"]).startswith("cpu")
    return {"model": ollama_name(served.name), "size": size, "size_vram": size if on_gpu else 0,
            "digest": digest(served), "details": details(served, status), "expires_at": NEVER_UNLOADED,
            "context_length": served.max_model_len}


def capabilities(served: ServedModel) -> list[str]:
    if served.embedding_only:
        return ["embedding"]
    template = served.tokenizer.chat_template or ""
    caps = ["completion"]
    if "tools" in template:
        caps.append("tools")
    if "<think>" in template or "enable_thinking" in template:
        caps.append("thinking")
    if "vision" in served.capabilities:
        caps.append("vision")
    return caps


def _parameters(served: ServedModel) -> list[tuple[str, Any]]:
    names = {"repetition_penalty": "repeat_penalty"}
    values = [(names.get(k, k), v) for k, v in sorted(served.generation_defaults.items())]
    return [("num_ctx", served.max_model_len), *values]


def shown(served: ServedModel, status: dict[str, Any]) -> dict[str, Any]:
    """/api/show's answer. model_info uses GGUF's key names (`<family>.context_length`...), which clients read
    for the context length."""
    d = details(served, status)
    family, config = d["family"], served.hf_config
    info: dict[str, Any] = {"general.architecture": family, "general.name": served.name,
                            "general.parameter_count": status["parameters"],
                            f"{family}.context_length": served.max_model_len}
    for key, gguf_key in (("hidden_size", "embedding_length"), ("num_hidden_layers", "block_count"),
                          ("num_attention_heads", "attention.head_count"),
                          ("num_key_value_heads", "attention.head_count_kv")):
        if isinstance(config.get(key), int):
            info[f"{family}.{gguf_key}"] = config[key]
    parameters = _parameters(served)
    modelfile = "".join([f"# Modelfile of {served.name}, served by qwenstack\nFROM {served.name}\n",
                         *(f"PARAMETER {k} {v}\n" for k, v in parameters)])
    return {"modelfile": modelfile, "parameters": "\n".join(f"{k:<30} {v}" for k, v in parameters),
            "template": served.tokenizer.chat_template or "", "details": d, "model_info": info,
            "capabilities": capabilities(served), "modified_at": timestamp(served.created), "license": ""}
