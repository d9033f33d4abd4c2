"""A Qwen3 / Qwen3-MoE model from one GGUF file (llama.cpp's format, what Ollama stores): config, weights and
tokenizer all read from the file with the `gguf` package.

    model, tokenizer, config, summary = load_gguf("Qwen3-0.6B-Q8_0.gguf", dtype=torch.bfloat16)

Decisions:
- The config is rebuilt from `{arch}.*` metadata (arch qwen3 or qwen3moe); tie_word_embeddings is whether
  the file has an `output.weight`, as llama.cpp decides it. Other architectures are refused by name.
- Tensors are renamed to the Hugging Face names (blk.N.attn_q -> model.layers.N.self_attn.q_proj; a MoE's
  stacked ffn_*_exps split per expert) and go through the strict loader's checks. Qwen3's Q and K are not
  permuted by llama.cpp's converter (only LLaMA's are), so no un-permutation is needed.
- Types: F32/F16/BF16 stay full precision in the model's dtype. Q4_0 is our int4-g32 code for code
  (q4_0.py: its block of 32 is a group with zero point 8). Other quantized types are dequantized exactly
  (gguf's reference dequantizers) and requantized to our nearest format, said once at load: 8-bit-class
  types (Q8_0, and Q5/Q6 for their precision) to our int8 per output channel; Q4_1, Q4_K and Q2_K (values
  on a linear grid per block) to our int4 with groups of 32; the other low-bit types (Q3_K, the IQ codebooks,
  TQ, MXFP4), which that grid rounds far off, to int8 (type_class). Q8_0 cannot be kept code for code: its
  scales are per 32-element block, ours per row, so its codes are re-rounded to one scale per row.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qwenstack.errors import CheckpointError, ConfigError, UnsupportedModelError
from qwenstack.from_gguf.tokenizer import tokenizer_from_metadata
from qwenstack.tokenizer import Tokenizer

ARCHITECTURES = {"qwen3": "qwen3", "qwen3moe": "qwen3_moe"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate",
}
EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}


@dataclass
class GgufFile:
    path: Path
    meta: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor

    @property
    def arch(self) -> str:
        return str(self.meta.get("general.architecture"))


def read_gguf(path: str | Path) -> GgufFile:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct errors on a damaged or foreign file
        raise CheckpointError(f"{path} is not a readable GGUF file (damaged or truncated?): {exc}") from None
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return GgufFile(Path(path), meta, {t.name: t for t in reader.tensors})


def config_from_metadata(gguf: GgufFile) -> dict[str, Any]:
    """A Hugging Face style config.json for the file's model."""
    if gguf.arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"GGUF architecture '{gguf.arch}' is not supported "
                                    f"(supported: {', '.join(ARCHITECTURES)})")
    try:
        return _config(gguf)
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as exc:  # a value of the wrong type, a zero count
        raise CheckpointError(f"{gguf.path.name} has malformed '{gguf.arch}.*' metadata: {exc!s}") from None


def _config(gguf: GgufFile) -> dict[str, Any]:
    m, a = gguf.meta, gguf.arch

    def need(key: str) -> Any:
        if f"{a}.{key}" not in m:
            raise CheckpointError(f"{gguf.path.name} has no '{a}.{key}' metadata")
        return m[f"{a}.{key}"]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    if "token_embd.weight" not in gguf.tensors:
        raise CheckpointError(f"{gguf.path.name} has no token_embd.weight tensor")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(m.get(f"{a}.rope.freq_base", 1e6))}
    if m.get(f"{a}.rope.scaling.type") == "yarn":
        rope.update(rope_type="yarn", factor=float(m[f"{a}.rope.scaling.factor"]),
                    original_max_position_embeddings=int(m[f"{a}.rope.scaling.original_context_length"]))
    config: dict[str, Any] = {
        "model_type": ARCHITECTURES[a], "hidden_size": hidden, "num_hidden_layers": int(need("block_count")),
        "intermediate_size": int(m.get(f"{a}.feed_forward_length", 0)) or None,
        "num_attention_heads": heads, "num_key_value_heads": int(m.get(f"{a}.attention.head_count_kv", heads)),
        "head_dim": int(m.get(f"{a}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(need("context_length")), "rope_parameters": rope,
        "vocab_size": int(gguf.tensors["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "eos_token_id": m.get("tokenizer.ggml.eos_token_id"), "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
        "pad_token_id": m.get("tokenizer.ggml.padding_token_id"),
    }
    if a == "qwen3moe":
        config.update(num_experts=int(need("expert_count")), num_experts_per_tok=int(need("expert_used_count")),
                      moe_intermediate_size=int(need("expert_feed_forward_length")), norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[])
        config["intermediate_size"] = config["intermediate_size"] or config["moe_intermediate_size"]
    return config


def _dequantized(tensor: Any, path: Path) -> torch.Tensor:
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    if tensor.tensor_type in (T.F32, T.F64):  # the reader gives these as float arrays already
        data = tensor.data
    else:
        try:
            data = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:  # types llama.cpp uses for activations (Q8_1, Q8_K) or integers, not weights
            raise UnsupportedModelError(f"{path.name}: tensor '{tensor.name}' is stored as {tensor.tensor_type.name}, "
                                        f"a GGML type qwenstack cannot read as weights") from None
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a copy: the file stays read-only


def type_class(tensor_type: Any) -> str:
    """float | int8 | int4: our nearest format for a GGML tensor type. int4 (groups of 32 on a linear grid) only
    for the types whose values lie on such a grid: Q4_0, Q4_1, Q4_K and Q2_K lose little re-rounded to it. The
    other types under 5 bits (Q3_K's 16-value sub-blocks, the IQ codebooks, ternary TQ and MXFP4's float codes)
    lose 7-15% of their weights' accuracy there (KL 0.02-1 on a tiny model), so they go to int8 with the rest."""
    from gguf import GGMLQuantizationType as T

    if tensor_type in (T.F32, T.F64, T.F16, T.BF16):
        return "float"
    return "int4" if tensor_type in (T.Q4_0, T.Q4_1, T.Q4_K, T.Q2_K) else "int8"


def gguf_names(gguf: GgufFile) -> dict[str, tuple[str, int | None]]:
    """Each Hugging Face tensor name -> the GGUF tensor holding it and, for a MoE's stacked experts, its index."""
    names: dict[str, tuple[str, int | None]] = {}
    for name, tensor in gguf.tensors.items():
        if name in GLOBAL_NAMES:
            names[GLOBAL_NAMES[name]] = (name, None)
            continue
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
        if match is None or (match.group(2) not in LAYER_NAMES and match.group(2) not in EXPERT_NAMES):
            raise CheckpointError(f"{gguf.path.name} has tensor '{name}', which {gguf.arch} does not use")
        layer, kind, leaf = match.groups()
        if kind in EXPERT_NAMES:
            for e in range(int(tensor.shape[2])):
                names[f"model.layers.{layer}.mlp.experts.{e}.{EXPERT_NAMES[kind]}.{leaf}"] = (name, e)
        else:
            names[f"model.layers.{layer}.{LAYER_NAMES[kind]}.{leaf}"] = (name, None)
    return names


def hf_tensors(gguf: GgufFile) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor dequantized under its Hugging Face name, and each name's GGML type."""
    state: dict[str, torch.Tensor] = {}
    types: dict[str, Any] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for hf_name, (name, expert) in gguf_names(gguf).items():
        if name not in dequantized:
            dequantized[name] = _dequantized(gguf.tensors[name], gguf.path)
        state[hf_name] = dequantized[name] if expert is None else dequantized[name][expert]
        types[hf_name] = gguf.tensors[name].tensor_type
    return state, types


def _module_classes(model: nn.Module, types: dict[str, Any]) -> dict[str, str]:
    """Each quantizable module (our names; a tied lm_head as 'lm_head') -> float | int8 | int4."""
    from qwenstack.models.moe import Experts
    from qwenstack.weights import parameter_sources

    sources = parameter_sources(model)
    classes: dict[str, str] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Experts)):
            continue
        names: list[str] = []
        for param, _ in module.named_parameters(recurse=False):
            layouts = sources[f"{module_name}.{param}"]
            names += [s.name for s in next((lay for lay in layouts if all(s.name in types for s in lay)), [])]
        kinds = {type_class(types[n]) for n in names}
        classes[module_name] = kinds.pop() if len(kinds) == 1 else "int8"
    if getattr(model, "lm_head", 0) is None:  # tied: the output matrix is the embedding's type
        classes["lm_head"] = type_class(types["model.embed_tokens.weight"])
    return classes


def _quantize_as_stored(model: nn.Module, classes: dict[str, str]) -> list[str]:
    from qwenstack.quantization import quantize_model

    said = []
    for method, kind in (("int4-g32", "int4"), ("int8", "int8")):
        chosen = [n for n, c in classes.items() if c == kind]
        if not chosen:
            continue
        # keep every other module still in full precision (quantize_model wants patterns that match one)
        remaining = [n for n, c in classes.items() if n not in chosen and _still_float(model, n)]
        report = quantize_model(model, method, keep=remaining)
        said.append(report.summary())
    return said


def _still_float(model: nn.Module, name: str) -> bool:
    from qwenstack.models.moe import Experts
    from qwenstack.quantization import QuantExperts

    if name == "lm_head" and getattr(model, "lm_head", 0) is None:
        return True
    module = model.get_submodule(name)
    return isinstance(module, (nn.Linear, Experts)) and not isinstance(module, QuantExperts)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
              quantize: bool = True) -> tuple[nn.Module, Tokenizer, dict[str, Any], str]:
    """(model, tokenizer, config, what was done). quantize=False keeps every tensor dequantized in `dtype`."""
    from qwenstack.models.registry import build_model
    from qwenstack.weights import load_tensors

    gguf = read_gguf(path)
    config = config_from_metadata(gguf)
    tokenizer = tokenizer_from_metadata(gguf.meta, gguf.path.name)
    try:
        model = build_model(config, "meta")
    except ConfigError as exc:  # its words are config.json's: here the values came from the file's metadata
        raise CheckpointError(f"{gguf.path.name}: its metadata does not make a model: {exc}") from None
    state, types = hf_tensors(gguf)
    load_tensors(model, state, dtype, device)
    del state
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t.name] = counts.get(t.name, 0) + 1
    stored = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    said = [f"GGUF {gguf.path.name} ({stored} tensors)"]
    classes = _module_classes(model, types)
    if quantize and any(c != "float" for c in classes.values()):
        from qwenstack.from_gguf.q4_0 import decode_q4_0_tensors, keep_q4_0_codes

        q4_0 = decode_q4_0_tensors(gguf, gguf_names(gguf))
        kept = keep_q4_0_codes(model, q4_0, dtype, device) if q4_0 else []
        for name in kept:
            classes.pop(name)
        if kept:
            said.append(f"{len(kept)} Q4_0 layers kept code for code as our int4-g32")
        if any(c != "float" for c in classes.values()):
            said.append("others dequantized exactly and requantized to our nearest formats (not code for code)"
                        if kept else "dequantized exactly and requantized to our nearest formats (not code for code)")
            said += _quantize_as_stored(model, classes)
    elif any(c != "float" for c in classes.values()):
        said.append(f"dequantized to {str(dtype).replace('torch.', '')}")
    return model, tokenizer, config, ": ".join(said[:2]) + ("; " + "; ".join(said[2:]) if said[2:] else "")
