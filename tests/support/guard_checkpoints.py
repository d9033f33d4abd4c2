"""Guard checkpoints for tests.

- Gen guards: scripted Qwen3 checkpoints (tests/scripted.py) whose greedy output after the moderation
  prompt is a chosen verdict text, with the stand-in Qwen3Guard template as their own chat template.
- Stream guards: Qwen3Guard-Stream checkpoints in the published layout (backbone under `model.*`, the
  token-level heads at the top level, no lm_head), written with qwenstack's own save logic: a random one
  (for loading and cache equality), and a crafted one whose heads flag one chosen token as Unsafe.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from checkpoints import dense_config, write_tokenizer
from scripted import ScriptedCheckpoint, build_scripted_checkpoint
from qwenstack.guard.gen import DEFAULT_GUARD_TEMPLATE

UNSAFE_VIOLENT = "Safety: Unsafe\nCategories: Violent"
SAFE_PROMPT = "Safety: Safe\nCategories: None"
UNSAFE_ANSWER = "Safety: Unsafe\nCategories: Violent, Non-violent Illegal Acts\nRefusal: No"
GARBAGE = "I am not sure what you mean."

RISK_LABELS = {"0": "Safe", "1": "Unsafe", "2": "Controversial"}
RESPONSE_CATEGORIES = ["Violent", "Non-violent Illegal Acts", "Sexual Content or Sexual Acts", "PII",
                       "Suicide & Self-Harm", "Unethical Acts", "Politically Sensitive Topics", "Copyright Violation"]
QUERY_CATEGORIES = RESPONSE_CATEGORIES + ["Jailbreak"]


def build_gen_guard(out_dir: str | Path, verdict_text: str) -> ScriptedCheckpoint:
    """A Gen guard that answers `verdict_text` to any moderation prompt."""
    return build_scripted_checkpoint(out_dir, verdict_text, chat_template=DEFAULT_GUARD_TEMPLATE)


def stream_config(**overrides: Any) -> dict[str, Any]:
    """A tiny Qwen3Guard-Stream config.json in the published shape (model_type qwen3, the Guard architecture,
    the head sizes and the index -> label maps)."""
    config = dense_config(
        model_type="qwen3", architectures=["Qwen3ForGuardModel"], guard_inner_size=32,
        num_risk_level=3, num_category=len(RESPONSE_CATEGORIES), num_query_risk_level=3,
        num_query_category=len(QUERY_CATEGORIES),
        response_risk_level_map=dict(RISK_LABELS), query_risk_level_map=dict(RISK_LABELS),
        response_category_map={str(i): c for i, c in enumerate(RESPONSE_CATEGORIES)},
        query_category_map={str(i): c for i, c in enumerate(QUERY_CATEGORIES)},
    )
    config.update(overrides)
    return config


def build_random_stream(out_dir: str | Path, seed: int = 0) -> Path:
    """Random backbone and heads (norm scales too), saved by qwenstack's save_checkpoint."""
    from qwenstack.models.qwen3_guard_stream import build_stream_model
    from qwenstack.weights import save_checkpoint

    out_dir = Path(out_dir)
    config = stream_config()
    torch.manual_seed(seed)
    model = build_stream_model(config, "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "head" in name:
                p.mul_(8.0)  # confident heads: every class shows up across tokens
    save_checkpoint(model, out_dir, config)
    write_tokenizer(out_dir)
    return out_dir


def build_flagging_stream(out_dir: str | Path, flagged: list[int], tokenizer_from: str | Path | None = None,
                          category: str = "Violent") -> Path:
    """A Stream guard that calls a token Unsafe (category `category`) when it is one of `flagged` or follows
    one, and Safe otherwise, by both the query and the response heads (a conversation stays Unsafe once a
    flagged token was seen, as a trained guard's verdict on a prefix would).

    Mostly zeroed backbone, like the scripted checkpoints, one layer: every embedding has feature 0, flagged
    tokens also feature 1. The MLP output is zero. Attention has zero queries and keys, so it averages its
    values over the whole prefix; the value is feature 1, written back as feature 2: "a flagged token was
    seen", exactly zero until one is. The heads keep the three features; the risk head scores Safe by
    s (f0 - f1) - S f2 and Unsafe by 2 s f1 + S f2, with S large enough that one flagged token among 4096
    still decides (a margin of about 10 logits either way)."""
    from qwenstack.models.qwen3_guard_stream import build_stream_model
    from qwenstack.weights import save_checkpoint

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out_dir / name).write_bytes((Path(tokenizer_from) / name).read_bytes())
    else:
        write_tokenizer(out_dir)
    from qwenstack.tokenizer import Tokenizer

    vocab = Tokenizer.from_dir(out_dir).vocab_size
    hidden, inner, context = 16, 8, 4096
    config = stream_config(vocab_size=vocab, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=1, num_key_value_heads=1, head_dim=16, guard_inner_size=inner,
                           max_position_embeddings=context)
    model = build_stream_model(config, "cpu")
    s = 10.0 / math.sqrt(inner)
    big = 10.0 * s * context  # feature 2 of a token after one flagged token in `context` is ~1/context
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 1.0
        emb[flagged, 1] = 1.0
        attn = model.model.layers[0].self_attn
        attn.qkv_proj.weight[attn.q_size + attn.kv_size, 1] = 1.0  # v[0] = feature 1; q = k = 0: a plain average
        attn.o_proj.weight[2, 0] = 1.0  # -> feature 2
        cat = RESPONSE_CATEGORIES.index(category)
        for prefix in ("", "query_"):
            pre = getattr(model, prefix + "risk_level_category_pre").weight
            pre[0, 0] = pre[1, 1] = pre[2, 2] = 1.0
            risk = getattr(model, prefix + "risk_level_head").weight  # rows: Safe, Unsafe, Controversial
            risk[0, 0], risk[0, 1], risk[0, 2] = s, -s, -big
            risk[1, 1], risk[1, 2] = 2 * s, big
            head = getattr(model, prefix + "category_head").weight
            head[cat, 1], head[cat, 2] = s, big
    save_checkpoint(model, out_dir, config)
    return out_dir
