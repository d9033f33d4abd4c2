"""Everything with tensors: the KV pool, the batch tensors of one step, the forward pass, and the rows of
logits that sampling and prompt logprobs need. Device-agnostic (CPU or CUDA).

Decisions:
- The KV pool is allocated once from a byte budget: one [2, blocks, block_size, kv_heads, head_dim]
  tensor per attention layer. The engine (through this runner) is the only owner of KV memory.
- Models with linear-attention layers (Qwen3-Next) also get a fixed-size recurrent state per slot, for
  num_state_slots slots. Which sequence holds which slot is the scheduler's decision (engine/slot_pool.py):
  the runner only reads `seq.state_slot`.
- Logits are computed only for rows that need them: the last token of each sequence that completes its
  known tokens this step, plus prompt positions whose logprobs were asked for.
- Models that take images (MultimodalModel) get 3-D positions and the image rows of the step from
  engine/multimodal.py, which also owns the encoder-output cache; other models never touch it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwenstack.engine.multimodal import DEFAULT_ENCODER_CACHE_MEMORY, MultimodalStep
from qwenstack.engine.sampler import (
    RequestFailed, SampleError, SampleRequest, sample, sequence_generator, token_logprobs,
)
from qwenstack.engine.scheduler import ScheduledBatch
from qwenstack.engine.sequence import PositionLogprobs, Sequence
from qwenstack.kernels import paged_decode_available
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.cpu_linear import prepare_cpu_linears
from qwenstack.models.base import CausalLM, MultimodalModel, RecurrentStateModel, layer_caches


@dataclass
class StepResult:
    sampled: dict[int, tuple[int, PositionLogprobs | None]]  # seq_id -> (token, logprobs)
    prompt_logprobs: dict[int, list[PositionLogprobs]]  # seq_id -> logprobs of prompt tokens computed this step
    # Speculative decoding (engine/speculative.py): seq_id -> accepted draft tokens, emitted before `sampled`.
    accepted: dict[int, list[tuple[int, PositionLogprobs | None]]] = field(default_factory=dict)


def kv_pool_blocks(model: CausalLM, memory_bytes: int, block_size: int, dtype: torch.dtype) -> int:
    per_block = model.kv_cache_spec().bytes_per_token(dtype) * block_size
    return max(0, memory_bytes // max(per_block, 1))


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, seed: int = 0, num_state_slots: int = 0,
                 encoder_cache_memory: int = DEFAULT_ENCODER_CACHE_MEMORY) -> None:
        self.model = model
        param = next(model.parameters())  # type: ignore[attr-defined]
        self.device, self.dtype = param.device, param.dtype
        self.block_size = block_size
        spec = model.kv_cache_spec()
        shape = (2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(spec.num_layers)]
        self.layer_caches: list = list(self.kv_caches)
        self.has_state = isinstance(model, RecurrentStateModel)
        if self.has_state:
            states = model.make_state_cache(num_state_slots, self.dtype, self.device)  # type: ignore[attr-defined]
            self.layer_caches = layer_caches(self.kv_caches, states)
        self.generator = torch.Generator().manual_seed(seed)
        self.multimodal = MultimodalStep(model, encoder_cache_memory) if isinstance(model, MultimodalModel) else None
        if self.device.type == "cpu":
            # Pick the fastest CPU linears (prepacked oneDNN weights when they win here), and build the native
            # decode kernel now rather than stalling the first request on it.
            prepare_cpu_linears(model)  # type: ignore[arg-type]
            paged_decode_available()

    def close(self) -> None:
        """Releases what the runner holds outside this process (worker ranks: distributed.executor)."""

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv_caches)

    def state_slots(self, seqs: list[Sequence]) -> torch.Tensor:
        """[B] long: each sequence's recurrent-state slot, as the scheduler assigned it at admission."""
        missing = [s.seq_id for s in seqs if s.state_slot is None]
        if missing:
            raise RuntimeError(f"sequences {missing} were scheduled without a recurrent-state slot")
        return torch.tensor([s.state_slot for s in seqs], dtype=torch.long, device=self.device)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    @torch.inference_mode()
    def execute(self, step: ScheduledBatch) -> StepResult:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, context_lens = [], []
        logit_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: list[tuple[Sequence, int, int]] = []  # (seq, row, token the row predicts)
        row = 0
        for seq, n in zip(step.seqs, step.num_new_tokens):
            start = seq.num_computed_tokens
            end = start + n
            tokens = seq.all_token_ids
            ids.extend(tokens[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(seq, start, end))
            query_lens.append(n)
            context_lens.append(end)
            if seq.params.prompt_logprobs is not None:
                for p in range(start, min(end, seq.num_prompt_tokens - 1)):
                    prompt_rows.append((seq, row + p - start, tokens[p + 1]))
            if end == seq.num_tokens:
                sample_seqs.append(seq)
            row += n
        width = max(len(s.block_table) for s in step.seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in step.seqs]
        dev = self.device
        batch = AttentionBatch(
            query_lens, context_lens,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.long, device=dev),
            block_size=self.block_size,
            state_slots=self.state_slots(step.seqs) if self.has_state else None,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        mm_positions, mm_batch = (None, None) if self.multimodal is None else \
            self.multimodal.prepare(step.seqs, step.num_new_tokens, dev)
        if mm_positions is None:
            hidden = self.model.forward(input_ids, torch.tensor(positions, dtype=torch.long, device=dev), batch,
                                        self.layer_caches)
        else:
            hidden = self.model.forward(input_ids, mm_positions, batch, self.layer_caches,  # type: ignore[call-arg]
                                        multimodal=mm_batch)
        # Sampling rows: the last token of each sequence that reached its end this step.
        starts = batch.query_starts
        index = {id(s): i for i, s in enumerate(step.seqs)}
        logit_rows = [starts[index[id(s)] + 1] - 1 for s in sample_seqs] + [r for _, r, _ in prompt_rows]
        result = StepResult({}, {})
        if not logit_rows:
            return result
        # In the model's dtype: the sampler converts the rows that need float32 (a float32 copy of 64 rows of
        # 152K logits cost 14 ms here, more than the greedy argmax over them).
        logits = self.model.compute_logits(hidden[torch.tensor(logit_rows, device=dev)])
        sample_logits = logits[: len(sample_seqs)]
        requests = [
            SampleRequest(
                s.params, s.prompt_token_ids, s.output_token_ids, sequence_generator(s),
                list(s.eos_token_ids) + s.params.stop_token_ids if len(s.output_token_ids) < s.params.min_tokens else [],
            )
            for s in sample_seqs
        ]
        if sample_seqs:
            try:
                tokens, logprobs = sample(sample_logits, requests, self.generator)
            except SampleError as exc:
                raise RequestFailed(sample_seqs[exc.row].request_id, exc.cause) from exc.cause
            for s, t, lp in zip(sample_seqs, tokens, logprobs):
                result.sampled[s.seq_id] = (t, lp)
        if prompt_rows:
            log_probs = torch.log_softmax(logits[len(sample_seqs):].float(), dim=-1)
            for (s, _, target), lp in zip(prompt_rows, log_probs):
                top = s.params.prompt_logprobs or 0
                result.prompt_logprobs.setdefault(s.seq_id, []).append(token_logprobs(lp, target, top))
        return result
