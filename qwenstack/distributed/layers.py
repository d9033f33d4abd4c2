"""The modules tensor and expert parallelism add to a model (everything else is a slice of the original).

- Partial-sum outputs (attention's o_proj, the MLP's down_proj, the experts) are summed by one all-reduce
  per block half: `add_all_reduce` hooks the module whose output is the partial sum, so the model file and
  the module names (checkpoint keys, quantization patterns) stay as they were.
- VocabParallelEmbedding: each rank holds a contiguous slice of the vocabulary (padded so every slice has
  the same size); a lookup outside the slice gives zeros and the all-reduce fills it in.
- ParallelLMHead: each rank computes the logits of its slice; an all-gather gives every rank the full
  row (every rank samples identically, so the driver needs no extra message).
- ExpertParallelExperts: each rank holds a contiguous block of experts and runs only the (token, expert)
  pairs routed to them; routing is computed on every rank from the same hidden states, so it is identical to
  one rank's, and the partial outputs are summed by the MLP's all-reduce.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwenstack.distributed.group import ParallelGroup
from qwenstack.models.moe import Experts


def add_all_reduce(module: nn.Module, group: ParallelGroup) -> None:
    """Sums the module's output over the ranks after every forward."""
    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return group.all_reduce(output.contiguous())

    module.register_forward_hook(hook)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor, vocab_size: int, group: ParallelGroup) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // group.world_size)
        self.start = group.rank * self.per_rank
        rows = weight[self.start:self.start + self.per_rank]
        padded = torch.zeros(self.per_rank, weight.shape[1], dtype=weight.dtype, device=weight.device)
        padded[:rows.shape[0]] = rows
        self.weight = nn.Parameter(padded, requires_grad=False)
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.per_rank)
        out = F.embedding(local.clamp(0, self.per_rank - 1), self.weight)
        out = out * inside[..., None].to(out.dtype)
        return self.group.all_reduce(out.contiguous())

    def extra_repr(self) -> str:
        return f"vocab {self.start}:{self.start + self.per_rank} of {self.vocab_size} (padded)"


class ParallelLMHead(nn.Module):
    """Logits over this rank's vocabulary slice, gathered into full rows. `inner` is the slice's linear
    (full precision or quantized); None for a tied head, which multiplies by the embedding's slice."""

    def __init__(self, inner: nn.Module | None, embedding: VocabParallelEmbedding | None, vocab_size: int,
                 group: ParallelGroup) -> None:
        super().__init__()
        if (inner is None) == (embedding is None):
            raise ValueError("a parallel lm_head has either its own linear or the tied embedding")
        self.inner = inner
        # Not a submodule: the tied embedding is registered once, where it lives.
        self._tied: list[VocabParallelEmbedding] = [embedding] if embedding is not None else []
        self.vocab_size = vocab_size
        self.group = group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.inner(hidden) if self.inner is not None else F.linear(hidden, self._tied[0].weight)
        return self.group.all_gather_last(local)[..., :self.vocab_size]


class ExpertParallelExperts(nn.Module):
    """Experts [start, end) of a MoE layer on this rank; same call as Experts (x, expert_ids, weights)."""

    def __init__(self, local: Experts, start: int, num_experts: int) -> None:
        super().__init__()
        self.local = local
        self.start, self.end = start, start + local.num_experts
        self.num_experts = num_experts  # of the whole layer (what the router chooses among)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; expert_ids, weights [T, k] -> this rank's partial output [T, H] (zeros for tokens whose
        experts all live elsewhere)."""
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.flatten()
        mine = ((flat_ids >= self.start) & (flat_ids < self.end)).nonzero().squeeze(1)  # (token, slot) pairs
        out = torch.zeros_like(x)
        if mine.numel() == 0:
            return out
        local_ids = flat_ids[mine] - self.start
        order = torch.argsort(local_ids, stable=True)
        pairs = mine[order]
        token_of = pairs // top_k
        counts = torch.bincount(local_ids, minlength=self.local.num_experts).tolist()
        inputs = x[token_of]
        results = torch.empty_like(inputs)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            h = self.local.expert_linear("gate_up_proj", expert, inputs[start:end])
            gate, up = h.split(self.local.intermediate_size, dim=-1)
            results[start:end] = self.local.expert_linear("down_proj", expert, F.silu(gate) * up)
            start = end
        results *= weights.flatten()[pairs, None].to(results.dtype)
        return out.index_add_(0, token_of, results)

    def extra_repr(self) -> str:
        return f"experts {self.start}:{self.end} of {self.num_experts}"
