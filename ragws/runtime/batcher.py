"""A dynamic batcher: one queue shared by every client, one model call per batch.

The contract is Triton's dynamic batcher, in the same three knobs:

* ``max_batch_size`` — the most items one model call takes;
* ``preferred_batch_size`` — a batch of this size goes as soon as it can be formed (on CPUs a
  small batch is often the fastest per item, on GPUs the largest);
* ``max_queue_delay`` — otherwise a batch goes when its oldest item has waited this long.

There is no polling: the collector sleeps until an item arrives or the oldest item's deadline
passes. The model runs on one dedicated thread, so the event loop never blocks on it.

The queue is shared, but not first come, first served: it holds one FIFO per client (the
connection a request came on, :mod:`ragws.runtime.fairness`), and a batch takes items from the
clients in turn, one each, round robin. So one client's burst of a thousand text lines cannot push
another client's few lines back by a thousand: they go into the next batch. Within a client,
items go in the order they came. The knobs keep their meaning across clients: the delay is the
oldest item's wait in any client's queue, and ``max_queue_size`` bounds all of them together.

Cancellation is structural: a caller awaits :meth:`DynamicBatcher.submit`; cancelling that
task cancels the item's future, and the collector skips items whose future is already done.
So a request whose socket closed never reaches the model, and a result that arrives for a
cancelled item is dropped. An item taken into a batch disarms its request's deadline
(:mod:`ragws.runtime.deadlines`): from then on the request is being served, not queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ragws.errors import ErrorCode, RequestError
from ragws.runtime import deadlines, fairness

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


class QueueFull(Exception):
    """The batcher's bounded queue is full; the caller should answer ``overloaded``."""


class BatchFailed(Exception):
    """The model raised on the batch this item was part of."""


class BatcherStopped(Exception):
    """The batcher was stopped before this item ran."""


@dataclass(slots=True)
class Batched(Generic[Out]):
    """One item's result, with how it was batched."""

    output: Out
    queue_s: float  # submit → batch start
    batch_size: int


@dataclass(slots=True, eq=False)
class _Entry(Generic[In, Out]):
    item: In
    future: asyncio.Future[Batched[Out]]
    enqueued: float  # time.monotonic()
    deadline: deadlines.Deadline | None  # the submitting request's, if it has one


def _withdrawn(entry: _Entry) -> bool:
    """Cancelled by its caller (or already answered): never to reach the model."""
    return entry.future.done()


def _live(entries: Iterable[_Entry]) -> Iterator[_Entry]:
    return (e for e in entries if not e.future.done())


@dataclass(slots=True)
class BatchStats:
    """Reported to ``on_batch`` after each model call, for metrics."""

    size: int
    queue_s: list[float]
    run_s: float
    failed: bool = False
    extra: dict[str, float] = field(default_factory=dict)


class DynamicBatcher(Generic[In, Out]):
    """Collects items from many callers into batches for ``run_batch``, clients in turn.

    ``run_batch`` takes a list of items and returns one output per item, in order. It runs on
    the batcher's own thread and may raise: the items of that batch then fail with
    :class:`BatchFailed` and the batcher goes on with the next batch.
    """

    def __init__(
        self,
        run_batch: Callable[[list[In]], Sequence[Out]],
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        preferred_batch_size: int | None = None,
        max_queue_size: int = 10_000,
        name: str = "batcher",
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be ≥ 1")
        if preferred_batch_size is not None and not 1 <= preferred_batch_size <= max_batch_size:
            raise ValueError("preferred_batch_size must be in 1..max_batch_size")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.preferred_batch_size = preferred_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.name = name
        self.on_batch = on_batch
        self._queue: fairness.FairQueue[_Entry[In, Out]] = fairness.FairQueue(_withdrawn)
        self._running: list[_Entry[In, Out]] = []  # the batch inside the model call
        self._arrived = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"ragws-{self.name}")
        self._task = asyncio.get_running_loop().create_task(self._collect(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._fail_queued(BatcherStopped(f"{self.name} stopped: the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @property
    def healthy(self) -> bool:
        """Whether the collector is running (it stops only when told to, or on a fatal error)."""
        return self._task is not None and not self._task.done()

    def queue_depth(self) -> int:
        """Items waiting (cancelled ones included until the collector drops them)."""
        return len(self._queue)

    # --- callers --------------------------------------------------------------------------

    async def submit(self, item: In, client: Hashable | None = None) -> Batched[Out]:
        """Queue ``item`` and wait for its result. Cancel the caller to withdraw it.

        ``client`` is whose turn the item waits for; by default the client of the request
        running in this context (:data:`ragws.runtime.fairness.current`)."""
        if not self.healthy:
            raise BatcherStopped(f"{self.name} is not running")
        if len(self._queue) >= self.max_queue_size:
            raise QueueFull(f"{self.name} queue is full ({self.max_queue_size} items)")
        future: asyncio.Future[Batched[Out]] = asyncio.get_running_loop().create_future()
        entry = _Entry(item, future, time.monotonic(), deadlines.current.get())
        self._queue.push(entry, fairness.current.get() if client is None else client)
        self._arrived.set()
        return await future

    async def submit_request(self, item: In, what: str) -> Batched[Out]:
        """:meth:`submit`, its failures raised as the errors a client gets: a full queue is
        ``overloaded``, a failed batch ``internal``, a stopped batcher ``unavailable``
        (``what`` names the model in the message)."""
        try:
            return await self.submit(item)
        except QueueFull as exc:
            raise RequestError(ErrorCode.OVERLOADED, str(exc)) from None
        except BatchFailed as exc:
            raise RequestError(ErrorCode.INTERNAL, f"{what} failed: {exc}") from None
        except BatcherStopped as exc:
            raise RequestError(ErrorCode.UNAVAILABLE, f"{what} unavailable: {exc}") from None

    # --- the collector --------------------------------------------------------------------

    async def _collect(self) -> None:
        try:
            await self._collect_forever()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # Not a model error (those fail one batch): the collector itself cannot go on.
            # Nothing queued may wait for it forever, and new items are refused at once.
            log.critical("%s: the batcher stopped on %r", self.name, exc, exc_info=True)
            self._fail_queued(BatcherStopped(f"{self.name} failed: {type(exc).__name__}"))

    def _fail_queued(self, error: BaseException) -> None:
        """Fail every item not yet answered: the running batch's and the queue's."""
        for entry in self._running:
            if not entry.future.done():
                entry.future.set_exception(error)
        self._running = []
        for entry in self._queue.drain():
            if not entry.future.done():
                entry.future.set_exception(error)

    async def _collect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._running = await self._next_batch()
            started = time.monotonic()
            try:
                outputs = await loop.run_in_executor(
                    self._executor, self.run_batch, [e.item for e in batch]
                )
                if len(outputs) != len(batch):
                    raise RuntimeError(f"model returned {len(outputs)} results for {len(batch)}")
            except Exception as exc:
                log.exception("%s: batch of %d failed", self.name, len(batch))
                error = BatchFailed(f"{type(exc).__name__}: {exc}")
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(error)
                self._report(batch, started, failed=True)
                continue
            for entry, output in zip(batch, outputs, strict=False):
                if not entry.future.done():  # cancelled while running: drop the result
                    entry.future.set_result(Batched(output, started - entry.enqueued, len(batch)))
            self._report(batch, started, failed=False)

    async def _next_batch(self) -> list[_Entry[In, Out]]:
        """Wait until a batch is due, then take it off the queue."""
        target = self.preferred_batch_size or self.max_batch_size
        while True:
            heads = self._queue.heads()  # each client's oldest live item
            if not heads:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # Counting stops at a full batch: a burst may queue thousands of lines.
            live = sum(1 for _ in itertools.islice(_live(self._queue), target))
            oldest = min(e.enqueued for e in heads)
            wait_s = oldest + self.max_queue_delay_s - time.monotonic()
            if live >= target or wait_s <= 0:
                # A full (preferred) batch goes at once; a partial one only at the deadline.
                return self._take(min(live, target))
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), wait_s)

    def _take(self, n: int) -> list[_Entry[In, Out]]:
        """Up to ``n`` live items, one from each client in turn (withdrawn ones skipped)."""
        batch: list[_Entry[In, Out]] = []
        while len(batch) < n and self._queue.peek() is not None:
            entry = self._queue.pop()
            batch.append(entry)
            if entry.deadline is not None:
                entry.deadline.started()
        return batch

    def _report(self, batch: list[_Entry[In, Out]], started: float, *, failed: bool) -> None:
        if self.on_batch is None:
            return
        stats = BatchStats(
            size=len(batch),
            queue_s=[started - e.enqueued for e in batch],
            run_s=time.monotonic() - started,
            failed=failed,
        )
        try:
            self.on_batch(stats)
        except Exception:  # metrics must never take the batcher down
            log.exception("%s: on_batch hook failed", self.name)
