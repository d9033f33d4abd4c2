"""Model resolution: a local directory, or a Hugging Face model id found in the local cache (downloaded
only when online and allowed). Offline with nothing cached, the error says how to get the model."""
from __future__ import annotations

import os
from pathlib import Path

from qwenstack.errors import ModelNotFoundError

_TRUE = ("1", "true", "yes", "on")
# What a runtime needs from a model repository; never the PyTorch .bin duplicates or GGUF files.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE or os.environ.get("QWENSTACK_OFFLINE", "").lower() in _TRUE


def hub_cache_dir() -> str | None:
    """Read at call time (huggingface_hub reads its environment once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo-model"
DEMO_NAMES = ("qwenstack-demo", "demo-model")  # the bundled demo model, by name


def served_name(model: str | os.PathLike) -> str:
    """The name a model is served and listed under: a local directory's own name, else the id as given."""
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else str(model)


def resolve_model(name_or_path: str | os.PathLike, allow_download: bool = True) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name in DEMO_NAMES:  # what `qwenstack models` lists and the server calls the bundled model
        return DEMO_MODEL_DIR
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"'{name}' is neither a local model directory nor a Hugging Face model id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True, allow_patterns=ALLOW_PATTERNS, cache_dir=hub_cache_dir()))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    except Exception as exc:  # a broken cache entry must not look like a crash
        if "not found" not in str(exc).lower():
            raise ModelNotFoundError(f"the local cache entry for '{name}' is unreadable: {exc}") from None
    if not allow_download or is_offline():
        raise ModelNotFoundError(
            f"model '{name}' is not in the local Hugging Face cache and downloads are off "
            f"(offline mode). Download it on a machine with network access with "
            f"`huggingface-cli download {name}` (then copy the cache, or set HF_HOME to it), "
            f"or pass a local directory that holds config.json and the safetensors weights."
        )
    try:
        return Path(snapshot_download(name, allow_patterns=ALLOW_PATTERNS, cache_dir=hub_cache_dir()))
    except Exception as exc:
        raise ModelNotFoundError(f"could not download '{name}': {exc}. Pass a local directory instead.") from None
