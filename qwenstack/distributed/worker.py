"""A tensor-parallel rank: load the model, take this rank's shard, then run every step the driver
broadcasts, until told to stop. The same code runs in a torch.multiprocessing child and in a Ray actor.

Decisions:
- Every rank loads the checkpoint itself (from the same path) and shards it locally: nothing but the
  per-step batch crosses process boundaries, and the weights are never pickled.
- A step is the driver's ScheduledBatch with light copies of its sequences (no generators, no logprob
  history): the worker's runner builds the same tensors and joins the same collectives; its sampled
  tokens are discarded (every rank sees the full logits, and only the driver's choice counts).
- The driver assigns recurrent-state slots before broadcasting, so every rank writes the same slot.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from qwenstack.distributed.config import ParallelConfig
from qwenstack.distributed.group import ParallelGroup
from qwenstack.distributed.shard import ShardReport, shard_model
from qwenstack.engine.scheduler import ScheduledBatch

log = logging.getLogger("qwenstack.distributed")


@dataclass(frozen=True)
class ModelSource:
    """What every rank loads, identically."""

    model: str  # a local checkpoint directory (or a hub id already in the local cache)
    dtype: str | None = None
    quantization: str | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class Rendezvous:
    host: str
    port: int
    backend: str = "gloo"  # nccl on GPUs


@dataclass(frozen=True)
class WorkerSpec:
    source: ModelSource
    parallel: ParallelConfig
    rendezvous: Rendezvous
    num_threads: int | None = None  # torch threads per rank (ranks share the machine's cores)


# --- messages from the driver ---------------------------------------------------------------------------

@dataclass(frozen=True)
class InitRunner:
    num_blocks: int
    block_size: int
    seed: int
    num_state_slots: int
    encoder_cache_memory: int
    kv_dtype: torch.dtype | None = None  # the KV pool's (engine.runner.kv_cache_dtype); None: the model's


@dataclass(frozen=True)
class Execute:
    step: ScheduledBatch
    # Sequences sent before: their prompt is left out and only the output tokens since the last send are
    # listed (nano-vllm sends only the last token for the same reason: a long context re-pickled every step).
    deltas: frozenset[int] = frozenset()
    released: tuple[int, ...] = ()  # sequences the driver let go of (finished or preempted): forget them


@dataclass(frozen=True)
class Shutdown:
    pass


def worker_view(step: ScheduledBatch) -> ScheduledBatch:
    """The step as a worker needs it: sequences without their generators and logprob history."""
    seqs = [dataclasses.replace(s, generator=None, logprobs=[], prompt_logprobs=[]) for s in step.seqs]
    return ScheduledBatch(seqs, list(step.num_new_tokens), num_lookahead_tokens=list(step.num_lookahead_tokens))


@dataclass
class TokenSender:
    """The driver's record of the tokens each worker holds per sequence, so a step sends only what changed.
    A sequence's tokens only grow while it is held (preemption releases it, and it is then sent whole again)."""

    sent_outputs: dict[int, int] = dataclasses.field(default_factory=dict)  # seq_id -> output tokens sent
    released: list[int] = dataclasses.field(default_factory=list)

    def forget(self, seq_id: int) -> None:
        if self.sent_outputs.pop(seq_id, None) is not None:
            self.released.append(seq_id)

    def message(self, step: ScheduledBatch) -> Execute:
        view = worker_view(step)
        deltas = set()
        for seq in view.seqs:
            sent = self.sent_outputs.get(seq.seq_id)
            self.sent_outputs[seq.seq_id] = len(seq.output_token_ids)
            if sent is not None:
                seq.prompt_token_ids, seq.output_token_ids = [], seq.output_token_ids[sent:]
                deltas.add(seq.seq_id)
        released, self.released = tuple(self.released), []
        return Execute(view, frozenset(deltas), released)


@dataclass
class TokenCache:
    """A worker's copy of each held sequence's tokens, rebuilt into full sequences from the driver's deltas."""

    tokens: dict[int, tuple[list[int], list[int]]] = dataclasses.field(default_factory=dict)  # prompt, outputs

    def apply(self, message: Execute) -> ScheduledBatch:
        for seq_id in message.released:
            self.tokens.pop(seq_id, None)
        for seq in message.step.seqs:
            if seq.seq_id in message.deltas:
                prompt, outputs = self.tokens[seq.seq_id]
                outputs.extend(seq.output_token_ids)
            else:
                prompt, outputs = seq.prompt_token_ids, list(seq.output_token_ids)
                self.tokens[seq.seq_id] = (prompt, outputs)
            seq.prompt_token_ids, seq.output_token_ids = prompt, list(outputs)
        return message.step


def load_shard(spec: WorkerSpec, group: ParallelGroup) -> tuple[torch.nn.Module, ShardReport]:
    """This rank's model: the full checkpoint loaded and quantized as on one rank, then cut to its shard."""
    from qwenstack.loading import load

    loaded = load(spec.source.model, dtype=spec.source.dtype, device=spec.source.device,
                  quantization=spec.source.quantization)
    report = shard_model(loaded.model, group, spec.parallel.expert_parallel)
    return loaded.model, report


def serve_steps(model: torch.nn.Module, group: ParallelGroup) -> None:
    """The worker loop: runs broadcast steps until Shutdown (or until the driver is gone)."""
    from qwenstack.engine.runner import ModelRunner

    runner: ModelRunner | None = None
    cache = TokenCache()
    while True:
        message = group.broadcast_object(None, src=0)
        if isinstance(message, Shutdown):
            return
        if isinstance(message, InitRunner):
            runner = ModelRunner(model, message.num_blocks, message.block_size, seed=message.seed,  # type: ignore[arg-type]
                                 num_state_slots=message.num_state_slots,
                                 encoder_cache_memory=message.encoder_cache_memory, kv_dtype=message.kv_dtype)
        elif isinstance(message, Execute):
            if runner is None:
                raise RuntimeError("the driver sent a step before initialising the runner")
            step = cache.apply(message)  # before anything can fail: the cache must follow every message
            try:
                runner.execute(step)
            except Exception as exc:  # noqa: BLE001
                # A failure after the collectives (a request's logits processor) happened on the driver too,
                # which ends that request; the ranks are still in step, so keep serving.
                log.warning("rank %d: step failed: %s", group.rank, exc)
        else:
            raise RuntimeError(f"unknown message from the driver: {type(message).__name__}")


def run_worker(rank: int, spec: WorkerSpec) -> None:
    """Entry point of a worker process (torch.multiprocessing target and the Ray actor's method)."""
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    logging.basicConfig(level=os.environ.get("QWENSTACK_LOG_LEVEL", "WARNING"))
    from qwenstack.kernels import build_all

    build_all()  # build (or load) the native kernels before the ranks start waiting on each other
    r = spec.rendezvous
    group = ParallelGroup.connect(r.host, r.port, rank, spec.parallel.tensor_parallel_size, backend=r.backend,
                                  timeout_s=spec.parallel.collective_timeout_s)
    model, _ = load_shard(spec, group)
    try:
        serve_steps(model, group)
    except RuntimeError as exc:  # the driver went away (its end of the connection closed): nothing to serve
        log.warning("rank %d stops: %s", rank, exc)
