"""Weight-only quantization applied at load time: `quantize_model(model, "int8" | "int4" | "fp8", keep=...)`.

    model = load_model(path, dtype=torch.bfloat16)
    report = quantize_model(model, "int8", keep=["lm_head"])   # glob patterns on module names
    print(report.summary())

What is quantized: every nn.Linear (attention, MLP, shared experts, linear-attention projections, the
lm_head) and the MoE experts (each expert's matrices, per expert). What is not: the embedding table (a
lookup reads one row per token, so quantizing it saves memory, not time), norms, the MoE router (its
softmax decides which experts run; it is tiny) and the linear-attention conv and gate vectors.

Decisions:
- Methods: "int8" (per output channel), "int4" (groups of 128 input channels, as published GPTQ/AWQ
  Qwen3 checkpoints use; "int4-g32", "int4-g64", "int4-g256" choose another group), "fp8" (CUDA only).
  Activations stay in the model's dtype: these are weight-only schemes (fp8's fast path aside, see
  formats.py).
- A tied lm_head (tie_word_embeddings) is given its own quantized copy of the embedding matrix, so the
  largest single matrix of small models is read in the compact format while the embedding lookup stays
  exact; `keep=["lm_head"]` keeps the shared full-precision matrix instead.
- A layer whose shape a method cannot take (int4 needs in_features divisible by a group of at least 32)
  stays in full precision and is listed in the report, never silently mis-quantized. A smaller group that
  divides in_features is tried first.
- Quantization works one module (and one expert) at a time, so peak memory stays near the model's size.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from qwenstack.errors import UnsupportedModelError
from qwenstack.models.moe import Experts
from qwenstack.quantization.formats import Fp8Weight, Int4Weight, Int8Weight, QuantizedWeight
from qwenstack.quantization.modules import QuantExperts, QuantLinear

METHODS = ("int8", "int4", "fp8")
DEFAULT_INT4_GROUP = 128
# Approximate bytes per weight of each method, scales included (for planning; see qwenstack.cost.planner).
BYTES_PER_WEIGHT = {"int8": 1.0, "int4": 0.5, "fp8": 1.0}


@dataclass(frozen=True)
class QuantizationSpec:
    method: str  # int8 | int4 | fp8
    group_size: int | None = None  # int4 only

    @property
    def name(self) -> str:
        if self.method == "int4" and self.group_size != DEFAULT_INT4_GROUP:
            return f"int4-g{self.group_size}"
        return self.method


def parse_method(text: str) -> QuantizationSpec:
    """'int8', 'int4', 'int4-g32' (also 'int4:32', 'w4a16'-style names are not accepted), 'fp8'."""
    key = str(text).strip().lower()
    if key in ("int8", "fp8"):
        return QuantizationSpec(key)
    match = re.fullmatch(r"int4(?:[-:_]g?(\d+))?", key)
    if match:
        group = int(match.group(1)) if match.group(1) else DEFAULT_INT4_GROUP
        if group < 2 or group & (group - 1):
            raise ValueError(f"int4 group size must be a power of two, got {group}")
        return QuantizationSpec("int4", group)
    raise ValueError(f"unknown quantization '{text}' (use int8, int4, int4-g32/g64/g128/g256 or fp8)")


@dataclass
class QuantizationReport:
    method: str
    quantized: list[str] = field(default_factory=list)  # module names now holding quantized weights
    kept: list[str] = field(default_factory=list)  # matched a keep pattern
    unsupported: dict[str, str] = field(default_factory=dict)  # name -> why it stayed in full precision
    reference_path: list[str] = field(default_factory=list)  # quantized, but no fused kernel for its shape
    bytes_before: int = 0  # of the weights that were quantized (a tied lm_head counts its copy)
    bytes_after: int = 0

    def summary(self) -> str:
        saved = f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB"
        parts = [f"{self.method}: {len(self.quantized)} layers quantized ({saved})"]
        if self.kept:
            parts.append(f"{len(self.kept)} kept in full precision ({', '.join(self.kept[:4])}"
                         f"{', ...' if len(self.kept) > 4 else ''})")
        if self.unsupported:
            parts.append(f"{len(self.unsupported)} left unquantized (shape): "
                         + "; ".join(f"{k}: {v}" for k, v in list(self.unsupported.items())[:3]))
        if self.reference_path:
            parts.append(f"{len(self.reference_path)} without a fused kernel")
        return ", ".join(parts)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A module is kept when a pattern matches its name or the name of a module containing it."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)


def _maker(spec: QuantizationSpec, in_features: int, dtype: torch.dtype) -> tuple[Any, str | None]:
    """A function weight -> QuantizedWeight for this layer, or (None, reason) when the shape cannot be taken."""
    if spec.method == "int8":
        return (lambda w: Int8Weight.quantize(w, dtype)), None
    if spec.method == "fp8":
        return (lambda w: Fp8Weight.quantize(w, dtype)), None
    assert spec.group_size is not None
    group = spec.group_size
    while group >= 32 and in_features % group:
        group //= 2
    if group < 32 or in_features % group:
        return None, f"in_features {in_features} has no int4 group of 32 or more"
    return (lambda w: Int4Weight.quantize(w, group, dtype)), None


def _check_device(spec: QuantizationSpec, device: torch.device) -> None:
    if spec.method != "fp8":
        return
    if device.type != "cuda":
        raise UnsupportedModelError(
            f"fp8 weight quantization runs on CUDA GPUs only, and this model is on {device.type}; "
            f"on a CPU use int8 (the fastest there) or int4")


def quantize_model(model: nn.Module, method: str | QuantizationSpec, keep: Sequence[str] = (),
                   group_size: int | None = None) -> QuantizationReport:
    """Replaces the model's linear layers and experts, in place, by weight-only quantized ones.

    keep: glob patterns on module names (`lm_head`, `model.layers.0.*`, `*.mlp.experts`) to leave in full
    precision. group_size overrides the int4 group of `method`."""
    spec = method if isinstance(method, QuantizationSpec) else parse_method(method)
    if group_size is not None:
        if spec.method != "int4":
            raise ValueError("group_size applies to int4 only")
        spec = parse_method(f"int4-g{group_size}")
    param = next(model.parameters())
    _check_device(spec, param.device)
    keep = list(keep)
    used_patterns: set[str] = set()
    report = QuantizationReport(spec.name)
    # Names, not modules: a list of the modules would keep every replaced full-precision weight alive to the
    # end, so the peak would be the whole model twice over instead of the model and one layer's copy.
    targets = [n for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, Experts)) and not isinstance(m, QuantExperts)]
    tied = getattr(model, "lm_head", 0) is None and hasattr(getattr(model, "model", None), "embed_tokens")
    # What the model keeps whole: a classifier's score head, a few rows whose quantization saves nothing.
    whole = set(getattr(model, "full_precision_modules", ()))
    for name in targets:
        hits = [p for p in keep if _matches(name, [p])]
        if hits or name in whole:
            used_patterns.update(hits)
            report.kept.append(name)
            continue
        module = model.get_submodule(name)
        if isinstance(module, Experts):
            new = _quantize_experts(module, spec, name, report)
        else:
            new = _quantize_linear(module.weight, module.bias, spec, name, report)
        del module
        if new is not None:
            _replace(model, name, new)
    if tied:
        hits = [p for p in keep if _matches("lm_head", [p])]
        used_patterns.update(hits)
        if hits:
            report.kept.append("lm_head")
        else:
            new = _quantize_linear(model.model.embed_tokens.weight, None, spec, "lm_head", report)
            if new is not None:
                model.lm_head = new
    unused = [p for p in keep if p not in used_patterns]
    if unused:
        raise ValueError(f"keep pattern(s) {unused} match no linear layer or experts module of this model")
    return report


def _record(report: QuantizationReport, spec: QuantizationSpec, name: str, before: list[torch.Tensor],
            after: list[QuantizedWeight]) -> None:
    report.quantized.append(name)
    report.bytes_before += sum(t.numel() * t.element_size() for t in before)
    report.bytes_after += sum(w.nbytes() for w in after)
    if spec.method != "fp8" and not all(w.use_kernel for w in after):
        report.reference_path.append(name)


def _quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantizationSpec, name: str,
                     report: QuantizationReport) -> QuantLinear | None:
    make, reason = _maker(spec, weight.shape[-1], weight.dtype)
    if make is None:
        report.unsupported[name] = reason or "unsupported shape"
        return None
    new = QuantLinear(make(weight.detach()), None if bias is None else bias.detach())
    _record(report, spec, name, [weight], [new.quantized])
    return new


def _quantize_experts(module: Experts, spec: QuantizationSpec, name: str,
                      report: QuantizationReport) -> QuantExperts | None:
    dtype = module.gate_up_proj.dtype
    make_gate_up, reason_gate_up = _maker(spec, module.hidden_size, dtype)  # gate_up_proj: [E, 2I, H]
    make_down, reason_down = _maker(spec, module.intermediate_size, dtype)  # down_proj: [E, H, I]
    if make_gate_up is None or make_down is None:
        report.unsupported[name] = reason_gate_up or reason_down or "unsupported shape"
        return None

    new = QuantExperts(module, make_gate_up, make_down)
    _record(report, spec, name, [module.gate_up_proj, module.down_proj], [new.gate_up_proj, new.down_proj])
    return new


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one single-sequence decode step reads, quantized or not: every tensor except the
    embedding table (a row lookup) unless it doubles as the lm_head; MoE experts count top_k / num_experts."""
    args = getattr(model, "args", None)
    expert_share = 1.0
    if getattr(args, "num_experts", 0):
        expert_share = args.num_experts_per_tok / args.num_experts  # type: ignore[union-attr]
    lookup_only = getattr(model, "lm_head", None) is not None
    total = 0.0
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        share = expert_share if isinstance(module, Experts) or ".experts." in module_name + "." else 1.0
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for tensor_name, t in tensors:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            if lookup_only and f"{module_name}.{tensor_name}".endswith("embed_tokens.weight"):
                continue
            total += t.numel() * t.element_size() * share
    return int(total)


__all__ = ["quantize_model", "parse_method", "decode_weight_bytes", "QuantizationReport", "QuantizationSpec",
           "QuantLinear", "QuantExperts", "METHODS"]
