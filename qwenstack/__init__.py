"""qwenstack: a self-hosted runtime for the Qwen3 open-weight model family.

`from qwenstack import LLM, SamplingParams` works, but torch is imported only when one of them is first
used, so the CLI's --help and torch-free modules stay fast.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "AsyncEngine", "__version__"]

_LAZY = {
    "LLM": ("qwenstack.llm", "LLM"),
    "SamplingParams": ("qwenstack.engine.params", "SamplingParams"),
    "AsyncEngine": ("qwenstack.engine.async_engine", "AsyncEngine"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'qwenstack' has no attribute {name!r}")
