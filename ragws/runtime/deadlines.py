"""Per-request deadlines: a request still queued when its deadline passes ends with "timeout".

A client may give a request ``deadline_ms``. The deadline covers the time the request waits:
decoding and rendering its input, the batchers' queues, a free KV-cache slot. The moment any
of its work reaches a model (a layout or OCR batch takes one of its pages or lines, or the OCR
engine admits its sequence) the deadline is disarmed and the request runs to its end, as with
Triton's queue policy: work a model has started is never thrown away for being late.

Expiry is structural, like a cancel: the timer cancels the request's task, which withdraws its
queued work wherever it waits, and :func:`deadline_scope` turns that cancellation into
:class:`DeadlineExceeded`. The batchers and the OCR engine see only items, not requests; they
find the request's :class:`Deadline` in a context variable, which the request's task and every
task it starts carry, so no call in between has to pass it along.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Iterator

#: Longest deadline a request may ask for.
MAX_DEADLINE_MS = 24 * 3600 * 1000


class DeadlineExceeded(Exception):
    """The request was still queued when its deadline passed."""


class Deadline:
    """A timer that cancels ``task`` unless :meth:`started` is called first."""

    def __init__(self, task: asyncio.Task, seconds: float) -> None:
        self._task = task
        self._loop = task.get_loop()
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(
            max(0.0, seconds), self._expire
        )
        self.expired = False

    def started(self) -> None:
        """The request's work reached a model: the deadline no longer applies (event loop)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def started_threadsafe(self) -> None:
        """:meth:`started`, from another thread (the OCR engine's)."""
        self._loop.call_soon_threadsafe(self.started)

    def _expire(self) -> None:
        self._handle = None
        self.expired = True
        self._task.cancel()


current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "ragws_deadline", default=None
)


@contextlib.contextmanager
def deadline_scope(seconds: float | None) -> Iterator[Deadline | None]:
    """Run the block under a deadline of ``seconds`` (None: no deadline).

    Must be entered in the request's own task. Raises :class:`DeadlineExceeded` out of the
    block when the deadline cancelled it; any other cancellation passes through.
    """
    if seconds is None:
        yield None
        return
    task = asyncio.current_task()
    assert task is not None, "deadline_scope needs a running task"
    deadline = Deadline(task, seconds)
    token = current.set(deadline)
    try:
        yield deadline
    except asyncio.CancelledError:
        if not deadline.expired:
            raise
        if hasattr(task, "uncancel"):  # Python ≥ 3.11 counts cancellations
            task.uncancel()  # the cancellation was ours, and ends here
        raise DeadlineExceeded(
            f"still queued after its deadline of {seconds * 1000:.0f} ms"
        ) from None
    finally:
        deadline.started()  # disarm: the block is over either way
        current.reset(token)
