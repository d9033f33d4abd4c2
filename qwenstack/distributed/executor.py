"""The driver's side of tensor parallelism: start the worker ranks, load this rank's shard, and give the
engine a runner that broadcasts each step before running its own share of it.

    loaded, executor = start_parallel(ModelSource(path), ParallelConfig(tensor_parallel_size=2))
    engine = LLMEngine(loaded.model, tok, eos, config, runner_factory=executor.make_runner)

Decisions:
- One scheduler: the engine on the driver (rank 0) schedules, owns the block tables and samples; the
  workers hold their share of every layer and of the KV pool (same block ids, fewer heads) and follow.
- Workers start with torch.multiprocessing (spawn) on this machine, or as Ray actors in a placement group
  across machines (ray_executor.py). Either way they meet the driver at one TCPStore rendezvous and form
  one gloo (CPU) or NCCL (GPU) group.
- A dead worker must not hang the server: liveness is checked before each step, every collective runs
  under a timeout, and any collective failure marks the executor broken. From then on every step raises
  EngineUnavailableError (the API answers 503) at once; the engine thread and the server stay up.
"""
from __future__ import annotations

import logging
import socket
from typing import Any, Protocol

import torch

from qwenstack.distributed.config import ParallelConfig
from qwenstack.distributed.group import CollectiveError, ParallelGroup
from qwenstack.distributed.shard import ShardReport, shard_model
from qwenstack.distributed.worker import (
    InitRunner, ModelSource, Rendezvous, Shutdown, TokenSender, WorkerSpec, run_worker,
)
from qwenstack.engine.runner import ModelRunner, StepResult
from qwenstack.engine.scheduler import ScheduledBatch
from qwenstack.errors import EngineUnavailableError

log = logging.getLogger("qwenstack.distributed")


class WorkerHandles(Protocol):
    """The started worker ranks, however they were started (processes or Ray actors)."""

    def dead(self) -> list[int]:
        """Ranks whose worker has exited."""
        ...

    def kill(self, rank: int) -> None:
        """Ends one rank at once."""
        ...

    def stop(self, timeout_s: float) -> None:
        """Waits for the workers to exit, then ends any still running."""
        ...


class ProcessWorkers:
    """Worker ranks 1..N-1 as torch.multiprocessing children (spawn: a clean interpreter, no forked threads)."""

    def __init__(self, spec: WorkerSpec) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self.processes = [ctx.Process(target=run_worker, args=(rank, spec), name=f"qwenstack-tp{rank}", daemon=True)
                          for rank in range(1, spec.parallel.tensor_parallel_size)]
        for p in self.processes:
            p.start()

    def dead(self) -> list[int]:
        return [rank for rank, p in enumerate(self.processes, start=1) if p.exitcode is not None]

    def kill(self, rank: int) -> None:
        """Ends one rank at once (SIGKILL): how the tests make a worker die mid-request."""
        self.processes[rank - 1].kill()

    def stop(self, timeout_s: float) -> None:
        for p in self.processes:
            p.join(timeout_s)
            if p.is_alive():
                p.kill()
                p.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ParallelExecutor:
    def __init__(self, group: ParallelGroup, workers: WorkerHandles, report: ShardReport) -> None:
        self.group = group
        self.workers = workers
        self.report = report
        self.broken: str | None = None  # why the workers can no longer follow the driver

    def make_runner(self, model: Any, num_blocks: int, block_size: int, seed: int = 0, num_state_slots: int = 0,
                    **kwargs: Any) -> "DistributedRunner":
        """The engine's runner_factory: same signature as ModelRunner."""
        return DistributedRunner(self, model, num_blocks, block_size, seed=seed, num_state_slots=num_state_slots,
                                 **kwargs)

    def send(self, message: object) -> None:
        self.check()
        try:
            self.group.broadcast_object(message, src=0)
        except RuntimeError as exc:
            raise self.fail(exc) from exc

    def check(self) -> None:
        if self.broken is not None:
            raise EngineUnavailableError(self.broken)
        dead = self.workers.dead()
        if dead:
            raise self.fail(RuntimeError(f"rank(s) {dead} exited"))

    def fail(self, exc: BaseException) -> EngineUnavailableError:
        if self.broken is None:
            dead = self.workers.dead()
            why = f"rank(s) {dead} exited" if dead else str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.broken = (f"a tensor-parallel worker of this model failed ({why}); the model cannot serve "
                           f"requests until the server is restarted")
            log.error("%s", self.broken)
        return EngineUnavailableError(self.broken)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        if self.broken is None:
            try:
                self.group.broadcast_object(Shutdown(), src=0)
            except RuntimeError:
                pass
            self.broken = "the model was shut down"
        self.workers.stop(timeout_s)


class DistributedRunner(ModelRunner):
    """Rank 0's ModelRunner: broadcasts each step to the workers, then runs its own share."""

    can_embed = False  # the workers run only what a step broadcasts: a pass of rank 0 alone would hang

    def __init__(self, executor: ParallelExecutor, model: Any, num_blocks: int, block_size: int, seed: int = 0,
                 num_state_slots: int = 0, **kwargs: Any) -> None:
        from qwenstack.engine.multimodal import DEFAULT_ENCODER_CACHE_MEMORY

        executor.send(InitRunner(num_blocks, block_size, seed, num_state_slots,
                                 kwargs.get("encoder_cache_memory", DEFAULT_ENCODER_CACHE_MEMORY),
                                 kwargs.get("kv_dtype")))
        super().__init__(model, num_blocks, block_size, seed=seed, num_state_slots=num_state_slots, **kwargs)
        self.executor = executor
        self.sender = TokenSender()

    def execute(self, step: ScheduledBatch) -> StepResult:
        # Each sequence carries its state slot (the scheduler's), so every rank reads and writes the same one.
        # A sequence missing from this step (finished, preempted, or waiting out a step) is forgotten on every
        # rank: the scheduler keeps no release hook, and a forgotten sequence is simply sent whole next time.
        scheduled = {seq.seq_id for seq in step.seqs}
        for seq_id in [i for i in self.sender.sent_outputs if i not in scheduled]:
            self.sender.forget(seq_id)
        self.executor.send(self.sender.message(step))
        try:
            return super().execute(step)
        except (CollectiveError, torch.distributed.DistError) as exc:  # a rank is gone: nothing can run
            raise self.executor.fail(exc) from exc

    def close(self) -> None:
        self.executor.shutdown()


def start_parallel(source: ModelSource, parallel: ParallelConfig, backend: str | None = None) -> tuple[Any, ParallelExecutor]:
    """Starts the workers, loads and shards rank 0's model here. Returns (LoadedModel, executor)."""
    from qwenstack.loading import load

    tp = parallel.tensor_parallel_size
    # The ranks share this machine's cores (the driver included): give each its share, or they oversubscribe.
    threads = max(1, torch.get_num_threads() // tp) if parallel.distributed_executor_backend == "mp" else None
    rendezvous = Rendezvous(_driver_address(parallel), free_port(),
                            backend or ("nccl" if source.device.startswith("cuda") else "gloo"))
    spec = WorkerSpec(source, parallel, rendezvous, threads)
    workers: WorkerHandles
    if parallel.distributed_executor_backend == "ray":
        from qwenstack.distributed.ray_executor import RayWorkers

        workers = RayWorkers(spec)
    else:
        workers = ProcessWorkers(spec)
    if threads:
        torch.set_num_threads(threads)
    try:
        group = ParallelGroup.connect(rendezvous.host, rendezvous.port, 0, tp, backend=rendezvous.backend,
                                      timeout_s=parallel.collective_timeout_s)
        loaded = load(source.model, dtype=source.dtype, device=source.device, quantization=source.quantization)
        report = shard_model(loaded.model, group, parallel.expert_parallel)
    except BaseException:
        workers.stop(1.0)
        raise
    return loaded, ParallelExecutor(group, workers, report)


def _driver_address(parallel: ParallelConfig) -> str:
    if parallel.distributed_executor_backend == "ray":
        from qwenstack.distributed.ray_executor import driver_ip

        return driver_ip()
    return "127.0.0.1"
