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


@dataclass(frozen=True)
class Execute:
    step: ScheduledBatch


@dataclass(frozen=True)
class Shutdown:
    pass


def worker_view(step: ScheduledBatch) -> ScheduledBatch:
    """The step as a worker needs it: sequences without their generators and logprob history."""
    seqs = [dataclasses.replace(s, generator=None, logprobs=[], prompt_logprobs=[]) for s in step.seqs]
    return ScheduledBatch(seqs, list(step.num_new_tokens), num_lookahead_tokens=list(step.num_lookahead_tokens))


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
    while True:
        message = group.broadcast_object(None, src=0)
        if isinstance(message, Shutdown):
            return
        if isinstance(message, InitRunner):
            runner = ModelRunner(model, message.num_blocks, message.block_size, seed=message.seed,  # type: ignore[arg-type]
                                 num_state_slots=message.num_state_slots,
                                 encoder_cache_memory=message.encoder_cache_memory)
        elif isinstance(message, Execute):
            if runner is None:
                raise RuntimeError("the driver sent a step before initialising the runner")
            try:
                runner.execute(message.step)
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
    from qwenstack.kernels import paged_decode_available

    paged_decode_available()  # build (or load) the native kernels before the ranks start waiting on each other
    r = spec.rendezvous
    group = ParallelGroup.connect(r.host, r.port, rank, spec.parallel.tensor_parallel_size, backend=r.backend,
                                  timeout_s=spec.parallel.collective_timeout_s)
    model, _ = load_shard(spec, group)
    try:
        serve_steps(model, group)
    except RuntimeError as exc:  # the driver went away (its end of the connection closed): nothing to serve
        log.warning("rank %d stops: %s", rank, exc)
