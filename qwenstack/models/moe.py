"""Sparse mixture-of-experts: a softmax router over all experts, top-k, SwiGLU experts.

Decisions:
- Experts are stored fused as transformers holds them in memory: gate_up_proj [E, 2I, H] (gate rows first)
  and down_proj [E, H, I]. Checkpoints store them per expert (Qwen3-MoE, Qwen3-Next) or fused and
  transposed (Qwen3-VL-MoE); `checkpoint_sources` declares both layouts and the loader picks the one on disk.
- Tokens are grouped by expert (one sort), and only the experts that received tokens run: no Python loop
  over every expert for every token. In the tile-packed CPU form the layer's experts run in one native call
  (kernels.moe_tiled: the gather, the products and the weighted sum) instead of a loop of products.
- Routing follows transformers exactly: softmax in float32, top-k, optional renormalisation, weights cast to
  the activation dtype before mixing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from qwenstack import kernels

if TYPE_CHECKING:
    from qwenstack.weights import Source


class Experts(nn.Module):
    # The CPU form prepare_for_cpu chose (class defaults: quantized subclasses skip __init__).
    packed: dict[str, list[torch.Tensor]] | None = None  # per-expert prepacked CPU weights
    native = False  # few-row products through the native CPU kernel (models/cpu_linear.py)
    # Both stacks hold each expert tile-packed, in place: [E, N / 16, K / 32, 16, 16, 2] (cpu_linear.py).
    tiled = False

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; expert_ids, weights [T, k] -> [T, H]."""
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.flatten()
        order = torch.argsort(flat_ids, stable=True)
        token_of = order // top_k  # which token each sorted (token, slot) pair belongs to
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        return self.mix(x, token_of, weights.flatten()[order].to(x.dtype), counts)

    def mix(self, x: torch.Tensor, token_of: torch.Tensor, pair_weights: torch.Tensor,
            counts: torch.Tensor) -> torch.Tensor:
        """Each token's weighted sum of its experts' SwiGLU: x [T, H]; pairs sorted by expert, token_of and
        pair_weights [R] (x's dtype), counts [E] pairs an expert -> [T, H]."""
        if self.tiled:  # the gather, every expert and the weighted sum in one native call where it applies
            mixed = kernels.moe_tiled(x, token_of, pair_weights, counts, self.gate_up_proj, self.down_proj)
            if mixed is not None:
                return mixed
        # One gather of the inputs in expert order and one weighted scatter-add at the end.
        results = self.grouped_swiglu(x[token_of], counts)
        results *= pair_weights[:, None]
        return torch.zeros_like(x).index_add_(0, token_of, results)

    def grouped_swiglu(self, inputs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each expert's SwiGLU over its rows: inputs [R, H] sorted by expert, counts [E] rows per expert.
        The loop over the experts that received rows only slices, multiplies and writes its rows."""
        results = torch.empty_like(inputs)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            end = start + count
            h = self.expert_linear("gate_up_proj", expert, inputs[start:end])
            gate, up = h.split(self.intermediate_size, dim=-1)
            results[start:end] = self.expert_linear("down_proj", expert, F.silu(gate) * up)
            start = end
        return results

    def expert_linear(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] @ W[expert].T for W = gate_up_proj or down_proj. Quantized experts
        (qwenstack.quantization.QuantExperts) override this one method and keep forward."""
        if self.tiled:
            from qwenstack.models.cpu_linear import tiled_linear

            return tiled_linear(x, getattr(self, name)[expert])
        if self.packed is not None:
            from qwenstack.models.cpu_linear import packed_linear

            return packed_linear(x, self.packed[name][expert])
        if self.native:
            from qwenstack.models.cpu_linear import native_linear

            return native_linear(x, getattr(self, name)[expert])
        return F.linear(x, getattr(self, name)[expert])

    def prepare_for_cpu(self, form: str) -> int:
        """Switches the experts to a CPU linear form of models/cpu_linear.py: "native" (the same weights,
        tile-packed in place where their sizes allow) or "packed" (prepacked copies; the originals are freed).
        Returns how many matrices changed form."""
        if self.tiled or self.native or self.packed is not None:  # prepared already
            return 0
        if form == "native":
            stacks = {name: getattr(self, name) for name in ("gate_up_proj", "down_proj")}
            if not all(kernels.can_tile(stack[0]) for stack in stacks.values()):
                self.native = True
                return 2 * self.num_experts
            for name, stack in stacks.items():
                e, n, k = stack.shape
                with torch.no_grad():  # expert by expert into its own storage: one expert of scratch
                    for expert in range(e):
                        stack[expert].copy_(kernels.pack_tiles(stack[expert]).view(n, k))
                packed = stack.data.view(e, n // kernels.TILE_N, k // kernels.TILE_K, kernels.TILE_K // 2, kernels.TILE_N, 2)
                setattr(self, name, nn.Parameter(packed, requires_grad=False))
            self.tiled = True
            return 2 * self.num_experts
        from qwenstack.models.cpu_linear import pack_weight

        self.packed = {name: [pack_weight(w) for w in getattr(self, name)] for name in ("gate_up_proj", "down_proj")}
        for name in ("gate_up_proj", "down_proj"):
            setattr(self, name, nn.Parameter(torch.empty(0, dtype=getattr(self, name).dtype), requires_grad=False))
        return 2 * self.num_experts

    def checkpoint_sources(self, prefix: str) -> dict[str, list[list["Source"]]]:
        from qwenstack.weights import Source

        i = self.intermediate_size
        per_expert_gate_up, per_expert_down = [], []
        for e in range(self.num_experts):
            per_expert_gate_up.append(Source(f"{prefix}{e}.gate_proj.weight", (e, slice(0, i))))
            per_expert_gate_up.append(Source(f"{prefix}{e}.up_proj.weight", (e, slice(i, 2 * i))))
            per_expert_down.append(Source(f"{prefix}{e}.down_proj.weight", (e,)))
        return {
            f"{prefix}gate_up_proj": [
                per_expert_gate_up,
                [Source(f"{prefix}gate_up_proj", (), transpose=True)],  # Qwen3-VL-MoE: [E, H, 2I]
                [Source(f"{prefix}gate_up_proj")],  # transformers' in-memory layout [E, 2I, H]
            ],
            f"{prefix}down_proj": [
                per_expert_down,
                [Source(f"{prefix}down_proj", (), transpose=True)],  # Qwen3-VL-MoE: [E, I, H]
                [Source(f"{prefix}down_proj")],
            ],
        }


class Router(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return expert_ids, weights.to(logits.dtype)


class SparseMoE(nn.Module):
    """Names match the checkpoint: mlp.gate.weight (router), mlp.experts.*."""

    def __init__(
        self, hidden_size: int, moe_intermediate_size: int, num_experts: int, top_k: int, norm_topk_prob: bool
    ) -> None:
        super().__init__()
        self.gate = Router(num_experts, hidden_size, top_k, norm_topk_prob)
        self.experts = Experts(num_experts, hidden_size, moe_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expert_ids, weights = self.gate(x)
        return self.experts(x, expert_ids, weights)
