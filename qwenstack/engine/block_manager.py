"""Paged KV blocks: allocation, reference counts, and the prefix cache. Pure Python, no torch.

Decisions:
- One pool of fixed-size blocks. A sequence holds a block table (list of block ids); full blocks can be
  shared by several sequences (reference counted), copy-free.
- Prefix cache: a full block is keyed by a chained hash (the previous block's hash, its token ids, and an
  extra key such as an image hash). A hit is trusted only if the stored token ids match too, so a hash
  collision can never serve wrong KV.
- Freed blocks keep their hash and stay reusable until the pool needs them; the pool hands out the least
  recently freed block first (LRU eviction).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Sequence as Seq


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] | None = None


def block_hash(parent: int | None, token_ids: Seq[int], extra: Hashable = None) -> int:
    return hash((parent, tuple(token_ids), extra))


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens served from the cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one token")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # --- prefix cache -------------------------------------------------------------------------------

    def hashes(self, token_ids: Seq[int], num_blocks: int, extra_keys: Seq[Hashable] | None = None) -> list[int]:
        out, parent = [], None
        for b in range(num_blocks):
            chunk = token_ids[b * self.block_size : (b + 1) * self.block_size]
            parent = block_hash(parent, chunk, extra_keys[b] if extra_keys else None)
            out.append(parent)
        return out

    def lookup_prefix(self, token_ids: Seq[int], extra_keys: Seq[Hashable] | None = None) -> list[int]:
        """Block ids that already hold the longest cached prefix of these tokens.

        At least one token is always left to compute, since the last one is needed to produce logits.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        found = []
        for b, h in enumerate(self.hashes(token_ids, max_blocks, extra_keys)):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            chunk = tuple(token_ids[b * self.block_size : (b + 1) * self.block_size])
            if self.blocks[block_id].token_ids != chunk:
                break
            found.append(block_id)
        return found

    def register_full_blocks(
        self, block_table: list[int], token_ids: Seq[int], num_registered: int, num_computed: int,
        extra_keys: Seq[Hashable] | None = None,
    ) -> int:
        """Enters newly completed full blocks into the prefix cache; returns the new registered count."""
        num_full = num_computed // self.block_size
        if not self.enable_prefix_caching or num_full <= num_registered:
            return max(num_registered, num_full)
        parent = self.blocks[block_table[num_registered - 1]].hash if num_registered else None
        for b in range(num_registered, num_full):
            chunk = tuple(token_ids[b * self.block_size : (b + 1) * self.block_size])
            h = block_hash(parent, chunk, extra_keys[b] if extra_keys else None)
            block = self.blocks[block_table[b]]
            if block.hash is None:
                block.hash, block.token_ids = h, chunk
                self.cached.setdefault(h, block.block_id)
            parent = h
        return num_full

    # --- allocation ---------------------------------------------------------------------------------

    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)  # least recently freed first
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cache entry
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, None
        block.ref_count = 1
        return block_id

    def can_grow(self, block_table: list[int], num_tokens: int, reused: Seq[int] = ()) -> bool:
        """Whether the table can cover num_tokens, counting reused cached blocks that are now free."""
        revived = sum(1 for b in reused if self.blocks[b].ref_count == 0)
        need = self.blocks_needed(num_tokens) - len(block_table) - len(reused)
        return need + revived <= self.num_free_blocks

    def share(self, block_table: list[int], cached_blocks: Seq[int]) -> None:
        """Adds cached blocks (a prefix hit) to an empty table, taking a reference on each."""
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            block_table.append(block_id)

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Appends fresh blocks until the table covers num_tokens. Call can_grow first."""
        need = self.blocks_needed(num_tokens) - len(block_table)
        if need > self.num_free_blocks:
            raise RuntimeError("KV pool exhausted: the scheduler should have preempted")
        for _ in range(need):
            block_table.append(self._take_free())

    def release(self, block_table: list[int]) -> None:
        """Drops the table's references; blocks whose count reaches zero return to the pool (cache kept).

        Released in reverse so a sequence's tail blocks are evicted before its shared prefix.
        """
        for block_id in reversed(block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        block_table.clear()

    def reset_prefix_cache(self) -> None:
        for block_id in self.free:
            self.blocks[block_id].hash = None
            self.blocks[block_id].token_ids = None
        self.cached = {h: b for h, b in self.cached.items() if self.blocks[b].ref_count > 0}
