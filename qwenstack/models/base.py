"""What every causal language model in qwenstack offers the loader and the engine.

Decisions:
- A model takes the new tokens of a packed batch ([T] ids and positions), an AttentionBatch and one KV
  cache tensor per attention layer, and returns hidden states [T, H]; `compute_logits` maps chosen rows
  to vocabulary logits. Computing logits only for the rows that need them saves a [T, V] product in prefill.
- The model describes its KV needs (KVCacheSpec) and the engine allocates the memory: the engine is the
  only owner of KV memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from qwenstack.config import ModelArgs
from qwenstack.models.attention import AttentionBatch


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int  # layers that keep keys and values (attention layers)
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of_decoder(cls, args: Any) -> "KVCacheSpec":
        """The spec of a decoder whose every layer is attention (Qwen3Args and the text configs built on it)."""
        assert args.num_key_value_heads is not None and args.head_dim is not None
        return cls(args.num_hidden_layers, args.num_key_value_heads, args.head_dim)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


@runtime_checkable
class CausalLM(Protocol):
    args: ModelArgs
    # Checkpoint tensors that are expected but not used (regular expressions), e.g. a tied lm_head.
    ignored_checkpoint_patterns: tuple[str, ...]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv_caches: list[torch.Tensor] | None,
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of hidden rows [T, H] -> [T, V], or [T, len(token_ids)] for those vocabulary entries only."""
        ...

    def kv_cache_spec(self) -> KVCacheSpec: ...


class RecurrentStateJournal(Protocol):
    """Deferred state updates of one verification pass: the deferred sequences' slots stay untouched during
    the pass, and commit(keep) advances each by exactly its first keep[i] tokens (the accepted ones)."""

    def commit(self, keep: list[int]) -> None: ...


@runtime_checkable
class RecurrentStateModel(Protocol):
    """A model whose linear-attention layers keep a fixed-size state per sequence instead of paged KV.

    Such a state cannot be trimmed like paged KV, so speculative verification passes a journal from
    `make_state_journal` to `forward(..., state_journal=journal)` and commits the accepted length after.
    """

    def make_state_cache(self, num_slots: int, dtype: torch.dtype, device: torch.device | str) -> list[Any | None]:
        """Per layer: that layer's state for `num_slots` slots, or None where the layer uses paged KV."""
        ...

    def make_state_journal(self, deferred: list[int]) -> RecurrentStateJournal:
        """A journal for one pass; `deferred` are the batch positions whose state updates wait for commit."""
        ...


def layer_caches(kv_caches: list[torch.Tensor], states: list[Any | None]) -> list[Any]:
    """The forward's per-layer cache list: each layer's state where it has one, else the next paged KV tensor."""
    attention_layers = sum(state is None for state in states)
    if attention_layers != len(kv_caches):
        raise ValueError(f"{len(kv_caches)} paged KV tensors for {attention_layers} attention layers")
    paged = iter(kv_caches)
    return [next(paged) if state is None else state for state in states]



def output_head(hidden_size: int, vocab_size: int, tied: bool) -> tuple[torch.nn.Linear | None, tuple[str, ...]]:
    """A decoder's lm_head (None when tied to the embedding) and the checkpoint tensors that leaves unused:
    some tied checkpoints still carry a copy of the embedding as lm_head.weight."""
    if tied:
        return None, (r"lm_head\.weight",)
    return torch.nn.Linear(hidden_size, vocab_size, bias=False), ()


def lm_logits(hidden: torch.Tensor, lm_head: Any, embed_tokens: torch.nn.Embedding,
              token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Vocabulary logits through the lm_head, or through the embedding matrix when the two are tied
    (lm_head is None). token_ids: only those entries' logits [T, len(token_ids)] (a reranker's "yes" and
    "no"), from their rows of the output matrix where the head's storage gives rows, else cut from the full
    logits (oneDNN-packed and quantized heads can only multiply)."""
    if token_ids is not None:
        rows = output_rows(lm_head, embed_tokens, token_ids)
        if rows is None:
            return lm_logits(hidden, lm_head, embed_tokens)[..., token_ids]
        bias = getattr(lm_head, "bias", None)
        return torch.nn.functional.linear(hidden, rows.to(hidden.dtype), None if bias is None else bias[token_ids])
    if lm_head is None:
        return torch.nn.functional.linear(hidden, embed_tokens.weight)
    return lm_head(hidden)


def output_rows(lm_head: Any, embed_tokens: torch.nn.Module, token_ids: torch.Tensor) -> torch.Tensor | None:
    """The output matrix's rows for token_ids [k, H]: the embedding's when tied (a lookup, plain or
    tile-packed), the head's own when it keeps a plain or tile-packed weight; None for any other head."""
    from qwenstack.kernels import tiled_rows
    from qwenstack.models.cpu_linear import TiledLinear

    if lm_head is None:
        return embed_tokens(token_ids)
    if isinstance(lm_head, TiledLinear):
        return tiled_rows(lm_head.packed, token_ids)
    weight = getattr(lm_head, "weight", None)
    return weight[token_ids] if isinstance(weight, torch.Tensor) else None


def prompt_logits(model: CausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, V] for a batch of equal-length prompts [B, S], no cache (training, scoring, tests)."""
    b, s = input_ids.shape
    positions = torch.arange(s, device=input_ids.device).repeat(b)
    hidden = model.forward(input_ids.flatten(), positions, AttentionBatch.for_prompts([s] * b), None)
    return model.compute_logits(hidden).view(b, s, -1)


@runtime_checkable
class MultimodalModel(Protocol):
    """A model that takes images or audio besides tokens. The engine calls these hooks and stays generic:

    - `plan_multimodal(prompt_token_ids, images[, audios])` once per request: places each input on its
      placeholder tokens and gives the prompt's positions (MultimodalPlan), raising RequestError when prompt
      and inputs disagree (audios are passed only to models that have `encode_audio`);
    - `encode_images` / `encode_audio` for the inputs a step needs that the encoder cache lacks;
    - `forward(..., multimodal=MultimodalBatch)` with positions [3, T] when a batch holds such inputs.
    """

    def plan_multimodal(self, prompt_token_ids: Any, images: Any) -> Any: ...
