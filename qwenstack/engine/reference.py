"""The reference generation path: greedy decoding with a paged KV cache, no scheduler.

It is deliberately simple (every sequence gets its own contiguous run of blocks, all prompts are
prefilled in one packed pass, then all sequences decode together) and serves as the oracle the engine is
tested against, next to transformers. Models with linear-attention layers (Qwen3-Next) also get one
recurrent-state slot per prompt (`make_state_cache`, `AttentionBatch.state_slots`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from qwenstack.models.attention import AttentionBatch
from qwenstack.models.base import CausalLM, RecurrentStateModel, layer_caches


def allocate_kv_caches(
    model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    spec = model.kv_cache_spec()
    shape = (2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]


@torch.inference_mode()
def greedy_generate(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    block_size: int = 16,
    eos_token_ids: tuple[int, ...] = (),
    kv_dtype: torch.dtype | None = None,
    forced: list[list[int]] | None = None,
    on_logits: Callable[[list[int], torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (stops early at an eos id, which is included). kv_dtype: the KV cache's
    (None: the model's). forced: teacher forcing, prompt i continues with forced[i] (at least max_new_tokens
    tokens) whatever its logits; on_logits(sequences, logits) sees each step's logits [len(sequences), vocab] of
    the prompts still running (e.g. to compare two models' next-token distributions over the same text)."""
    param = next(model.parameters())  # type: ignore[attr-defined]
    device, dtype = param.device, param.dtype
    blocks_per_seq = [(len(p) + max_new_tokens + block_size - 1) // block_size for p in prompts]
    tables, start = [], 0
    for n in blocks_per_seq:
        tables.append(list(range(start, start + n)))
        start += n
    width = max(blocks_per_seq)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device)
    kv_caches: list[Any] = allocate_kv_caches(model, start, block_size, kv_dtype or dtype, device)
    state_slots = None
    if isinstance(model, RecurrentStateModel):  # slot i holds prompt i's recurrent state
        kv_caches = layer_caches(kv_caches, model.make_state_cache(len(prompts), dtype, device))
        state_slots = torch.arange(len(prompts), device=device)

    def slot(seq: int, pos: int) -> int:
        return tables[seq][pos // block_size] * block_size + pos % block_size

    outputs: list[list[int]] = [[] for _ in prompts]
    lengths = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    positions = torch.tensor([i for p in prompts for i in range(len(p))], dtype=torch.long, device=device)
    slots = [slot(s, i) for s, p in enumerate(prompts) for i in range(len(p))]
    batch = AttentionBatch(lengths, lengths, torch.tensor(slots, device=device), block_tables, block_size,
                           state_slots=state_slots)
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        hidden = model.forward(ids, positions, batch, kv_caches)
        logits = model.compute_logits(hidden[batch.last_token_indices(device)])
        if on_logits is not None:
            on_logits(active, logits)
        next_ids = logits.argmax(dim=-1).tolist() if forced is None else [forced[s][len(outputs[s])] for s in active]
        still = []
        for seq, token in zip(active, next_ids):
            outputs[seq].append(token)
            if token not in eos_token_ids:
                still.append(seq)
        active = [s for s in still if len(outputs[s]) < max_new_tokens]
        if not active:
            break
        ids = torch.tensor([outputs[s][-1] for s in active], dtype=torch.long, device=device)
        positions = torch.tensor([lengths[s] + len(outputs[s]) - 1 for s in active], dtype=torch.long, device=device)
        slots = [slot(s, lengths[s] + len(outputs[s]) - 1) for s in active]
        ctx = [lengths[s] + len(outputs[s]) for s in active]
        batch = AttentionBatch([1] * len(active), ctx, torch.tensor(slots, device=device), block_tables[active], block_size,
                               state_slots=None if state_slots is None else state_slots[active])
    return outputs
