"""Models from GGUF files (llama.cpp's format) and from Ollama's local store: see model.py, tokenizer.py, ollama.py."""
from __future__ import annotations

import os
from pathlib import Path

from qwenstack.errors import ModelNotFoundError

GGUF_MAGIC = b"GGUF"


def gguf_source(model: str | os.PathLike) -> Path | None:
    """The GGUF file a model argument names (a .gguf path, or an Ollama model name found in its store), or
    None when it names something else (a checkpoint directory, a Hugging Face id)."""
    from qwenstack.from_gguf.ollama import find_ollama_model, looks_like_ollama_name

    text = str(model)
    path = Path(text).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == GGUF_MAGIC:
                return path
        if path.suffix.lower() == ".gguf":
            raise ModelNotFoundError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
        return None
    if path.suffix.lower() == ".gguf":
        raise ModelNotFoundError(f"no such GGUF file: {path}")
    if not path.exists() and looks_like_ollama_name(text):
        return find_ollama_model(text)
    return None


def served_name(model: str | os.PathLike, source: Path) -> str:
    """A GGUF file is served under its file name without .gguf; an Ollama model under its own name."""
    return source.stem if Path(str(model)).expanduser().is_file() else str(model)
