"""Drop-in quantized replacements for the model's nn.Linear layers and MoE experts."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from qwenstack import kernels
from qwenstack.models.moe import Experts
from qwenstack.quantization.formats import QuantizedWeight

MakeWeight = Callable[[torch.Tensor], QuantizedWeight]


class QuantLinear(nn.Module):
    """y = x @ W.T (+ bias) with W held in a QuantizedWeight; any leading dimensions on x."""

    def __init__(self, quantized: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        self.quantized = quantized
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, make: MakeWeight) -> "QuantLinear":
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(make(linear.weight.detach()), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quantized.matmul(x.reshape(-1, self.in_features))
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantExperts(Experts):
    """Experts whose gate_up_proj [E, 2I, H] and down_proj [E, H, I] are quantized per expert; the routing
    and grouping in Experts.forward are unchanged, only `expert_linear` differs."""

    def __init__(self, experts: Experts, make_gate_up: MakeWeight, make_down: MakeWeight) -> None:
        nn.Module.__init__(self)  # not Experts.__init__: no full-precision parameters
        self.num_experts, self.hidden_size = experts.num_experts, experts.hidden_size
        self.intermediate_size = experts.intermediate_size
        self.gate_up_proj = make_gate_up(experts.gate_up_proj.detach())
        self.down_proj = make_down(experts.down_proj.detach())

    def prepare_for_cpu(self, form: str) -> int:
        """Quantized experts already run their own kernels: no CPU layout change (models/cpu_linear.py)."""
        return 0

    @classmethod
    def from_weights(cls, experts: Experts, gate_up_proj: QuantizedWeight, down_proj: QuantizedWeight) -> "QuantExperts":
        """Experts whose stacks were quantized elsewhere (a pre-quantized checkpoint)."""
        return cls(experts, lambda _: gate_up_proj, lambda _: down_proj)

    def grouped_swiglu(self, inputs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every expert in one native call where both stacks are tile-packed (kernels.experts_swiglu), else the
        loop of Experts over the experts that received rows."""
        stacks = [w.tiled_operands() for w in (self.gate_up_proj, self.down_proj)]
        if stacks[0] is not None and stacks[1] is not None:
            fused = kernels.experts_swiglu(inputs, counts, stacks[0], stacks[1])
            if fused is not None:
                return fused
        return super().grouped_swiglu(inputs, counts)

    def expert_linear(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        weight: QuantizedWeight = getattr(self, name)
        return weight.matmul(x, expert)
