"""Held-out perplexity of a causal language model, for the demo model's card and for measuring what
quantization costs.

Decisions:
- Token-level: the text is tokenized once (special tokens written in the text, such as `<|im_start|>`,
  become their ids) and scored as one stream, so the figure depends on the tokenizer, not on characters.
- Non-overlapping windows that share one token: each window is `context_len` tokens and starts on the last
  token of the previous one (stride context_len - 1), so every token but the first is predicted exactly
  once, from the tokens before it in its window. The model never sees a position past context_len - 1.
- Log-probabilities are taken in float32 whatever the model's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from qwenstack.models.base import CausalLM, prompt_logits


@dataclass(frozen=True)
class PerplexityResult:
    mean_nll: float  # nats per predicted token
    num_tokens: int  # tokens predicted (all but the first)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def window_starts(num_tokens: int, context_len: int) -> list[int]:
    """Start of each window over a stream of num_tokens; consecutive windows share one token."""
    if context_len < 2:
        raise ValueError(f"context_len must be at least 2, got {context_len}")
    stride = context_len - 1
    return list(range(0, max(num_tokens - 1, 0), stride))


@torch.inference_mode()
def token_perplexity(model: CausalLM, token_ids: list[int], context_len: int, batch_size: int = 8) -> PerplexityResult:
    """Mean negative log-likelihood over a token stream, scored in windows of context_len tokens."""
    if len(token_ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    device = next(model.parameters()).device  # type: ignore[attr-defined]
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    windows = [ids[s:s + context_len] for s in window_starts(len(token_ids), context_len)]
    total, count = 0.0, 0
    # Full windows go in batches; the shorter last one (if any) alone, so no padding is needed.
    full = [w for w in windows if w.numel() == context_len]
    rest = [w for w in windows if w.numel() != context_len]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in rest]
    for group in groups:
        batch = torch.stack(group)  # [B, S]
        logits = prompt_logits(model, batch[:, :-1]).float()  # [B, S-1, V]
        logprobs = torch.log_softmax(logits, dim=-1)
        nll = -logprobs.gather(-1, batch[:, 1:, None]).squeeze(-1)  # [B, S-1]
        total += nll.double().sum().item()
        count += nll.numel()
    return PerplexityResult(total / count, count)


def heldout_perplexity(model: CausalLM, tokenizer: Any, text: str, context_len: int, batch_size: int = 8) -> float:
    """Perplexity of `text` under the model (see token_perplexity for the windowing).

    `tokenizer` is a qwenstack Tokenizer (or anything with `encode(text) -> list[int]`)."""
    return token_perplexity(model, tokenizer.encode(text), context_len, batch_size).perplexity
