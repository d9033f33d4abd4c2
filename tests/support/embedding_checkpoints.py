"""Tiny random checkpoints in Qwen3-Embedding's released layout, built with transformers' Qwen3Model: tensors
without the `model.` prefix and no lm_head, config.json naming Qwen3ForCausalLM as the release does, and
sentence-transformers' files (modules.json, 1_Pooling/config.json with last-token pooling,
config_sentence_transformers.json with the "query" prompt). The tokenizer appends <|endoftext|> through a
TemplateProcessing post-processor, as the current Qwen3-Embedding tokenizer.json does."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from checkpoints import _randomise_norms, dense_config, tiny_tokenizer
from tokenizer_training import save_tokenizer

QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def embedding_tokenizer(appends_end: bool) -> Any:
    """The tiny BPE tokenizer, with <|endoftext|> appended to every text when `appends_end`."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(tiny_tokenizer().to_str())
    if appends_end:
        end = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
            special_tokens=[("<|endoftext|>", end)])
    return tok


def build_embedding_checkpoint(out_dir: Path, seed: int = 0, sentence_transformers: bool = True,
                               appends_end: bool = True, **overrides: Any) -> Path:
    import transformers

    config = dense_config(**overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen3Model(transformers.Qwen3Config(**config)).to(torch.float32)
    _randomise_norms(model, seed)
    model.save_pretrained(out_dir)
    saved = json.loads((out_dir / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps({**saved, "architectures": ["Qwen3ForCausalLM"]}, indent=2))
    save_tokenizer(embedding_tokenizer(appends_end), out_dir)
    if sentence_transformers:
        (out_dir / "modules.json").write_text(json.dumps(ST_MODULES, indent=2))
        (out_dir / "1_Pooling").mkdir(exist_ok=True)
        (out_dir / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": config["hidden_size"], "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True, "include_prompt": True}, indent=2))
        (out_dir / "config_sentence_transformers.json").write_text(json.dumps({
            "prompts": {"query": QUERY_PROMPT, "document": ""}, "default_prompt_name": None,
            "similarity_fn_name": "cosine"}, indent=2))
    return out_dir


def hf_embeddings(model_dir: Path, prompts: list[list[int]]) -> torch.Tensor:
    """transformers' reference: AutoModel (Qwen3Model), last_hidden_state at each prompt's last token,
    L2-normalized, one prompt at a time (no padding to get wrong)."""
    import transformers

    model = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3Model"
    with torch.inference_mode():
        rows = [model(torch.tensor([p])).last_hidden_state[0, -1] for p in prompts]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)
