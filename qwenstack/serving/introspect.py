"""What a running server tells tools about itself beyond the OpenAI API.

- GET /tokenizer_info (vLLM's endpoint; lm-eval's remote tokenizer reads it): the special tokens, the chat
  template and the context length of the served model (`?model=` picks one when several are served).
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from qwenstack.serving.state import get_state


def tokenizer_info(served: Any) -> dict[str, Any]:
    tok = served.tokenizer
    added = tok.backend.get_added_tokens_decoder()
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        **{key: tok.special_tokens.get(key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")},
        "chat_template": tok.chat_template,
        "model_max_length": served.max_model_len,
        "vocab_size": tok.vocab_size,
        "added_tokens_decoder": {str(i): {"content": t.content, "special": t.special} for i, t in sorted(added.items())},
    }


def router() -> APIRouter:
    api = APIRouter()

    @api.get("/tokenizer_info")
    def get_tokenizer_info(request: Request, model: str | None = None) -> dict[str, Any]:
        return tokenizer_info(get_state(request).registry.resolve(model))

    return api
