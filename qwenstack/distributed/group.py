"""ParallelGroup: one object holding a process group of `world_size` ranks, and the collectives the
parallel layers use.

Decisions:
- No default process group (`torch.distributed.init_process_group`): that is process-wide state, and one
  test process (or one server with data-parallel replicas) holds several engines at once. Each group is
  a ProcessGroupGloo built on its own TCPStore, owned by this object and passed to the layers that need it.
- Every collective runs under the group's timeout: a dead peer turns into an exception on the survivors
  (gloo reports a closed connection at once, the timeout bounds anything else), never a hang.
- The time spent in collectives is accumulated (`comm_seconds`), so the per-step communication cost can be
  measured on the real workload rather than estimated.
"""
from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0


class CollectiveError(RuntimeError):
    """A collective failed: a peer closed its connection (its process died) or did not answer in time."""


@dataclass
class CommStats:
    seconds: float = 0.0  # wall time inside collectives, this rank
    calls: int = 0
    bytes: int = 0  # payload of all-reduce / all-gather / broadcast, this rank


@dataclass
class ParallelGroup:
    rank: int
    world_size: int
    process_group: dist.ProcessGroup | None = None  # None only for a group of one rank
    store: dist.Store | None = None  # kept alive with the group: the rendezvous of its ranks
    stats: CommStats = field(default_factory=CommStats)

    @classmethod
    def single(cls) -> "ParallelGroup":
        return cls(0, 1)

    @classmethod
    def connect(cls, host: str, port: int, rank: int, world_size: int, *, backend: str = "gloo",
                timeout_s: float = DEFAULT_TIMEOUT_S) -> "ParallelGroup":
        """Rank 0 serves the rendezvous store on host:port; the others connect to it."""
        if world_size == 1:
            return cls.single()
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            pg: dist.ProcessGroup = dist.ProcessGroupGloo(store, rank, world_size, opts)
        elif backend == "nccl":
            pg = dist.ProcessGroupNCCL(store, rank, world_size)
        else:
            raise ValueError(f"unknown collective backend '{backend}' (use gloo or nccl)")
        return cls(rank, world_size, pg, store)

    # --- collectives --------------------------------------------------------------------------------

    def _timed(self, work: dist.Work, nbytes: int, start: float) -> None:
        try:
            work.wait()
        except RuntimeError as exc:
            raise CollectiveError(str(exc).splitlines()[0]) from exc
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1
        self.stats.bytes += nbytes

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in place (x must be contiguous); returned for chaining."""
        if self.process_group is None:
            return x
        start = time.perf_counter()
        self._timed(self._start(self.process_group.allreduce, [x]), x.numel() * x.element_size(), start)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenation of every rank's x along the last dimension, in rank order (equal shapes)."""
        if self.process_group is None:
            return x
        start = time.perf_counter()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self._timed(self._start(self.process_group.allgather, [parts], [x]), x.numel() * x.element_size() * self.world_size,
                    start)
        return torch.cat(parts, dim=-1)

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        """Rank src's obj on every rank (pickled: a length, then the bytes)."""
        if self.process_group is None:
            return obj
        start = time.perf_counter()
        if self.rank == src:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.long)
        else:
            size = torch.zeros(1, dtype=torch.long)
        self._timed(self._start(self.process_group.broadcast, size, src), 0, start)
        if self.rank != src:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self._timed(self._start(self.process_group.broadcast, payload, src), payload.numel(), start)
        return obj if self.rank == src else pickle.loads(payload.numpy().tobytes())

    @staticmethod
    def _start(collective: object, *args: object) -> dist.Work:
        try:
            return collective(*args)  # type: ignore[operator]
        except RuntimeError as exc:
            raise CollectiveError(str(exc).splitlines()[0]) from exc

    def barrier(self) -> None:
        if self.process_group is not None:
            self.all_reduce(torch.zeros(1))

    def shard_range(self, total: int) -> tuple[int, int]:
        """This rank's [start, end) of `total` items split evenly (total must divide)."""
        if total % self.world_size:
            raise ValueError(f"{total} does not split evenly over {self.world_size} ranks")
        size = total // self.world_size
        return self.rank * size, (self.rank + 1) * size
