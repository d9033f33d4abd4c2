"""GGUF's Q4_0 kept code for code as our int4-g32.

Q4_0 stores each run of 32 weights along a row as one float16 scale d and 32 four-bit codes q (block of 18
bytes: d, then 16 bytes whose low nibbles are codes 0..15 and high nibbles codes 16..31), w = d * (q - 8).
Our int4 format is w = (q - 8) * scale + zero per group of 32 (formats.Int4Weight), so with scale = d and
zero = 0 the codes are kept as they are: exact in float32 (in bfloat16, d is rounded to bfloat16 as any
int4 scale is). The assembly into fused layers (q/k/v, gate/up, expert stacks) is the pre-quantized
loader's (quantization/prequantized.py), which keeps codes the same way for AWQ and GPTQ.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from qwenstack.quantization.prequantized import Decoded, assemble_decoded, runnable_weight

BLOCK = 32
BLOCK_BYTES = 2 + BLOCK // 2


def decode_q4_0(tensor: Any) -> Decoded:
    """A Q4_0 tensor [*, N, K] (gguf.ReaderTensor) -> its codes, scales and zero points (8), exactly."""
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK_BYTES)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 2:]
    codes = np.concatenate([packed & 0xF, packed >> 4], axis=-1).reshape(shape)
    scales_t = torch.from_numpy(scales)
    return Decoded(codes=torch.from_numpy(codes), scales=scales_t, zeros=torch.full_like(scales_t, 8.0))


def decode_q4_0_tensors(gguf: Any, names: dict[str, tuple[str, int | None]]) -> dict[str, Decoded]:
    """Every Q4_0 tensor of a GgufFile decoded, by Hugging Face name (one expert of a stack each); `names`:
    model.gguf_names of the file."""
    from gguf import GGMLQuantizationType

    stacks: dict[str, Decoded] = {}
    out: dict[str, Decoded] = {}
    for hf_name, (name, expert) in names.items():
        if gguf.tensors[name].tensor_type != GGMLQuantizationType.Q4_0:
            continue
        if name not in stacks:
            stacks[name] = decode_q4_0(gguf.tensors[name])
        whole = stacks[name]
        out[hf_name] = whole if expert is None else Decoded(codes=whole.codes[expert], scales=whole.scales[expert],
                                                            zeros=whole.zeros[expert])
    return out


def keep_q4_0_codes(model: nn.Module, decoded: dict[str, Decoded], dtype: torch.dtype,
                    device: torch.device | str) -> list[str]:
    """Replaces every linear layer and experts module whose tensors are all Q4_0 (`decoded`, by Hugging Face
    name) by our int4 holding the same codes; a tied lm_head too when the embedding is Q4_0. Returns their names."""
    from qwenstack.models.moe import Experts
    from qwenstack.quantization import QuantExperts, QuantLinear, _replace
    from qwenstack.weights import Source, parameter_sources

    sources = parameter_sources(model)
    kept: list[str] = []
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, Experts)):
            continue
        weights: dict[str, Any] = {}
        for param_name, param in module.named_parameters(recurse=False):
            layout = next((lay for lay in sources[f"{module_name}.{param_name}"]
                           if all(s.name in decoded for s in lay)), None)
            if layout is None:
                break
            parts = [decoded[s.name] for s in layout]
            weights[param_name], _ = runnable_weight(assemble_decoded(param.shape, layout, parts), dtype, device)
        else:
            if isinstance(module, Experts):
                _replace(model, module_name, QuantExperts.from_weights(module, weights["gate_up_proj"],
                                                                       weights["down_proj"]))
            else:
                bias = None if module.bias is None else module.bias.detach()
                _replace(model, module_name, QuantLinear(weights["weight"], bias))
            kept.append(module_name)
    embedding = "model.embed_tokens.weight"
    if getattr(model, "lm_head", 0) is None and embedding in decoded:
        table = model.get_parameter(embedding)
        weight, _ = runnable_weight(assemble_decoded(table.shape, [Source(embedding)], [decoded[embedding]]),
                                    dtype, device)
        model.lm_head = QuantLinear(weight, None)
        kept.append("lm_head")
    return kept
