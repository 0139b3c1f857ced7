"""A WebSocket's send queue: bounded, written by one task, watched for a client that stalls.

Every frame for a socket goes through its :class:`Outbox`. Request tasks :meth:`~Outbox.put`
encoded frames; one writer task takes them in order and writes them to the socket, so frames
of different requests interleave but never tear. While the queue holds ``limit`` bytes or
more, ``put`` waits: the request that wanted to send pauses where it is, and resumes as the
client reads. Nothing is dropped for a client that is slow but reading.

A write that waits ``stall_timeout_s`` for the client means it has stopped reading; the
outbox then calls ``on_stall`` (the session closes the socket with 1008 and cancels its
requests).

Why a writer task rather than each request writing under a lock: aiohttp's flow control
shares one drain waiter per connection, and cancelling a task blocked in it (a request's
cancel, deadline or socket close) cancels that waiter for every later write until the client
reads again. Here only the writer waits on it, and it is cancelled only when the socket is
done.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from aiohttp import web


class Outbox:
    def __init__(
        self,
        ws: web.WebSocketResponse,
        *,
        limit: int,
        stall_timeout_s: float,
        on_stall: Callable[[], None],
    ) -> None:
        self._ws = ws
        self._limit = limit
        self._stall_timeout_s = stall_timeout_s
        self._on_stall = on_stall
        self._frames: deque[bytes] = deque()
        self._queued = 0  # bytes in _frames
        self._writing = 0  # bytes of the frame being written
        self.closed = False
        self._ready = asyncio.Event()  # frames to write
        self._room = asyncio.Event()  # queued_bytes is under the limit
        self._room.set()
        self._idle = asyncio.Event()  # nothing queued or in writing
        self._idle.set()
        self._writer = asyncio.create_task(self._write_forever(), name="ragws-outbox")

    @property
    def queued_bytes(self) -> int:
        """Bytes not yet handed to the connection, the frame in writing included."""
        return self._queued + self._writing

    async def put(self, data: bytes) -> None:
        """Queue one frame; wait while the queue is full. Frames put after :meth:`discard`
        (or :meth:`stop`) are dropped: the socket is going away."""
        while self.queued_bytes >= self._limit and not self.closed:
            self._room.clear()
            await self._room.wait()
        if self.closed:
            return
        self._frames.append(data)
        self._queued += len(data)
        self._idle.clear()
        self._ready.set()

    async def flush(self, timeout: float) -> bool:
        """Wait until everything queued is written, at most ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def discard(self) -> None:
        """Drop what is queued and accept nothing more (the frame in writing completes)."""
        self.closed = True
        self._frames.clear()
        self._queued = 0
        self._room.set()  # releases waiting put()s, which then drop their frames

    def close(self) -> None:
        """Discard, and cancel the writer (without waiting for it to end)."""
        self.discard()
        self._writer.cancel()
        self._idle.set()

    async def stop(self) -> None:
        """Discard, and end the writer."""
        self.close()
        await asyncio.gather(self._writer, return_exceptions=True)

    async def _write_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._frames:
                self._idle.set()
                self._ready.clear()
                await self._ready.wait()
                continue
            data = self._frames.popleft()
            self._queued -= len(data)
            self._writing = len(data)
            watchdog = loop.call_later(self._stall_timeout_s, self._on_stall)
            try:
                # A peer gone mid-write is noticed (and cleaned up) by the session's reader.
                with contextlib.suppress(ConnectionError):
                    await self._ws.send_bytes(data)
            finally:
                watchdog.cancel()
                self._writing = 0
            if self.queued_bytes < self._limit:
                self._room.set()
