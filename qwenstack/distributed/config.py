"""How a model is laid out over processes and replicas (torch-free: the CLI and the server config read it)."""
from __future__ import annotations

from dataclasses import dataclass

EXECUTOR_BACKENDS = ("mp", "ray")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1  # ranks one model is split over (attention heads, MLP, vocabulary)
    expert_parallel: bool = False  # MoE experts spread over those ranks instead of split inside each expert
    data_parallel_size: int = 1  # independent replicas behind one API (serving/replicas.py)
    distributed_executor_backend: str = "mp"  # mp: torch.multiprocessing on this machine; ray: a Ray cluster
    # A collective waiting longer than this means a rank is gone or stuck (a dead process is noticed at once:
    # its connections close). Generous, because a first step may wait on a rank building native kernels.
    collective_timeout_s: float = 180.0

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.data_parallel_size < 1:
            raise ValueError("tensor_parallel_size and data_parallel_size must be >= 1")
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, "
                             f"got '{self.distributed_executor_backend}'")
        if self.expert_parallel and self.tensor_parallel_size == 1:
            raise ValueError("expert parallelism spreads experts over the tensor-parallel ranks: "
                             "set tensor_parallel_size > 1")

    @property
    def is_distributed(self) -> bool:
        return self.tensor_parallel_size > 1
