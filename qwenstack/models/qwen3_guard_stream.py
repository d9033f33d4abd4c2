"""Qwen3Guard-Stream: a Qwen3 backbone plus token-level safety heads, fed incrementally with its own KV cache.

    stream = GuardStream.load("Qwen/Qwen3Guard-Stream-0.6B")
    session = stream.new_session()
    session.feed_user(prompt_ids)[-1].safety          # the prompt's verdict: its last token's
    for ids in answer_chunks:
        for v in session.feed_assistant(ids): ...     # one TokenVerdict per answer token, as it streams
    session.close()

Checkpoint (the published layout; config.json has model_type "qwen3" and architectures
["Qwen3ForGuardModel"], so the causal-LM registry does not pick it):
- the backbone under `model.*`, exactly Qwen3's keys (no lm_head; a tied copy on disk is ignored);
- response heads at the top level: `risk_level_category_pre` (Linear H -> guard_inner_size, no bias), then
  `risk_level_category_layernorm` (RMSNorm), feeding `risk_level_head` and `category_head` (no bias);
- query (prompt) heads: the `query_*` twins of the four above.
The heads read the backbone's last hidden state (after the final norm) at every token.

config.json fields read here (besides Qwen3's):
- `guard_inner_size`: width of the heads' shared projection.
- `response_risk_level_map`, `query_risk_level_map`: class index (as a string) -> level name, e.g.
  {"0": "Safe", "1": "Unsafe", "2": "Controversial"}; names map to `Safety` case-insensitively.
- `response_category_map`, `query_category_map`: class index -> category name.
- `num_risk_level`, `num_category`, `num_query_risk_level`, `num_query_category`: optional; when present
  they must equal the sizes of the maps.

Decisions:
- A session owns its KV cache: one sequence in a small paged cache (contiguous blocks) that doubles as the
  conversation grows, so each fed token costs one incremental forward, never a re-run of the prefix (the
  reference implementation's `stream_generate` re-runs it: QwenLM/Qwen3Guard#22).
- Feeding text at once or token by token gives the same per-token verdicts (up to float rounding).
- User tokens are classified by the query heads, assistant tokens by the response heads, as the
  reference `stream_moderate_from_ids(..., role=...)` does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from qwenstack.config import read_config
from qwenstack.errors import ConfigError
from qwenstack.guard.verdict import Safety, Verdict
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.base import KVCacheSpec
from qwenstack.models.layers import RMSNorm, SwiGLU
from qwenstack.models.qwen3 import Qwen3Args, Qwen3Model

ARCHITECTURE = "Qwen3ForGuardModel"
USER, ASSISTANT = "user", "assistant"


def _labels(config_map: Any, name: str, count: int | None) -> tuple[str, ...]:
    if not isinstance(config_map, dict) or not config_map:
        raise ConfigError(f"config.json field '{name}' must be a non-empty object of index -> label")
    try:
        labels = tuple(str(config_map[str(i)]) for i in range(len(config_map)))
    except KeyError:
        raise ConfigError(f"config.json field '{name}' must have the keys \"0\"..\"{len(config_map) - 1}\"") from None
    if count is not None and count != len(labels):
        raise ConfigError(f"config.json says {count} classes for '{name}', but the map has {len(labels)}")
    return labels


@dataclass(kw_only=True)
class Qwen3GuardStreamArgs(Qwen3Args):
    guard_inner_size: int
    response_risk_level_map: dict[str, str]
    response_category_map: dict[str, str]
    query_risk_level_map: dict[str, str]
    query_category_map: dict[str, str]
    num_risk_level: int | None = None
    num_category: int | None = None
    num_query_risk_level: int | None = None
    num_query_category: int | None = None
    risk_levels: tuple[str, ...] = field(init=False)  # response head's classes, in head order
    categories: tuple[str, ...] = field(init=False)
    query_risk_levels: tuple[str, ...] = field(init=False)
    query_categories: tuple[str, ...] = field(init=False)

    def validate(self, config: dict[str, Any]) -> None:
        super().validate(config)
        self.risk_levels = _labels(self.response_risk_level_map, "response_risk_level_map", self.num_risk_level)
        self.categories = _labels(self.response_category_map, "response_category_map", self.num_category)
        self.query_risk_levels = _labels(self.query_risk_level_map, "query_risk_level_map", self.num_query_risk_level)
        self.query_categories = _labels(self.query_category_map, "query_category_map", self.num_query_category)


def is_stream_guard_config(config: dict[str, Any]) -> bool:
    return ARCHITECTURE in (config.get("architectures") or []) or "guard_inner_size" in config


class Qwen3GuardStreamModel(nn.Module):
    args_class: ClassVar[type[Qwen3GuardStreamArgs]] = Qwen3GuardStreamArgs

    def __init__(self, args: Qwen3GuardStreamArgs) -> None:
        super().__init__()
        self.args = args
        h, g, eps = args.hidden_size, args.guard_inner_size, args.rms_norm_eps
        self.model = Qwen3Model(args, lambda i: SwiGLU(args.hidden_size, args.intermediate_size))
        self.risk_level_category_pre = nn.Linear(h, g, bias=False)
        self.risk_level_category_layernorm = RMSNorm(g, eps)
        self.risk_level_head = nn.Linear(g, len(args.risk_levels), bias=False)
        self.category_head = nn.Linear(g, len(args.categories), bias=False)
        self.query_risk_level_category_pre = nn.Linear(h, g, bias=False)
        self.query_risk_level_category_layernorm = RMSNorm(g, eps)
        self.query_risk_level_head = nn.Linear(g, len(args.query_risk_levels), bias=False)
        self.query_category_head = nn.Linear(g, len(args.query_categories), bias=False)
        # Published configs say tie_word_embeddings; there is no LM head, so a stored copy is not used.
        self.ignored_checkpoint_patterns: tuple[str, ...] = (r"lm_head\.weight",)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_caches: list[torch.Tensor] | None) -> torch.Tensor:
        return self.model(input_ids, positions, batch, kv_caches)  # [T, H], after the final norm

    def classify(self, hidden: torch.Tensor, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Risk-level and category logits [T, classes] of each row, by the heads of `role`."""
        if role == USER:
            x = self.query_risk_level_category_layernorm(self.query_risk_level_category_pre(hidden))
            return self.query_risk_level_head(x), self.query_category_head(x)
        if role == ASSISTANT:
            x = self.risk_level_category_layernorm(self.risk_level_category_pre(hidden))
            return self.risk_level_head(x), self.category_head(x)
        raise ValueError(f"role must be '{USER}' or '{ASSISTANT}', got {role!r}")

    def kv_cache_spec(self) -> KVCacheSpec:
        assert self.args.num_key_value_heads is not None and self.args.head_dim is not None
        return KVCacheSpec(self.args.num_hidden_layers, self.args.num_key_value_heads, self.args.head_dim)


def build_stream_model(config: dict[str, Any], device: str | torch.device = "meta") -> Qwen3GuardStreamModel:
    args = Qwen3GuardStreamArgs.from_dict(config)
    with torch.device(device):
        model = Qwen3GuardStreamModel(args)
    return model.eval()


def load_stream_model(model_dir: str | Path, dtype: torch.dtype | str | None = None,
                      device: str | torch.device = "cpu") -> Qwen3GuardStreamModel:
    """Strict load: every head and backbone tensor present with its shape, nothing else but a tied lm_head."""
    from qwenstack.models.registry import default_dtype, parse_dtype
    from qwenstack.weights import load_weights

    config = read_config(model_dir)
    if not is_stream_guard_config(config):
        raise ConfigError(f"{model_dir} is not a Qwen3Guard-Stream checkpoint (no {ARCHITECTURE} in architectures, "
                          f"no guard_inner_size in config.json)")
    model = build_stream_model(config, "meta")
    load_weights(model, model_dir, parse_dtype(dtype) if dtype is not None else default_dtype(config), device)
    return model


# --- streaming ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenVerdict:
    token_id: int
    position: int  # in the session's conversation
    role: str
    safety: Safety
    safety_prob: float  # probability of `safety` (softmax over the risk-level head)
    category: str | None  # the most likely category; None when the token is Safe
    category_prob: float
    risk_probs: tuple[float, ...]  # every risk level's probability, in the head's order

    def verdict(self) -> Verdict:
        categories = () if self.category is None else (self.category,)
        return Verdict(self.safety, categories, raw=f"{self.role} token {self.position}", score=self.safety_prob)


class GuardStream:
    """A loaded Stream guard; sessions share its weights and each keeps its own KV cache."""

    def __init__(self, model: Qwen3GuardStreamModel, tokenizer: Any = None, block_size: int = 16) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.block_size = block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_len = model.args.max_position_embeddings

    @classmethod
    def load(cls, model_dir: str | Path, dtype: torch.dtype | str | None = None,
             device: str | torch.device = "cpu", **options: Any) -> "GuardStream":
        from qwenstack.tokenizer import Tokenizer

        path = Path(model_dir)
        tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
        return cls(load_stream_model(path, dtype, device), tokenizer, **options)

    def new_session(self) -> "StreamSession":
        return StreamSession(self)

    def labels(self, role: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        a = self.model.args
        return (a.query_risk_levels, a.query_categories) if role == USER else (a.risk_levels, a.categories)


class StreamSession:
    """One conversation fed to the guard as it happens. Not thread-safe: one caller at a time."""

    INITIAL_BLOCKS = 4

    def __init__(self, stream: GuardStream) -> None:
        self.stream = stream
        self.length = 0  # tokens fed so far
        self.token_ids: list[int] = []
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.closed = False

    def _reserve(self, total: int) -> None:
        need = math.ceil(total / self.stream.block_size)
        if need <= self.num_blocks:
            return
        blocks = max(need, 2 * self.num_blocks, self.INITIAL_BLOCKS)
        spec = self.stream.model.kv_cache_spec()
        shape = (2, blocks, self.stream.block_size, spec.num_kv_heads, spec.head_dim)
        grown = [torch.zeros(shape, dtype=self.stream.dtype, device=self.stream.device) for _ in range(spec.num_layers)]
        for new, old in zip(grown, self.kv_caches):
            new[:, : self.num_blocks].copy_(old)
        self.kv_caches, self.num_blocks = grown, blocks

    @torch.inference_mode()
    def _feed(self, token_ids: Any, role: str) -> list[TokenVerdict]:
        if self.closed:
            raise RuntimeError("this guard session is closed")
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.reshape(-1).tolist()  # a 0-dim tensor is one token
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(t) for t in token_ids]
        if not ids:
            return []
        n, start = len(ids), self.length
        if start + n > self.stream.max_len:
            raise ValueError(f"the conversation would reach {start + n} tokens, over the guard's "
                             f"{self.stream.max_len}-token context")
        self._reserve(start + n)
        dev = self.stream.device
        positions = torch.arange(start, start + n, dtype=torch.long, device=dev)
        batch = AttentionBatch([n], [start + n], slot_mapping=positions,
                               block_tables=torch.arange(self.num_blocks, dtype=torch.long, device=dev)[None],
                               block_size=self.stream.block_size)
        model = self.stream.model
        hidden = model(torch.tensor(ids, dtype=torch.long, device=dev), positions, batch, self.kv_caches)
        risk_logits, category_logits = model.classify(hidden, role)
        self.length += n
        self.token_ids.extend(ids)
        return self._verdicts(ids, start, role, risk_logits.float().softmax(-1), category_logits.float().softmax(-1))

    def _verdicts(self, ids: list[int], start: int, role: str, risk: torch.Tensor,
                  category: torch.Tensor) -> list[TokenVerdict]:
        levels, categories = self.stream.labels(role)
        risk_p, risk_i = risk.max(-1)
        cat_p, cat_i = category.max(-1)
        rows = risk.tolist()
        out = []
        for j, (token, rp, ri, cp, ci) in enumerate(zip(ids, risk_p.tolist(), risk_i.tolist(), cat_p.tolist(),
                                                         cat_i.tolist())):
            safety = Safety.from_label(levels[ri])
            out.append(TokenVerdict(token, start + j, role, safety, rp,
                                    None if safety is Safety.SAFE else categories[ci], cp, tuple(rows[j])))
        return out

    def feed_user(self, token_ids: Any) -> list[TokenVerdict]:
        """The user's tokens (the prompt's chat-template tokens up to its <|im_end|>): per-token verdicts by
        the query heads; the last one is the prompt's verdict."""
        return self._feed(token_ids, USER)

    def feed_assistant(self, token_ids: Any) -> list[TokenVerdict]:
        """The answer's tokens as they are generated (one or several at a time)."""
        return self._feed(token_ids, ASSISTANT)

    def close(self) -> None:
        self.kv_caches, self.num_blocks, self.closed = [], 0, True

    def __enter__(self) -> "StreamSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
