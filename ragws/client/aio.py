"""The asyncio client: :class:`AsyncClient` and its connection handling.

One WebSocket is kept open and every request is multiplexed over it: each request gets a
client-generated ``id`` and its own queue, and one reader task hands each incoming frame to the
queue of the request it names. A dropped socket fails the requests that were on it with code
``disconnected``, and the next request opens a new socket, retrying with exponential backoff. A
server going away (``goaway``) keeps its socket for what is in flight on it; new requests, and
those it refuses, go on a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Generator, Sequence
from types import TracebackType
from typing import Any

import aiohttp
import msgpack

from ragws.client.connection import Call, ConnectFailed, Connection, handshake, pack
from ragws.client.streams import OcrStream, ParseStream, PdfStream, drain
from ragws.client.types import (
    CANCELLED,
    DISCONNECTED,
    Document,
    Frame,
    Hello,
    Layout,
    ParsedPage,
    RagwsError,
    RequestId,
)

# The package's name, not this module's: the client logs as one component.
log = logging.getLogger("ragws.client")

DEFAULT_URL = "ws://127.0.0.1:7088/ws"

# Frames after which the server sends nothing more about a request.
_FINAL_TYPES = frozenset({"done", "error", "layout"})
# Refusals that, after a goaway, mean "not here": the request is sent again elsewhere.
_GONE_ELSEWHERE = frozenset({"overloaded", "unavailable", DISCONNECTED})
# Outcomes of one page range of a split document after which that range is sent again.
_RANGE_RETRIED = frozenset({"overloaded", "unavailable", DISCONNECTED, "shutdown"})


class AsyncClient:
    """One WebSocket to a ragws server, shared by every request made through it.

    Open it with ``async with AsyncClient.connect(url) as client`` or
    ``client = await AsyncClient.connect(url)`` (then ``await client.close()``). Requests may be
    made from many tasks at once. When the socket drops, the requests on it raise
    :class:`RagwsError` with code ``disconnected`` and the next request reconnects: up to
    ``retries`` more attempts after the first, waiting ``backoff`` seconds and doubling up to
    ``max_backoff`` between them.

    ``api_key`` is sent as ``Authorization: Bearer <key>`` on every handshake.
    ``deadline_ms`` goes with every request: one still queued that long after it reached the
    server ends with ``timeout`` (a stream's result says ``finish_reason == "timeout"``).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        retries: int = 4,
        backoff: float = 0.25,
        max_backoff: float = 4.0,
        open_timeout: float = 30.0,
        heartbeat: float | None = 30.0,
        deadline_ms: float | None = None,
    ) -> None:
        if retries < 0 or backoff < 0 or max_backoff < backoff or open_timeout <= 0:
            raise ValueError("need retries >= 0, 0 <= backoff <= max_backoff, open_timeout > 0")
        if deadline_ms is not None and deadline_ms <= 0:
            raise ValueError("deadline_ms must be positive")
        self.url = url
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.open_timeout = open_timeout
        self.heartbeat = heartbeat  # ping interval; a server silent for half of it is dropped
        self.deadline_ms = deadline_ms
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._options: dict[str, Any] = dict(
            api_key=api_key,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            open_timeout=open_timeout,
            heartbeat=heartbeat,
            deadline_ms=deadline_ms,
        )
        self._ids = itertools.count(1)
        self._http: aiohttp.ClientSession | None = None
        self._conn: Connection | None = None
        self._draining: set[Connection] = set()  # left after goaway, still finishing requests
        self._siblings: list[AsyncClient] = []  # more connections, for documents split in ranges
        self._hello: Hello | None = None
        self._connect_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # cancel frames sent in the background
        self._closed = False

    @classmethod
    def connect(cls, url: str = DEFAULT_URL, **options: Any) -> Connecting:
        """Open a client: ``await`` it, or use it as ``async with``. Options as the constructor."""
        return Connecting(cls(url, **options))

    async def open(self) -> AsyncClient:
        """Open the socket now (requests open it when needed) and read the server's hello."""
        await self._connection()
        return self

    @property
    def hello(self) -> Hello:
        """The hello of the latest connection: models, OCR modes and markup, limits."""
        if self._hello is None:
            raise RuntimeError("not connected yet: use AsyncClient.connect(url)")
        return self._hello

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.usable

    async def close(self) -> None:
        """Close the socket; requests still in flight raise ``disconnected``."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        siblings, self._siblings = self._siblings, []
        await asyncio.gather(*(sibling.close() for sibling in siblings))
        conns = [self._conn, *self._draining]
        self._conn = None
        self._draining.clear()
        for conn in conns:
            if conn is not None:
                await conn.ws.close()
                if conn.reader is not None:
                    await asyncio.gather(conn.reader, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> AsyncClient:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- operations -----------------------------------------------------------------------

    async def layout(
        self, image: bytes, *, conf: float | None = None, iou: float | None = None
    ) -> Layout:
        """Regions of one page image (PNG, JPEG, WebP, TIFF, BMP or GIF bytes)."""
        frame = await self._unary({"type": "layout", "image": image, "conf": conf, "iou": iou})
        return Layout.from_frame(frame)

    def pdf(
        self,
        data: bytes,
        *,
        pages: Sequence[int] | None = None,
        scale: float = 2.0,
        images: bool = False,
        conf: float | None = None,
        iou: float | None = None,
    ) -> PdfStream:
        """Layout of every page (or of ``pages``, 0-based), streamed as pages finish."""
        return PdfStream(
            self,
            {
                "type": "pdf",
                "pdf": data,
                "pages": _page_list(pages),
                "scale": scale,
                "images": images,
                "conf": conf,
                "iou": iou,
            },
        )

    def ocr(
        self,
        image: bytes,
        *,
        mode: str = "format",
        max_tokens: int | None = None,
        box: Sequence[float] | None = None,
        crop: bool = False,
        ignore_eos: bool = False,
        prompt: str | None = None,
    ) -> OcrStream:
        """The text of an image, streamed as it is read; ``box`` crops the image first.
        ``mode`` is one of the model's tasks (``hello.ocr_modes``); ``prompt`` replaces the
        task's instruction, for a VLM."""
        return OcrStream(
            self,
            {
                "type": "ocr",
                "image": image,
                "mode": mode,
                "max_tokens": max_tokens,
                "box": None if box is None else [float(v) for v in box],
                "crop": crop,
                "ignore_eos": ignore_eos,
                "prompt": prompt,
            },
        )

    async def ocr_text(
        self,
        image: bytes,
        *,
        mode: str = "format",
        max_tokens: int | None = None,
        box: Sequence[float] | None = None,
        crop: bool = False,
        prompt: str | None = None,
    ) -> str:
        """The whole text of an image (the stream of :meth:`ocr`, drained)."""
        stream = self.ocr(
            image, mode=mode, max_tokens=max_tokens, box=box, crop=crop, prompt=prompt
        )
        return (await drain(stream)).text

    def parse(
        self,
        data: bytes,
        *,
        pages: Sequence[int] | None = None,
        text: str = "auto",
        chunk_chars: int = 1500,
        scale: float = 2.0,
        figures: bool = False,
        furniture: bool = False,
        style_pages: Sequence[int] | None = None,
    ) -> ParseStream:
        """A PDF (bytes starting with ``%PDF-``) or an image to blocks, markdown and chunks.

        Pages stream as they finish; the stream's :attr:`~ParseStream.result` is the
        :class:`Document`. ``text``: ``auto`` (the PDF's text layer, OCR where it has none),
        ``pdf`` or ``ocr``. ``pages`` applies to a PDF only. ``style_pages``: the pages whose
        text decides the document's style (title, headings, running headers), when ``pages``
        is one range of a larger selection; None: ``pages`` themselves.
        """
        return ParseStream(
            self,
            {
                "type": "parse",
                ("pdf" if is_pdf(data) else "image"): data,
                "pages": _page_list(pages),
                "text": text,
                "chunk_chars": chunk_chars,
                "scale": scale,
                "figures": figures,
                "furniture": furniture,
                "style_pages": _page_list(style_pages),
            },
        )

    async def parse_document(
        self,
        data: bytes,
        *,
        pages: Sequence[int] | None = None,
        text: str = "auto",
        chunk_chars: int = 1500,
        scale: float = 2.0,
        figures: bool = False,
        furniture: bool = False,
        connections: int = 1,
        pages_per_request: int | None = None,
        on_page: Callable[[ParsedPage], object] | None = None,
    ) -> Document:
        """The parsed document (the stream of :meth:`parse`, drained).

        A PDF can go as page ranges of ``pages_per_request`` pages over ``connections``
        sockets (through a load balancer: to several replicas), and is split so by itself when
        it has more pages than the server's ``max_pages``. The pages are put back in order, and
        the markdown and chunks are those of a parse of the whole over one socket
        (:mod:`ragws.client.split`). A range whose socket drops, or that a server going away refuses
        or ends with ``shutdown``, is sent again (only that range). ``on_page`` is called
        with each page as it first arrives (for progress).
        """
        if connections < 1:
            raise ValueError(f"connections must be ≥ 1, got {connections}")
        fields: Frame = dict(
            text=text, chunk_chars=chunk_chars, scale=scale, figures=figures, furniture=furniture
        )
        pdf = is_pdf(data)
        if pdf and (connections > 1 or pages_per_request is not None):
            ranged = await self._split(data, pages, connections, pages_per_request, fields, on_page)
            if ranged is not None:
                return ranged
        elif pdf and pages is not None:
            await self._connection()  # its hello says max_pages
            if len(pages) > self._max_pages():
                ranged = await self._split(data, pages, 1, None, fields, on_page)
                if ranged is not None:
                    return ranged
        stream = self.parse(data, pages=pages, **fields)
        try:
            return await drain(stream, on_page)
        except RagwsError as exc:
            # Over max_pages: split instead of refused (a PDF over max_pdf_bytes stays refused).
            if exc.code != "too_large" or not pdf or stream._received:
                raise
            ranged = await self._split(data, pages, 1, None, fields, on_page)
            if ranged is None:
                raise
            return ranged

    def _max_pages(self) -> int:
        return int(self.hello.limits.get("max_pages") or 0) or 2**31

    async def _split(
        self,
        data: bytes,
        pages: Sequence[int] | None,
        connections: int,
        pages_per_request: int | None,
        fields: Frame,
        on_page: Callable[[ParsedPage], object] | None,
    ) -> Document | None:
        """The document parsed in page ranges; None when one request will do (it fits one
        range, or its pages cannot be counted here: the server then says what is wrong)."""
        # pymupdf and the server's assembly: only for split documents
        from ragws.client import split

        await self._connection()
        selected = list(pages) if pages is not None else None
        if selected is None:
            count = await asyncio.to_thread(split.pdf_page_count, data)
            if count is None:
                return None
            selected = list(range(count))
        per = split.pages_per_request(
            len(selected), connections, pages_per_request, self._max_pages()
        )
        if len(selected) <= per:
            return None
        ranges = split.page_ranges(selected, per)
        return await self._parse_ranges(data, selected, ranges, connections, fields, on_page)

    async def _parse_ranges(
        self,
        data: bytes,
        selected: list[int],
        ranges: list[tuple[int, ...]],
        connections: int,
        fields: Frame,
        on_page: Callable[[ParsedPage], object] | None,
    ) -> Document:
        """Parse ``ranges`` of ``selected`` over ``connections`` sockets, one range at a time
        on each, and put the document together."""
        from ragws.client import split

        started = time.monotonic()
        todo: asyncio.Queue[tuple[int, ...] | None] = asyncio.Queue()
        for pages in ranges:
            todo.put_nowait(pages)
        finished: dict[tuple[int, ...], list[Frame]] = {}
        failures: dict[tuple[int, ...], int] = {}
        seen: set[int] = set()
        workers = min(connections, len(ranges))
        clients = [self, *await self._more_connections(workers - 1)]

        def first_arrival(page: ParsedPage) -> None:
            if on_page is not None and page.page not in seen:
                seen.add(page.page)
                on_page(page)

        async def parse_range(client: AsyncClient, pages: tuple[int, ...]) -> list[Frame]:
            stream = client.parse(data, pages=pages, style_pages=selected, **fields)
            reason = (await drain(stream, first_arrival)).finish_reason
            if reason != "stop":
                raise RagwsError(reason, f"pages {list(pages)} ended early ({reason})", stream.id)
            return stream._frames

        async def work(client: AsyncClient) -> None:
            while (pages := await todo.get()) is not None:
                try:
                    finished[pages] = await parse_range(client, pages)
                except RagwsError as exc:
                    failures[pages] = tries = failures.get(pages, 0) + 1
                    if exc.code not in _RANGE_RETRIED or tries > self.retries:
                        raise
                    log.info("pages %s: %s; sent again", list(pages), exc)
                    todo.put_nowait(pages)  # another connection may take it meanwhile
                    await asyncio.sleep(self._backoff_delay(tries))
                    continue
                if len(finished) == len(ranges):
                    for _ in clients:
                        todo.put_nowait(None)

        tasks = [asyncio.ensure_future(work(client)) for client in clients]
        try:
            await asyncio.gather(*tasks)
        finally:  # a range failed for good (or the caller gave up): the others stop too
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        frames = [frame for pages in ranges for frame in finished[pages]]
        markdown, chunks = split.assemble(
            frames, chunk_chars=fields["chunk_chars"], furniture=fields["furniture"]
        )
        elapsed = time.monotonic() - started
        done: Frame = {  # as the done frame of a parse of the whole would have it
            "finish_reason": "stop",
            "markdown": markdown,
            "chunks": chunks,
            "page_count": frames[0].get("page_count") if frames else None,
            "timing": {
                "total_ms": round(elapsed * 1000, 3),
                "pages_per_s": round(len(frames) / max(elapsed, 1e-9), 3),
            },
        }
        return Document.from_frame(done, (ParsedPage.from_frame(f) for f in frames))

    async def _more_connections(self, count: int) -> list[AsyncClient]:
        """``count`` more clients of the same server, each with its own socket, kept open for
        the next split document."""
        while len(self._siblings) < count:
            self._siblings.append(AsyncClient(self.url, **self._options))
        siblings = self._siblings[:count]
        await asyncio.gather(*(sibling.open() for sibling in siblings))
        return siblings

    async def cancel(self, request_id: RequestId) -> bool:
        """Ask the server to stop a request (a stream's ``id``); False if it is not in flight.

        The stream then ends normally, its result's ``finish_reason`` being ``"cancelled"``.
        """
        for conn in (self._conn, *self._draining):
            if conn is not None and request_id in conn.pending:
                await self._send_cancel(conn, request_id)
                return True
        return False

    # --- requests -------------------------------------------------------------------------

    def _new_id(self) -> int:
        return next(self._ids)

    async def _unary(self, fields: Frame) -> Frame:
        """Send a request answered by one frame, and wait for that frame."""
        call, frame = await self._start(self._new_id(), fields)
        if frame.get("type") == "done":  # ended without its result: cancel, deadline, shutdown
            reason = frame.get("finish_reason", CANCELLED)
            raise RagwsError(reason, f"the request ended without a result ({reason})", call.id)
        return frame

    async def _start(self, request_id: RequestId, fields: Frame) -> tuple[Call, Frame]:
        """Send a request and wait for its first frame.

        A request refused by a server that is going away (a ``goaway`` frame on its socket,
        then ``overloaded`` or ``unavailable``, or the socket closed with no answer) did no
        work there, and is sent again on a new connection, which a load balancer gives to
        another replica."""
        for attempt in itertools.count():
            call = await self._submit(request_id, fields)
            try:
                return call, await call.receive()
            except RagwsError as exc:
                moved = call.conn.draining and exc.code in _GONE_ELSEWHERE
                if not moved or attempt >= self.retries:
                    raise
                log.info("request %s refused by a server going away: sent again", request_id)
            except asyncio.CancelledError:
                self._abandon_soon(call)
                raise
        raise AssertionError("unreachable")

    async def _submit(self, request_id: RequestId, fields: Frame) -> Call:
        """Send one request frame; its replies go to the returned call's queue."""
        frame = {"id": request_id, **{k: v for k, v in fields.items() if v is not None}}
        if self.deadline_ms is not None:
            frame.setdefault("deadline_ms", self.deadline_ms)
        data = pack(frame)
        conn = await self._connection()
        limit = conn.hello.limits.get("max_frame_bytes")
        if isinstance(limit, int) and len(data) > limit:
            # The server would close the socket (1009), failing every request on it.
            raise RagwsError(
                "too_large",
                f"the request frame is {len(data)} bytes, over the server's "
                f"max_frame_bytes ({limit})",
                request_id,
            )
        call = Call(request_id, conn, asyncio.Queue())
        conn.pending[request_id] = call.queue  # before sending: the reply may come at once
        try:
            await conn.send(data)
        except asyncio.CancelledError:
            self._abandon_soon(call)
            raise
        except (aiohttp.ClientError, ConnectionError) as exc:
            call.detach()
            raise RagwsError(DISCONNECTED, f"the socket dropped: {exc}", request_id) from exc
        return call

    async def _abandon(self, call: Call) -> None:
        """Stop routing the call's frames; cancel it on the server unless it has ended."""
        if call.detach():
            await self._send_cancel(call.conn, call.id)

    def _abandon_soon(self, call: Call) -> None:
        """:meth:`_abandon` from any thread, without waiting (for ``__del__``)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
            loop.call_soon_threadsafe(self._spawn_abandon, call)

    def _spawn_abandon(self, call: Call) -> None:
        if not call.detach():
            return
        task = asyncio.get_running_loop().create_task(self._send_cancel(call.conn, call.id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_cancel(self, conn: Connection, request_id: RequestId) -> None:
        if not conn.open:
            return  # a closed socket has cancelled everything on it already
        data = pack({"type": "cancel", "id": request_id})
        with contextlib.suppress(aiohttp.ClientError, ConnectionError):
            await conn.send(data)

    # --- the connection -------------------------------------------------------------------

    async def _connection(self) -> Connection:
        """The open connection, opening one (with backoff) when there is none."""
        if self._closed:
            raise RuntimeError("the client is closed")
        self._loop = asyncio.get_running_loop()
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        async with self._connect_lock:  # one reconnect serves every waiting request
            conn = self._conn
            if conn is not None and conn.usable:
                return conn
            conn = await self._open_with_backoff()
            if self._closed:
                await conn.ws.close()
                raise RuntimeError("the client is closed")
            old = self._conn
            if old is not None and old.open:  # draining: it closes once its requests end
                self._draining.add(old)
            self._conn, self._hello = conn, conn.hello
            return conn

    def _backoff_delay(self, attempt: int) -> float:
        """Seconds before retry ``attempt`` (1, 2, ...): ``backoff``, doubled each time up to
        ``max_backoff``."""
        # The exponent is capped: 2 ** 1024 no longer converts to a float.
        return min(self.backoff * 2 ** min(attempt - 1, 1000), self.max_backoff)

    async def _open_with_backoff(self) -> Connection:
        failure: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff_delay(attempt))
            try:
                return await self._open_once()
            except ConnectFailed as exc:
                failure = exc
                log.info("connecting to %s (attempt %d): %s", self.url, attempt + 1, exc)
        raise RagwsError(
            DISCONNECTED,
            f"cannot connect to {self.url} ({self.retries + 1} attempts): {failure}",
        )

    async def _open_once(self) -> Connection:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        ws, hello = await handshake(
            self._http,
            self.url,
            headers=self._headers,
            heartbeat=self.heartbeat,
            open_timeout=self.open_timeout,
        )
        conn = Connection(ws, hello)
        conn.reader = asyncio.get_running_loop().create_task(self._read(conn))
        return conn

    async def _read(self, conn: Connection) -> None:
        """Route every frame to the request it names, until the socket closes."""
        ws = conn.ws
        try:
            async for message in ws:
                if message.type is aiohttp.WSMsgType.BINARY:
                    self._dispatch(conn, message.data)
                elif message.type is aiohttp.WSMsgType.ERROR:
                    log.info("socket to %s: %s", self.url, ws.exception())
                    break
        finally:
            conn.alive = False
            if self._closed:
                reason = "the client was closed"
            else:
                reason = f"the socket to {self.url} closed (code {ws.close_code})"
            for request_id, queue in conn.pending.items():
                queue.put_nowait(RagwsError(DISCONNECTED, reason, request_id))
            conn.pending.clear()
            self._draining.discard(conn)
            if not ws.closed:
                await ws.close()

    def _dispatch(self, conn: Connection, data: bytes) -> None:
        try:
            frame = msgpack.unpackb(data, raw=False)
        except Exception:  # msgpack raises many types; one bad frame must not stop the reader
            log.warning("unreadable frame from %s", self.url)
            return
        if not isinstance(frame, dict):
            return
        if frame.get("type") == "goaway":
            log.info(
                "%s is going away (%s): new requests go on a new connection",
                self.url,
                frame.get("reason"),
            )
            conn.draining = True
            return
        request_id = frame.get("id")
        queue = conn.pending.get(request_id) if isinstance(request_id, (int, str)) else None
        if queue is None:
            # Frames of abandoned requests land here, as does an error about a frame the
            # server could not read far enough to find its id.
            if frame.get("type") == "error" and request_id is None:
                log.warning("error from %s: %s", self.url, frame.get("message"))
            return
        if frame.get("type") in _FINAL_TYPES:
            del conn.pending[request_id]
        queue.put_nowait(frame)


class Connecting:
    """What :meth:`AsyncClient.connect` returns: awaitable, or an async context manager."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    def __await__(self) -> Generator[Any, None, AsyncClient]:
        return self.open().__await__()

    async def __aenter__(self) -> AsyncClient:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.close()

    async def open(self) -> AsyncClient:
        """Open the client; one that fails to open is closed."""
        try:
            return await self._client.open()
        except BaseException:
            await self._client.close()  # the caller never gets the client to close it
            raise


def is_pdf(data: bytes) -> bool:
    """PDFs start with ``%PDF-``; the server tells documents apart by the same rule."""
    return data[:5] == b"%PDF-"


def _page_list(pages: Sequence[int] | None) -> list[int] | None:
    return None if pages is None else [int(p) for p in pages]
