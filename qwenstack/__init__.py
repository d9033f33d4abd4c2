"""qwenstack: a self-hosted runtime for the Qwen3 open-weight model family."""

__version__ = "0.1.0"
