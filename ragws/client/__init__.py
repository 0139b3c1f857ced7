"""Python client for the ragws WebSocket protocol (docs/protocol.md, usage in docs/client.md).

:class:`AsyncClient` keeps one WebSocket open and multiplexes every request over it: each
request gets a client-generated ``id`` and its own queue, and one reader task hands each
incoming frame to the queue of the request it names. :class:`Client` offers the same operations
with blocking calls, by running an :class:`AsyncClient` on a private event-loop thread.

Results are small dataclasses; a server ``error`` frame becomes :class:`RagwsError`. A dropped
socket fails the requests that were on it with code ``disconnected``, and the next request opens
a new socket, retrying with exponential backoff. This module needs only aiohttp and msgpack.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar

import aiohttp
import msgpack

__all__ = [
    "AsyncClient",
    "Block",
    "Cell",
    "Chunk",
    "ChunkBox",
    "Client",
    "Document",
    "Hello",
    "Layout",
    "ListItem",
    "OcrResult",
    "OcrStream",
    "ParseStream",
    "ParsedPage",
    "PdfPage",
    "PdfStream",
    "PdfSummary",
    "RagwsError",
    "SyncStream",
    "Token",
]

log = logging.getLogger(__name__)

RequestId = int | str  # this client numbers its requests; the protocol also allows strings
Frame = dict[str, Any]
DEFAULT_URL = "ws://127.0.0.1:7088/ws"

#: Client-side error codes, beside the server's (bad_request, too_large, overloaded,
#: unsupported, internal, unavailable).
DISCONNECTED = "disconnected"
UNAUTHORIZED = "unauthorized"
CANCELLED = "cancelled"

# Frames after which the server sends nothing more about a request.
_FINAL_TYPES = frozenset({"done", "error", "layout"})
# Refusals that, after a goaway, mean "not here": the request is sent again elsewhere.
_GONE_ELSEWHERE = frozenset({"overloaded", "unavailable", DISCONNECTED})
# Outcomes of one page range of a split document after which that range is sent again.
_RANGE_RETRIED = frozenset({"overloaded", "unavailable", DISCONNECTED, "shutdown"})


class RagwsError(Exception):
    """A request failed: the server's ``error`` frame, or a condition the client detected.

    ``code`` is one of the protocol's codes (``bad_request``, ``too_large``, ``overloaded``,
    ``unsupported``, ``internal``, ``unavailable``) or one the client adds: ``disconnected``
    (the socket dropped while the request was in flight, or could not be opened),
    ``unauthorized`` (the server refused the handshake with HTTP 401 or 403), and for a
    ``layout`` request that ended without its result the ``done`` frame's reason:
    ``cancelled`` (:meth:`AsyncClient.cancel`), ``timeout`` (still queued at its
    ``deadline_ms``), ``shutdown`` (the server stopped). ``request_id`` is the request's id
    when known.
    """

    def __init__(self, code: str, message: str, request_id: RequestId | None = None) -> None:
        super().__init__(code, message, request_id)
        self.code = code
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """What the server said on connect: its models, what OCR accepts, and its limits."""

    version: int
    models: dict[str, str | None]  # {"layout": name, "ocr": name or None}
    ocr_modes: tuple[str, ...]  # the ``mode`` values ``ocr`` accepts; empty without OCR
    ocr_markup: bool  # whether mode "format" yields markup (GOT-OCR2) or plain text
    limits: dict[str, Any]  # max_pages, max_pdf_bytes, max_frame_bytes, ...

    @classmethod
    def from_frame(cls, frame: Frame) -> Hello:
        ocr = frame.get("ocr") or {}
        return cls(
            version=int(frame.get("version", 0)),
            models=dict(frame.get("models") or {}),
            ocr_modes=tuple(ocr.get("modes") or ()),
            ocr_markup=bool(ocr.get("markup", False)),
            limits=dict(frame.get("limits") or {}),
        )


@dataclass(frozen=True, slots=True)
class Layout:
    """Regions of one image: parallel lists, highest score first; boxes in the image's pixels."""

    width: int
    height: int
    boxes: list[list[float]]  # [x0, y0, x1, y1]
    classes: list[str]
    scores: list[float]
    timing: dict[str, float]  # queue_ms, total_ms

    @classmethod
    def from_frame(cls, frame: Frame) -> Layout:
        return cls(
            width=frame["width"],
            height=frame["height"],
            boxes=frame["boxes"],
            classes=frame["classes"],
            scores=frame["scores"],
            timing=frame.get("timing") or {},
        )


@dataclass(frozen=True, slots=True)
class PdfPage:
    """Regions of one rendered PDF page; boxes in the rendered pixels (``scale`` × points)."""

    page: int  # 0-based
    width: int
    height: int
    boxes: list[list[float]]
    classes: list[str]
    scores: list[float]
    image: bytes | None  # the rendered page as JPEG, when asked for with images=True

    @classmethod
    def from_frame(cls, frame: Frame) -> PdfPage:
        return cls(
            page=frame["page"],
            width=frame["width"],
            height=frame["height"],
            boxes=frame["boxes"],
            classes=frame["classes"],
            scores=frame["scores"],
            image=frame.get("image"),
        )


@dataclass(frozen=True, slots=True)
class PdfSummary:
    """The end of a ``pdf`` request."""

    finish_reason: str  # "stop", or "cancelled"
    pages: int  # pages answered
    page_count: int | None  # pages in the document (None when cancelled)
    timing: dict[str, float]  # total_ms, pages_per_s


@dataclass(frozen=True, slots=True)
class Token:
    """A piece of OCR text as it is read. Line OCR gives one per line, with its box and score."""

    text: str
    box: list[float] | None = None  # [x0, y0, x1, y1] in the sent image's pixels
    score: float | None = None


@dataclass(frozen=True, slots=True)
class OcrResult:
    """The end of an ``ocr`` request; ``text`` is the concatenation of its tokens."""

    text: str
    finish_reason: str  # "stop", "length" or "cancelled"
    usage: dict[str, int]  # prompt_tokens, completion_tokens (lines, for line OCR)
    timing: dict[str, float]  # queue_ms, ttft_ms, total_ms


@dataclass(frozen=True, slots=True)
class ListItem:
    """One item of a ``list`` block: its text, its depth (0 = top) and its marker."""

    text: str
    level: int = 0
    marker: str = "-"  # "-" for a bullet, "1.", "2." ... for a numbered item

    @classmethod
    def from_dict(cls, data: Frame) -> ListItem:
        return cls(
            text=data.get("text", ""), level=data.get("level", 0), marker=data.get("marker", "-")
        )


@dataclass(frozen=True, slots=True)
class Cell:
    """One cell of a ``table`` block, at its 0-based row and column, spanning rows/columns."""

    row: int
    col: int
    row_span: int  # >= 1
    col_span: int  # >= 1
    text: str
    bbox: list[float] | None = None  # in the rendered page's pixels, when known

    @classmethod
    def from_dict(cls, data: Frame) -> Cell:
        return cls(
            row=data.get("row", 0),
            col=data.get("col", 0),
            row_span=data.get("row_span") or 1,
            col_span=data.get("col_span") or 1,
            text=data.get("text", ""),
            bbox=data.get("bbox"),
        )


@dataclass(frozen=True, slots=True)
class Block:
    """One block of a parsed page, with its text; bbox in the rendered page's pixels.

    The fields after ``image`` carry the block's structure; a server that does not send them
    (an older one) leaves them ``None`` or empty.
    """

    type: str  # title, heading, text, list, code, table, equation, figure, caption, ...
    bbox: list[float]
    text: str
    order: int  # position in the page's reading order
    source: str  # "pdf", "ocr" or "none"
    score: float
    image: bytes | None = None  # a figure's crop as JPEG, with figures=True
    markdown: str = ""  # the block's own markdown ("" for furniture left out of it)
    level: int | None = None  # title: 1; heading: 2..6; else None
    items: list[ListItem] = field(default_factory=list)  # a list's items
    html: str | None = None  # a table as <table> markup (text escaped)
    cells: list[Cell] = field(default_factory=list)  # a table's cells

    @classmethod
    def from_dict(cls, data: Frame) -> Block:
        return cls(
            type=data["type"],
            bbox=data["bbox"],
            text=data.get("text", ""),
            order=data.get("order", 0),
            source=data.get("source", "none"),
            score=data.get("score", 0.0),
            image=data.get("image"),
            markdown=data.get("markdown") or "",
            level=data.get("level"),
            items=[ListItem.from_dict(item) for item in data.get("items") or ()],
            html=data.get("html"),
            cells=[Cell.from_dict(cell) for cell in data.get("cells") or ()],
        )


@dataclass(frozen=True, slots=True)
class ParsedPage:
    """One page of a ``parse`` request: its blocks in reading order and its markdown."""

    page: int  # 0-based
    width: int
    height: int
    source: str  # where its text came from: "pdf", "ocr", "mixed" or "none"
    blocks: list[Block]
    markdown: str
    timing: dict[str, float]  # layout_ms, total_ms

    @classmethod
    def from_frame(cls, frame: Frame) -> ParsedPage:
        return cls(
            page=frame["page"],
            width=frame["width"],
            height=frame["height"],
            source=frame.get("source", "none"),
            blocks=[Block.from_dict(b) for b in frame.get("blocks") or ()],
            markdown=frame.get("markdown", ""),
            timing=frame.get("timing") or {},
        )


@dataclass(frozen=True, slots=True)
class ChunkBox:
    """Where a block of a chunk lies."""

    page: int
    bbox: list[float]


@dataclass(frozen=True, slots=True)
class Chunk:
    """A RAG chunk: blocks joined in reading order, with the pages and boxes they came from,
    and the heading path in force at its first block."""

    text: str
    pages: list[int]
    bboxes: list[ChunkBox]
    headings: list[str] = field(default_factory=list)  # outermost first; [] before any

    @classmethod
    def from_dict(cls, data: Frame) -> Chunk:
        return cls(
            text=data["text"],
            pages=list(data.get("pages") or ()),
            bboxes=[ChunkBox(b["page"], b["bbox"]) for b in data.get("bboxes") or ()],
            headings=list(data.get("headings") or ()),
        )


@dataclass(frozen=True, slots=True)
class Document:
    """The end of a ``parse`` request: the document's markdown and chunks, and its pages."""

    finish_reason: str  # "stop", or "cancelled"
    markdown: str
    chunks: list[Chunk]
    pages: list[ParsedPage]  # the pages received, in page order
    page_count: int | None  # pages in the document (1 for an image; None when cancelled)
    timing: dict[str, float]  # total_ms, pages_per_s


# --- one request, one connection ------------------------------------------------------------


@dataclass(eq=False)
class _Connection:
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


@dataclass(eq=False, slots=True)
class _Call:
    """A sent request: the frames the reader routes to it arrive on ``queue``."""

    id: RequestId
    conn: _Connection
    queue: asyncio.Queue[Frame | RagwsError]

    async def receive(self) -> Frame:
        """The next frame about this request; an ``error`` frame or a drop raises."""
        item = await self.queue.get()
        if isinstance(item, RagwsError):
            raise item
        if item.get("type") == "error":
            raise RagwsError(str(item.get("code")), str(item.get("message")), self.id)
        return item


class _ConnectFailed(Exception):
    """One connection attempt failed in a way worth retrying."""


ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class _Stream(Generic[ItemT, ResultT]):
    """A streaming request: iterate its items, then read :attr:`result`.

    The request is sent on the first step of the iteration. Leaving early (``aclose()``, the
    end of an ``async with`` block, or dropping the stream, as ``break`` out of
    ``async for x in client.ocr(...)`` does) cancels it on the server.
    """

    def __init__(self, client: AsyncClient, fields: Frame) -> None:
        self.id: RequestId = client._new_id()
        self._client = client
        self._fields = fields
        self._call: _Call | None = None
        self._ended = False
        self._result: ResultT | None = None
        self._error: RagwsError | None = None

    def __aiter__(self) -> _Stream[ItemT, ResultT]:
        return self

    async def __anext__(self) -> ItemT:
        if self._ended:
            raise StopAsyncIteration
        try:
            if self._call is None:
                self._call, frame = await self._client._start(self.id, self._fields)
            else:
                frame = await self._call.receive()
        except RagwsError as exc:
            self._ended, self._error = True, exc
            raise
        if frame.get("type") == "done":
            self._ended = True
            self._result = self._finish(frame)
            raise StopAsyncIteration
        return self._item(frame)

    @property
    def result(self) -> ResultT:
        """The request's final result; raises its error if it failed."""
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise RuntimeError(f"request {self.id} has not ended: iterate the stream to its end")
        return self._result

    async def aclose(self) -> None:
        """Stop here: the server is told to cancel the request unless it has already ended."""
        was_open = self._call is not None and not self._ended
        self._ended = True
        if was_open:
            await self._client._abandon(self._call)

    async def __aenter__(self) -> _Stream[ItemT, ResultT]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if self._call is not None and not self._ended:
            self._client._abandon_soon(self._call)

    def _item(self, frame: Frame) -> ItemT:
        raise NotImplementedError

    def _finish(self, frame: Frame) -> ResultT:
        raise NotImplementedError


class PdfStream(_Stream[PdfPage, PdfSummary]):
    """Pages of a ``pdf`` request in completion order; :attr:`result` is a :class:`PdfSummary`."""

    def __init__(self, client: AsyncClient, fields: Frame) -> None:
        super().__init__(client, fields)
        self._received = 0

    def _item(self, frame: Frame) -> PdfPage:
        self._received += 1
        return PdfPage.from_frame(frame)

    def _finish(self, frame: Frame) -> PdfSummary:
        return PdfSummary(
            finish_reason=frame.get("finish_reason", "stop"),
            pages=frame.get("pages", self._received),
            page_count=frame.get("page_count"),
            timing=frame.get("timing") or {},
        )


class OcrStream(_Stream[Token, OcrResult]):
    """Tokens of an ``ocr`` request as they are read; :attr:`result` is an :class:`OcrResult`."""

    def __init__(self, client: AsyncClient, fields: Frame) -> None:
        super().__init__(client, fields)
        self._parts: list[str] = []

    def _item(self, frame: Frame) -> Token:
        self._parts.append(frame["text"])
        return Token(frame["text"], frame.get("box"), frame.get("score"))

    def _finish(self, frame: Frame) -> OcrResult:
        return OcrResult(
            # A cancelled request's done frame has no text: keep what arrived.
            text=frame.get("text", "".join(self._parts)),
            finish_reason=frame.get("finish_reason", "stop"),
            usage=frame.get("usage") or {},
            timing=frame.get("timing") or {},
        )


class ParseStream(_Stream[ParsedPage, Document]):
    """Pages of a ``parse`` request in completion order; :attr:`result` is a :class:`Document`."""

    def __init__(self, client: AsyncClient, fields: Frame) -> None:
        super().__init__(client, fields)
        self._pages: list[ParsedPage] = []
        self._frames: list[Frame] = []  # as sent: a document split in ranges is put together

    def _item(self, frame: Frame) -> ParsedPage:
        page = ParsedPage.from_frame(frame)
        self._pages.append(page)
        self._frames.append(frame)
        return page

    def _finish(self, frame: Frame) -> Document:
        return Document(
            finish_reason=frame.get("finish_reason", "stop"),
            markdown=frame.get("markdown", ""),
            chunks=[Chunk.from_dict(c) for c in frame.get("chunks") or ()],
            pages=sorted(self._pages, key=lambda p: p.page),
            page_count=frame.get("page_count"),
            timing=frame.get("timing") or {},
        )


# --- the asyncio client ---------------------------------------------------------------------


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
        self._conn: _Connection | None = None
        self._draining: set[_Connection] = set()  # left after goaway, still finishing requests
        self._siblings: list[AsyncClient] = []  # more connections, for documents split in ranges
        self._hello: Hello | None = None
        self._connect_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # cancel frames sent in the background
        self._closed = False

    @classmethod
    def connect(cls, url: str = DEFAULT_URL, **options: Any) -> _Connecting:
        """Open a client: ``await`` it, or use it as ``async with``. Options as the constructor."""
        return _Connecting(cls(url, **options))

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
    ) -> OcrStream:
        """The text of an image, streamed as it is read; ``box`` crops the image first."""
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
    ) -> str:
        """The whole text of an image (the stream of :meth:`ocr`, drained)."""
        stream = self.ocr(image, mode=mode, max_tokens=max_tokens, box=box, crop=crop)
        async with stream:
            async for _ in stream:
                pass
        return stream.result.text

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
        received = 0
        try:
            async with stream:
                async for page in stream:
                    received += 1
                    if on_page is not None:
                        on_page(page)
        except RagwsError as exc:
            # Over max_pages: split instead of refused (a PDF over max_pdf_bytes stays refused).
            if exc.code != "too_large" or not pdf or received:
                raise
            ranged = await self._split(data, pages, 1, None, fields, on_page)
            if ranged is None:
                raise
            return ranged
        return stream.result

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

        async def parse_range(client: AsyncClient, pages: tuple[int, ...]) -> list[Frame]:
            stream = client.parse(data, pages=pages, style_pages=selected, **fields)
            async with stream:
                async for page in stream:
                    if on_page is not None and page.page not in seen:
                        seen.add(page.page)
                        on_page(page)
            if stream.result.finish_reason != "stop":
                reason = stream.result.finish_reason
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
                    delay = min(self.backoff * 2 ** (tries - 1), self.max_backoff)
                    await asyncio.sleep(delay)
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
        return Document(
            finish_reason="stop",
            markdown=markdown,
            chunks=[Chunk.from_dict(chunk) for chunk in chunks],
            pages=sorted((ParsedPage.from_frame(f) for f in frames), key=lambda p: p.page),
            page_count=frames[0].get("page_count") if frames else None,
            timing={
                "total_ms": round(elapsed * 1000, 3),
                "pages_per_s": round(len(frames) / max(elapsed, 1e-9), 3),
            },
        )

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

    async def _start(self, request_id: RequestId, fields: Frame) -> tuple[_Call, Frame]:
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

    async def _submit(self, request_id: RequestId, fields: Frame) -> _Call:
        """Send one request frame; its replies go to the returned call's queue."""
        frame = {"id": request_id, **{k: v for k, v in fields.items() if v is not None}}
        if self.deadline_ms is not None:
            frame.setdefault("deadline_ms", self.deadline_ms)
        data = msgpack.packb(frame, use_bin_type=True)
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
        call = _Call(request_id, conn, asyncio.Queue())
        conn.pending[request_id] = call.queue  # before sending: the reply may come at once
        try:
            async with conn.send_lock:
                await conn.ws.send_bytes(data)
        except asyncio.CancelledError:
            self._abandon_soon(call)
            raise
        except (aiohttp.ClientError, ConnectionError) as exc:
            conn.pending.pop(request_id, None)
            raise RagwsError(DISCONNECTED, f"the socket dropped: {exc}", request_id) from exc
        return call

    async def _abandon(self, call: _Call) -> None:
        """Stop routing the call's frames; cancel it on the server unless it has ended."""
        if call.conn.pending.pop(call.id, None) is not None:
            await self._send_cancel(call.conn, call.id)

    def _abandon_soon(self, call: _Call) -> None:
        """:meth:`_abandon` from any thread, without waiting (for ``__del__``)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
            loop.call_soon_threadsafe(self._spawn_abandon, call)

    def _spawn_abandon(self, call: _Call) -> None:
        if call.conn.pending.pop(call.id, None) is None:
            return
        task = asyncio.get_running_loop().create_task(self._send_cancel(call.conn, call.id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_cancel(self, conn: _Connection, request_id: RequestId) -> None:
        if not conn.open:
            return  # a closed socket has cancelled everything on it already
        data = msgpack.packb({"type": "cancel", "id": request_id}, use_bin_type=True)
        with contextlib.suppress(aiohttp.ClientError, ConnectionError):
            async with conn.send_lock:
                await conn.ws.send_bytes(data)

    # --- the connection -------------------------------------------------------------------

    async def _connection(self) -> _Connection:
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

    async def _open_with_backoff(self) -> _Connection:
        delay = self.backoff
        failure: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
            try:
                return await self._open_once()
            except _ConnectFailed as exc:
                failure = exc
                log.info("connecting to %s (attempt %d): %s", self.url, attempt + 1, exc)
        raise RagwsError(
            DISCONNECTED,
            f"cannot connect to {self.url} ({self.retries + 1} attempts): {failure}",
        )

    async def _open_once(self) -> _Connection:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        try:
            ws = await asyncio.wait_for(
                self._http.ws_connect(
                    self.url,
                    headers=self._headers,
                    max_msg_size=0,  # the server bounds what it sends; page images can be large
                    heartbeat=self.heartbeat,
                ),
                self.open_timeout,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise RagwsError(UNAUTHORIZED, f"{self.url}: HTTP {exc.status}") from exc
            if 400 <= exc.status < 500:  # a wrong URL: retrying will not help
                raise RagwsError(
                    DISCONNECTED, f"{self.url} refused the WebSocket: HTTP {exc.status}"
                ) from exc
            raise _ConnectFailed(f"HTTP {exc.status}") from exc
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise _ConnectFailed(str(exc) or type(exc).__name__) from exc
        try:
            hello = await self._read_hello(ws)
        except BaseException:
            await ws.close()
            raise
        conn = _Connection(ws, hello)
        conn.reader = asyncio.get_running_loop().create_task(self._read(conn))
        return conn

    async def _read_hello(self, ws: aiohttp.ClientWebSocketResponse) -> Hello:
        try:
            message = await ws.receive(timeout=self.open_timeout)
        except asyncio.TimeoutError as exc:
            raise _ConnectFailed("no hello frame from the server") from exc
        if message.type is not aiohttp.WSMsgType.BINARY:
            raise _ConnectFailed(f"the socket closed before the hello frame ({message.type.name})")
        frame = msgpack.unpackb(message.data, raw=False)
        if not isinstance(frame, dict) or frame.get("type") != "hello":
            raise RagwsError(DISCONNECTED, f"{self.url} did not begin with a hello frame")
        return Hello.from_frame(frame)

    async def _read(self, conn: _Connection) -> None:
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

    def _dispatch(self, conn: _Connection, data: bytes) -> None:
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


class _Connecting:
    """What :meth:`AsyncClient.connect` returns: awaitable, or an async context manager."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    def __await__(self) -> Generator[Any, None, AsyncClient]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncClient:
        return await self._open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.close()

    async def _open(self) -> AsyncClient:
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


# --- the blocking client --------------------------------------------------------------------

T = TypeVar("T")


class Client:
    """The operations of :class:`AsyncClient` as blocking calls, for code without asyncio.

    An :class:`AsyncClient` runs on a private event-loop thread; streams become plain
    iterators (:class:`SyncStream`). Use it as a context manager, or call :meth:`close`.
    Do not call it from inside a running event loop: it would block that loop.
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
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ragws-client", daemon=True
        )
        self._thread.start()
        self._async = AsyncClient(
            url,
            api_key=api_key,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            open_timeout=open_timeout,
            deadline_ms=deadline_ms,
            heartbeat=heartbeat,
        )
        try:
            self._run(_Connecting(self._async)._open())
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def connect(cls, url: str = DEFAULT_URL, **options: Any) -> Client:
        """A connected client; options as :class:`AsyncClient`."""
        return cls(url, **options)

    @property
    def hello(self) -> Hello:
        return self._async.hello

    @property
    def url(self) -> str:
        return self._async.url

    def close(self) -> None:
        """Close the socket and stop the client's thread."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._async.close())
        finally:
            self._stop_loop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def layout(
        self, image: bytes, *, conf: float | None = None, iou: float | None = None
    ) -> Layout:
        return self._run(self._async.layout(image, conf=conf, iou=iou))

    def pdf(
        self,
        data: bytes,
        *,
        pages: Sequence[int] | None = None,
        scale: float = 2.0,
        images: bool = False,
        conf: float | None = None,
        iou: float | None = None,
    ) -> SyncStream[PdfPage, PdfSummary]:
        stream = self._async.pdf(data, pages=pages, scale=scale, images=images, conf=conf, iou=iou)
        return SyncStream(self, stream)

    def ocr(
        self,
        image: bytes,
        *,
        mode: str = "format",
        max_tokens: int | None = None,
        box: Sequence[float] | None = None,
        crop: bool = False,
        ignore_eos: bool = False,
    ) -> SyncStream[Token, OcrResult]:
        stream = self._async.ocr(
            image, mode=mode, max_tokens=max_tokens, box=box, crop=crop, ignore_eos=ignore_eos
        )
        return SyncStream(self, stream)

    def ocr_text(
        self,
        image: bytes,
        *,
        mode: str = "format",
        max_tokens: int | None = None,
        box: Sequence[float] | None = None,
        crop: bool = False,
    ) -> str:
        return self._run(
            self._async.ocr_text(image, mode=mode, max_tokens=max_tokens, box=box, crop=crop)
        )

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
    ) -> SyncStream[ParsedPage, Document]:
        stream = self._async.parse(
            data,
            pages=pages,
            text=text,
            chunk_chars=chunk_chars,
            scale=scale,
            figures=figures,
            furniture=furniture,
        )
        return SyncStream(self, stream)

    def parse_document(
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
        """As :meth:`AsyncClient.parse_document`; ``on_page`` runs on the client's thread."""
        return self._run(
            self._async.parse_document(
                data,
                pages=pages,
                text=text,
                chunk_chars=chunk_chars,
                scale=scale,
                figures=figures,
                furniture=furniture,
                connections=connections,
                pages_per_request=pages_per_request,
                on_page=on_page,
            )
        )

    def cancel(self, request_id: RequestId) -> bool:
        return self._run(self._async.cancel(request_id))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the client's loop and wait for it; an interrupt cancels it."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class SyncStream(Generic[ItemT, ResultT]):
    """A stream of :class:`Client`: iterate it, then read :attr:`result`.

    Leaving early (``close()``, the end of a ``with`` block, or dropping it) cancels the
    request on the server, as with the async streams.
    """

    def __init__(self, client: Client, stream: _Stream[ItemT, ResultT]) -> None:
        self._client = client
        self._stream = stream

    @property
    def id(self) -> RequestId:
        return self._stream.id

    @property
    def result(self) -> ResultT:
        return self._stream.result

    def __iter__(self) -> SyncStream[ItemT, ResultT]:
        return self

    def __next__(self) -> ItemT:
        more, item = self._client._run(_step(self._stream))
        if not more:
            raise StopIteration
        return item  # type: ignore[return-value]

    def close(self) -> None:
        if not self._client._loop.is_closed():
            self._client._run(self._stream.aclose())

    def __enter__(self) -> SyncStream[ItemT, ResultT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _step(stream: _Stream[ItemT, ResultT]) -> tuple[bool, ItemT | None]:
    # StopAsyncIteration is turned into a flag: a future should not carry it across threads.
    try:
        return True, await stream.__anext__()
    except StopAsyncIteration:
        return False, None
