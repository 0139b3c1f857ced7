"""The dynamic batcher's contract: full batches go at once, partial ones at the deadline,
withdrawn items never run, and a failing batch fails only its own items."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ragws.runtime.batcher import BatcherStopped, BatchFailed, DynamicBatcher, QueueFull


class Recorder:
    """A batch function that records the batches it saw (and can be slowed or made to fail)."""

    def __init__(self, delay_s: float = 0.0, fail_on: object = None) -> None:
        self.batches: list[list[object]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.fail_on = fail_on

    def __call__(self, items: list[object]) -> list[object]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot process {self.fail_on!r}")
        return [f"out:{item}" for item in items]


async def _started(fn, **kwargs) -> DynamicBatcher:
    batcher = DynamicBatcher(fn, **kwargs)
    batcher.start()
    return batcher


async def test_full_batch_goes_before_the_deadline():
    fn = Recorder()
    batcher = await _started(fn, max_batch_size=4, max_queue_delay_s=5.0)
    t0 = time.monotonic()
    results = await asyncio.gather(*(batcher.submit(i) for i in range(4)))
    assert time.monotonic() - t0 < 1.0  # did not wait for the 5 s window
    assert [r.output for r in results] == ["out:0", "out:1", "out:2", "out:3"]
    assert fn.batches == [[0, 1, 2, 3]] and all(r.batch_size == 4 for r in results)
    assert fn.threads and "MainThread" not in fn.threads  # the model ran off the event loop
    await batcher.stop()


async def test_partial_batch_waits_for_oldest_deadline():
    fn = Recorder()
    batcher = await _started(fn, max_batch_size=8, max_queue_delay_s=0.2)
    t0 = time.monotonic()
    first = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.sleep(0.1)
    second = asyncio.ensure_future(batcher.submit("b"))
    await asyncio.gather(first, second)
    elapsed = time.monotonic() - t0
    # The window is measured from the oldest item, not restarted by the second one.
    assert 0.18 <= elapsed < 0.29, elapsed
    assert fn.batches == [["a", "b"]]
    assert first.result().queue_s >= 0.18
    await batcher.stop()


async def test_preferred_size_cuts_batches_and_the_rest_waits():
    fn = Recorder(delay_s=0.05)
    batcher = await _started(fn, max_batch_size=8, preferred_batch_size=2, max_queue_delay_s=0.3)
    await asyncio.gather(*(batcher.submit(i) for i in range(5)))
    sizes = [len(b) for b in fn.batches]
    assert sizes == [2, 2, 1], sizes
    await batcher.stop()


async def test_cancelled_item_never_runs():
    fn = Recorder()
    batcher = await _started(fn, max_batch_size=4, max_queue_delay_s=0.2)
    keep = asyncio.ensure_future(batcher.submit("keep"))
    drop = asyncio.ensure_future(batcher.submit("drop"))
    await asyncio.sleep(0.05)
    drop.cancel()
    assert (await keep).output == "out:keep"
    assert fn.batches == [["keep"]]
    await batcher.stop()


async def test_result_for_item_cancelled_while_running_is_dropped():
    fn = Recorder(delay_s=0.2)
    batcher = await _started(fn, max_batch_size=2, max_queue_delay_s=0.0)
    running = asyncio.ensure_future(batcher.submit("x"))
    await asyncio.sleep(0.05)  # now inside the model call
    running.cancel()
    await asyncio.sleep(0.3)
    assert running.cancelled()
    assert (await batcher.submit("y")).output == "out:y"  # the batcher is still serving
    await batcher.stop()


async def test_failing_batch_fails_only_its_items():
    fn = Recorder(fail_on="poison")
    batcher = await _started(fn, max_batch_size=2, max_queue_delay_s=0.05)
    bad = await asyncio.gather(
        batcher.submit("poison"), batcher.submit("unlucky"), return_exceptions=True
    )
    assert all(isinstance(r, BatchFailed) and "poison" in str(r) for r in bad)
    assert (await batcher.submit("fine")).output == "out:fine"
    await batcher.stop()


class Fatal(BaseException):
    """Not an Exception: no model-error handler catches it (a dying thread or interpreter)."""


async def test_a_dead_collector_fails_everything_waiting_and_refuses_new_items():
    def run(items: list[object]) -> list[object]:
        time.sleep(0.1)
        raise Fatal("the inference thread dies")

    batcher = await _started(run, max_batch_size=1, max_queue_delay_s=0.0)
    assert batcher.healthy
    running = asyncio.ensure_future(batcher.submit("running"))
    await asyncio.sleep(0.02)
    queued = asyncio.ensure_future(batcher.submit("queued"))
    results = await asyncio.wait_for(asyncio.gather(running, queued, return_exceptions=True), 5)
    assert all(isinstance(r, BatcherStopped) and "failed" in str(r) for r in results)
    assert not batcher.healthy
    with pytest.raises(BatcherStopped):
        await batcher.submit("later")
    await batcher.stop()


async def test_bounded_queue_refuses_at_once():
    fn = Recorder(delay_s=0.3)
    batcher = await _started(fn, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=2)
    running = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.05)  # 0 is running; the queue is empty
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await batcher.submit(3)
    await asyncio.gather(running, *queued)
    await batcher.stop()


async def test_idle_batcher_does_not_spin():
    fn = Recorder()
    batcher = await _started(fn, max_batch_size=4, max_queue_delay_s=0.01)
    cpu0 = time.process_time()
    await asyncio.sleep(0.5)
    assert time.process_time() - cpu0 < 0.05  # asleep on an event, not polling
    assert fn.batches == []
    await batcher.stop()


def test_choose_batch_size_measures_on_cpu_and_takes_max_on_gpu(embedded_model):
    from ragws.pipeline.layout import choose_batch_size

    chosen = choose_batch_size(embedded_model, 4, budget_s=5.0)
    assert chosen in (1, 2, 4)

    class OnGpu:
        device = "cuda"

    assert choose_batch_size(OnGpu(), 16) == 16  # type: ignore[arg-type]


# --- fair share: clients in turn --------------------------------------------------------------


class Gated(Recorder):
    """A batch function whose first batch waits for :meth:`open`, so that a test can queue
    items from several clients before any of them is taken."""

    def __init__(self) -> None:
        super().__init__()
        self._gate = threading.Event()

    def open(self) -> None:
        self._gate.set()

    def __call__(self, items: list[object]) -> list[object]:
        self._gate.wait(5)
        return super().__call__(items)


async def _gated(**kwargs) -> tuple[Gated, DynamicBatcher, asyncio.Future]:
    """A batcher whose model call is held on a first item ("gate"), from client "z"."""
    fn = Gated()
    batcher = await _started(fn, **kwargs)
    gate = asyncio.ensure_future(batcher.submit("gate", client="z"))
    await asyncio.sleep(0)  # queued
    while batcher.queue_depth():  # taken: the batch of one is held in the model call
        await asyncio.sleep(0.005)
    return fn, batcher, gate


def _queue(batcher: DynamicBatcher, client: str, items) -> list[asyncio.Future]:
    return [asyncio.ensure_future(batcher.submit(i, client=client)) for i in items]


async def test_batches_take_clients_in_turn_and_each_clients_items_in_order():
    fn, batcher, gate = await _gated(max_batch_size=3, max_queue_delay_s=0.0)
    queued = _queue(batcher, "a", ["a0", "a1", "a2", "a3"])
    queued += _queue(batcher, "b", ["b0", "b1"])
    queued += _queue(batcher, "c", ["c0"])
    await asyncio.sleep(0.01)
    assert batcher.queue_depth() == 7
    fn.open()
    await asyncio.gather(gate, *queued)
    # One from each client in turn, the turn carried from batch to batch; a client whose
    # queue empties leaves the turn.
    assert fn.batches == [["gate"], ["a0", "b0", "c0"], ["a1", "b1", "a2"], ["a3"]]
    await batcher.stop()


async def test_the_client_comes_from_the_request_context():
    from ragws.runtime.fairness import client_scope

    fn, batcher, gate = await _gated(max_batch_size=4, max_queue_delay_s=0.0)
    queued = []
    for client, items in (("socket-1", ["x0", "x1", "x2"]), ("socket-2", ["y0"])):
        with client_scope(client):  # as a request task started under it would
            queued += [asyncio.ensure_future(batcher.submit(i)) for i in items]
    await asyncio.sleep(0.01)
    fn.open()
    await asyncio.gather(gate, *queued)
    assert fn.batches == [["gate"], ["x0", "y0", "x1", "x2"]]
    await batcher.stop()


async def test_a_bystander_item_goes_in_the_next_batch_despite_a_burst():
    fn, batcher, gate = await _gated(max_batch_size=8, max_queue_delay_s=0.0)
    burst = _queue(batcher, "burst", range(100))
    await asyncio.sleep(0.01)
    (bystander,) = _queue(batcher, "bystander", ["solo"])
    await asyncio.sleep(0.01)
    fn.open()
    result = await bystander
    await asyncio.gather(gate, *burst)
    assert "solo" in fn.batches[1]  # the first batch after the one running when it came
    assert result.queue_s < 5.0
    # The burst's own items stayed in their order, across every batch.
    assert [i for batch in fn.batches[1:] for i in batch if i != "solo"] == list(range(100))
    await batcher.stop()


async def test_withdrawn_items_of_any_client_never_run_nor_cost_a_turn():
    fn, batcher, gate = await _gated(max_batch_size=4, max_queue_delay_s=0.0)
    a0, a1 = _queue(batcher, "a", ["a0", "a1"])
    b0, b1 = _queue(batcher, "b", ["b0", "b1"])
    (c0,) = _queue(batcher, "c", ["c0"])
    await asyncio.sleep(0.01)
    for withdrawn in (a0, b0, b1):
        withdrawn.cancel()
    await asyncio.sleep(0.01)
    fn.open()
    await asyncio.gather(gate, a1, c0)
    assert fn.batches == [["gate"], ["a1", "c0"]]
    assert batcher.queue_depth() == 0
    await batcher.stop()


async def test_queue_bound_counts_every_clients_items():
    fn, batcher, gate = await _gated(max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=3)
    queued = _queue(batcher, "a", [1, 2]) + _queue(batcher, "b", [3])
    await asyncio.sleep(0.01)
    for client in ("a", "b", "c"):  # a new client gets no room of its own either
        with pytest.raises(QueueFull):
            await batcher.submit(4, client=client)
    fn.open()
    await asyncio.gather(gate, *queued)
    await batcher.stop()


async def test_partial_batch_waits_for_the_oldest_item_of_any_client():
    fn = Recorder()
    batcher = await _started(fn, max_batch_size=8, max_queue_delay_s=0.2)
    t0 = time.monotonic()
    first = asyncio.ensure_future(batcher.submit("a", client="one"))
    await asyncio.sleep(0.1)
    second = asyncio.ensure_future(batcher.submit("b", client="two"))
    await asyncio.gather(first, second)
    elapsed = time.monotonic() - t0
    assert 0.18 <= elapsed < 0.29, elapsed  # one's item set the window, not two's
    assert fn.batches == [["a", "b"]]
    await batcher.stop()
