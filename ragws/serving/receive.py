"""Bytes held for what is still arriving: one budget across all clients, a time limit per frame.

aiohttp's WebSocket reader keeps the received part of a frame in memory until the frame is
complete, bounded per socket by ``max_frame_bytes`` and by nothing across sockets: 20 sockets
that each send most of a 90 MB frame and stall hold 1.8 GB. Here every socket's reader is
watched by a :class:`FrameMeter`, which follows the frame headers on the wire (a few bytes per
frame; the payload is never copied or parsed) and counts the bytes of the message in progress
against one :class:`ReceiveBudget` (``max_receive_buffer_mb``):

* a message that grows past :data:`SMALL_MESSAGE_BYTES` while the budget is spent closes its
  socket with 1013 (try again later): the sender of a large frame is refused, while small
  frames (requests for one page, cancels) always go through, so a flood of stalled uploads
  cannot lock out other clients;
* a message not complete ``frame_timeout_s`` after its first byte closes its socket with 1008,
  which returns its bytes to the budget.

HTTP bodies take their ``Content-Length`` from the same budget while they are read
(:meth:`ReceiveBudget.reserve`).

The meter sits between aiohttp's connection and its WebSocket reader (both private to
aiohttp; see :class:`BoundedWebSocketResponse`): the least invasive place that sees every byte
as it arrives, without a reader of our own. glibc keeps freed memory in its arenas, so once a
socket that held a large message ends, :func:`schedule_trim` asks it to return them to the
system.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

log = logging.getLogger(__name__)

#: Messages up to this size never wait for the budget: every socket may hold this much of one,
#: as the kernel holds its socket buffers, so that small requests pass while large uploads are
#: refused.
SMALL_MESSAGE_BYTES = 1024 * 1024
#: How long a socket closed for its frames has to read the close frame before it is cut.
CLOSE_LINGER_S = 2.0

_DATA_OPCODES = (0x0, 0x1, 0x2)  # continuation, text, binary; the others are control frames


class ReceiveBudget:
    """Bytes held across all connections for messages and bodies not yet complete."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @property
    def spent(self) -> bool:
        return self.held >= self.limit

    def add(self, size: int) -> None:
        self.held += size

    def release(self, size: int) -> None:
        self.held -= size

    def try_reserve(self, size: int) -> bool:
        """Take ``size`` bytes if they fit (a size up to SMALL_MESSAGE_BYTES always does)."""
        if size > SMALL_MESSAGE_BYTES and self.held + size > self.limit:
            return False
        self.held += size
        return True

    @contextlib.contextmanager
    def reserved(self, size: int) -> Iterator[None]:
        """Hold ``size`` bytes (already taken by :meth:`try_reserve`) until the block ends."""
        try:
            yield
        finally:
            self.release(size)


class FrameMeter:
    """Stands in for one connection's aiohttp ``WebSocketReader``: follows the frame headers,
    counts the bytes of the message in progress against the budget, times it, and passes
    every byte on unchanged."""

    def __init__(
        self,
        reader: Any,
        budget: ReceiveBudget,
        frame_timeout_s: float,
        on_violation: Callable[[WSCloseCode, str], None],
    ) -> None:
        self._reader = reader  # aiohttp's WebSocketReader
        self._budget = budget
        self._timeout_s = frame_timeout_s
        self._on_violation = on_violation
        self._head = b""  # a frame header split across reads
        self._remaining = 0  # payload bytes of the current frame still to come
        self._data_frame = False  # the current frame carries message data
        self._fin = False  # ... and is the message's last
        self._open = False  # a message has begun and is not complete
        self.held = 0  # bytes of the message in progress
        self.peak = 0  # the largest message held, for the caller's information
        self._timer: asyncio.TimerHandle | None = None
        self.failed = False

    # aiohttp's protocol calls these two, as it would the reader's.

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.scan(data)
        if self.failed or self._reader is None:
            return False, b""  # the socket is being closed: what it still sends is dropped
        return self._reader.feed_data(data)

    def feed_eof(self) -> None:
        """The connection is gone: its bytes are no longer held."""
        self.failed = True
        self._release()
        if self._reader is not None:
            self._reader.feed_eof()
            self._reader = None  # let the reader's buffers go with the connection

    def scan(self, data: bytes) -> None:
        """Account for ``data`` (bytes as they arrived) without looking into payloads."""
        pos, end = 0, len(data)
        while pos < end:
            if self._remaining:
                n = min(self._remaining, end - pos)
                self._remaining -= n
                pos += n
                if self._data_frame and not self.failed:
                    self._grow(n)
                if not self._remaining:
                    self._frame_done()
                continue
            take = min(end - pos, 14 - len(self._head))
            head = self._head + data[pos : pos + take]
            size = _header_size(head)
            if size is None or len(head) < size:
                self._head = head
                pos += take
                continue
            pos += size - len(self._head)
            self._head = b""
            self._start_frame(head[:size])
        if self._open and self._timer is None and not self.failed:
            self._timer = asyncio.get_running_loop().call_later(self._timeout_s, self._expired)

    def _start_frame(self, head: bytes) -> None:
        opcode = head[0] & 0x0F
        length = head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(head[2:4], "big")
        elif length == 127:
            length = int.from_bytes(head[2:10], "big")
        self._remaining = length
        self._data_frame = opcode in _DATA_OPCODES
        if self.failed:
            return
        if self._data_frame:
            self._fin = bool(head[0] & 0x80)
            self._open = True
        if not self._remaining:
            self._frame_done()

    def _grow(self, n: int) -> None:
        self.held += n
        self._budget.add(n)
        self.peak = max(self.peak, self.held)
        if self.held > SMALL_MESSAGE_BYTES and self._budget.held > self._budget.limit:
            mib = self._budget.limit / 2**20
            self._fail(
                WSCloseCode.TRY_AGAIN_LATER,
                f"the server is receiving {mib:.0f} MiB of large frames already "
                "(max_receive_buffer_mb); send this one again later",
            )

    def _frame_done(self) -> None:
        if self._data_frame and self._fin:  # the message is complete: the reader hands it on
            self._release()

    def _release(self) -> None:
        self._open = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.held:
            self._budget.release(self.held)
            self.held = 0

    def _expired(self) -> None:
        self._timer = None
        if self._open and not self.failed:
            self._fail(
                WSCloseCode.POLICY_VIOLATION,
                f"a frame was not complete {self._timeout_s:g} s after it began (frame_timeout_s)",
            )

    def _fail(self, code: WSCloseCode, message: str) -> None:
        """Stop passing bytes on and have the socket closed; what it holds stays counted
        until the connection is gone (the reader keeps it until then)."""
        self.failed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._on_violation(code, message)


def _header_size(head: bytes) -> int | None:
    """Bytes of the frame header starting ``head``, once its second byte is known."""
    if len(head) < 2:
        return None
    length = head[1] & 0x7F
    extra = 2 if length == 126 else 8 if length == 127 else 0
    return 2 + extra + (4 if head[1] & 0x80 else 0)


class BoundedWebSocketResponse(web.WebSocketResponse):
    """A ``WebSocketResponse`` whose incoming bytes are metered by a :class:`FrameMeter`.

    The meter is put in place in ``_post_start``, synchronously where aiohttp hands the
    connection its reader, so no byte reaches the reader unseen (those that came with the
    handshake are scanned as well). If a future aiohttp moves these internals, the socket
    still works, bounded by ``max_frame_bytes`` alone, and a warning says so.
    """

    def __init__(self, *, budget: ReceiveBudget, frame_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._budget = budget
        self._frame_timeout_s = frame_timeout_s
        self.meter: FrameMeter | None = None
        self.violation: tuple[WSCloseCode, str] | None = None
        self._refusal: asyncio.Future[None] | None = None

    def _post_start(self, request: web.BaseRequest, protocol: Any, writer: Any) -> None:
        connection = request.protocol
        tail = getattr(connection, "_message_tail", b"")
        super()._post_start(request, protocol, writer)
        reader = getattr(connection, "_payload_parser", None)
        if reader is None:
            log.warning("this aiohttp version hides its WebSocket reader: no receive budget")
            return
        self.meter = FrameMeter(reader, self._budget, self._frame_timeout_s, self._violated)
        connection._payload_parser = self.meter
        if tail:
            self.meter.scan(tail)

    def _violated(self, code: WSCloseCode, message: str) -> None:
        """Close the socket with ``code`` and ``message`` (see :meth:`refused`)."""
        self.violation = (code, message)
        log.info("closing a WebSocket (%d): %s", code, message)
        transport = self._req.transport if self._req is not None else None
        if transport is not None:
            # Read no more of what it sends: its sends block, so that it gets to read the
            # close frame, and the server spends nothing on bytes it would drop.
            transport.pause_reading()
        self._refusal = asyncio.ensure_future(self._refuse(code, message))

    async def _refuse(self, code: WSCloseCode, message: str) -> None:
        # Not close(): it would wait for the client's answer to the close, which sits behind
        # the rest of its frame, and then cut a connection whose client is still sending,
        # which resets it before the client has read why.
        deadline = asyncio.get_running_loop().time() + CLOSE_LINGER_S
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.close(code, message.encode()), CLOSE_LINGER_S)
        self._closed = True  # what aiohttp's own close() sets first, with no more heartbeats
        getattr(self, "_cancel_heartbeat", lambda: None)()
        self._exception = ConnectionError(f"closed ({code}): {message}")
        if self._reader is not None:  # ends the session's receive()
            self._reader.feed_data(WSMessage(WSMsgType.ERROR, self._exception, None), 0)
        await asyncio.sleep(max(0.0, deadline - asyncio.get_running_loop().time()))
        transport = self._req.transport if self._req is not None else None
        if transport is not None:
            transport.abort()
        self._parser = None  # what aiohttp's close() does last: the reader holds the bytes

    async def refused(self) -> None:
        """Wait until a refused socket's connection is cut: :data:`CLOSE_LINGER_S` after its
        close frame, time for the client to read it. The handler must not return before,
        or the connection would be closed while the client is still sending, which resets
        it before the client has read why."""
        if self._refusal is not None:
            await asyncio.gather(self._refusal, return_exceptions=True)


_libc: Any = None
_trim_pending = False


def schedule_trim(delay_s: float = 0.5) -> None:
    """Give freed memory back to the system soon: once for any number of calls within
    ``delay_s``, so that 20 sockets closing together cost one trim after the last."""
    global _trim_pending
    if _trim_pending:
        return
    _trim_pending = True
    loop = asyncio.get_running_loop()

    def trim() -> None:
        global _trim_pending
        _trim_pending = False
        loop.run_in_executor(None, give_back_memory)

    loop.call_later(delay_s, trim)


def give_back_memory() -> None:
    """Ask glibc to return freed heap memory to the system (``malloc_trim``); a no-op
    elsewhere. Large frames arrive in many reads of up to 256 KiB, which glibc serves from
    its heap and keeps after they are freed."""
    global _libc
    if _libc is None:
        _libc = False
        name = ctypes.util.find_library("c")
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(name) if name else None
            if libc is not None:
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                _libc = libc
    if _libc:
        _libc.malloc_trim(0)
