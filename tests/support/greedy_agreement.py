"""Greedy tokens of a lossy (requantized) model compared with the exact reference's, honestly.

A lossy format moves logits a little (~0.1 for int8 on the tiny random models here). Where the reference's
top two logits are closer than that, either choice is a coin toss that no lossy format can be held to; on
MoE models a router near tie can also send a token to another expert, which moves every later logit by a
lot. So: every greedy choice of the reference that is clear of a near tie (top-2 gap >= `near_tie`), at a
position where every token so far went to the same experts in both models, must be ours too (teacher-
forced on the reference's continuation), and decoding freely our tokens equal the reference's at least up
to its first undecided position. The number of decided positions is returned, for the caller to demand
that the comparison covers enough of the continuation.
"""
from __future__ import annotations

from typing import Callable

import torch

from qwenstack.models.base import prompt_logits
from qwenstack.models.moe import Router

NEAR_TIE = 0.2


def routing(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The experts each MoE router picks for each position of ids [1, S]: [layers, S, top_k], sorted
    (empty on a dense model)."""
    picked: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _, __, out: picked.append(out[0].sort(-1).values))
             for m in model.modules() if isinstance(m, Router)]
    prompt_logits(model, ids)
    for hook in hooks:
        hook.remove()
    return torch.stack(picked) if picked else torch.empty(0, ids.shape[1], 0, dtype=torch.long)


@torch.inference_mode()
def assert_greedy_agrees(reference: Callable[[torch.Tensor], torch.Tensor], exact: torch.nn.Module,
                         ours: torch.nn.Module, prompts: list[list[int]], want: list[list[int]],
                         got: list[list[int]], near_tie: float = NEAR_TIE) -> int:
    """reference(ids [1, S]) -> logits [S, V] (transformers, or the original model); exact: our model with the
    exact weights (for its routing); want/got: the reference's and our greedy continuations."""
    decided = 0
    for prompt, ref_tokens, our_tokens in zip(prompts, want, got):
        ids = torch.tensor([prompt + ref_tokens])
        top2 = reference(ids)[len(prompt) - 1:-1].float().topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) >= near_tie
        same_experts = (routing(ours, ids) == routing(exact, ids)).all(-1).all(0)
        clear &= same_experts.cummin(0).values[len(prompt) - 1:-1]
        ours_next = prompt_logits(ours, ids)[0, len(prompt) - 1:-1].argmax(-1)
        assert torch.equal(ours_next[clear], torch.tensor(ref_tokens)[clear]), (prompt, clear.tolist())
        decided += int(clear.sum())
        first_undecided = int((~clear).nonzero()[0]) if not clear.all() else len(ref_tokens)
        assert our_tokens[:first_undecided] == ref_tokens[:first_undecided], (prompt, first_undecided)
    return decided
