"""How a checkpoint's hidden states become embeddings: what sentence-transformers' files say (modules.json,
1_Pooling/config.json, config_sentence_transformers.json), and whether a checkpoint is an embedding model.

Decisions:
- Only last-token pooling is implemented (Qwen3-Embedding's, and what Ollama does for decoder models); an
  embedding checkpoint that asks for another pooling is refused at load, by name, rather than served wrong.
- Qwen3-Embedding was trained with <|endoftext|> after each text. Its current tokenizer.json appends it (a
  TemplateProcessing post-processor); the first release's did not and its reference code appended it by
  hand. We encode with the post-processor and append the token only where it did not, so both give the same ids.
- A chat model serves embeddings too (Ollama's behaviour): last token, L2-normalized, nothing appended.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection

from qwenstack.errors import ConfigError, RequestError, UnsupportedModelError

ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
EMBEDDING_END_TOKEN = "<|endoftext|>"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None


def st_modules(model_dir: Path | None) -> list[dict[str, Any]]:
    """sentence-transformers' module list (modules.json), empty when the checkpoint has none."""
    path = Path(model_dir) / "modules.json" if model_dir is not None else None
    if path is None or not path.is_file():
        return []
    modules = _read_json(path)
    return [m for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []


def is_embedding_checkpoint(model_dir: Path | None, tensor_names: Collection[str]) -> bool:
    """Whether a (Qwen3 dense) checkpoint is an embedding model, with no language-model head to generate with.

    Either sign suffices: sentence-transformers' modules.json naming a Pooling module (the released
    Qwen3-Embedding ships one; chat checkpoints do not), or a bare backbone, i.e. no tensor under `model.` and
    no lm_head (what Qwen3Model.save_pretrained writes, the released layout). A missing lm_head alone says
    nothing: tied chat models (Qwen3-0.6B, 4B) have none on disk either, but their tensors are `model.`-prefixed.
    """
    if any(m.get("type") == ST_POOLING for m in st_modules(model_dir)):
        return True
    names = list(tensor_names)
    return bool(names) and "lm_head.weight" not in names and not any(n.startswith("model.") for n in names)


@dataclass(frozen=True)
class PoolingConfig:
    """Last-token pooling, and what surrounds it."""

    normalize: bool = True  # L2-normalize the vector (after truncating it to the requested dimensions)
    end_token: str | None = None  # appended to each text when the tokenizer's post-processor did not add it
    prompts: dict[str, str] = field(default_factory=dict)  # named instructions put before a text (prompt_name)

    def instruction(self, prompt_name: str | None) -> str:
        """The named instruction put before each text (prompt_name, e.g. "query"); "" for None. RequestError
        for a name the checkpoint does not have."""
        if prompt_name is None:
            return ""
        if prompt_name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise RequestError(f"prompt_name '{prompt_name}' is not one of this model's prompts ({known})")
        return self.prompts[prompt_name]

    def with_end_token(self, ids: list[int], tokenizer: Any) -> list[int]:
        """A text's ids (encoded with the tokenizer's special tokens) with end_token appended, unless the
        tokenizer's post-processor already did (Qwen3-Embedding's current tokenizer does, its first one not)."""
        end_id = tokenizer.token_to_id(self.end_token) if self.end_token is not None else None
        return [*ids, end_id] if end_id is not None and (not ids or ids[-1] != end_id) else ids

    @classmethod
    def for_model(cls, model_dir: Path | None, embedding_only: bool) -> "PoolingConfig":
        """An embedding checkpoint's own pooling; a generative model's embeddings are its last token, normalized."""
        return cls.for_embedding_checkpoint(model_dir) if embedding_only else cls()

    @classmethod
    def for_embedding_checkpoint(cls, model_dir: Path | None) -> "PoolingConfig":
        """An embedding checkpoint's pooling, from its sentence-transformers files; Qwen3-Embedding's when it
        ships none (a bare backbone)."""
        modules = st_modules(model_dir)
        if not modules:
            return cls(normalize=True, end_token=EMBEDDING_END_TOKEN)
        assert model_dir is not None
        pooling = next((m for m in modules if m.get("type") == ST_POOLING), None)
        if pooling is not None:
            _check_last_token(Path(model_dir) / str(pooling.get("path") or "") / "config.json")
        st_config = Path(model_dir) / "config_sentence_transformers.json"
        prompts = _read_json(st_config).get("prompts") if st_config.is_file() else None
        prompts = {k: v for k, v in prompts.items() if isinstance(v, str)} if isinstance(prompts, dict) else {}
        normalize = any(m.get("type") == ST_NORMALIZE for m in modules)
        return cls(normalize=normalize, end_token=EMBEDDING_END_TOKEN, prompts=prompts)


def _check_last_token(path: Path) -> None:
    config = _read_json(path) if path.is_file() else {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object")
    modes = sorted(k.removeprefix("pooling_mode_") for k, v in config.items() if k.startswith("pooling_mode_") and v)
    if modes and modes != ["lasttoken"]:
        raise UnsupportedModelError(f"{path} asks for pooling {', '.join(modes)}; qwenstack implements last-token "
                                    f"pooling only (pooling_mode_lasttoken, as Qwen3-Embedding uses)")
