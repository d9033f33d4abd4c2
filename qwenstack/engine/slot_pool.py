"""Recurrent-state slots: the per-sequence state of linear-attention layers (Qwen3-Next). Pure Python, no torch.

Decisions:
- The pool only hands out slot numbers; the runner holds the state tensors, indexed by them. So the scheduler
  decides every allocation (KV blocks beside it in BlockManager, slots here) and the runner only reads
  `seq.state_slot`.
- A running sequence holds exactly one slot, from admission until it finishes or is preempted (recompute
  rebuilds its state from a fresh slot, which needs no clearing: a fresh sequence's state starts at zero).
- Last freed, first reused (a stack): the slot the runner touched most recently is handed out again.
"""
from __future__ import annotations


class SlotPool:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"a slot pool needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        # Popped from the end: slot num_slots - 1 first, as the runner's own list did before the pool moved here.
        self.free: list[int] = list(range(num_slots))
        self._taken: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        """A free slot. Call only when num_free > 0: the scheduler admits no sequence without one."""
        if not self.free:
            raise RuntimeError("no free recurrent-state slot: the scheduler should not have admitted this sequence")
        slot = self.free.pop()
        self._taken.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._taken:  # a double free would hand one slot to two sequences
            raise ValueError(f"state slot {slot} is not allocated")
        self._taken.remove(slot)
        self.free.append(slot)
