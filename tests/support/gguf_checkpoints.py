"""GGUF files written from tiny Hugging Face checkpoints with the `gguf` package's writer, following
llama.cpp's convert_hf_to_gguf.py for Qwen3 / Qwen3-MoE: tensor names blk.N.*, experts stacked into
ffn_*_exps, norms and the router kept F32, no Q/K permutation (that is LLaMA's), a gpt2 BPE vocabulary in
id order with token types (control for special added tokens, user-defined for other added ones), merges
as "a b" strings, the pre-tokenizer by name, special token ids and the chat template."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp"}
EXPERTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
KEEP_F32 = ("_norm.weight", "ffn_gate_inp.weight")


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and any(p.get("type") == "Split" for p in pre.get("pretokenizers", [])):
        return "qwen2"
    return "gpt-2"


def write_tokenizer_metadata(writer, hf_dir: Path) -> None:
    import gguf

    tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    size = max(vocab.values()) + 1
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        text = by_id.get(i, f"[PAD{i}]")
        tokens.append(text)
        if text in added:
            types.append(gguf.TokenType.CONTROL if added[text]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("eos_token", writer.add_eos_token_id), ("pad_token", writer.add_pad_token_id),
                     ("bos_token", writer.add_bos_token_id)):
        if config.get(key):
            add(vocab[config[key]])
    writer.add_add_bos_token(False)
    if config.get("chat_template"):
        writer.add_chat_template(config["chat_template"])


def write_gguf(hf_dir: Path, out: Path, file_type: str = "F32") -> Path:
    """hf_dir: a qwen3 or qwen3_moe checkpoint with one model.safetensors. file_type: F32, BF16, F16, Q8_0 or another type gguf.quants can quantize (Q4_0, Q4_1, Q5_0, ...)
    (applied to every 2-D weight, as llama.cpp's --outtype does)."""
    import gguf

    config = json.loads((hf_dir / "config.json").read_text())
    moe = config["model_type"] == "qwen3_moe"
    arch = "qwen3moe" if moe else "qwen3"
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if moe:
        writer.add_expert_count(config.get("num_experts", config.get("num_local_experts")))
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    write_tokenizer_metadata(writer, hf_dir)

    state = load_file(str(hf_dir / "model.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in state.items():
        if name == "model.embed_tokens.weight":
            tensors["token_embd.weight"] = t
        elif name == "model.norm.weight":
            tensors["output_norm.weight"] = t
        elif name == "lm_head.weight":
            if not config.get("tie_word_embeddings"):
                tensors["output.weight"] = t
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            if ".experts." in rest:
                expert, proj = rest.removeprefix("mlp.experts.").split(".")[:2]
                stacked.setdefault(f"blk.{layer}.{EXPERTS[proj]}.weight", {})[int(expert)] = t
            else:
                module, leaf = rest.rsplit(".", 1)
                tensors[f"blk.{layer}.{NAMES[module]}.{leaf}"] = t
    for name, parts in stacked.items():
        tensors[name] = torch.stack([parts[e] for e in sorted(parts)])
    for name, t in tensors.items():
        data = t.float().numpy()
        if data.ndim == 1 or name.endswith(KEEP_F32) or file_type == "F32":
            writer.add_tensor(name, np.ascontiguousarray(data))
            continue
        qtype = gguf.GGMLQuantizationType[file_type]
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
