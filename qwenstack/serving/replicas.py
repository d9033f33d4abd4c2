"""Data-parallel replicas: several engines of one model behind one served name, and the router between them.

Decisions:
- A replica is a whole engine (its own weights, KV pool, scheduler and engine thread; with
  --tensor-parallel-size, its own worker ranks). Replicas share nothing, so one replica's batch never
  waits on another's.
- The router sends a request to the replica whose prefix cache most likely holds its prompt: it keeps, per
  replica, the chained hashes of the full prompt blocks it sent there (bounded, least recently used
  first out) and picks the replica with the longest run of leading blocks. With no block in common it
  falls back to the replica with the fewest requests in flight (ties: the fewest routed so far).
- The router's record is a prediction, not the engines' truth (a replica may evict a block): a wrong guess
  costs a recompute, never a wrong answer.
- Metrics: the usual families are summed over the replicas (dashboards see one model); per-replica
  families (`qwenstack:replica_*`, labelled `replica`) show where requests and cache hits landed.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from qwenstack.engine.async_engine import AsyncEngine
from qwenstack.engine.outputs import RequestOutput
from qwenstack.engine.params import SamplingParams

DEFAULT_REMEMBERED_BLOCKS = 65536  # per replica: block hashes the router remembers


def prompt_block_hashes(prompt_token_ids: list[int], block_size: int) -> list[bytes]:
    """Chained hashes of the prompt's full blocks: block i's hash covers tokens [0, (i + 1) * block_size)."""
    hashes, previous = [], b""
    for start in range(0, len(prompt_token_ids) - block_size + 1, block_size):
        block = prompt_token_ids[start:start + block_size]
        previous = hashlib.blake2b(previous + repr(block).encode(), digest_size=16).digest()
        hashes.append(previous)
    return hashes


@dataclass
class ReplicaState:
    in_flight: int = 0
    routed: int = 0
    prefix_routed: int = 0  # routed here because of a cached prefix
    blocks: OrderedDict[bytes, None] = field(default_factory=OrderedDict)


class PrefixRouter:
    """Torch-free routing policy: prompt -> replica index."""

    def __init__(self, num_replicas: int, block_size: int, remembered_blocks: int = DEFAULT_REMEMBERED_BLOCKS) -> None:
        if num_replicas < 1:
            raise ValueError("a router needs at least one replica")
        self.block_size = block_size
        self.remembered_blocks = remembered_blocks
        self.replicas = [ReplicaState() for _ in range(num_replicas)]

    def _matched(self, state: ReplicaState, hashes: list[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in state.blocks:
                break
            n += 1
        return n

    def choose(self, prompt_token_ids: list[int]) -> int:
        """Picks a replica and records the request as in flight there (call `finished` when it ends)."""
        hashes = prompt_block_hashes(prompt_token_ids, self.block_size)
        matches = [self._matched(state, hashes) for state in self.replicas]
        best = max(matches)
        if best > 0:
            index = matches.index(best)
            self.replicas[index].prefix_routed += 1
        else:
            # Ties on load (sequential traffic: nothing in flight) go to the replica sent fewest requests.
            index = min(range(len(self.replicas)), key=lambda i: (self.replicas[i].in_flight, self.replicas[i].routed, i))
        state = self.replicas[index]
        state.in_flight += 1
        state.routed += 1
        for h in hashes:
            state.blocks[h] = None
            state.blocks.move_to_end(h)
        while len(state.blocks) > self.remembered_blocks:
            state.blocks.popitem(last=False)
        return index

    def finished(self, index: int) -> None:
        self.replicas[index].in_flight -= 1


class _SummedView:
    """What the server reads from `served.engine.engine`: replica 0 for the model's limits (every replica is
    the same model), sums over the replicas for the counters."""

    def __init__(self, replicated: "ReplicatedEngine") -> None:
        self._replicated = replicated
        self._first = replicated.replicas[0].engine

    def __getattr__(self, name: str) -> Any:  # validate, plan_multimodal, vocab_size, max_model_len, ...
        return getattr(self._first, name)

    def has_unfinished_requests(self) -> bool:
        return any(r.engine.has_unfinished_requests() for r in self._replicated.replicas)

    def stats(self) -> dict[str, Any]:
        per = [r.engine.stats() for r in self._replicated.replicas]
        summed: dict[str, Any] = {}
        for stats in per:
            for key, value in stats.items():
                summed[key] = summed.get(key, 0) + value
        summed["kv_usage"] = sum(s["kv_usage"] for s in per) / len(per)  # a fraction: the mean, not the sum
        return summed

    def replica_stats(self) -> list[dict[str, Any]]:
        out = []
        for engine, state in zip(self._replicated.replicas, self._replicated.router.replicas):
            stats = dict(engine.engine.stats())
            stats.update(routed_requests=state.routed, prefix_routed_requests=state.prefix_routed,
                         in_flight_requests=state.in_flight)
            out.append(stats)
        return out


class ReplicatedEngine:
    """Several AsyncEngines of one model with AsyncEngine's interface: generate, abort, shutdown."""

    def __init__(self, replicas: list[AsyncEngine], block_size: int) -> None:
        self.replicas = replicas
        self.router = PrefixRouter(len(replicas), block_size)
        self.engine = _SummedView(self)
        self._placement: dict[str, int] = {}  # request id -> replica, while it runs (for aborts)
        self._next_id = 0

    def new_request_id(self, prefix: str = "req") -> str:
        self._next_id += 1
        return f"{prefix}-dp{self._next_id}"

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       prompt: str | None = None, multimodal: Any = None) -> AsyncIterator[RequestOutput]:
        request_id = request_id or self.new_request_id()
        index = self.router.choose(prompt_token_ids)
        self._placement[request_id] = index
        try:
            async for out in self.replicas[index].generate(prompt_token_ids, params, request_id=request_id,
                                                           prompt=prompt, multimodal=multimodal):
                yield out
        finally:
            self._placement.pop(request_id, None)
            self.router.finished(index)

    async def embed(self, prompts: list[list[int]]) -> Any:
        """Embedding passes on the replicas in turn (they keep no prefix, so none is better placed)."""
        return await self._in_turn().embed(prompts)

    async def last_token_logits(self, prompts: list[list[int]], token_ids: list[int]) -> Any:
        """Scoring passes (reranking), on the replicas in turn as embeddings are."""
        return await self._in_turn().last_token_logits(prompts, token_ids)

    async def classify(self, prompts: list[list[int]]) -> Any:
        """A classifier's passes, on the replicas in turn as embeddings are."""
        return await self._in_turn().classify(prompts)

    def _in_turn(self) -> AsyncEngine:
        self._next_id += 1
        return self.replicas[self._next_id % len(self.replicas)]

    def abort(self, request_id: str) -> None:
        index = self._placement.get(request_id)
        if index is not None:
            self.replicas[index].abort(request_id)

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.shutdown()
