"""The dynamic batcher's contract: full batches go at once, partial ones at the deadline,
withdrawn items never run, and a failing batch fails only its own items."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ragws.batcher import BatcherStopped, BatchFailed, DynamicBatcher, QueueFull


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
    from ragws.layout import choose_batch_size

    chosen = choose_batch_size(embedded_model, 4, budget_s=5.0)
    assert chosen in (1, 2, 4)

    class OnGpu:
        device = "cuda"

    assert choose_batch_size(OnGpu(), 16) == 16  # type: ignore[arg-type]
