"""A checkpoint's generation_config.json -> the sampling defaults a request that omits them gets.

Decisions:
- As vLLM applies them: an omitted temperature means Qwen's recommended value, not OpenAI's 1.0.
- `do_sample: false` means greedy decoding, as in `transformers` (whatever temperature the file also
  names): the default temperature becomes 0.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwenstack.errors import ConfigError, RequestError

GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                           "presence_penalty", "frequency_penalty")


def generation_defaults(model_dir: Path | None) -> dict[str, Any]:
    if model_dir is None or not (Path(model_dir) / "generation_config.json").is_file():
        return {}
    try:
        data = json.loads((Path(model_dir) / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    defaults = {k: data[k] for k in GENERATION_DEFAULT_KEYS
                if isinstance(data.get(k), (int, float)) and not isinstance(data.get(k), bool)}
    if isinstance(defaults.get("top_k"), float):  # a count, whatever the file wrote (20.0)
        defaults["top_k"] = int(defaults["top_k"])
    if data.get("do_sample") is False:
        defaults["temperature"] = 0.0
    _check_defaults(Path(model_dir) / "generation_config.json", defaults)
    return defaults


def _check_defaults(path: Path, defaults: dict[str, Any]) -> None:
    """A default no request could use (temperature -1, top_p 2) is the file's error, said once at load; unchecked,
    every request that leaves the value out was refused with a 400 naming a parameter it never sent."""
    from qwenstack.engine.params import SamplingParams

    try:
        SamplingParams(**defaults)
    except RequestError as exc:
        raise ConfigError(f"{path} sets a sampling default no request can use: {exc}") from None
