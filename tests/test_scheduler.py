"""The scheduler's own allocations, without a model: recurrent-state slots (SlotPool) beside the KV blocks."""
from __future__ import annotations

import pytest

from qwenstack.engine.block_manager import BlockManager
from qwenstack.engine.params import SamplingParams
from qwenstack.engine.scheduler import Scheduler, SchedulerConfig
from qwenstack.engine.sequence import Sequence, SequenceStatus
from qwenstack.engine.slot_pool import SlotPool


def make_seq(seq_id: int, prompt_len: int, max_tokens: int = 8) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, list(range(1, prompt_len + 1)), SamplingParams(), max_tokens)


def run_step(scheduler: Scheduler, sampled: int = 7) -> list[Sequence]:
    """One step as the engine does it without a model: compute the scheduled tokens, append one sampled token
    to every sequence that reached its end."""
    batch = scheduler.schedule()
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(sampled)
    return batch.seqs


# --- the slot pool ----------------------------------------------------------------------------------------------


def test_slot_pool_hands_out_each_slot_once() -> None:
    pool = SlotPool(3)
    taken = [pool.allocate() for _ in range(3)]
    assert sorted(taken) == [0, 1, 2] and pool.num_free == 0
    with pytest.raises(RuntimeError, match="no free recurrent-state slot"):
        pool.allocate()
    pool.release(taken[1])
    assert pool.allocate() == taken[1]  # last freed, first reused
    pool.release(taken[0])
    with pytest.raises(ValueError, match="not allocated"):
        pool.release(taken[0])  # a double free would give one slot to two sequences
    with pytest.raises(ValueError):
        SlotPool(0)


def test_admission_waits_for_a_free_slot_and_finish_returns_it() -> None:
    slots = SlotPool(2)
    scheduler = Scheduler(SchedulerConfig(), BlockManager(64, 4), state_slots=slots)
    seqs = [make_seq(i, 5) for i in range(3)]
    scheduler.add(seqs)
    assert run_step(scheduler) == seqs[:2]  # blocks and budget for all three, slots for two
    assert {s.state_slot for s in seqs[:2]} == {0, 1} and seqs[2].state_slot is None
    assert seqs[2].status == SequenceStatus.WAITING and slots.num_free == 0
    scheduler.finish(seqs[0], "stop")
    assert seqs[0].state_slot is None and slots.num_free == 1
    assert run_step(scheduler) == [seqs[1], seqs[2]]
    assert seqs[2].state_slot is not None and seqs[2].state_slot != seqs[1].state_slot
    for seq in seqs[1:]:
        scheduler.finish(seq, "abort")
    assert sorted(slots.free) == [0, 1]


def test_waiting_sequence_finished_before_admission_holds_no_slot() -> None:
    slots = SlotPool(1)
    scheduler = Scheduler(SchedulerConfig(), BlockManager(16, 4), state_slots=slots)
    a, b = make_seq(0, 3), make_seq(1, 3)
    scheduler.add([a, b])
    run_step(scheduler)
    scheduler.finish(b, "abort")  # still waiting: nothing to return
    assert slots.num_free == 0 and a.state_slot == 0
    scheduler.finish(a, "stop")
    assert slots.free == [0]


def test_preemption_returns_the_slot_and_readmission_takes_a_fresh_one() -> None:
    slots = SlotPool(4)
    blocks = BlockManager(4, 4)  # 16 tokens: two 6-token prompts fit, their growth does not
    scheduler = Scheduler(SchedulerConfig(), blocks, state_slots=slots)
    a, b = make_seq(0, 6, max_tokens=12), make_seq(1, 6, max_tokens=12)
    scheduler.add([a, b])
    run_step(scheduler)
    assert a.state_slot is not None and b.state_slot is not None
    preempted = []
    while not preempted:
        batch = scheduler.schedule()
        preempted = batch.preempted
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_token_ids.append(7)
    assert preempted == [b] and b.status == SequenceStatus.WAITING
    assert b.state_slot is None and slots.num_free == 3  # recompute starts from a fresh slot
    scheduler.finish(a, "stop")
    assert run_step(scheduler) == [b] and b.state_slot is not None and b.num_preemptions == 1
    scheduler.finish(b, "stop")
    assert slots.num_free == 4 and blocks.num_free_blocks == blocks.num_blocks


def test_scheduler_without_a_slot_pool_assigns_none() -> None:
    scheduler = Scheduler(SchedulerConfig(), BlockManager(8, 4))
    seq = make_seq(0, 5)
    scheduler.add([seq])
    assert run_step(scheduler) == [seq] and seq.state_slot is None
