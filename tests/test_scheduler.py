"""Scheduler and KV-slot bookkeeping: admission into free slots, decode priority, the prefill
budget, and slots freed the moment a sequence finishes or is aborted."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from ragws.engine.engine import EngineStats, OcrEngine
from ragws.engine.kv_slots import SlotAllocator, SlotsExhausted
from ragws.engine.scheduler import Scheduler
from ragws.engine.sequence import FinishReason, GenerationParams, SeqStatus, Sequence, TokenEvent

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


# --- chunked prefill: prompts longer than a step's budget -------------------------------------


class FakeRunner:
    """The runner's contract without a model: a prompt chunk gives a token only when it ends
    the prompt, a decode always does. Records each step's chunks as ``(seq_id, start, end)``."""

    name = "fake"
    stop_ids = frozenset({EOS})
    repetition_penalty = 1.0
    no_repeat_ngram_size = 0
    num_slots = 4
    max_model_len = 512

    class tokenizer:  # decodes token t as one letter
        @staticmethod
        def decode(ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(chr(ord("a") + t % 26) for t in ids)

    def __init__(self) -> None:
        self.chunks: list[list[tuple[int, int, int]]] = []
        self.decodes: list[list[int]] = []

    def kv_cache_bytes(self) -> int:
        return 0

    def step(self, prefill: list[Sequence], decode: list[Sequence]) -> list[int | None]:
        self.chunks.append([(s.seq_id, *s.prefill_span) for s in prefill])
        self.decodes.append(ids(decode))
        done = [s.prefill_span[1] == s.num_prompt_tokens for s in prefill]
        return [7 if d else None for d in done] + [8] * len(decode)


def run_step(sched: Scheduler, runner: FakeRunner):
    step = sched.schedule()
    sched.postprocess(step, runner.step(step.prefill, step.decode))
    return step


def test_a_prompt_over_the_budget_is_prefilled_in_chunks_while_others_decode():
    sched = Scheduler(SlotAllocator(4, 512), max_prefill_tokens=100)
    runner = FakeRunner()
    a, b = seq(0, prompt_len=60, max_tokens=20), seq(1, prompt_len=40, max_tokens=20)
    sched.add(a)
    sched.add(b)
    run_step(sched, runner)
    long = seq(2, prompt_len=350, max_tokens=3)
    sched.add(long)
    for n in range(1, 5):
        step = run_step(sched, runner)
        # The running streams get a token at every step of the long prefill.
        assert ids(step.decode) == [0, 1] and len(a.output_ids) == len(b.output_ids) == n + 1
        # The long prompt is sampled only once its last chunk has run.
        assert long.output_ids == ([7] if n == 4 else [])
        assert (long.first_token_at is not None) == (n == 4)
    assert runner.chunks == [
        [(0, 0, 60), (1, 0, 40)],
        [(2, 0, 100)],
        [(2, 100, 200)],
        [(2, 200, 300)],
        [(2, 300, 350)],
    ]
    assert long.num_computed_tokens == 350 and long.prefill_chunk is None
    step = run_step(sched, runner)
    assert ids(step.decode) == [0, 1, 2] and long.output_ids == [7, 8]
    assert long.num_computed_tokens == long.num_tokens - 1 == 351


def test_chunks_go_first_in_admission_order_then_admissions_share_the_rest():
    sched = Scheduler(SlotAllocator(4, 512), max_prefill_tokens=8)
    runner = FakeRunner()
    for i, n in enumerate((20, 20, 6)):
        sched.add(seq(i, prompt_len=n, max_tokens=10))
    while sched.waiting or any(s.in_prefill for s in sched.running):
        run_step(sched, runner)
    assert runner.chunks == [
        [(0, 0, 8)],
        [(0, 8, 16)],
        [(0, 16, 20), (1, 0, 4)],  # 1 can never fit a step whole: it takes what 0 left
        [(1, 4, 12)],
        [(1, 12, 20)],
        [(2, 0, 6)],  # 2 fits a step whole, so it waited for one
    ]
    assert runner.decodes[3:] == [[0], [0], [0, 1]]


def test_a_prompt_within_the_budget_is_never_split():
    sched = Scheduler(SlotAllocator(4, 512), max_prefill_tokens=10)
    runner = FakeRunner()
    sched.add(seq(0, prompt_len=25), client="a")
    sched.add(seq(1, prompt_len=6), client="b")
    sched.add(seq(2, prompt_len=3), client="a")
    for _ in range(4):
        run_step(sched, runner)
    # 1 does not fit what 0's last chunk left (5 of 10): it waits, and the turn with it.
    assert runner.chunks == [[(0, 0, 10)], [(0, 10, 20)], [(0, 20, 25)], [(1, 0, 6), (2, 0, 3)]]


def test_abort_mid_prefill_frees_the_slot_and_the_image_features():
    slots = SlotAllocator(2, 512)
    sched = Scheduler(slots, max_prefill_tokens=8)
    runner = FakeRunner()
    long, other = seq(0, prompt_len=30), seq(1, prompt_len=5)
    long.image = object()  # the prepared request, and the features the runner keeps
    sched.add(long)
    sched.add(other)
    step = sched.schedule()
    assert step.prefill == [long] and step.admitted == [long]
    sched.postprocess(step, runner.step(step.prefill, step.decode))
    long.features = object()
    assert long.num_computed_tokens == 8 and long.output_ids == []
    assert sched.abort(0) is long and long.finish_reason is FinishReason.CANCELLED
    assert long.slot is None and long.image is None and long.features is None
    assert slots.used == 0 and sched.running == []
    step = run_step(sched, runner)
    assert step.admitted == [other] and other.slot == 0 and other.output_ids == [7]


@dataclass
class Prompt:
    prompt_ids: list[int]


def test_engine_sends_nothing_for_a_prompt_until_its_last_chunk():
    stats: list[EngineStats] = []
    engine = OcrEngine(FakeRunner(), max_prefill_tokens=100, on_step=stats.append)
    events: list[TokenEvent] = []
    started: list[int] = []
    params = GenerationParams(max_tokens=2)
    engine.submit(
        Prompt(list(range(250))), params, events.append, on_start=lambda: started.append(1)
    )
    for n in range(3):
        engine.step()
        last = n == 2  # chunks [0, 100), [100, 200), [200, 250)
        assert started == [1]  # once, when it is admitted
        assert stats[-1].batch_size == last and bool(stats[-1].ttft_s) == last
        assert len(events) == last  # no token, no text, no event until the last chunk
    engine.step()
    assert [e.text for e in events] == ["h", "i"]
    assert events[-1].finish_reason is FinishReason.LENGTH
