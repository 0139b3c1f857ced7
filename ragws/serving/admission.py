"""Global admission control: a hard cap on in-flight requests, refused at once beyond it.

Requests are never queued here. A request that would exceed ``max_concurrent`` is answered
``overloaded`` (HTTP 429) immediately, so the only queues in the server are the model
batchers', and they are bounded by this cap.
"""

from __future__ import annotations

import asyncio

from prometheus_client import Counter, Gauge


class Admission:
    def __init__(self, max_concurrent: int, inflight: Gauge, rejected: Counter) -> None:
        self.max_concurrent = max_concurrent
        self.inflight = 0
        self._gauge = inflight
        self._rejected = rejected
        self.draining = False  # shutting down: admit nothing new
        self._idle = asyncio.Event()
        self._idle.set()

    def try_acquire(self) -> bool:
        """Take a slot if one is free; event-loop only, so no lock is needed."""
        if self.draining or self.inflight >= self.max_concurrent:
            self._rejected.inc()
            return False
        self.inflight += 1
        self._idle.clear()
        self._gauge.set(self.inflight)
        return True

    def release(self) -> None:
        self.inflight -= 1
        self._gauge.set(self.inflight)
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight, at most ``timeout`` seconds; True if it came."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def overloaded_message(self) -> str:
        if self.draining:
            return "the server is shutting down; retry on another instance"
        return f"server is at capacity ({self.max_concurrent} requests in flight); retry later"
