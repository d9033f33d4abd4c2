"""Requests that fail at sampling beside others: a processor that refuses every token after a few, and an engine
loop that keeps the step's outputs when some of its requests fail (LLMEngine.step raises RequestFailed with them,
as the server's AsyncEngine takes them)."""
from __future__ import annotations

from typing import Callable

import torch

from qwenstack.engine.engine import LLMEngine
from qwenstack.engine.sampler import RequestFailed


def refuse_after(tokens: int) -> Callable[[list[int], torch.Tensor], torch.Tensor]:
    """A logits processor that leaves no token once `tokens` are generated (as allowed_token_ids against a grammar)."""
    def refuse(output: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output) == tokens:
            raise ValueError("no token can be generated")
        return logits
    return refuse


def run_through_failures(engine: LLMEngine) -> tuple[dict[str, list[int]], list[str]]:
    """Steps until every request ends: (each request's token ids, the ids of the requests that failed)."""
    tokens: dict[str, list[int]] = {}
    failed: list[str] = []
    while engine.has_unfinished_requests():
        try:
            outputs = engine.step()
        except RequestFailed as exc:
            failed += list(exc.failures)
            outputs = exc.outputs
        for out in outputs:
            tokens[out.request_id] = out.outputs[0].token_ids
    return tokens, failed
