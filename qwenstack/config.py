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
TRANSFORMERS_ROPE_THETA = 10000.0  # transformers' rope_theta when a config.json names none


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
        for key in ("rope_parameters", "rope_scaling"):
            if config.get(key) is not None and not isinstance(config[key], dict):
                raise ConfigError(f"config.json field '{key}' must be an object, found {json.dumps(config[key])}")
        # As transformers reads it: a non-empty rope_scaling replaces rope_parameters whole (a 5.x config.json
        # where a user added rope_scaling for YaRN, as Qwen's model cards say, runs YaRN).
        params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
        if "rope_theta" not in params:
            if "rope_theta" in config:
                params["rope_theta"] = config["rope_theta"]
            elif config.get("rope_scaling") and config.get("rope_parameters"):
                params["rope_theta"] = _replaced_rope_theta(config["rope_parameters"])
            else:
                raise ConfigError(f"config.json for {model_type} has no 'rope_theta' (nor rope_parameters.rope_theta)")
        if "partial_rotary_factor" not in params and "partial_rotary_factor" in config:
            params["partial_rotary_factor"] = config["partial_rotary_factor"]
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "mrope":  # Qwen2-VL era name for the multimodal default rope
            rope_type = "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope_type '{rope_type}' is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if rope_type in ("linear", "yarn") and params.get("factor") is None:
            raise ConfigError(f"config.json's rope_type '{rope_type}' needs a factor (rope_parameters.factor)")
        original = params.get("original_max_position_embeddings")
        if rope_type == "yarn":
            # transformers gives a top-level original_max_position_embeddings priority, else max_position_embeddings.
            original = config.get("original_max_position_embeddings", original)
            if original is None:
                original = config.get("max_position_embeddings")
            if original is None:
                raise ConfigError("yarn rope needs original_max_position_embeddings or max_position_embeddings")
        try:
            return cls._parsed(params, rope_type, original)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"config.json's rope settings (rope_theta, rope_parameters, rope_scaling) hold a value "
                              f"of the wrong type: {exc}") from None

    @classmethod
    def _parsed(cls, params: dict[str, Any], rope_type: str, original: Any) -> "RopeConfig":
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


def rope_context_length(max_position_embeddings: int, rope: RopeConfig | None) -> int:
    """The context a model runs: max_position_embeddings, or more where its rope scaling stretches it, as vLLM
    derives max_model_len (YaRN: original_max_position_embeddings x factor; linear: x factor). A YaRN rope_scaling
    added to a Qwen3 config (40,960 positions) is there for 131,072."""
    if rope is None or rope.factor is None or rope.rope_type not in ("linear", "yarn"):
        return max_position_embeddings
    base = rope.original_max_position_embeddings if rope.rope_type == "yarn" else None
    return max(max_position_embeddings, int((base or max_position_embeddings) * rope.factor))


def _replaced_rope_theta(rope_parameters: dict[str, Any]) -> float:
    """The rope_theta transformers runs when rope_scaling replaced rope_parameters and names none itself: its
    class default, 10000. Taken only where rope_parameters agrees, refused where it names another (which
    transformers silently drops)."""
    theta = float(rope_parameters.get("rope_theta", TRANSFORMERS_ROPE_THETA))
    if theta != TRANSFORMERS_ROPE_THETA:
        raise ConfigError(
            f"config.json has both rope_scaling and rope_parameters: rope_scaling replaces rope_parameters (as "
            f"transformers reads it), so rope_parameters.rope_theta={theta:g} is dropped and transformers runs "
            f"rope_theta={TRANSFORMERS_ROPE_THETA:g}; give rope_theta in rope_scaling or at the top level")
    return theta


# Sizes and counts that no checkpoint has at zero or below: such a value is a typo, said before anything is built.
POSITIVE_FIELDS = frozenset((
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "moe_intermediate_size", "num_experts",
    "num_experts_per_tok", "decoder_sparse_step",
))


def _checked_value(name: str, value: Any, hint: Any) -> Any:
    """A config.json value as its field's type says, or ConfigError naming the field: a count written as a string
    ("2") or a size at 0 would otherwise fail deep in model construction, or (a bool as "false") load wrongly.
    Integral floats (2.0) pass as ints; other types (lists, dicts, str) are each architecture's own to check."""
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint) if _is_optional(hint) else hint
    wrong = None
    if base is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            wrong = "an integer"
        elif name in POSITIVE_FIELDS and value < 1:
            wrong = "at least 1"
    elif base is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        wrong = "a number"
    elif base is bool and value in (0, 1) and not isinstance(value, float):
        value = bool(value)
    elif base is bool:
        wrong = "true or false"
    elif base is str and not isinstance(value, str):
        wrong = "a string"
    if wrong:
        raise ConfigError(f"config.json field '{name}' must be {wrong}, found {json.dumps(value)}")
    return value


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
                values[f.name] = _checked_value(f.name, config[f.name], hints[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if _is_optional(hints[f.name]) or (f.name in config and hints[f.name] not in (int, float)):
                    values[f.name] = None
                else:
                    said = "has null for" if f.name in config else "is missing"
                    raise ConfigError(
                        f"config.json {said} the field '{f.name}', required by the {cls.model_type} architecture"
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


def adapter_message(model_dir: str | Path) -> str | None:
    """The error for a LoRA adapter directory (adapter_config.json, no model of its own) given as a model."""
    path = Path(model_dir) / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    on = f" for {base}" if base else ""
    return (f"{model_dir} is a LoRA adapter{on} (adapter_config.json), not a full model, and qwenstack does not "
            f"apply adapters: merge it into its base model with peft (merge_and_unload, then save_pretrained) "
            f"and serve the merged directory")


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


def read_processor_config(model_dir: str | Path, part: str, legacy_name: str,
                          required: bool = True) -> dict[str, Any]:
    """A sub-processor's settings as transformers 5 finds them: processor_config.json's `part` object first, then
    its own file (`legacy_name`: preprocessor_config.json, video_preprocessor_config.json); with neither, a
    ConfigError, or {} (the class defaults) when not `required`."""
    nested = nested_processor_config(model_dir, part)
    if nested is not None:
        return nested
    if not (Path(model_dir) / legacy_name).is_file():
        if not required:
            return {}
        raise ConfigError(f"no {legacy_name} in {model_dir} (nor '{part}' in a {PROCESSOR_CONFIG})")
    return read_json_config(model_dir, legacy_name)


def read_config(model_dir: str | Path) -> dict[str, Any]:
    if not (Path(model_dir) / "config.json").is_file() and (adapter := adapter_message(model_dir)):
        raise ConfigError(adapter)
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


__all__ = ["ModelArgs", "RopeConfig", "read_config", "eos_token_ids", "field", "rope_context_length"]
