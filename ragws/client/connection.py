"""One WebSocket to the server: opening it up to its ``hello``, sending on it, and the requests
in flight on it.

:class:`Connection` is the open socket and the queue of each request sent on it (routing frames
into those queues is :class:`ragws.client.aio.AsyncClient`'s reader); :class:`Call` is one sent
request, read frame by frame.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
import msgpack

from ragws.client.types import (
    DISCONNECTED,
    UNAUTHORIZED,
    Frame,
    Hello,
    RagwsError,
    RequestId,
)


def pack(frame: Frame) -> bytes:
    """A frame as the protocol sends it: msgpack, bytes as bin."""
    return msgpack.packb(frame, use_bin_type=True)


@dataclass(eq=False)
class Connection:
    """One open socket: the hello it began with and the requests in flight on it."""

    ws: aiohttp.ClientWebSocketResponse
    hello: Hello
    pending: dict[RequestId, asyncio.Queue[Frame | RagwsError]] = field(default_factory=dict)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reader: asyncio.Task[None] | None = None
    alive: bool = True
    draining: bool = False  # goaway came: what is in flight finishes, new requests go elsewhere

    @property
    def open(self) -> bool:
        return self.alive and not self.ws.closed

    @property
    def usable(self) -> bool:
        """Open, and fit for new requests."""
        return self.open and not self.draining

    async def send(self, data: bytes) -> None:
        """Send one frame; frames of concurrent requests go one after another."""
        async with self.send_lock:
            await self.ws.send_bytes(data)


@dataclass(eq=False, slots=True)
class Call:
    """A sent request: the frames the reader routes to it arrive on ``queue``."""

    id: RequestId
    conn: Connection
    queue: asyncio.Queue[Frame | RagwsError]

    async def receive(self) -> Frame:
        """The next frame about this request; an ``error`` frame or a drop raises."""
        item = await self.queue.get()
        if isinstance(item, RagwsError):
            raise item
        if item.get("type") == "error":
            raise RagwsError(str(item.get("code")), str(item.get("message")), self.id)
        return item

    def detach(self) -> bool:
        """Stop routing this request's frames; False if it had ended (or was detached) already."""
        return self.conn.pending.pop(self.id, None) is not None


class ConnectFailed(Exception):
    """One connection attempt failed in a way worth retrying."""


async def handshake(
    http: aiohttp.ClientSession,
    url: str,
    *,
    headers: dict[str, str],
    heartbeat: float | None,
    open_timeout: float,
) -> tuple[aiohttp.ClientWebSocketResponse, Hello]:
    """Open a socket to ``url`` and read the server's hello on it.

    Raises :class:`ConnectFailed` when another attempt may succeed, :class:`RagwsError` when it
    will not (a refused key, a wrong URL, a peer that is not a ragws server).
    """
    try:
        ws = await asyncio.wait_for(
            http.ws_connect(
                url,
                headers=headers,
                max_msg_size=0,  # the server bounds what it sends; page images can be large
                heartbeat=heartbeat,
            ),
            open_timeout,
        )
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status in (401, 403):
            raise RagwsError(UNAUTHORIZED, f"{url}: HTTP {exc.status}") from exc
        if 400 <= exc.status < 500:  # a wrong URL: retrying will not help
            raise RagwsError(
                DISCONNECTED, f"{url} refused the WebSocket: HTTP {exc.status}"
            ) from exc
        raise ConnectFailed(f"HTTP {exc.status}") from exc
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        raise ConnectFailed(str(exc) or type(exc).__name__) from exc
    try:
        return ws, await _read_hello(ws, url, open_timeout)
    except BaseException:
        await ws.close()
        raise


async def _read_hello(ws: aiohttp.ClientWebSocketResponse, url: str, open_timeout: float) -> Hello:
    try:
        message = await ws.receive(timeout=open_timeout)
    except asyncio.TimeoutError as exc:
        raise ConnectFailed("no hello frame from the server") from exc
    if message.type is not aiohttp.WSMsgType.BINARY:
        raise ConnectFailed(f"the socket closed before the hello frame ({message.type.name})")
    frame = msgpack.unpackb(message.data, raw=False)
    if not isinstance(frame, dict) or frame.get("type") != "hello":
        raise RagwsError(DISCONNECTED, f"{url} did not begin with a hello frame")
    return Hello.from_frame(frame)
