"""Worker ranks as Ray actors, placed by a placement group, for tensor parallelism across machines.

    qwenstack serve MODEL --tensor-parallel-size 8 --distributed-executor-backend ray   # RAY_ADDRESS=...

Decisions:
- Ray places; torch.distributed computes. Each worker rank is one actor reserved in a placement group
  (one bundle per rank: CPUs, plus a GPU when the model runs on CUDA; PACK keeps ranks on as few nodes as
  fit), and runs the same worker loop as a local process (worker.run_worker). The ranks then form one
  gloo or NCCL group with the driver over the TCPStore at the driver's node address.
- Ray is optional (`pip install qwenstack[ray]`): imported only when this backend is chosen. An already
  initialised Ray (a test's local cluster, a job on a cluster) is used as it is; otherwise ray.init()
  connects to RAY_ADDRESS or starts a local one.
- A dead actor is noticed through its run() reference, which completes when the actor exits or is killed.
"""
from __future__ import annotations

from typing import Any

from qwenstack.distributed.worker import WorkerSpec, run_worker


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("the ray backend needs Ray: pip install 'qwenstack[ray]'") from exc
    if not ray.is_initialized():
        ray.init()
    return ray


def driver_ip() -> str:
    return str(_ray().util.get_node_ip_address())


class _Rank:
    """One worker rank inside a Ray actor."""

    def run(self, rank: int, spec: WorkerSpec) -> int:
        run_worker(rank, spec)
        return rank


class RayWorkers:
    def __init__(self, spec: WorkerSpec) -> None:
        ray = _ray()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        self._remove = remove_placement_group
        ranks = spec.parallel.tensor_parallel_size - 1
        gpu = 1 if spec.source.device.startswith("cuda") else 0
        bundle = {"CPU": float(spec.num_threads or 1), **({"GPU": 1.0} if gpu else {})}
        self.group = placement_group([bundle] * ranks, strategy="PACK")
        ray.get(self.group.ready(), timeout=spec.parallel.collective_timeout_s)
        actor = ray.remote(num_cpus=bundle["CPU"], num_gpus=gpu)(_Rank)
        self.actors = [
            actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i),
                          name=None).remote()
            for i in range(ranks)
        ]
        self.runs = [a.run.remote(rank, spec) for rank, a in enumerate(self.actors, start=1)]

    def dead(self) -> list[int]:
        done, _ = self._ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        return [self.runs.index(ref) + 1 for ref in done]

    def kill(self, rank: int) -> None:
        """Ends one rank's actor at once (what a lost node looks like to the driver)."""
        self._ray.kill(self.actors[rank - 1], no_restart=True)

    def stop(self, timeout_s: float) -> None:
        self._ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout_s)
        for a in self.actors:
            self._ray.kill(a, no_restart=True)
        self._remove(self.group)
