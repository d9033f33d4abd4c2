"""Typed model configs read from a checkpoint's config.json.

Decisions:
- Fields are named exactly as in config.json. Fields the architecture cannot run without have no default,
  and a missing one raises ConfigError naming it; we never fall back to a library's class defaults,
  which differ from the released values (see shared/reference/qwen3-family.md).
- RoPE settings come either from `rope_parameters` (transformers 5.x) or from `rope_theta` +
  `rope_scaling` (older checkpoints); both end in one RopeConfig.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from qwenstack.errors import ConfigError

T = TypeVar("T", bound="ModelArgs")

SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str
    rope_theta: float
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0
    mrope_section: tuple[int, ...] | None = None  # multimodal rotary (Qwen3-VL / Omni)
    mrope_interleaved: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any], model_type: str) -> "RopeConfig":
        params = dict(config.get("rope_parameters") or {})
        legacy = config.get("rope_scaling") or {}
        for key, value in legacy.items():
            params.setdefault(key, value)
        if "rope_theta" not in params:
            if "rope_theta" not in config:
                raise ConfigError(f"config.json for {model_type} has no 'rope_theta' (nor rope_parameters.rope_theta)")
            params["rope_theta"] = config["rope_theta"]
        if "partial_rotary_factor" not in params and "partial_rotary_factor" in config:
            params["partial_rotary_factor"] = config["partial_rotary_factor"]
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "mrope":  # Qwen2-VL era name for the multimodal default rope
            rope_type = "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope_type '{rope_type}' is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if rope_type in ("linear", "yarn") and params.get("factor") is None and rope_type == "linear":
            raise ConfigError("rope_type 'linear' needs rope_parameters.factor")
        original = params.get("original_max_position_embeddings")
        if rope_type == "yarn":
            # transformers gives a top-level original_max_position_embeddings priority, else max_position_embeddings.
            original = config.get("original_max_position_embeddings", original)
            if original is None:
                original = config.get("max_position_embeddings")
            if original is None:
                raise ConfigError("yarn rope needs original_max_position_embeddings or max_position_embeddings")
        mrope = params.get("mrope_section")
        return cls(
            rope_type=rope_type,
            rope_theta=float(params["rope_theta"]),
            factor=None if params.get("factor") is None else float(params["factor"]),
            original_max_position_embeddings=None if original is None else int(original),
            attention_factor=params.get("attention_factor"),
            beta_fast=params.get("beta_fast"),
            beta_slow=params.get("beta_slow"),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
            partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)),
            mrope_section=None if mrope is None else tuple(int(s) for s in mrope),
            mrope_interleaved=bool(params.get("mrope_interleaved", False)),
        )


def _is_optional(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


@dataclass
class ModelArgs:
    """Base for per-architecture args. Subclasses declare fields named as in config.json."""

    model_type: ClassVar[str] = ""
    # Fields computed after parsing, not read from config.json under their own name.
    derived_fields: ClassVar[tuple[str, ...]] = ("rope",)
    # Other names the same field goes by in some config.json files (transformers' attribute_map).
    aliases: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_dict(cls: type[T], config: dict[str, Any]) -> T:
        values: dict[str, Any] = {}
        config = dict(config)
        for alias, name in cls.aliases.items():
            if config.get(name) is None and config.get(alias) is not None:
                config[name] = config[alias]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name in cls.derived_fields:
                continue
            if f.name in config and config[f.name] is not None:
                values[f.name] = config[f.name]
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if f.name in config or _is_optional(hints[f.name]):
                    values[f.name] = None
                else:
                    raise ConfigError(
                        f"config.json is missing the field '{f.name}', required by the {cls.model_type} architecture"
                    )
        args = cls(**values)
        args.validate(config)
        return args

    def validate(self, config: dict[str, Any]) -> None:
        """Checks and derived values; subclasses extend it."""


def read_json_config(model_dir: str | Path, name: str) -> dict[str, Any]:
    """A JSON object file of a checkpoint (config.json, preprocessor_config.json), or a ConfigError naming it."""
    path = Path(model_dir) / name
    if not path.is_file():
        raise ConfigError(f"no {name} in {model_dir}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config


PROCESSOR_CONFIG = "processor_config.json"


def nested_processor_config(model_dir: str | Path, part: str) -> dict[str, Any] | None:
    """The `part` object ("image_processor", "video_processor", "feature_extractor") of processor_config.json,
    where transformers 5's processor.save_pretrained writes every sub-processor's settings (and no
    preprocessor_config.json); None where the checkpoint has none (the older one-file-each layout)."""
    if not (Path(model_dir) / PROCESSOR_CONFIG).is_file():
        return None
    nested = read_json_config(model_dir, PROCESSOR_CONFIG).get(part)
    if nested is not None and not isinstance(nested, dict):
        raise ConfigError(f"{PROCESSOR_CONFIG}: '{part}' must be a JSON object")
    return nested


def read_processor_config(model_dir: str | Path, part: str, legacy_name: str) -> dict[str, Any]:
    """A sub-processor's settings as transformers 5 finds them: processor_config.json's `part` object first, then
    its own file (`legacy_name`: preprocessor_config.json, video_preprocessor_config.json)."""
    nested = nested_processor_config(model_dir, part)
    if nested is not None:
        return nested
    if not (Path(model_dir) / legacy_name).is_file():
        raise ConfigError(f"no {legacy_name} in {model_dir} (nor '{part}' in a {PROCESSOR_CONFIG})")
    return read_json_config(model_dir, legacy_name)


def read_config(model_dir: str | Path) -> dict[str, Any]:
    config = read_json_config(model_dir, "config.json")
    path = Path(model_dir) / "config.json"
    if "model_type" not in config:
        raise ConfigError(f"{path} has no 'model_type' field, so the architecture is unknown")
    return config


def eos_token_ids(config: dict[str, Any]) -> list[int]:
    """eos_token_id may be an int, a list, or absent."""
    eos = config.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]


__all__ = ["ModelArgs", "RopeConfig", "read_config", "eos_token_ids", "field"]
