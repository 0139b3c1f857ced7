"""What the client hands back: result dataclasses made from the server's frames, and errors.

Each result is a frozen dataclass with a ``from_frame`` (or ``from_dict``, for what a frame
nests) that reads the frame's fields, tolerating the fields an older server leaves out. A
server ``error`` frame, or a failure the client detects itself, is a :class:`RagwsError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

RequestId = int | str  # this client numbers its requests; the protocol also allows strings
Frame = dict[str, Any]


#: Client-side error codes, beside the server's (bad_request, too_large, overloaded,
#: unsupported, internal, unavailable).
DISCONNECTED = "disconnected"
UNAUTHORIZED = "unauthorized"
CANCELLED = "cancelled"


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
    ocr_architecture: str | None = None  # the OCR model's architecture; None without OCR
    ocr_page_mode: str | None = None  # a page-level model's mode for a whole page

    @classmethod
    def from_frame(cls, frame: Frame) -> Hello:
        ocr = frame.get("ocr") or {}
        return cls(
            version=int(frame.get("version", 0)),
            models=dict(frame.get("models") or {}),
            ocr_modes=tuple(ocr.get("modes") or ()),
            ocr_markup=bool(ocr.get("markup", False)),
            limits=dict(frame.get("limits") or {}),
            ocr_architecture=ocr.get("architecture"),
            ocr_page_mode=ocr.get("page_mode"),
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

    @classmethod
    def from_frame(cls, frame: Frame, received: int) -> PdfSummary:
        """From the ``done`` frame; ``received``: the pages that arrived, if it does not say."""
        return cls(
            finish_reason=frame.get("finish_reason", "stop"),
            pages=frame.get("pages", received),
            page_count=frame.get("page_count"),
            timing=frame.get("timing") or {},
        )


@dataclass(frozen=True, slots=True)
class Token:
    """A piece of OCR text as it is read. Line OCR gives one per line, with its box and score."""

    text: str
    box: list[float] | None = None  # [x0, y0, x1, y1] in the sent image's pixels
    score: float | None = None

    @classmethod
    def from_frame(cls, frame: Frame) -> Token:
        return cls(frame["text"], frame.get("box"), frame.get("score"))


@dataclass(frozen=True, slots=True)
class OcrResult:
    """The end of an ``ocr`` request; ``text`` is the concatenation of its tokens."""

    text: str
    finish_reason: str  # "stop", "length" or "cancelled"
    usage: dict[str, int]  # prompt_tokens, completion_tokens (lines, for line OCR)
    timing: dict[str, float]  # queue_ms, ttft_ms, total_ms

    @classmethod
    def from_frame(cls, frame: Frame, streamed: str) -> OcrResult:
        """From the ``done`` frame; ``streamed``: the tokens' text, if it has none."""
        return cls(
            # A cancelled request's done frame has no text: keep what arrived.
            text=frame.get("text", streamed),
            finish_reason=frame.get("finish_reason", "stop"),
            usage=frame.get("usage") or {},
            timing=frame.get("timing") or {},
        )


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

    @classmethod
    def from_frame(cls, frame: Frame, pages: Iterable[ParsedPage]) -> Document:
        """From the ``done`` frame and the pages that came before it, in any order."""
        return cls(
            finish_reason=frame.get("finish_reason", "stop"),
            markdown=frame.get("markdown", ""),
            chunks=[Chunk.from_dict(c) for c in frame.get("chunks") or ()],
            pages=sorted(pages, key=lambda p: p.page),
            page_count=frame.get("page_count"),
            timing=frame.get("timing") or {},
        )
