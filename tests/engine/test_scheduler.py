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


# --- lookahead for speculative decoding ---------------------------------------------------------------------------


def lookahead_scheduler(num_blocks: int, k: int = 2, **options) -> Scheduler:
    return Scheduler(SchedulerConfig(num_lookahead_tokens=k, **options), BlockManager(num_blocks, 4))


def test_sampling_sequences_get_blocks_for_their_drafts_and_decodes_a_grant() -> None:
    scheduler = lookahead_scheduler(16, k=3)
    seq = make_seq(0, 6, max_tokens=20)
    scheduler.add([seq])
    batch = scheduler.schedule()
    assert batch.num_lookahead_tokens == [0]  # a prefill has no drafts to verify yet
    assert len(seq.block_table) == 3  # 6 prompt tokens + 3 drafts written after the sample: 9 tokens
    seq.num_computed_tokens += 6
    seq.output_token_ids.append(7)
    batch = scheduler.schedule()
    assert batch.num_new_tokens == [1] and batch.num_lookahead_tokens == [3]
    assert len(seq.block_table) * 4 >= seq.num_tokens + 3 + 3  # verify 3, then draft 3 beyond them


def test_lookahead_is_capped_by_max_tokens_and_the_step_budget() -> None:
    scheduler = lookahead_scheduler(64, k=3, max_num_batched_tokens=4)
    short = make_seq(0, 3, max_tokens=2)  # one token after the first: at most one draft
    seqs = [short] + [make_seq(i, 3, max_tokens=20) for i in (1, 2)]
    for seq in seqs:
        seq.output_token_ids.append(7)
        seq.num_computed_tokens = seq.num_tokens - 1
    scheduler.running.extend(seqs)
    for seq in seqs:
        scheduler.blocks.grow(seq.block_table, seq.num_tokens)
        seq.status = SequenceStatus.RUNNING
    batch = scheduler.schedule()
    # 3 decode tokens leave 1 of the 4-token budget: the short sequence can use no draft, the next takes it.
    assert batch.num_new_tokens == [1, 1, 1] and batch.num_lookahead_tokens == [0, 1, 0]


def test_admission_refused_until_the_drafts_fit() -> None:
    scheduler = lookahead_scheduler(4, k=3)  # 16 tokens
    first, second = make_seq(0, 7, max_tokens=4), make_seq(1, 4, max_tokens=8)
    scheduler.add([first, second])
    assert run_step(scheduler) == [first]  # 7 + 3 drafts take 3 blocks; 4 + 3 need 2 more, 1 is free
    assert second.status == SequenceStatus.WAITING and len(first.block_table) == 3
    scheduler.finish(first, "stop")
    assert run_step(scheduler) == [second] and len(second.block_table) == 2
    scheduler.finish(second, "stop")
    assert scheduler.blocks.num_free_blocks == 4  # lookahead blocks return with the sequence


def test_running_lookahead_never_preempts_and_preemption_returns_it() -> None:
    scheduler = lookahead_scheduler(6, k=3)  # 24 tokens
    a, b = make_seq(0, 8, max_tokens=16), make_seq(1, 8, max_tokens=16)
    scheduler.add([a, b])
    run_step(scheduler)  # each: 8 prompt tokens + 3 drafts = 3 blocks: the pool is full
    assert scheduler.blocks.num_free_blocks == 0
    batch = scheduler.schedule()  # decodes fit in their blocks; no spare block for more lookahead
    assert batch.seqs == [a, b] and not batch.preempted
    assert batch.num_lookahead_tokens == [3, 3]  # the drafts verified now are covered by the blocks they hold
    for seq in batch.seqs:  # as the engine does when all three drafts are accepted, plus the bonus token
        seq.num_computed_tokens += 1 + 3
        seq.output_token_ids.extend([7, 7, 7, 7])
    batch = scheduler.schedule()  # a needs a fourth block: b (the latest) is preempted, not for lookahead's sake
    assert batch.preempted == [b] and b.block_table == [] and b.status == SequenceStatus.WAITING
    # a: 13 tokens + 3 to verify + 3 to draft want 5 blocks; one of the 2 free stays free for a's growth.
    assert batch.seqs == [a] and batch.num_lookahead_tokens == [3] and len(a.block_table) == 5
    assert scheduler.blocks.num_free_blocks == 1
    scheduler.finish(a, "stop")
    assert scheduler.blocks.num_free_blocks == 6
