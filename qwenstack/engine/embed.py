"""Embeddings from the engine's model: the final hidden state at each prompt's last token.

Decisions:
- Whole prompts in passes with no KV cache (AttentionBatch.for_prompts): an embedding needs no decode, so it
  takes no KV blocks from generating requests and leaves the prefix cache alone.
- Several prompts share one packed pass up to `max_tokens_per_pass` tokens (the engine's step budget), so a
  batch of short texts costs about one forward; a prompt longer than that runs alone.
- The states come back raw, in float32 on the CPU: truncating to `dimensions` and normalizing are the caller's
  (done in that order: a truncated vector is renormalized, as Matryoshka embeddings are used).
- The same passes score reranking prompts (serving/rerank.py): a `head` maps each pass's last-token states to
  the logits of two vocabulary entries, through the model's own compute_logits on those two rows only, or to a
  sequence classifier's label logits (LLMEngine.classify).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from qwenstack.models.attention import AttentionBatch


def pass_groups(lengths: list[int], max_tokens_per_pass: int) -> list[list[int]]:
    """Prompt indices grouped into passes, in order, each within the token budget (or one prompt alone)."""
    groups: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if groups and used + n <= max_tokens_per_pass:
            groups[-1].append(i)
            used += n
        else:
            groups.append([i])
            used = n
    return groups


@torch.inference_mode()
def last_token_states(model: Any, prompts: list[list[int]], max_tokens_per_pass: int,
                      head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """[len(prompts), hidden] float32: the model's final (normed) hidden state at each prompt's last token.
    head: maps each pass's states (the model's dtype and device) before they come back, e.g. to the logits of
    a few vocabulary entries (a reranker's "yes" and "no"); [len(prompts), head's width] then."""
    device = next(model.parameters()).device
    rows: list[torch.Tensor] = []
    for group in pass_groups([len(p) for p in prompts], max_tokens_per_pass):
        lengths = [len(prompts[i]) for i in group]
        ids = torch.tensor([t for i in group for t in prompts[i]], dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        batch = AttentionBatch.for_prompts(lengths)
        hidden = model.forward(ids, positions, batch, None)
        states = hidden[batch.last_token_indices(device)]
        rows.append((states if head is None else head(states)).float().cpu())
    return torch.cat(rows)


def without_trailing(prompt: list[int], token: int | None) -> list[int]:
    """The prompt without the copies of `token` at its end (a classifier's pads), its first token kept always:
    transformers pools a sequence classifier at the last non-pad token, position 0 when all are pads."""
    end = len(prompt)
    while token is not None and end > 1 and prompt[end - 1] == token:
        end -= 1
    return prompt[:end]


def matryoshka(states: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """The embeddings of last-token states: the first `dimensions` values (all when None), then L2-normalized
    when the model normalizes, so a truncated vector has unit length again."""
    vectors = states if dimensions is None else states[:, :dimensions]
    return torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors
