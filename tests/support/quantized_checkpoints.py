"""Writers of pre-quantized checkpoints (AWQ, GPTQ, Qwen's FP8) from a full-precision Hugging Face one.

The reference tools (autoawq, gptqmodel) need CUDA builds and do not install here, so these write the
formats as documented by their readers: transformers' integrations (finegrained_fp8.py: w = q *
weight_scale_inv per 128x128 block) and gptqmodel's packing (awq/utils/packing_utils.py: AWQ packs eight
output columns per int32 in the order 0,2,4,6,1,3,5,7; GPTQ packs along the input with zero points stored
minus one in its v1 "gptq" serialisation). Quantization itself is plain min/max rounding: the formats,
not the calibration, are under test.

Each writer also writes, beside the quantized checkpoint, the same model with the exactly dequantized
weights in float32 (`reference_dir`): what transformers loads when it cannot load the format itself, and
what our loader's dequantize mode must reproduce. The dequantization here is written independently of
qwenstack's decoder (qwenstack/quantization/prequantized.py).
"""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FP8_MAX = 448.0
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections that read the same input share GPTQ's act-order permutation (one Hessian per input).
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 words in 0 .. 2**32 - 1 -> the same bits as int32."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _pack_along_last(codes: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    per = 32 // bits
    grouped = codes.long().reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    if order is not None:
        grouped = grouped[..., list(order)]
    words = torch.zeros(grouped.shape[:-1], dtype=torch.long)
    for i in range(per):
        words |= grouped[..., i] << (bits * i)
    return _to_int32(words)


def _minmax_codes(w: torch.Tensor, bits: int, sym: bool, min_zero: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [R, G] one group per row -> codes [R, G], scale [R] (float16), zero [R] (integer)."""
    maxq = 2**bits - 1
    lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    if sym:
        amax = torch.maximum(lo.abs(), hi)
        scale = (2 * amax / maxq).clamp(min=1e-6).half()
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.float32)
    else:
        scale = ((hi - lo) / maxq).clamp(min=1e-6).half()
        zero = torch.round(-lo / scale.float()).clamp(min_zero, maxq)
    q = torch.clamp(torch.round(w / scale.float()[:, None]) + zero[:, None], 0, maxq)
    return q.long(), scale, zero.long()


def quantize_awq(w: torch.Tensor, group: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """w [N, K] -> AWQ GEMM tensors (qweight [K, N/8], qzeros [K/G, N/8], scales [K/G, N]) and the exact
    dequantized weight."""
    n, k = w.shape
    groups = w.float().view(n, k // group, group).transpose(0, 1).reshape(-1, group)  # [(K/G) * N, G]
    q, scale, zero = _minmax_codes(groups, 4, sym=False, min_zero=0)
    deq = ((q - zero[:, None]).float() * scale.float()[:, None]).view(k // group, n, group).transpose(0, 1).reshape(n, k)
    codes = q.view(k // group, n, group).permute(0, 2, 1).reshape(k, n)  # [K, N]
    tensors = {"qweight": _pack_along_last(codes, 4, AWQ_ORDER),
               "qzeros": _pack_along_last(zero.view(k // group, n), 4, AWQ_ORDER),
               "scales": scale.view(k // group, n).contiguous()}
    return tensors, deq


def quantize_gptq(w: torch.Tensor, bits: int, group: int, sym: bool, perm: torch.Tensor | None
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """w [N, K] -> GPTQ v1 tensors (qweight [K*bits/32, N], qzeros [K/G, N*bits/32] holding zero - 1,
    scales [K/G, N], g_idx [K]) and the exact dequantized weight. perm: act-order (input channels quantized
    in this order; group j holds perm[j*G:(j+1)*G])."""
    n, k = w.shape
    group = k if group == -1 else group  # -1: one group per row
    perm = torch.arange(k) if perm is None else perm
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // group).to(torch.int32)
    codes = torch.empty(k, n, dtype=torch.long)
    scales = torch.empty(k // group, n, dtype=torch.float16)
    zeros = torch.empty(k // group, n, dtype=torch.long)
    deq = torch.empty(n, k)
    for g in range(k // group):
        cols = perm[g * group:(g + 1) * group]
        q, scale, zero = _minmax_codes(w.float()[:, cols], bits, sym, min_zero=1)  # v1 cannot store zero 0
        codes[cols] = q.t()
        scales[g], zeros[g] = scale, zero
        deq[:, cols] = (q - zero[:, None]).float() * scale.float()[:, None]
    tensors = {"qweight": _pack_along_last(codes.t(), bits).t().contiguous(),
               "qzeros": _pack_along_last(zeros - 1, bits), "scales": scales, "g_idx": g_idx}
    return tensors, deq


def quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """w [N, K] -> e4m3 weight and float32 weight_scale_inv [ceil(N/b), ceil(K/b)], and the exact dequantized weight."""
    n, k = w.shape
    rows, cols = -(-n // block), -(-k // block)
    padded = torch.zeros(rows * block, cols * block)
    padded[:n, :k] = w.float()
    tiles = padded.view(rows, block, cols, block)
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)  # [rows, cols]
    q = (tiles / scale[:, None, :, None]).view(rows * block, cols * block)[:n, :k].to(torch.float8_e4m3fn)
    deq = q.float() * scale.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return {"weight": q, "weight_scale_inv": scale}, deq


def quantization_config(method: str, bits: int = 4, group: int = 128, act_order: bool = False,
                        sym: bool = False) -> dict[str, Any]:
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}
    if method == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order, "sym": sym,
                "checkpoint_format": "gptq", "true_sequential": True, "static_groups": False}
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def write_quantized(src: Path, out: Path, method: str, *, bits: int = 4, group: int = 128, act_order: bool = False,
                    sym: bool = False, reference_dir: Path | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Writes `src` (a full-precision checkpoint, one file or shards) quantized by `method` to `out`;
    non-quantized tensors in `dtype`, lm_head/embeddings/norms/the MoE router left unquantized as the
    published checkpoints do. With reference_dir, also the exactly dequantized model in float32."""
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    quantized: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        module, _, leaf = name.rpartition(".")
        proj = module.rpartition(".")[2]
        if leaf != "weight" or proj not in QUANTIZED_LINEARS:
            quantized[name] = t.to(dtype) if t.is_floating_point() else t
            reference[name] = quantized[name].float()
            continue
        if method == "awq":
            parts, deq = quantize_awq(t, group)
        elif method == "gptq":
            perm = None
            if act_order:
                key = module.rpartition(".")[0] + "." + SHARED_INPUT.get(proj, proj)
                perm = torch.randperm(t.shape[1], generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))
            parts, deq = quantize_gptq(t, bits, group, sym, perm)
        else:
            parts, deq = quantize_fp8(t)
        quantized.update({f"{module}.{p}": v for p, v in parts.items()})
        reference[name] = deq
    out.mkdir(parents=True, exist_ok=True)
    save_file(quantized, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = str(dtype).replace("torch.", "")
    for directory in [out] + ([reference_dir] if reference_dir else []):
        directory.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.name != "config.json" and not f.name.startswith("model.safetensors") \
                    and f.suffix != ".safetensors":
                shutil.copy(f, directory / f.name)
    (out / "config.json").write_text(json.dumps(
        config | {"quantization_config": quantization_config(method, bits, group, act_order, sym)}, indent=2))
    if reference_dir is not None:
        save_file(reference, str(reference_dir / "model.safetensors"), metadata={"format": "pt"})
        (reference_dir / "config.json").write_text(json.dumps(config | {"dtype": "float32"}, indent=2))
    return out
