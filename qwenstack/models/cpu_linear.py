"""Linears for CPU decode: weights prepacked once in oneDNN's blocked layout.

On CPU, a matrix-vector product through `F.linear` on bfloat16 reads weights well below the memory
bandwidth; the same product on a weight reordered once by oneDNN (`mkldnn._reorder_linear_weight`, what
torch.compile's CPU freezing does) runs about three times faster here, with bit-identical bfloat16
results. Decoding is bound by those reads, so the runner packs a model's linears once when it runs on CPU
in bfloat16 or float16, after checking on the model's own largest matrix that packing is faster on this
machine (measure, then pick).

Packing replaces each plain nn.Linear by a PackedLinear (the unpacked weight is freed, so memory does not
double), gives a tied lm_head its own packed copy of the embedding matrix (the embedding still serves
lookups), and packs every MoE expert's matrices. Quantized modules are left alone. Packing is the last step
of preparing a model: the packed weights are opaque, so nothing reads them back.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from qwenstack.models.moe import Experts

log = logging.getLogger("qwenstack.models")
PACKABLE_DTYPES = (torch.bfloat16, torch.float16)


def packing_supported() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = pack_weight(weight)  # opaque oneDNN tensor: a plain attribute, not a parameter
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def _largest_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    return max(linears, key=lambda m: m.weight.numel(), default=None)


def packing_is_faster(weight: torch.Tensor, repeats: int = 5) -> bool:
    """Times one matrix-vector product both ways on this machine (best of `repeats`)."""
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype)
    packed = pack_weight(weight)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.inference_mode():
        plain = best(lambda: F.linear(x, weight))
        prepacked = best(lambda: packed_linear(x, packed))
    return prepacked < plain


def pack_for_cpu(model: nn.Module, force: bool = False) -> int:
    """Packs the model's linears in place when that is faster here (or always, with force); returns how many
    matrices were packed."""
    params = list(model.parameters())
    if not params or params[0].device.type != "cpu" or params[0].dtype not in PACKABLE_DTYPES:
        return 0
    if not packing_supported():
        return 0
    probe = _largest_linear(model)
    if probe is None or not (force or packing_is_faster(probe.weight)):
        log.info("prepacked CPU linears are not faster on this machine; keeping F.linear")
        return 0
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, PackedLinear(child.weight, child.bias))
                count += 1
            elif type(child) is Experts:
                count += child.pack_for_cpu(pack_weight)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(model, "lm_head", 0) is None and isinstance(embed, nn.Embedding):
        model.lm_head = PackedLinear(embed.weight)  # type: ignore[assignment]
        count += 1
    log.info("packed %d CPU linears in oneDNN's blocked layout", count)
    return count
