"""The parse pipeline: PDF or image → layout → text of each region → blocks, markdown, chunks.

For every page, concurrently up to a window of pages per document:

1. **render** the page (pymupdf, on the PDF thread) or take the sent image;
2. **layout** through the shared dynamic batcher (the same queue as ``layout``/``pdf`` requests);
3. **text** for each region, from one of two sources:

   * ``pdf`` — the page's own text layer, the words whose centre lies in the region;
   * ``ocr`` — the OCR backend reads the regions. Text-like regions (text, titles, captions,
     headers, footers, references, lists) are read as plain text; tables and equations in
     ``format`` mode when the backend produces markup (GOT-OCR2), else plain. Figures are not
     read: they become a block with their bbox (and, when asked, their crop as JPEG).

   ``text="auto"`` takes the PDF's text where a region has any and OCRs the rest (a scanned
   page, a figure of text, a region drawn as vector paths); with GOT-OCR2, tables and equations
   go to OCR even on born-digital pages, because its markup beats a flattened text layer.
   All regions of all pages of all clients share the OCR batches (line recognition batches for
   the embedded backend, the running batch for GOT-OCR2);
4. **assemble**: reading order, markdown, and at the end RAG chunks (:mod:`ragws.assemble`).

Pages are yielded as they complete; cancelling the consumer cancels every page task of the
request, which withdraws its queued layout pages and OCR lines or sequences.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .assemble import (
    FURNITURE,
    Block,
    Chunk,
    area,
    chunk_blocks,
    document_markdown,
    normalize_label,
    overlap,
    page_markdown,
    reading_order,
    title_levels,
)
from .documents import decode_image, encode_jpeg
from .layout import LayoutService, PdfPlan
from .metrics import Metrics
from .ocr import OcrBackend
from .protocol import ErrorCode, ParseRequest, RequestError
from .window import windowed

Box = tuple[float, float, float, float]
Word = tuple[float, float, float, float, str, int, int, int]

#: Region types OCR'd in ``format`` mode when the backend produces markup.
MARKUP_TYPES = frozenset({"table", "equation"})
#: Region types that are never read: their content is not text.
UNREAD_TYPES = frozenset({"figure"})
#: A block this much inside another is part of it, not a block of its own.
CONTAINED = 0.8
#: Types whose line breaks are layout, not content (hyphenated breaks are joined).
PROSE_TYPES = frozenset(
    {"text", "title", "figure_caption", "table_caption", "table_footnote", "equation_caption"}
    | {"reference", "header", "footer", "abandon"}
)
_BROKEN_WORD = re.compile(r"([^\W\d_])-\n([a-z]\S*)")


@dataclass(slots=True)
class ParsedPage:
    page: int  # 0-based
    width: int
    height: int
    blocks: list[Block]  # in reading order
    markdown: str
    source: str  # where the page's text came from: pdf, ocr, mixed, none
    layout_ms: float = 0.0
    total_ms: float = 0.0
    pages: int = 1  # pages the request parses, and pages in the document: known from the
    page_count: int = 1  # first frame on, for placeholders and progress

    def to_frame(self, request_id: object) -> dict:
        return {
            "type": "page",
            "id": request_id,
            "page": self.page,
            "pages": self.pages,
            "page_count": self.page_count,
            "width": self.width,
            "height": self.height,
            "blocks": [block.to_dict() for block in self.blocks],
            "markdown": self.markdown,
            "source": self.source,
            "timing": {"layout_ms": round(self.layout_ms, 3), "total_ms": round(self.total_ms, 3)},
        }


@dataclass(slots=True)
class ParsedDocument:
    """What the ``done`` frame carries, built from every page once all are parsed."""

    pages: list[ParsedPage] = field(default_factory=list)
    markdown: str = ""
    chunks: list[Chunk] = field(default_factory=list)
    page_count: int = 1


class ParseService:
    def __init__(
        self,
        layout: LayoutService,
        ocr: OcrBackend | None,
        metrics: Metrics,
        pool: ThreadPoolExecutor,
        *,
        max_image_pixels: int,
        pages_in_flight: int = 4,
    ) -> None:
        self.layout = layout
        self.ocr = ocr
        self.metrics = metrics
        self._pool = pool
        self._max_pixels = max_image_pixels
        self.pages_in_flight = pages_in_flight

    async def parse(self, request: ParseRequest) -> AsyncIterator[ParsedPage | ParsedDocument]:
        """Yield each page as it completes (any order), then the whole document."""
        if request.text == "ocr" and self.ocr is None:
            raise RequestError(
                ErrorCode.UNSUPPORTED,
                "text 'ocr' needs an OCR model; this server runs with --ocr-model none",
            )
        done: list[ParsedPage] = []
        page_count = 1
        if request.is_pdf:
            plan = await self.layout.open_pdf(request.document, request.pages)
            page_count = plan.doc.page_count
            try:
                # Closed explicitly: an abandoned async generator would keep its page tasks
                # running until garbage collection.
                async with contextlib.aclosing(self._pdf_pages(plan, request)) as pages:
                    async for page in pages:
                        page.pages, page.page_count = len(plan.pages), page_count
                        done.append(page)
                        yield page
            finally:
                await self.layout.close_pdf(plan)
        else:
            started = time.monotonic()
            rgb = await self._run(decode_image, request.document, self._max_pixels)
            page = await self._page(rgb, 0, None, request, started)
            done.append(page)
            yield page
        done.sort(key=lambda p: p.page)
        pages_blocks = [p.blocks for p in done]
        yield ParsedDocument(
            pages=done,
            markdown=document_markdown(pages_blocks, include_furniture=request.furniture),
            chunks=chunk_blocks(
                pages_blocks, request.chunk_chars, include_furniture=request.furniture
            ),
            page_count=page_count,
        )

    # --- pages ----------------------------------------------------------------------------

    def _pdf_pages(self, plan: PdfPlan, request: ParseRequest) -> AsyncIterator[ParsedPage]:
        # Pages run concurrently so that their layout and OCR work batches, within a window so
        # that a long document holds few rendered pages at once, and its first pages finish
        # (and stream) first instead of every page finishing near the end.
        async def one(page: int) -> ParsedPage:
            started = time.monotonic()
            rgb = await self.layout.render_page(plan, page, request.scale)
            words = None
            if request.text != "ocr":
                words = await self.layout.page_words(plan, page)
            return await self._page(rgb, page, words, request, started)

        return windowed(plan.pages, one, self.pages_in_flight)

    async def _page(
        self,
        rgb: np.ndarray,
        page: int,
        words: list[Word] | None,
        request: ParseRequest,
        started: float,
    ) -> ParsedPage:
        height, width = rgb.shape[:2]
        layout = await self.layout.detect_array(rgb, page, started)
        layout_ms = (time.monotonic() - started) * 1000
        det = layout.detections
        blocks = [
            Block(
                type=normalize_label(label),
                bbox=tuple(float(v) for v in box),  # type: ignore[arg-type]
                page=page,
                score=float(score),
            )
            for box, label, score in zip(det.boxes, det.labels, det.scores, strict=True)
        ]
        blocks = drop_contained(blocks)
        pixel_words = scale_words(words or [], request.scale) if request.text != "ocr" else []
        fallback = not blocks
        if fallback:
            # Layout found nothing (a blank page, or a page unlike any it was trained on):
            # read the page as one block rather than lose its text.
            blocks = [Block(type="text", bbox=(0.0, 0.0, float(width), float(height)), page=page)]
        await self._fill_text(rgb, blocks, pixel_words, request)
        if fallback and not blocks[0].text:
            blocks = []
        if request.figures:
            await self._attach_figures(rgb, blocks)
        ordered = reading_order(blocks, width, height)
        sources = {b.source for b in ordered if b.source != "none"}
        source = sources.pop() if len(sources) == 1 else ("mixed" if sources else "none")
        self.metrics.parse_pages_total.labels(source).inc()
        return ParsedPage(
            page=page,
            width=width,
            height=height,
            blocks=ordered,
            # On the first page the document title is a level-1 heading, as in the document's
            # markdown; later pages cannot know, and use level 2 for every title.
            markdown=page_markdown(
                ordered,
                include_furniture=request.furniture,
                title_level=title_levels([ordered]) if page == 0 else None,
            ),
            source=source,
            layout_ms=layout_ms,
            total_ms=(time.monotonic() - started) * 1000,
        )

    async def _fill_text(
        self, rgb: np.ndarray, blocks: list[Block], words: list[Word], request: ParseRequest
    ) -> None:
        markup = self.ocr is not None and self.ocr.markup
        pdf_texts = assign_words(words, [b.bbox for b in blocks]) if words else [""] * len(blocks)
        to_ocr: list[Block] = []
        for block, pdf_text in zip(blocks, pdf_texts, strict=True):
            if block.type in UNREAD_TYPES:
                continue
            prefer_ocr = request.text == "ocr" or (markup and block.type in MARKUP_TYPES)
            if pdf_text and not prefer_ocr:
                block.text, block.source = pdf_text, "pdf"
            elif request.text != "pdf" and self.ocr is not None:
                to_ocr.append(block)
        if to_ocr:
            assert self.ocr is not None
            modes = ["format" if markup and b.type in MARKUP_TYPES else "plain" for b in to_ocr]
            texts = await self.ocr.read_regions(rgb, [b.bbox for b in to_ocr], modes)
            for block, text in zip(to_ocr, texts, strict=True):
                block.text, block.source = text.strip(), "ocr"
        for block in blocks:
            if block.type in PROSE_TYPES:
                block.text = dehyphenate(block.text)

    async def _attach_figures(self, rgb: np.ndarray, blocks: Sequence[Block]) -> None:
        for block in blocks:
            if block.type == "figure":
                x0, y0, x1, y1 = (round(v) for v in block.bbox)
                crop = np.ascontiguousarray(rgb[max(0, y0) : y1, max(0, x0) : x1])
                if crop.size:
                    block.image = await self._run(encode_jpeg, crop)

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


# --- pure helpers -------------------------------------------------------------------------------


def scale_words(words: Sequence[Word], scale: float) -> list[Word]:
    """Text-layer words from PDF points to the rendered page's pixels."""
    return [
        (w[0] * scale, w[1] * scale, w[2] * scale, w[3] * scale, w[4], w[5], w[6], w[7])
        for w in words
    ]


def assign_words(words: Sequence[Word], boxes: Sequence[Box]) -> list[str]:
    """The text of each box from text-layer words: a word belongs to the smallest box holding
    its centre (so overlapping regions never repeat it); lines keep the PDF's own order."""
    owned: list[list[Word]] = [[] for _ in boxes]
    for word in words:
        if not word[4].strip():
            continue
        owner = smallest_holder(((word[0] + word[2]) / 2, (word[1] + word[3]) / 2), boxes)
        if owner is not None:
            owned[owner].append(word)
    texts = []
    for mine in owned:
        lines: dict[tuple[int, int], list[Word]] = {}
        for w in mine:
            lines.setdefault((w[5], w[6]), []).append(w)
        ordered = sorted(
            lines.values(), key=lambda ws: (min(w[1] for w in ws), min(w[0] for w in ws))
        )
        line_text = (" ".join(w[4] for w in sorted(ws, key=lambda w: w[7])) for ws in ordered)
        texts.append("\n".join(line_text))
    return texts


def smallest_holder(point: tuple[float, float], boxes: Sequence[Box]) -> int | None:
    """Index of the smallest box containing ``point``, or None."""
    x, y = point
    holding = [(area(b), i) for i, b in enumerate(boxes) if b[0] <= x <= b[2] and b[1] <= y <= b[3]]
    return min(holding)[1] if holding else None


def dehyphenate(text: str) -> str:
    """Join words broken across lines by a hyphen: "cap-" + "ture" → "capture", but "end-" +
    "to-end" → "end-to-end" (a continuation with a hyphen of its own is a compound)."""

    def join(match: re.Match[str]) -> str:
        rest = match.group(2)
        return match.group(1) + ("-" if "-" in rest else "") + rest

    return _BROKEN_WORD.sub(join, text)


def drop_contained(blocks: list[Block]) -> list[Block]:
    """Resolve overlapping regions, which layout models report across classes.

    * A block mostly inside a table or figure is part of it (cell text, axis labels): dropped,
      except captions, headers and footers.
    * Of two other blocks where one lies mostly inside the other, the inner one is dropped:
      its text is the outer one's (e.g. a "title" and a "text" box around the same heading;
      of two near-identical boxes a title is kept, else the higher-scoring one).
    """
    # Twins are decided in this order: a short region seen as both "title" and "text" is
    # almost always a heading, otherwise the more confident box wins.
    order = sorted(range(len(blocks)), key=lambda i: (blocks[i].type != "title", -blocks[i].score))
    kept_ids: set[int] = set()
    for i in order:
        block = blocks[i]
        if block.type in ("table", "figure"):
            kept_ids.add(id(block))
            continue
        exempt = block.type.endswith("_caption") or block.type in FURNITURE
        inside = False
        for other in blocks:
            if other is block or overlap(block.bbox, other.bbox) < CONTAINED * area(block.bbox):
                continue
            container = other.type in ("table", "figure")
            if container and not exempt:
                inside = True
            elif not container and (id(other) in kept_ids or area(other.bbox) > area(block.bbox)):
                # Inside a larger block, or a near-twin of a higher-scoring one already kept.
                inside = True
            if inside:
                break
        if not inside:
            kept_ids.add(id(block))
    return [b for b in blocks if id(b) in kept_ids]
