"""Cutting a linear layer (or a stack of expert matrices) into a tensor-parallel shard.

Decisions:
- Quantized weights are cut after quantization: the codes are sliced and the scales computed on the full
  matrix are kept (int8: per output row, so a column slice keeps every row's scale; int4: per group of
  input columns, so a column slice must fall on group boundaries). A shard therefore dequantizes to exactly
  the columns or rows of the single-rank weight, and TP with int8/int4 differs from one rank only by the
  order of the final sums.
- Rows are given as an index tensor (attention takes several disjoint row blocks: q, k, v); columns as one
  contiguous range.
"""
from __future__ import annotations

import torch
from torch import nn

from qwenstack.errors import UnsupportedModelError
from qwenstack.quantization.formats import Int4Weight, Int8Weight, QuantizedWeight
from qwenstack.quantization.modules import QuantLinear


def slice_quantized(weight: QuantizedWeight, rows: torch.Tensor | None = None,
                    cols: tuple[int, int] | None = None) -> QuantizedWeight:
    """The rows (output channels) and/or columns (input channels) [start, end) of every matrix of a stack."""
    if isinstance(weight, Int8Weight):
        codes, scales = weight.codes(), weight.scales
        if rows is not None:
            codes, scales = codes.index_select(-2, rows), scales.index_select(-1, rows)
        if cols is not None:
            codes = codes[..., cols[0]:cols[1]]
        return Int8Weight.from_codes(codes, scales, None if weight.use_kernel else False)
    if isinstance(weight, Int4Weight):
        codes, sz, g = weight.codes(), weight.group_scale_zeros(), weight.group_size  # sz [*, K/G, N, 2]
        if rows is not None:
            codes, sz = codes.index_select(-2, rows), sz.index_select(-2, rows)
        if cols is not None:
            start, end = cols
            if start % g or end % g:
                raise UnsupportedModelError(
                    f"int4 groups of {g} input channels do not fall on the tensor-parallel split at {start}:{end}; "
                    f"use a smaller group (int4-g32) or fewer ranks")
            codes, sz = codes[..., start:end], sz[..., start // g:end // g, :, :]
        return Int4Weight.from_scale_zeros(codes, sz, g, None if weight.use_kernel else False)
    raise UnsupportedModelError(f"{type(weight).__name__} weights cannot be split for tensor parallelism yet "
                                f"(int8 and int4 can)")


def slice_experts_quantized(weight: QuantizedWeight, start: int, end: int) -> QuantizedWeight:
    """Experts [start, end) of a quantized stack: the leading dimension, whatever the stored form."""
    if isinstance(weight, Int8Weight):
        return Int8Weight(weight.qweight[start:end].clone(), weight.scales[start:end].clone(), weight.use_kernel,
                          tiled=weight.tiled)
    if isinstance(weight, Int4Weight):
        return Int4Weight(weight.packed[start:end].clone(), weight.scale_zeros[start:end].clone(), weight.group_size,
                          weight.in_features, weight.use_kernel, tiled=weight.tiled)
    raise UnsupportedModelError(f"{type(weight).__name__} experts cannot be split for expert parallelism yet")


def take_rows(module: nn.Module, rows: torch.Tensor) -> nn.Module:
    """A linear layer holding only the given output rows (bias included): a column-parallel shard."""
    if isinstance(module, QuantLinear):
        bias = None if module.bias is None else module.bias[rows].clone()
        return QuantLinear(slice_quantized(module.quantized, rows=rows), bias)
    if type(module) is nn.Linear:
        new = nn.Linear(module.in_features, rows.numel(), bias=module.bias is not None,
                        device="meta", dtype=module.weight.dtype)
        new.weight = nn.Parameter(module.weight.detach()[rows].clone(), requires_grad=False)
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.detach()[rows].clone(), requires_grad=False)
        return new
    raise UnsupportedModelError(f"cannot split a {type(module).__name__} for tensor parallelism")


def take_cols(module: nn.Module, start: int, end: int, keep_bias: bool) -> nn.Module:
    """A linear layer holding input columns [start, end): a row-parallel shard whose output is a partial
    sum. keep_bias: one rank keeps the bias so that the sum adds it once."""
    if isinstance(module, QuantLinear):
        bias = module.bias.clone() if keep_bias and module.bias is not None else None
        return QuantLinear(slice_quantized(module.quantized, cols=(start, end)), bias)
    if type(module) is nn.Linear:
        has_bias = keep_bias and module.bias is not None
        new = nn.Linear(end - start, module.out_features, bias=has_bias, device="meta", dtype=module.weight.dtype)
        new.weight = nn.Parameter(module.weight.detach()[:, start:end].clone(), requires_grad=False)
        if has_bias:
            new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return new
    raise UnsupportedModelError(f"cannot split a {type(module).__name__} for tensor parallelism")


def head_rows(heads: range, head_size: int, offset: int = 0) -> torch.Tensor:
    """Row indices of consecutive heads of head_size rows each, starting at row `offset`."""
    return torch.arange(heads.start * head_size, heads.stop * head_size) + offset
