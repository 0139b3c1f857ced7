"""Scheduler and KV-slot bookkeeping: admission into free slots, decode priority, the prefill
budget, and slots freed the moment a sequence finishes or is aborted."""

from __future__ import annotations

import pytest

from ragws.engine.kv_slots import SlotAllocator, SlotsExhausted
from ragws.engine.scheduler import Scheduler
from ragws.engine.sequence import FinishReason, SeqStatus, Sequence

EOS = 2


def seq(rid: int, prompt_len: int = 10, max_tokens: int = 3) -> Sequence:
    return Sequence(
        seq_id=rid,
        prompt_ids=list(range(100, 100 + prompt_len)),
        image=None,
        max_tokens=max_tokens,
        stop_ids=frozenset({EOS}),
        emit=lambda event: None,
    )


def test_slots_lowest_first_and_exhaustion():
    slots = SlotAllocator(3, max_model_len=64)
    assert [slots.allocate(i) for i in range(3)] == [0, 1, 2]
    assert not slots.can_allocate()
    with pytest.raises(SlotsExhausted):
        slots.allocate(9)
    slots.free(1)
    assert slots.used == 2 and slots.allocate(10) == 1
    with pytest.raises(ValueError):
        slots.free(7)
    assert slots.fits(64) and not slots.fits(65)


def test_admission_never_exceeds_slots_and_decode_goes_every_step():
    sched = Scheduler(SlotAllocator(2, 64), max_prefill_tokens=1000)
    for i in range(4):
        sched.add(seq(i))
    step = sched.schedule()
    assert [s.seq_id for s in step.prefill] == [0, 1] and step.decode == []
    sched.postprocess(step, [5, 5])
    step = sched.schedule()
    assert step.prefill == [] and [s.seq_id for s in step.decode] == [0, 1]
    assert [s.seq_id for s in sched.waiting] == [2, 3]


def test_prefill_budget_limits_admissions_per_step_but_not_decodes():
    sched = Scheduler(SlotAllocator(8, 512), max_prefill_tokens=25)
    for i in range(4):
        sched.add(seq(i, prompt_len=10))
    first = sched.schedule()
    assert len(first.prefill) == 2  # 10 + 10 fits 25, a third would not
    sched.postprocess(first, [5, 5])
    second = sched.schedule()
    assert len(second.prefill) == 2 and len(second.decode) == 2


def test_prompt_longer_than_budget_is_admitted_alone():
    sched = Scheduler(SlotAllocator(4, 512), max_prefill_tokens=8)
    sched.add(seq(0, prompt_len=300))
    sched.add(seq(1, prompt_len=5))
    step = sched.schedule()
    assert [s.seq_id for s in step.prefill] == [0]


def test_finish_on_eos_and_length_frees_slots():
    slots = SlotAllocator(2, 64)
    sched = Scheduler(slots, max_prefill_tokens=100)
    a, b = seq(0, max_tokens=2), seq(1, max_tokens=5)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    assert sched.postprocess(step, [7, EOS]) == [b]
    assert b.finish_reason is FinishReason.STOP and b.slot is None and slots.used == 1
    step = sched.schedule()
    assert sched.postprocess(step, [8]) == [a]
    assert a.finish_reason is FinishReason.LENGTH and a.output_ids == [7, 8]
    assert slots.used == 0 and not sched.has_work()


def test_ignore_eos_runs_to_max_tokens():
    s = seq(0, max_tokens=3)
    s.ignore_eos = True
    assert s.append(EOS) is None and s.append(EOS) is None
    assert s.append(EOS) is FinishReason.LENGTH


def test_abort_frees_the_slot_at_once_and_drops_a_token_in_flight():
    slots = SlotAllocator(2, 64)
    sched = Scheduler(slots, max_prefill_tokens=100)
    a, b, c = seq(0), seq(1), seq(2)
    for s in (a, b, c):
        sched.add(s)
    step = sched.schedule()
    assert slots.used == 2
    # a is aborted while the step that admitted it runs: its token is dropped.
    assert sched.abort(0) is a and a.status is SeqStatus.FINISHED
    assert a.finish_reason is FinishReason.CANCELLED and slots.used == 1
    sched.postprocess(step, [5, 6])
    assert a.output_ids == [] and b.output_ids == [6]
    # The freed slot goes to the waiting sequence on the very next step.
    nxt = sched.schedule()
    assert nxt.prefill == [c] and c.slot == 0
    assert sched.abort(2) is c and sched.abort(2) is None
    # Aborting a waiting sequence removes it from the queue.
    d = seq(3)
    sched.add(d)
    assert sched.abort(3) is d and d not in sched.waiting


# --- fair share: clients admitted in turn ----------------------------------------------------


def ids(seqs) -> list[int]:
    return [s.seq_id for s in seqs]


def test_waiting_clients_are_admitted_in_turn_each_in_its_own_order():
    sched = Scheduler(SlotAllocator(4, 64), max_prefill_tokens=1000)
    for i in range(4):
        sched.add(seq(i), client="a")
    sched.add(seq(10), client="b")
    sched.add(seq(11), client="b")
    sched.add(seq(20), client="c")
    assert ids(sched.waiting) == [0, 10, 20, 1, 11, 2, 3]  # the order admission will take
    step = sched.schedule()
    assert ids(step.prefill) == [0, 10, 20, 1]
    sched.postprocess(step, [5, 5, 5, EOS])  # 1 ends: one slot frees
    # The turn carries over: after a's 1 came b.
    assert ids(sched.schedule().prefill) == [11]


def test_a_bystander_gets_the_next_free_slot_despite_a_burst():
    slots = SlotAllocator(2, 64)
    sched = Scheduler(slots, max_prefill_tokens=1000)
    for i in range(100):
        sched.add(seq(i, max_tokens=1), client="burst")
    step = sched.schedule()
    assert ids(step.prefill) == [0, 1]
    sched.add(seq(999), client="bystander")
    sched.postprocess(step, [5, 5])  # max_tokens=1: both end, both slots free
    assert ids(sched.schedule().prefill) == [2, 999]
    assert ids(sched.waiting) == list(range(3, 100))  # the burst's order, untouched


def test_the_turn_waits_on_a_prompt_over_the_budget():
    sched = Scheduler(SlotAllocator(8, 512), max_prefill_tokens=30)
    sched.add(seq(0, prompt_len=20), client="a")
    sched.add(seq(1, prompt_len=25), client="b")
    sched.add(seq(2, prompt_len=5), client="a")
    # b's 25 tokens do not fit what a's 20 left; the step ends there rather than let a's
    # next prompt go round b.
    assert ids(sched.schedule().prefill) == [0]
    assert ids(sched.schedule().prefill) == [1, 2]


def test_abort_finds_a_waiting_sequence_in_any_clients_queue():
    sched = Scheduler(SlotAllocator(1, 64), max_prefill_tokens=1000)
    sched.add(seq(0), client="a")
    sched.schedule()
    for rid, client in ((1, "a"), (2, "b"), (3, "b"), (4, "c")):
        sched.add(seq(rid), client=client)
    assert sched.abort(3).finish_reason is FinishReason.CANCELLED
    assert sched.abort(4).status is SeqStatus.FINISHED  # c's only sequence: c leaves the turn
    assert ids(sched.waiting) == [1, 2] and len(sched.waiting) == 2
    assert sched.abort(3) is None
