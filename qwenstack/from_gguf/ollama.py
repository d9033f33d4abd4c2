"""Finding a model that the user pulled with Ollama in Ollama's local store, read-only.

The store (OLLAMA_MODELS, default ~/.ollama/models) keeps a manifest per name at
manifests/<registry>/<namespace>/<model>/<tag> (`qwen3:0.6b` is registry.ollama.ai/library/qwen3/0.6b;
no tag means `latest`), a JSON list of layers by digest; the weights are the layer of media type
application/vnd.ollama.image.model, a GGUF file at blobs/sha256-<hex>. Nothing is written there.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from qwenstack.errors import ModelNotFoundError

MODEL_LAYER = "application/vnd.ollama.image.model"
DEFAULT_REGISTRY = "registry.ollama.ai"
# [registry/][namespace/]model[:tag], as Ollama names models.
NAME = re.compile(r"^(?:(?P<registry>[\w.-]+\.[\w.-]+(?::\d+)?)/)?(?:(?P<namespace>[\w.-]+)/)?"
                  r"(?P<model>[\w.-]+)(?::(?P<tag>[\w.-]+))?$")


def ollama_store() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def looks_like_ollama_name(name: str) -> bool:
    """`qwen3:0.6b`, `library/qwen3:8b`: a tag, or a name the store has under some tag (Hugging Face ids, which
    are `org/name` without a tag, are tried as those first)."""
    return bool(NAME.match(name)) and (":" in name or manifest_path(name).parent.is_dir())


def manifest_path(name: str) -> Path:
    match = NAME.match(name)
    if match is None:
        raise ModelNotFoundError(f"'{name}' is not an Ollama model name (model[:tag])")
    parts = match.groupdict()
    return (ollama_store() / "manifests" / (parts["registry"] or DEFAULT_REGISTRY)
            / (parts["namespace"] or "library") / parts["model"] / (parts["tag"] or "latest"))


def find_ollama_model(name: str) -> Path:
    """The GGUF blob of an Ollama model, or ModelNotFoundError saying where it looked."""
    path = manifest_path(name)
    if not path.is_file():
        tags = sorted(p.name for p in path.parent.iterdir() if p.is_file()) if path.parent.is_dir() else []
        base = name.split(":")[0]
        have = f"; the store has it as {', '.join(base + ':' + t for t in tags)}" if tags else f" (no {path})"
        raise ModelNotFoundError(f"Ollama model '{name}' (tag {path.name}) is not in the local store{have}; "
                                 f"pull it with `ollama pull {name}` or pass a .gguf file")
    try:
        layers = json.loads(path.read_text(encoding="utf-8")).get("layers", [])
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ModelNotFoundError(f"the Ollama manifest {path} is unreadable: {exc}") from None
    digests = [layer.get("digest", "") for layer in layers if isinstance(layer, dict)
               and layer.get("mediaType") == MODEL_LAYER]
    if not digests:
        raise ModelNotFoundError(f"the Ollama manifest {path} has no model layer ({MODEL_LAYER})")
    blob = ollama_store() / "blobs" / digests[0].replace(":", "-")
    if not blob.is_file():
        raise ModelNotFoundError(f"Ollama model '{name}' lists blob {digests[0]}, which is missing from {blob.parent}")
    return blob
