"""The synchronous engine: requests in, one scheduling step at a time, outputs with deltas out.

    add_request -> step() = schedule -> runner.execute -> postprocess -> [RequestOutput]

The engine knows token ids; text appears only through the incremental detokenizer (for stop strings and
streaming). It validates requests against the context and the KV pool before they enter the queue, so one
bad request is refused alone and the others keep running.

Requests may carry images (MultimodalInputs) for models that take them: the model plans them once per
request (placeholders, 3-D positions), the plan rides in each sequence's extras, and blocks holding image
placeholders are keyed in the prefix cache by the images' content hashes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch

from qwenstack.engine.block_manager import BlockManager
from qwenstack.engine.detokenizer import Decoder, IncrementalDetokenizer
from qwenstack.engine.embed import last_token_states, without_trailing
from qwenstack.engine.multimodal import DEFAULT_ENCODER_CACHE_MEMORY, PLAN_KEY, sequence_plan
from qwenstack.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from qwenstack.engine.params import SamplingParams
from qwenstack.engine.runner import ModelRunner, kv_cache_dtype, kv_pool_blocks
from qwenstack.engine.sampler import RequestFailed
from qwenstack.engine.scheduler import Scheduler, SchedulerConfig
from qwenstack.engine.speculative import SpeculativeRunner, speculative_pool_blocks
from qwenstack.engine.sequence import PositionLogprobs, Sequence, SequenceStatus
from qwenstack.engine.slot_pool import SlotPool
from qwenstack.config import rope_context_length
from qwenstack.errors import RequestError
from qwenstack.models.base import CausalLM, MultimodalModel
from qwenstack.multimodal.inputs import MultimodalInputs, MultimodalPlan

log = logging.getLogger("qwenstack.engine")


# A server's step token budget where the operator set none. A step's prompt chunks hold every running stream
# until they are computed, and a CPU computes ~400 prompt tokens/s of a 0.6B model on two cores: 2048 tokens
# froze the streams for ~5 s and put half of 32 concurrent requests' first tokens behind two such steps. 512
# (llama.cpp's physical batch) cut TTFT p50 from 11.0 to 3.6 s and the worst inter-token gap from 2.7 to 1.4 s
# at the same throughput (benchmarks/RESULTS.md, "A step budget for CPU servers"). Accelerators compute 2048
# tokens in tens of milliseconds, where bigger steps are the better use of them.
SERVER_STEP_TOKENS = {"cpu": 512}
DEFAULT_STEP_TOKENS = 2048


def model_context_length(args: Any, default: int) -> int:
    """The model's own context: max_position_embeddings as its rope scaling stretches it; `default` for a model
    with no such field."""
    positions = getattr(args, "max_position_embeddings", None)
    return default if positions is None else rope_context_length(positions, getattr(args, "rope", None))


def server_step_tokens(device: str) -> int:
    """The default max_num_batched_tokens of a served model on `device` ("cpu", "cuda", "cuda:1", ...)."""
    return SERVER_STEP_TOKENS.get(device.split(":")[0], DEFAULT_STEP_TOKENS)


def block_extra_keys(seq: Sequence, block_size: int) -> Any:
    """What besides its tokens identifies each of seq's KV blocks for the prefix cache (its images' keys)."""
    plan = sequence_plan(seq)
    return None if plan is None else plan.block_keys(block_size)

DEFAULT_KV_CACHE_MEMORY = 2 * 1024**3


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY  # bytes for the KV pool
    max_model_len: int | None = None  # defaults to the model's context, capped by the pool
    max_num_seqs: int = 64
    max_num_batched_tokens: int = DEFAULT_STEP_TOKENS
    max_waiting: int = 1024
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    speculative_tokens: int = 0  # k > 0: draft k tokens per step (engine/speculative.py)
    speculative_method: str = "mtp"  # "mtp": the model's MTP head (Qwen3-Next); "ngram": prompt lookup, any model
    prompt_lookup_min: int = 2  # ngram: the shortest suffix looked up
    prompt_lookup_max: int = 4  # ngram: the longest
    prompt_lookup_max_batch: int | None = 8  # ngram: no drafts in steps of more sequences (None: always draft)
    encoder_cache_memory: int = DEFAULT_ENCODER_CACHE_MEMORY  # bytes of cached image encodings (vision models)
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; fp8 (= fp8_e5m2): float8_e5m2, half the bytes a token


@dataclass
class EngineCounters:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    finished_requests: int = 0


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    pending: list[Sequence] = field(default_factory=list)  # siblings admitted once the prompt is cached
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    emitted_logprobs: list[int] = field(default_factory=list)
    prompt: str | None = None


class LLMEngine:
    def __init__(self, model: CausalLM, decoder: Decoder, eos_token_ids: list[int], config: EngineConfig | None = None,
                 context_len: int | None = None, runner_factory: Callable[..., ModelRunner] | None = None) -> None:
        """runner_factory: builds the runner in place of ModelRunner (same arguments); tensor parallelism
        passes its executor's, whose runner broadcasts each step to the worker ranks."""
        self.config = config or EngineConfig()
        self.model = model
        self.decoder = decoder
        self.eos_token_ids = tuple(eos_token_ids)
        param = next(model.parameters())  # type: ignore[attr-defined]
        spec_k = self.config.speculative_tokens
        if spec_k < 0:
            raise ValueError(f"speculative_tokens must be >= 0, got {spec_k}")
        mtp = spec_k and self.config.speculative_method == "mtp"
        pool_blocks = speculative_pool_blocks if mtp else kv_pool_blocks  # the MTP layer's KV shares each block
        kv_dtype = kv_cache_dtype(self.config.kv_cache_dtype, param.dtype)
        num_blocks = pool_blocks(model, self.config.kv_cache_memory, self.config.block_size, kv_dtype)
        # An embedding model generates nothing, and its passes (embed.py) use no KV cache: the smallest pool.
        self.embedding_only = bool(getattr(model, "is_embedding_model", False))
        # A sequence classifier's label names (models/qwen3_classifier.py); None for any other model.
        self.labels: tuple[str, ...] | None = getattr(model, "labels", None)
        if self.embedding_only:
            num_blocks = 2
        if num_blocks < 2:
            raise ValueError(f"kv_cache_memory={self.config.kv_cache_memory} bytes holds fewer than 2 KV blocks")
        if spec_k and runner_factory is not None:
            raise ValueError("speculative decoding is not supported with tensor parallelism yet")
        runner_cls: Any = runner_factory or ModelRunner
        if spec_k:
            runner_cls = partial(SpeculativeRunner, speculative_tokens=spec_k, method=self.config.speculative_method,
                                 prompt_lookup_min=self.config.prompt_lookup_min,
                                 prompt_lookup_max=self.config.prompt_lookup_max,
                                 prompt_lookup_max_batch=self.config.prompt_lookup_max_batch)
        self.runner = runner_cls(model, num_blocks, self.config.block_size, seed=self.config.seed,
                                  num_state_slots=self.config.max_num_seqs,
                                  encoder_cache_memory=self.config.encoder_cache_memory,
                                  kv_dtype=kv_dtype)
        prefix_caching = self.config.enable_prefix_caching
        if self.runner.has_state and prefix_caching:
            # A prefix-cache hit would resume a sequence whose recurrent state never saw the prefix.
            log.info("prefix caching is off for this model: its linear-attention layers keep recurrent state")
            prefix_caching = False
        self.block_manager = BlockManager(num_blocks, self.config.block_size, prefix_caching)
        # One slot per sequence that may run: the runner sized its state tensors for max_num_seqs slots.
        self.state_slots = SlotPool(self.config.max_num_seqs) if self.runner.has_state else None
        sched = SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens, self.config.max_waiting,
                                self.config.enable_chunked_prefill, num_lookahead_tokens=spec_k)
        # A function of the block size, not a bound method: the engine's own method in its scheduler made a
        # reference cycle, and a dropped engine's KV pool (gigabytes) waited for the cyclic garbage collector.
        self._block_extra_keys = partial(block_extra_keys, block_size=self.config.block_size)
        self.scheduler = Scheduler(sched, self.block_manager, extra_keys=self._block_extra_keys,
                                   state_slots=self.state_slots)
        pool_tokens = num_blocks * self.config.block_size
        model_len = context_len or model_context_length(model.args, pool_tokens)
        self.max_model_len = min(self.config.max_model_len or model_len, model_len,
                                 model_len if self.embedding_only else pool_tokens)
        if (self.config.max_model_len or 0) > model_len:  # vLLM refuses it; said, as several models may share it
            log.warning("max_model_len=%d is over this model's context length of %d (its config.json): serving %d",
                        self.config.max_model_len, model_len, self.max_model_len)
        self.vocab_size = model.args.vocab_size  # type: ignore[attr-defined]
        self.requests: dict[str, _Request] = {}
        self.counters = EngineCounters()
        self._next_seq_id = 0

    # --- requests -----------------------------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Checks a request against the limits; returns its resolved max_tokens. Raises RequestError."""
        if self.labels is not None:
            raise RequestError("this is a sequence-classification model: it classifies texts (POST /classify), "
                               "it cannot generate text")
        if self.embedding_only:
            raise RequestError("this is an embedding model: it computes embeddings (POST /v1/embeddings), "
                               "it cannot generate text")
        params.validate()
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestError("the prompt is empty")
        if n >= self.max_model_len:
            raise RequestError(
                f"the prompt has {n} tokens, but this model's maximum context length is {self.max_model_len} tokens "
                f"(prompt plus at least one generated token)"
            )
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        room = self.max_model_len - n
        if params.max_tokens is not None and params.max_tokens > room:
            raise RequestError(
                f"max_tokens={params.max_tokens} is too large: the prompt has {n} tokens and the maximum context "
                f"length is {self.max_model_len}, so at most {room} tokens can be generated"
            )
        max_tokens = room if params.max_tokens is None else params.max_tokens
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill and n + max_tokens > budget:
            # Unchunked, a step must hold the whole sequence (a preemption recomputes the prompt and the output
            # so far): one that never fits would wait for ever.
            raise RequestError(
                f"with chunked prefill off, a step computes a whole sequence, and this one may reach {n + max_tokens} "
                f"tokens (a prompt of {n} and max_tokens={max_tokens}), over max_num_batched_tokens={budget}: lower "
                f"max_tokens, raise max_num_batched_tokens or enable chunked prefill")
        return max_tokens

    def plan_multimodal(self, prompt_token_ids: list[int], multimodal: MultimodalInputs | None) -> MultimodalPlan | None:
        """The model's plan for a request's images (None for a text-only request). Raises RequestError."""
        if not isinstance(self.model, MultimodalModel):
            if multimodal:
                kind = "images" if multimodal.images else "audio"
                raise RequestError(f"this model does not accept {kind} (it is text-only)")
            return None
        images = list(multimodal.images) if multimodal else []
        audios = list(multimodal.audios) if multimodal else []
        if audios and not hasattr(self.model, "encode_audio"):
            raise RequestError("this model does not accept audio (it has no audio encoder)")
        plan = (self.model.plan_multimodal(prompt_token_ids, images, audios) if audios
                else self.model.plan_multimodal(prompt_token_ids, images))
        return plan if plan.placements else None

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, multimodal: MultimodalInputs | None = None) -> None:
        if request_id in self.requests:
            raise RequestError(f"request id '{request_id}' is already in use")
        max_tokens = self.validate(prompt_token_ids, params)
        plan = self.plan_multimodal(prompt_token_ids, multimodal)
        seqs, detoks = [], []
        for i in range(params.n):
            # Each sequence its own seed and processors (their state is per sequence: LogitsProcessor).
            p = params if params.n == 1 and not params.logits_processors else params.clone_for_sample(i)
            seq = Sequence(self._next_seq_id, request_id, i, list(prompt_token_ids), p, max_tokens,
                           () if p.ignore_eos else self.eos_token_ids)
            if plan is not None:
                seq.extras[PLAN_KEY] = plan
            self._next_seq_id += 1
            seqs.append(seq)
            detoks.append(IncrementalDetokenizer(self.decoder, seq.prompt_token_ids, p.skip_special_tokens, p.stop,
                                                 p.include_stop_str_in_output, reasoning=p.reasoning,
                                                 min_tokens=p.min_tokens))
        request = _Request(request_id, list(prompt_token_ids), params, seqs, detoks, pending=seqs[1:], prompt=prompt,
                           emitted_logprobs=[0] * params.n)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        self.scheduler.add(seqs[:1], counted=len(seqs))
        self.requests[request_id] = request
        self.counters.prompt_tokens += len(prompt_token_ids)

    def check_embedding_prompts(self, prompts: list[list[int]]) -> None:
        """Each prompt non-empty, within the context and the vocabulary. Raises RequestError."""
        if not self.runner.can_embed:
            raise RequestError("embeddings are not supported with tensor parallelism yet")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise RequestError(f"input {i} is empty")
            if len(prompt) > self.max_model_len:
                raise RequestError(f"input {i} has {len(prompt)} tokens, but this model's maximum context length "
                                   f"is {self.max_model_len} tokens")
            if min(prompt) < 0 or max(prompt) >= self.vocab_size:
                bad = next(t for t in prompt if not 0 <= t < self.vocab_size)
                raise RequestError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")

    def embed(self, prompts: list[list[int]]) -> torch.Tensor:
        """Last-token hidden states [N, hidden] (float32, not normalized) of whole prompts, in passes of at
        most a step's token budget. Call it between steps (from the thread that steps the engine)."""
        self.check_embedding_prompts(prompts)
        return last_token_states(self.model, prompts, self.config.max_num_batched_tokens)

    def check_scoring(self, prompts: list[list[int]], token_ids: list[int]) -> None:
        """What last_token_logits needs: a language-model head, prompts as embed's, ids in the vocabulary.
        Raises RequestError."""
        if self.embedding_only:
            what = "a sequence-classification" if self.labels is not None else "an embedding"
            raise RequestError(f"this is {what} model: it has no language-model head to score tokens with")
        self.check_embedding_prompts(prompts)
        if not token_ids or not all(0 <= t < self.vocab_size for t in token_ids):
            raise RequestError(f"token ids {token_ids} are not in the vocabulary (0..{self.vocab_size - 1})")

    def last_token_logits(self, prompts: list[list[int]], token_ids: list[int]) -> torch.Tensor:
        """[N, len(token_ids)] float32: each whole prompt's next-token logits of those vocabulary entries only
        (a reranker's "no" and "yes"), in the embedding passes. Call it between steps, as embed."""
        self.check_scoring(prompts, token_ids)
        device = next(self.model.parameters()).device  # type: ignore[attr-defined]
        ids = torch.tensor(token_ids, dtype=torch.long, device=device)
        return last_token_states(self.model, prompts, self.config.max_num_batched_tokens,
                                 head=lambda states: self.model.compute_logits(states, ids))

    def check_classifying(self, prompts: list[list[int]]) -> None:
        """What classify needs: a classification head, prompts as embed's. Raises RequestError."""
        if self.labels is None:
            raise RequestError("this model has no classification head: classify with a sequence-classification "
                               "checkpoint (Qwen3ForSequenceClassification)")
        self.check_embedding_prompts(prompts)

    def classify(self, prompts: list[list[int]]) -> torch.Tensor:
        """[N, len(labels)] float32: a sequence classifier's label logits at each whole prompt's last token that
        is not the pad token (transformers' pooling; trailing pads change nothing before them, so they are cut
        off), in the embedding passes. Call it between steps, as embed. Raises RequestError."""
        self.check_classifying(prompts)
        pad = getattr(self.model, "pad_token_id", None)
        pooled = [without_trailing(p, pad) for p in prompts]
        return last_token_states(self.model, pooled, self.config.max_num_batched_tokens,
                                 head=self.model.compute_logits)  # type: ignore[attr-defined]

    def abort(self, request_id: str) -> bool:
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.seqs:
            self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- stepping -----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        step = self.scheduler.schedule()
        self.counters.preemptions += len(step.preempted)
        if not step:
            return []
        result = self.runner.execute(step)
        touched: dict[str, _Request] = {}
        now = time.monotonic()
        for seq, n in zip(step.seqs, step.num_new_tokens):
            request = self.requests.get(seq.request_id)
            if request is None or seq.request_id in result.failed:
                continue
            seq.num_computed_tokens += n
            seq.num_registered_blocks = self.block_manager.register_full_blocks(
                seq.block_table, seq.all_token_ids, seq.num_registered_blocks, seq.num_computed_tokens,
                self._block_extra_keys(seq))
            if seq.index == 0 and seq.seq_id in result.prompt_logprobs and request.prompt_logprobs is not None:
                # Written by position: a recompute after preemption rewrites entries instead of repeating them.
                entries = result.prompt_logprobs[seq.seq_id]
                first = seq.num_computed_tokens - n + 1
                request.prompt_logprobs[first:first + len(entries)] = entries
            for token, logprobs in result.accepted.get(seq.seq_id, ()):  # speculative decoding: accepted drafts
                if seq.is_finished:
                    break
                self._append_token(request, seq, token, logprobs, now)
                seq.num_computed_tokens += 1  # the draft's KV and recurrent state were kept
                touched[request.request_id] = request
            if seq.seq_id in result.sampled and not seq.is_finished:
                token, logprobs = result.sampled[seq.seq_id]
                self._append_token(request, seq, token, logprobs, now)
                touched[request.request_id] = request
            if request.pending and (seq.index == 0 and seq.num_computed_tokens >= seq.num_prompt_tokens):
                self.scheduler.add(request.pending, counted=0)  # admitted with their request
                request.pending = []
        outputs = [self._make_output(r) for r in touched.values()]
        if result.failed:  # those requests end; the step stands for the others (see RequestFailed)
            for request_id in result.failed:
                self.abort(request_id)
            raise RequestFailed(result.failed, outputs)
        return outputs

    def _append_token(self, request: _Request, seq: Sequence, token: int, logprobs: PositionLogprobs | None,
                      now: float) -> None:
        seq.output_token_ids.append(token)
        self.counters.generation_tokens += 1
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        seq.metrics.last_token_time = now
        if logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token].logprob
        detok = request.detokenizers[seq.index]
        eos = token in seq.eos_token_ids and len(seq.output_token_ids) > seq.params.min_tokens - 1
        stop_token = token in seq.params.stop_token_ids and len(seq.output_token_ids) >= seq.params.min_tokens
        if not (eos or stop_token) or seq.params.include_stop_str_in_output:
            detok.add_token(token)  # the token that stops a sequence is not its text (vLLM's), unless asked for
        reason, stop_reason = None, None
        if eos:
            reason = "stop"
        elif stop_token:
            reason, stop_reason = "stop", token
        elif detok.stopped_on is not None:
            reason, stop_reason = "stop", detok.stopped_on
        elif len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            if detok.stopped_on is None:
                detok.flush()
            seq.stop_reason = stop_reason
            seq.metrics.finished_time = now
            self.scheduler.finish(seq, reason)

    def _make_output(self, request: _Request) -> RequestOutput:
        outputs = []
        for seq, detok in zip(request.seqs, request.detokenizers):
            done = seq.is_finished
            delta_text = detok.take_delta(final=done)
            start = request.emitted_logprobs[seq.index]
            delta_ids = seq.output_token_ids[start:]
            request.emitted_logprobs[seq.index] = len(seq.output_token_ids)
            want_lp = seq.params.logprobs is not None
            outputs.append(CompletionOutput(
                index=seq.index, text=detok.text, token_ids=list(seq.output_token_ids),
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                logprobs=seq.logprobs if want_lp else None,
                cumulative_logprob=seq.cumulative_logprob if want_lp else None,
                delta_text=delta_text, delta_token_ids=delta_ids,
                delta_logprobs=seq.logprobs[start:] if want_lp else None,
            ))
        finished = all(s.is_finished for s in request.seqs)
        first = request.seqs[0].metrics
        metrics = RequestMetrics(
            arrival_time=first.arrival_time, first_scheduled_time=first.first_scheduled_time,
            first_token_time=min((s.metrics.first_token_time for s in request.seqs if s.metrics.first_token_time), default=None),
            last_token_time=max((s.metrics.last_token_time for s in request.seqs if s.metrics.last_token_time), default=None),
            finished_time=time.monotonic() if finished else None,
            num_cached_tokens=first.num_cached_prompt_tokens,
        )
        if finished:
            self.requests.pop(request.request_id, None)
            self.counters.finished_requests += 1
        return RequestOutput(request.request_id, request.prompt_token_ids, outputs, finished, metrics,
                             request.prompt_logprobs, request.prompt)

    def close(self) -> None:
        """Stops what the engine started outside this process (tensor-parallel workers); idempotent."""
        self.runner.close()

    # --- introspection ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        bm = self.block_manager
        stats = {
            "num_running": sum(1 for s in self.scheduler.running if s.status == SequenceStatus.RUNNING),
            "num_waiting": len(self.scheduler.waiting),
            "kv_usage": bm.usage(),
            "prefix_cache_queries": bm.stats.queries,
            "prefix_cache_hits": bm.stats.hits,
            "prompt_tokens": self.counters.prompt_tokens,
            "generation_tokens": self.counters.generation_tokens,
            "preemptions": self.counters.preemptions,
        }
        if isinstance(self.runner, SpeculativeRunner):  # acceptance rate = accepted / draft tokens
            stats["spec_draft_tokens"] = self.runner.stats.drafted
            stats["spec_accepted_tokens"] = self.runner.stats.accepted
        return stats

    def generate_all(self, prompts: list[list[int]], params: list[SamplingParams],
                     multimodal: list[MultimodalInputs | None] | None = None) -> list[RequestOutput]:
        """Runs a batch to completion (the offline path). Outputs in input order."""
        ids = [f"batch-{self._next_seq_id}-{i}" for i in range(len(prompts))]
        inputs = multimodal or [None] * len(prompts)
        final: dict[str, RequestOutput] = {}
        try:
            for rid, prompt, p, mm in zip(ids, prompts, params, inputs):
                self.add_request(rid, prompt, p, multimodal=mm)
            while self.has_unfinished_requests():
                for out in self.step():
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:  # a bad request (or ^C) must not stay in the engine and fail every later call
            for rid in ids:
                if rid not in final:
                    self.abort(rid)
            raise
        return [final[rid] for rid in ids]

