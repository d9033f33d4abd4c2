"""Checkpoints quantized by others, read as they are: Qwen's FP8 (e4m3 with block scales), AWQ and GPTQ.

    model = load_model("Qwen3-8B-AWQ")        # config.json's quantization_config is detected
    # awq 4-bit g128: 252 matrices repacked into int4-g128 as they are (codes kept; ...)

Each format is mapped at load to our nearest runnable one (formats.py), and the mapping is said once:
- AWQ (4-bit, zero points, "gemm" packing) and GPTQ 4-bit with a group of 32..256: the 4-bit codes are
  kept and repacked into our int4 group format (Int4Weight.from_codes: w = (q - z) * s becomes
  (q - 8) * s + (8 - z) * s). Exact in float32; in bfloat16 the group scales are rounded to bfloat16.
- GPTQ with act-order (desc_act: g_idx scatters a group's input channels): the input channels are stored
  in quantization order, where the groups are contiguous again, and each product gathers the activations
  in that order (formats.PermutedInput): still the original codes.
- GPTQ with one group per row (group_size -1, 4 or 8 bits) whose q - z fits in int8: the codes shifted by
  their zero point are our int8 per output channel as they are (exact in float32).
- FP8 (e4m3, 128x128 block scales `weight_scale_inv`), grouped GPTQ 8-bit and groups our int4 kernel lacks:
  dequantized exactly (float32) and requantized to our int8 per output channel (on CUDA, FP8 goes to our
  per-channel fp8). `dequantize=True` keeps the exactly dequantized weights in the model's dtype instead.
  Why not exact: our int8 kernels hold one scale per output row. Group scales along the input (GPTQ's
  g128) do not fold into one row scale, and an e4m3 row is not an 8-bit integer grid at all: e4m3 keeps 3
  mantissa bits at every exponent, so values more than 3 binades apart cannot share one integer step
  within 127 levels, even with a scale per 128-column block. The cost is measured (`qwenstack
  eval-quality --quantization as-stored`) and tested (tests/test_prequantized.py).
- Anything else (other bit widths, AWQ without zero points or with GEMV packing, static FP8 activation
  scales, other GPTQ serialisations, other quant_methods) is refused with an error naming the option.

Layers a checkpoint left unquantized (lm_head, embeddings, norms, the MoE router: modules_to_not_convert)
are read as ordinary tensors: a layer is quantized exactly when its quantized tensors are present.
The strict loader's checks still hold: each quantized layer stands in for a `<name>.weight` tensor of the
right shape, and a leftover or missing tensor is named.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from qwenstack.errors import CheckpointError, UnsupportedModelError
from qwenstack.models.moe import Experts
from qwenstack.quantization.formats import (INT4_KERNEL_GROUPS, Fp8Weight, Int4Weight, Int8Weight, PermutedInput,
                                            QuantizedWeight)
from qwenstack.quantization import _replace
from qwenstack.quantization.modules import QuantExperts, QuantLinear
from qwenstack.weights import (Source, TensorInfo, _read_tensor, _set_parameter, checkpoint_tensors, load_weights,
                               plan_load)

METHODS = ("fp8", "awq", "gptq")
# AWQ's GEMM packing puts the 8 output columns of one int32 in this order (nibble i holds column ORDER[i]).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
QUANT_PARTS = {"awq": ("qweight", "qzeros", "scales"), "gptq": ("qweight", "qzeros", "scales", "g_idx"),
               "fp8": ("weight", "weight_scale_inv")}


@dataclass(frozen=True)
class PrequantScheme:
    method: str  # fp8 | awq | gptq
    bits: int
    group_size: int = 0  # awq/gptq; 0 = one group per row (GPTQ's group_size -1)
    block: tuple[int, int] = (0, 0)  # fp8 (rows, columns) per scale
    zero_offset: int = 0  # GPTQ's v1 serialisation stores zero points minus one

    @property
    def name(self) -> str:
        if self.method == "fp8":
            return f"fp8 e4m3 {self.block[0]}x{self.block[1]} blocks"
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"{self.method} {self.bits}-bit {group}"


def _refuse(option: str, value: Any, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"quantization_config {option}={value!r} is not supported: {why}")


def parse_scheme(config: dict[str, Any]) -> PrequantScheme | None:
    """The checkpoint's quantization_config as a scheme we run, None when there is none; refusals name the option."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise UnsupportedModelError("config.json quantization_config must be an object")
    method = str(qc.get("quant_method", "")).lower()
    if method not in METHODS:
        raise _refuse("quant_method", qc.get("quant_method"), f"qwenstack reads {', '.join(METHODS)} checkpoints "
                      f"(or quantizes full-precision ones itself with --quantization)")
    if method == "fp8":
        if str(qc.get("fmt", "e4m3")).lower() != "e4m3":
            raise _refuse("fmt", qc.get("fmt"), "only e4m3 FP8 weights are read")
        if str(qc.get("activation_scheme", "dynamic")).lower() != "dynamic":
            raise _refuse("activation_scheme", qc.get("activation_scheme"), "static activation scales are not read "
                          "(weights are dequantized; use a checkpoint with dynamic activation scaling)")
        block = qc.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise _refuse("weight_block_size", block, "FP8 weights need a [rows, columns] block of scales")
        return PrequantScheme("fp8", 8, block=(block[0], block[1]))
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size"))
    if not isinstance(group, int) or group == 0 or group < -1:
        raise _refuse("group_size", group, "a positive group size (or -1, one group per row) is needed")
    group = 0 if group == -1 else group
    if method == "awq":
        if bits != 4:
            raise _refuse("bits", bits, "AWQ checkpoints are read at 4 bits")
        if qc.get("zero_point", True) is not True:
            raise _refuse("zero_point", qc.get("zero_point"), "AWQ without zero points is not read")
        packing = str(qc.get("version", qc.get("format", "gemm"))).lower()
        if packing != "gemm":
            raise _refuse("version", packing, "only AWQ's GEMM packing is read (GEMV and kernel-specific layouts are not)")
        return PrequantScheme("awq", 4, group)
    if bits not in (4, 8):
        raise _refuse("bits", bits, "GPTQ checkpoints are read at 4 or 8 bits")
    serialisation = str(qc.get("checkpoint_format", "gptq")).lower()
    if serialisation not in ("gptq", "gptq_v2"):
        raise _refuse("checkpoint_format", serialisation, "only the gptq and gptq_v2 serialisations are read")
    return PrequantScheme("gptq", bits, group, zero_offset=1 if serialisation == "gptq" else 0)


@dataclass
class Decoded:
    """One quantized matrix [N, K] read from the checkpoint: integer codes with group scales and zero points
    (codes' columns in `order` when set), or the exact float32 weight (FP8)."""

    codes: torch.Tensor | None = None  # uint8 [N, K]
    scales: torch.Tensor | None = None  # float32 [N, K / G]
    zeros: torch.Tensor | None = None  # float32 [N, K / G], code units
    order: torch.Tensor | None = None  # int64 [K]: stored column j is weight column order[j]
    weight: torch.Tensor | None = None  # float32 [N, K] (FP8)

    def dequantize(self) -> torch.Tensor:
        """The float32 weights [*, N, K] these stand for (exact)."""
        if self.weight is not None:
            return self.weight
        assert self.codes is not None and self.scales is not None and self.zeros is not None
        *lead, n, k = self.codes.shape
        groups = self.scales.shape[-1]
        w = (self.codes.float().view(*lead, n, groups, k // groups) - self.zeros[..., None]) * self.scales[..., None]
        w = w.view(*lead, n, k)
        if self.order is None:
            return w
        return torch.empty_like(w).scatter_(-1, self.order.unsqueeze(-2).expand_as(w), w)


def _unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., C] -> codes [..., C, 32 / bits], code i from bits i*bits upward."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return (packed[..., None] >> shifts) & ((1 << bits) - 1)


def decode_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> Decoded:
    """AWQ GEMM: qweight [K, N/8] and qzeros [K/G, N/8] int32 packed along the output, scales [K/G, N]."""
    k, n = qweight.shape[0], scales.shape[1]
    if qweight.shape[1] * 8 != n or qzeros.shape != (scales.shape[0], n // 8) or k % scales.shape[0]:
        raise CheckpointError(f"AWQ tensors disagree: qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, "
                              f"scales {list(scales.shape)}")
    unorder = list(AWQ_ORDER)

    def columns(packed: torch.Tensor) -> torch.Tensor:
        nibbles = _unpack_int32(packed, 4)  # [R, N/8, 8]: nibble i is column AWQ_ORDER[i] of its eight
        out = torch.empty_like(nibbles)
        out[..., unorder] = nibbles
        return out.reshape(packed.shape[0], n)

    return Decoded(codes=columns(qweight).t().to(torch.uint8).contiguous(), scales=scales.float().t().contiguous(),
                   zeros=columns(qzeros).float().t().contiguous())


def decode_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                scheme: PrequantScheme) -> Decoded:
    """GPTQ: qweight [K * bits / 32, N] packed along the input, qzeros [K/G, N * bits / 32] along the output,
    scales [K/G, N], g_idx [K] (group of each input channel; act-order scatters them)."""
    bits = scheme.bits
    per = 32 // bits
    k, n, groups = qweight.shape[0] * per, scales.shape[1], scales.shape[0]
    if qweight.shape[1] != n or qzeros.shape != (groups, n // per) or (g_idx is not None and g_idx.shape != (k,)):
        raise CheckpointError(f"GPTQ tensors disagree: qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, "
                              f"scales {list(scales.shape)}, g_idx {None if g_idx is None else list(g_idx.shape)}")
    codes = _unpack_int32(qweight.t(), bits).reshape(n, k)  # [N, K/per, per] -> input channel r*per + i
    zeros = _unpack_int32(qzeros, bits).reshape(groups, n).t().float() + scheme.zero_offset  # [N, K/G]
    group = k // groups
    contiguous = torch.arange(k) // group
    g_idx = contiguous if g_idx is None else g_idx.long()
    if g_idx.min() < 0 or g_idx.max() >= groups:
        raise CheckpointError(f"GPTQ g_idx names groups outside 0..{groups - 1}")
    order = None
    if not torch.equal(g_idx, contiguous):
        order = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[order], contiguous):
            # Groups of unequal sizes: no contiguous layout, so per-column scales (still exact).
            w = (codes.float() - zeros[:, g_idx]) * scales.float().t()[:, g_idx]
            return Decoded(weight=w)
        codes = codes[:, order]
    return Decoded(codes=codes.to(torch.uint8).contiguous(), scales=scales.float().t().contiguous(), zeros=zeros,
                   order=order)


def decode_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, scheme: PrequantScheme) -> Decoded:
    """FP8 e4m3 weight [N, K] with one float32 scale per block: w = q * weight_scale_inv[n // bn, k // bk]."""
    n, k = weight.shape
    bn, bk = scheme.block
    want = (-(-n // bn), -(-k // bk))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"FP8 weight_scale_inv has shape {list(scale_inv.shape)}, expected {list(want)} "
                              f"for a [{n}, {k}] weight in {bn}x{bk} blocks")
    scales = scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return Decoded(weight=weight.float() * scales)


@dataclass
class PrequantReport:
    scheme: PrequantScheme
    repacked: list[str] = field(default_factory=list)  # int4 codes kept
    repacked_int8: list[str] = field(default_factory=list)  # per-channel codes kept as our int8
    requantized: list[str] = field(default_factory=list)  # dequantized exactly, then our int8 / fp8
    dequantized: list[str] = field(default_factory=list)  # kept as exact float weights
    target: str = ""  # our format for requantized layers: int8 (CPU) or fp8 (CUDA)
    dtype: str = ""  # the activation dtype, in which int4 group scales are stored

    def summary(self) -> str:
        parts = []
        if self.repacked:
            exact = "exact" if self.dtype == "float32" else f"scales rounded to {self.dtype}"
            parts.append(f"{len(self.repacked)} layers repacked into our int4 as they are (codes kept, {exact})")
        if self.repacked_int8:
            exact = "exact" if self.dtype == "float32" else f"scales rounded to {self.dtype}"
            parts.append(f"{len(self.repacked_int8)} layers repacked into our int8 per output channel as they are "
                         f"(codes kept, {exact})")
        if self.requantized:
            parts.append(f"{len(self.requantized)} layers dequantized exactly and requantized to our {self.target} "
                         f"per output channel (not exact)")
        if self.dequantized:
            parts.append(f"{len(self.dequantized)} layers dequantized exactly to {self.dtype}")
        return f"{self.scheme.name} checkpoint: " + ", ".join(parts)


class _Reader:
    """Reads named tensors of a checkpoint, keeping one file open at a time."""

    def __init__(self, tensors: dict[str, TensorInfo]) -> None:
        self.tensors = tensors
        self.path: Path | None = None
        self.file: BinaryIO | None = None

    def __call__(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if self.path != info.file:
            self.close()
            self.file, self.path = open(info.file, "rb"), info.file
        return _read_tensor(self.file, info)

    def get(self, name: str) -> torch.Tensor | None:
        return self(name) if name in self.tensors else None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file, self.path = None, None


def _stand_ins(tensors: dict[str, TensorInfo], scheme: PrequantScheme) -> tuple[dict[str, TensorInfo], set[str]]:
    """The checkpoint's tensors with each quantized layer's parts replaced by one float `<layer>.weight`
    of the shape it stands for, and the names of those stand-ins."""
    marker = "weight_scale_inv" if scheme.method == "fp8" else "qweight"
    layers = {name[: -len(marker) - 1] for name in tensors if name.endswith("." + marker)}
    edited = dict(tensors)
    stand_ins = set()
    for layer in sorted(layers):
        parts = {p: f"{layer}.{p}" for p in QUANT_PARTS[scheme.method]}
        required = [p for p in parts if p != "g_idx"]
        lacking = [parts[p] for p in required if parts[p] not in tensors]
        if lacking:
            raise CheckpointError(f"the {scheme.method} checkpoint is missing tensor '{lacking[0]}'")
        _check_part_dtypes(tensors, parts, scheme.method)
        if scheme.method == "fp8":
            shape = tensors[parts["weight"]].shape
            if tensors[parts["weight"]].dtype != torch.float8_e4m3fn:
                raise CheckpointError(f"'{parts['weight']}' has a scale but is {tensors[parts['weight']].dtype}, not e4m3")
        else:
            n = tensors[parts["scales"]].shape[1]
            rows = tensors[parts["qweight"]].shape[0]
            k = rows if scheme.method == "awq" else rows * 32 // scheme.bits
            shape = (n, k)
        for p in parts.values():
            edited.pop(p, None)
        info = tensors[parts[required[0]]]
        edited[f"{layer}.weight"] = TensorInfo(f"{layer}.weight", info.file, torch.float32, tuple(shape), 0, 0)
        stand_ins.add(f"{layer}.weight")
    return edited, stand_ins


def _check_part_dtypes(tensors: dict[str, TensorInfo], parts: dict[str, str], method: str) -> None:
    """Packed codes and indices are integers, scales floats: anything else decoded into garbage (an int scale)
    or failed deep in the unpacking (NotImplementedError: "rshift_cpu" not implemented for 'Float')."""
    for part, name in parts.items():
        if name not in tensors or part == "weight":
            continue
        dtype = tensors[name].dtype
        want_float = part in ("scales", "weight_scale_inv")
        if dtype.is_floating_point != want_float or dtype == torch.bool:
            kind = "floating-point" if want_float else "integer"
            raise CheckpointError(f"the {method} checkpoint's tensor '{name}' is {str(dtype).replace('torch.', '')}, "
                                  f"not {kind}")


def _plain_beside_quantized(stored: dict[str, TensorInfo], name: str, plain: str, method: str) -> CheckpointError:
    """The error for a parameter fused from quantized tensors and a plain one: most often the plain one's
    quantization parts (its FP8 scale) are what is missing."""
    info = stored.get(plain)
    if method == "fp8" and info is not None and info.dtype.itemsize == 1:
        return CheckpointError(f"the fp8 checkpoint is missing tensor '{plain}_scale_inv'")
    return CheckpointError(f"'{name}' is filled from quantized and unquantized tensors ({plain}); "
                           f"mixed layouts are not read")


def _decode(read: _Reader, layer: str, scheme: PrequantScheme) -> Decoded:
    try:
        return _decode_parts(read, layer, scheme)
    except CheckpointError as exc:  # the decoders check shapes without knowing the layer: name it
        raise CheckpointError(f"{layer}: {exc}") from None


def _decode_parts(read: _Reader, layer: str, scheme: PrequantScheme) -> Decoded:
    if scheme.method == "fp8":
        return decode_fp8(read(f"{layer}.weight"), read(f"{layer}.weight_scale_inv"), scheme)
    if scheme.method == "awq":
        return decode_awq(read(f"{layer}.qweight"), read(f"{layer}.qzeros"), read(f"{layer}.scales"))
    return decode_gptq(read(f"{layer}.qweight"), read(f"{layer}.qzeros"), read(f"{layer}.scales"),
                       read.get(f"{layer}.g_idx"), scheme)


def assemble_decoded(shape: torch.Size, layout: list[Source], parts: list[Decoded]) -> Decoded:
    """The decoded sources of one parameter (a fused qkv, a stack of experts) in the parameter's shape.
    Codes are kept only when every source has codes with one group size and, per matrix, one order."""
    keep_codes = all(p.codes is not None for p in parts) and len({p.scales.shape[1] for p in parts  # type: ignore[union-attr]
                                                                   if p.scales is not None}) == 1
    if keep_codes:
        stack = tuple(shape[:-2])
        orders: dict[tuple[Any, ...], torch.Tensor | None] = {}
        for source, part in zip(layout, parts):
            key = tuple(source.index[: len(stack)])
            if key in orders and not _same_order(orders[key], part.order):
                keep_codes = False
            orders[key] = part.order
    if not keep_codes:
        weight = torch.empty(shape, dtype=torch.float32)
        for source, part in zip(layout, parts):
            weight[source.index] = part.dequantize()
        return Decoded(weight=weight)
    groups = parts[0].scales.shape[1]  # type: ignore[union-attr]
    codes = torch.empty(shape, dtype=torch.uint8)
    scales = torch.empty(*shape[:-1], groups)
    zeros = torch.empty(*shape[:-1], groups)
    has_order = any(p.order is not None for p in parts)
    order = torch.empty(*shape[:-2], shape[-1], dtype=torch.long) if has_order else None
    for source, part in zip(layout, parts):
        codes[source.index], scales[source.index], zeros[source.index] = part.codes, part.scales, part.zeros
        if order is not None:
            order[source.index[: len(shape) - 2]] = part.order if part.order is not None else torch.arange(shape[-1])
    return Decoded(codes=codes, scales=scales, zeros=zeros, order=order)


def _same_order(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


def runnable_weight(decoded: Decoded, dtype: torch.dtype, device: torch.device | str) -> tuple[QuantizedWeight, bool]:
    """Our runnable format for one parameter's decoded weights, and whether its codes were kept."""
    device = torch.device(device)
    if decoded.codes is not None and decoded.scales is not None and decoded.zeros is not None:
        k, groups = decoded.codes.shape[-1], decoded.scales.shape[-1]
        group = k // groups
        if decoded.codes.max() <= 15 and group in INT4_KERNEL_GROUPS:
            weight: QuantizedWeight = Int4Weight.from_codes(decoded.codes.to(device), decoded.scales.to(device),
                                                            decoded.zeros.to(device), group, dtype)
            if decoded.order is not None:
                weight = PermutedInput(weight, decoded.order.to(device))
            return weight, True
        int8 = _int8_codes(decoded)
        if int8 is not None:
            return Int8Weight.from_codes(int8.to(device), decoded.scales[..., 0].to(device=device, dtype=dtype)), True
        decoded = Decoded(weight=decoded.dequantize())
    assert decoded.weight is not None
    w = decoded.weight.to(device)
    if device.type == "cuda":
        return Fp8Weight.quantize(w, dtype), False
    return Int8Weight.quantize(w, dtype), False


def _int8_codes(decoded: Decoded) -> torch.Tensor | None:
    """With one group per row (GPTQ's group_size -1), w = (q - z) * s is our int8 per output channel exactly
    when every z is a whole number and every q - z fits in int8: those codes, else None. (Grouped scales do
    not fit a per-row kernel, and FP8's e4m3 values span more binades than 8-bit integers hold.)"""
    assert decoded.codes is not None and decoded.scales is not None and decoded.zeros is not None
    if decoded.scales.shape[-1] != 1 or decoded.order is not None or not torch.equal(decoded.zeros, decoded.zeros.round()):
        return None
    shifted = decoded.codes.to(torch.int16) - decoded.zeros.to(torch.int16)
    if shifted.min() < -128 or shifted.max() > 127:
        return None
    return shifted.to(torch.int8)


def load_prequantized(model: nn.Module, model_dir: str | Path, scheme: PrequantScheme, dtype: torch.dtype,
                      device: torch.device | str = "cpu", dequantize: bool = False) -> PrequantReport:
    """Fills a meta-device model from a pre-quantized checkpoint (module docstring). dequantize: keep the
    exactly dequantized weights in `dtype` rather than running a quantized format."""
    device = torch.device(device)
    stored = checkpoint_tensors(model_dir)
    tensors, stand_ins = _stand_ins(stored, scheme)
    params = dict(model.named_parameters())
    plan = plan_load(model, tensors)
    quantized = {name for name, layout in plan.items() if any(s.name in stand_ins for s in layout)}
    for name in quantized:
        plain = [s.name for s in plan[name] if s.name not in stand_ins]
        if plain:
            raise _plain_beside_quantized(stored, name, plain[0], scheme.method)
        if any(s.transpose for s in plan[name]):
            raise CheckpointError(f"'{name}' would need its quantized tensors transposed, which is not supported")
    load_weights(model, model_dir, dtype, device, tensors=tensors, skip=frozenset(quantized))
    report = PrequantReport(scheme, target="fp8" if device.type == "cuda" else "int8",
                            dtype=str(dtype).replace("torch.", ""))
    read = _Reader(stored)
    experts: dict[str, dict[str, QuantizedWeight]] = defaultdict(dict)
    try:
        for name in sorted(quantized):
            layout = plan[name]
            decoded = assemble_decoded(params[name].shape, layout, [_decode(read, s.name[: -len(".weight")], scheme)
                                                             for s in layout])
            module_name, _, attr = name.rpartition(".")
            if dequantize:
                weight = decoded.dequantize()
                _set_parameter(model, name, weight.to(device=device, dtype=dtype))
                report.dequantized.append(module_name)
                continue
            qweight, kept = runnable_weight(decoded, dtype, device)
            inner = qweight.inner if isinstance(qweight, PermutedInput) else qweight
            (report.requantized if not kept else report.repacked if isinstance(inner, Int4Weight)
             else report.repacked_int8).append(module_name)
            module = model.get_submodule(module_name)
            if isinstance(module, Experts):
                experts[module_name][attr] = qweight
                if len(experts[module_name]) == 2:
                    _replace(model, module_name, QuantExperts.from_weights(
                        module, experts[module_name]["gate_up_proj"], experts[module_name]["down_proj"]))
            elif isinstance(module, nn.Linear) and attr == "weight":
                bias = None if module.bias is None else module.bias.detach()
                _replace(model, module_name, QuantLinear(qweight, bias))
            else:
                raise CheckpointError(f"'{name}' is quantized in the checkpoint, but {type(module).__name__} "
                                      f"cannot hold quantized weights")
    finally:
        read.close()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise CheckpointError(f"'{meta[0]}' was quantized for only part of its module (both expert stacks needed)")
    return report


__all__ = ["PrequantScheme", "PrequantReport", "parse_scheme", "load_prequantized", "decode_awq", "decode_gptq",
           "decode_fp8", "Decoded", "assemble_decoded", "runnable_weight"]
