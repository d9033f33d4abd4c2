"""Everything with tensors: the KV pool, the batch tensors of one step, the forward pass, and the rows of
logits that sampling and prompt logprobs need. Device-agnostic (CPU or CUDA).

Decisions:
- The KV pool is allocated once from a byte budget: one [2, blocks, block_size, kv_heads, head_dim]
  tensor per attention layer. The engine (through this runner) is the only owner of KV memory. Its dtype is the
  model's, or float8_e5m2 for --kv-cache-dtype fp8 (vLLM's name; e5m2 as vLLM's CPU backend, since it needs no
  scale: float16's range, two mantissa bits): twice the tokens in the same bytes, and half the bytes a decode
  step reads from it.
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
from typing import Any, ClassVar

import torch

from qwenstack.engine.multimodal import DEFAULT_ENCODER_CACHE_MEMORY, MultimodalStep
from qwenstack.engine.params import KV_CACHE_DTYPES
from qwenstack.engine.sampler import SampleRequest, rows_logprobs, sample, sequence_generator
from qwenstack.engine.scheduler import ScheduledBatch
from qwenstack.engine.sequence import PositionLogprobs, Sequence
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.fast_paths import prepare_for_cpu
from qwenstack.models.base import CausalLM, MultimodalModel, RecurrentStateModel, layer_caches


@dataclass
class StepResult:
    sampled: dict[int, tuple[int, PositionLogprobs | None]]  # seq_id -> (token, logprobs)
    prompt_logprobs: dict[int, list[PositionLogprobs]]  # seq_id -> logprobs of prompt tokens computed this step
    # Speculative decoding (engine/speculative.py): seq_id -> accepted draft tokens, emitted before `sampled`.
    accepted: dict[int, list[tuple[int, PositionLogprobs | None]]] = field(default_factory=dict)
    failed: dict[str, Exception] = field(default_factory=dict)  # request_id -> why its sampling failed


@dataclass
class StepInputs:
    """The flat token batch of one step, as the model takes it."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    batch: AttentionBatch
    row_starts: list[int]  # each sequence's first row in the batch
    prompt_rows: list[tuple[Sequence, int, int]]  # (seq, row, the prompt token the row predicts)


def sample_request(seq: Sequence, extra: list[int] | None = None) -> SampleRequest:
    """The sampler's view of seq, with `extra` tokens (speculative drafts) counted as already generated."""
    output = seq.output_token_ids + (extra or [])
    block = list(seq.eos_token_ids) + seq.params.stop_token_ids if len(output) < seq.params.min_tokens else []
    return SampleRequest(seq.params, seq.prompt_token_ids, output, sequence_generator(seq), block)


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's dtype for --kv-cache-dtype `name`: auto (the model's) or fp8 / fp8_e5m2 (float8_e5m2)."""
    if name == "auto":
        return model_dtype
    if name in ("fp8", "fp8_e5m2"):
        return torch.float8_e5m2
    if name.startswith("fp8"):
        raise ValueError(f"kv_cache_dtype {name!r} is not supported: e4m3 needs per-tensor scales from a calibrated "
                         f"checkpoint; use 'fp8' (e5m2, no scale)")
    raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")


def kv_pool_blocks(model: CausalLM, memory_bytes: int, block_size: int, dtype: torch.dtype) -> int:
    per_block = model.kv_cache_spec().bytes_per_token(dtype) * block_size
    return max(0, memory_bytes // max(per_block, 1))


class ModelRunner:
    # Whether the model may run a pass outside a step (engine/embed.py): not where other ranks must join each pass.
    can_embed: ClassVar[bool] = True

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, seed: int = 0, num_state_slots: int = 0,
                 encoder_cache_memory: int = DEFAULT_ENCODER_CACHE_MEMORY, kv_dtype: torch.dtype | None = None) -> None:
        """kv_dtype: the KV pool's dtype (kv_cache_dtype()); None: the model's."""
        self.model = model
        param = next(model.parameters())  # type: ignore[attr-defined]
        self.device, self.dtype = param.device, param.dtype
        self.kv_dtype = kv_dtype or self.dtype
        self.block_size = block_size
        spec = model.kv_cache_spec()
        shape = (2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(spec.num_layers)]
        self.layer_caches: list = list(self.kv_caches)
        self.has_state = isinstance(model, RecurrentStateModel)
        if self.has_state:
            states = model.make_state_cache(num_state_slots, self.dtype, self.device)  # type: ignore[attr-defined]
            self.layer_caches = layer_caches(self.kv_caches, states)
        self.generator = torch.Generator().manual_seed(seed)
        self.multimodal = MultimodalStep(model, encoder_cache_memory) if isinstance(model, MultimodalModel) else None
        prepare_for_cpu(model)  # type: ignore[arg-type]

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

    def attention_batch(self, seqs: list[Sequence], query_lens: list[int], context_lens: list[int],
                        slots: list[int]) -> AttentionBatch:
        """The paged-attention view of one pass over `seqs` (block tables padded to the longest)."""
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        dev = self.device
        return AttentionBatch(query_lens, context_lens, slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
                              block_tables=torch.tensor(tables, dtype=torch.long, device=dev),
                              block_size=self.block_size)

    def prepare(self, step: ScheduledBatch, extra_tokens: list[list[int]] | None = None,
                rows_as_decodes: bool = False) -> StepInputs:
        """The flat batch of one step: each sequence's scheduled tokens, then its `extra_tokens` (tokens
        not yet emitted, such as speculative drafts to verify), which get positions and KV slots after them
        in blocks the scheduler reserved (its lookahead). With `rows_as_decodes` (a decode step, a model
        without recurrent state) each token is its own attention row over the sequence's blocks up to its
        position: the same causal attention, as a batch of one-token decodes, which takes the decode fast
        paths (all rows' keys and values are written before any row attends)."""
        extra = extra_tokens or [[] for _ in step.seqs]
        if self.multimodal is not None and any(extra):
            raise ValueError("extra tokens per sequence are not supported for models that take images")
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, context_lens, row_starts = [], [], []
        row_seqs: list[Sequence] = []
        prompt_rows: list[tuple[Sequence, int, int]] = []
        row = 0
        for seq, n, more in zip(step.seqs, step.num_new_tokens, extra):
            start = seq.num_computed_tokens
            end = start + n
            tokens = seq.all_token_ids
            m = n + len(more)
            ids.extend(tokens[start:end] + more)
            positions.extend(range(start, start + m))
            slots.extend(self._slots(seq, start, start + m))
            if rows_as_decodes:
                query_lens += [1] * m
                context_lens.extend(range(start + 1, start + m + 1))
                row_seqs += [seq] * m
            else:
                query_lens.append(m)
                context_lens.append(start + m)
                row_seqs.append(seq)
            row_starts.append(row)
            if seq.params.prompt_logprobs is not None:
                for p in range(start, min(end, seq.num_prompt_tokens - 1)):
                    prompt_rows.append((seq, row + p - start, tokens[p + 1]))
            row += m
        batch = self.attention_batch(row_seqs, query_lens, context_lens, slots)
        if self.has_state:
            batch.state_slots = self.state_slots(step.seqs)
        dev = self.device
        return StepInputs(torch.tensor(ids, dtype=torch.long, device=dev),
                          torch.tensor(positions, dtype=torch.long, device=dev), batch, row_starts, prompt_rows)

    def forward(self, step: ScheduledBatch, inputs: StepInputs, **model_options: Any) -> torch.Tensor:
        """Hidden states [T, H] of the step's rows; model_options go to the model (a state journal)."""
        positions = inputs.positions
        if self.multimodal is not None:
            mm_positions, mm_batch = self.multimodal.prepare(step.seqs, step.num_new_tokens, self.device)
            if mm_positions is not None:  # 3-D positions and the step's image rows
                positions, model_options = mm_positions, {**model_options, "multimodal": mm_batch}
        return self.model.forward(inputs.input_ids, positions, inputs.batch, self.layer_caches, **model_options)

    def sample_rows(self, seqs: list[Sequence], logits: torch.Tensor, requests: list[SampleRequest],
                    result: StepResult) -> list[int]:
        """Samples one token per row into result.sampled; a row that fails goes to result.failed instead."""
        failures: dict[int, Exception] = {}
        tokens, logprobs = sample(logits, requests, self.generator, failures)
        for row, (s, t, lp) in enumerate(zip(seqs, tokens, logprobs)):
            if row in failures:
                result.failed[s.request_id] = failures[row]
            else:
                result.sampled[s.seq_id] = (t, lp)
        return tokens

    @staticmethod
    def add_prompt_logprobs(prompt_rows: list[tuple[Sequence, int, int]], logits: torch.Tensor,
                            result: StepResult) -> None:
        """logits: one row per prompt row, in order."""
        found = rows_logprobs(logits, [target for _, _, target in prompt_rows],
                              [s.params.prompt_logprobs or 0 for s, _, _ in prompt_rows])
        for (s, _, _), entry in zip(prompt_rows, found):
            result.prompt_logprobs.setdefault(s.seq_id, []).append(entry)

    @torch.inference_mode()
    def execute(self, step: ScheduledBatch) -> StepResult:
        inputs = self.prepare(step)
        hidden = self.forward(step, inputs)
        # Sampling rows: the last token of each sequence that reached its end this step.
        done = [i for i, (s, n) in enumerate(zip(step.seqs, step.num_new_tokens))
                if s.num_computed_tokens + n == s.num_tokens]
        sample_seqs = [step.seqs[i] for i in done]
        logit_rows = [inputs.batch.query_starts[i + 1] - 1 for i in done] + [r for _, r, _ in inputs.prompt_rows]
        result = StepResult({}, {})
        if not logit_rows:
            return result
        dev = self.device
        # In the model's dtype: the sampler converts the rows that need float32 (a float32 copy of 64 rows of
        # 152K logits cost 14 ms here, more than the greedy argmax over them).
        logits = self.model.compute_logits(hidden[torch.tensor(logit_rows, device=dev)])
        if sample_seqs:
            self.sample_rows(sample_seqs, logits[: len(sample_seqs)], [sample_request(s) for s in sample_seqs], result)
        if inputs.prompt_rows:
            self.add_prompt_logprobs(inputs.prompt_rows, logits[len(sample_seqs):], result)
        return result
