"""What speculative decoding's sampling tests share: the exact distribution of a few sampled tokens, and
Pearson's test of counted samples against it."""
from __future__ import annotations

import collections
from typing import Any

import torch

from qwenstack.engine.params import SamplingParams
from qwenstack.engine.sampler import filter_logits
from qwenstack.models.base import prompt_logits


def exact_distribution(model: Any, prompt: list[int], params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(t1, ..., t_max_tokens) under the sampler's own distribution, from full no-cache passes."""
    dist: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(params.max_tokens or 0):
        grown = {}
        for prefix, prob in dist.items():
            with torch.inference_mode():
                logits = prompt_logits(model, torch.tensor([prompt + list(prefix)]))[0, -1].float()
            p = filter_logits(logits, params).softmax(-1)
            for t in torch.nonzero(p).flatten().tolist():
                grown[prefix + (t,)] = prob * float(p[t])
        dist = grown
    return dist


def chi_square_p_value(counts: collections.Counter, expected: dict[tuple[int, ...], float], n: int) -> float:
    """Pearson's test; cells expecting fewer than 5 samples are pooled into one."""
    observed, wanted, rest_o, rest_e = [], [], 0, 0.0
    for cell, p in expected.items():
        if p * n >= 5:
            observed.append(counts.get(cell, 0))
            wanted.append(p * n)
        else:
            rest_o, rest_e = rest_o + counts.get(cell, 0), rest_e + p * n
    if rest_e:
        observed.append(rest_o)
        wanted.append(rest_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, wanted))
    df = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(stat / 2, dtype=torch.float64)))
