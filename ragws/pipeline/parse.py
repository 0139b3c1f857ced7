"""The parse pipeline: PDF or image → layout → lines → blocks, markdown, chunks.

For a PDF, the text layer of every selected page is read first (lines with their fonts, in the
document workers, pages in parallel) and the document's style decided from all of it: body
size, heading styles, the title, running headers and footers
(:func:`ragws.pipeline.structure.analyze`). Then for every page, concurrently up to a window of
pages per document:

1. **render** the page (pymupdf, in a document worker) or take the sent image;
2. **layout** through the shared dynamic batcher (the same queue as ``layout``/``pdf`` requests);
3. **lines** from one of two sources:

   * ``pdf`` — the page's own text layer;
   * ``ocr`` — the OCR backend: the embedded line OCR reads every line of the page (detection
     once per page, recognition batched across clients); an element-level VLM (GOT-OCR2,
     MinerU2.5, PaddleOCR-VL) reads each region with its kind's task (tables and equations
     come back as markup); a page-level VLM (olmOCR-2, Nanonets-OCR2, RolmOCR) reads the page
     whole, and its markdown becomes the page's blocks (:mod:`ragws.pipeline.vlm_pages`);

   ``text="auto"`` takes the text layer where the page has one, OCRs regions that have no text
   in it (a figure of text, a region drawn as paths), and OCRs pages without a text layer;
4. **tables**: pymupdf's table finder inside each table region of a born-digital page, else
   the table-structure model on the region's crop with the words already read;
5. **blocks** (:func:`ragws.pipeline.structure.build_blocks`): every line in exactly one block,
   typed by its region and its typography, in reading order; markdown per block
   (:mod:`ragws.pipeline.markdown`); at the end the document's markdown and its RAG chunks
   (:mod:`ragws.pipeline.chunks`).

Pages are yielded as they complete; cancelling the consumer cancels every page task of the
request, which withdraws its queued layout pages, OCR lines or sequences and table crops.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from ragws.errors import ErrorCode, RequestError, bad_request
from ragws.metrics import Metrics
from ragws.models.orientation import rotate
from ragws.pipeline.blocks import Block
from ragws.pipeline.chunks import Chunk, chunk_blocks
from ragws.pipeline.document_service import DocumentService, PdfPlan
from ragws.pipeline.documents import PdfDocument, encode_jpeg
from ragws.pipeline.geometry import BBox
from ragws.pipeline.geometry import scale as scale_box
from ragws.pipeline.layout import LayoutService
from ragws.pipeline.markdown import document_markdown, page_markdown, set_markdown
from ragws.pipeline.ocr.backend import OcrBackend
from ragws.pipeline.structure import (
    DocumentStyle,
    PageInput,
    Region,
    analyze,
    assign_lines,
    build_blocks,
    mark_repeated_furniture,
    page_style,
    region_kind,
    regions_without_text,
    resolve_regions,
    retype_tabular_regions,
    ruled_tables,
)
from ragws.pipeline.textlayer import Line, Shapes, ocr_line
from ragws.pipeline.vlm_pages import page_blocks, strip_front_matter
from ragws.runtime.tasks import in_pool
from ragws.runtime.window import windowed

if TYPE_CHECKING:
    from ragws.pipeline.table_service import OrientationService, TableStructureService
    from ragws.pipeline.tables import Table

#: Region kinds whose text is read when the text layer has none for them.
READ_KINDS = frozenset({"text", "title", "list", "caption", "footnote", "header", "footer"})
#: Document styles kept for the page ranges still to come (``style_pages``).
STYLES_KEPT = 8
#: Region kinds GOT-OCR2 reads in ``format`` mode (markup), when the backend has markup.


@dataclass(frozen=True, slots=True)
class ParseOptions:
    """How to parse one document: the pipeline's side of a parse request, whichever API it
    came on (a WebSocket frame, a ``POST /parse`` form, the client's split ranges)."""

    is_pdf: bool = True  # else an image
    pages: tuple[int, ...] | None = None  # 0-based; None: every page
    text: str = "auto"  # where block text comes from: auto, ocr, pdf
    chunk_chars: int = 1500  # target size of a RAG chunk
    scale: float = 2.0  # PDF render scale; bboxes are in the rendered pixels
    figures: bool = False  # attach each figure's crop as JPEG
    furniture: bool = False  # keep headers and footers in the markdown and chunks
    # Pages whose text layer decides the document's style; None: the selected pages.
    style_pages: tuple[int, ...] | None = None


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


@dataclass(slots=True)
class ParsedDocument:
    """What the ``done`` frame carries, built from every page once all are parsed."""

    pages: list[ParsedPage] = field(default_factory=list)
    markdown: str = ""
    chunks: list[Chunk] = field(default_factory=list)
    page_count: int = 1


@dataclass(slots=True)
class TextLayer:
    """A PDF's text layer, read once per request: lines and drawn shapes per page (points)."""

    lines: dict[int, list[Line]] = field(default_factory=dict)
    shapes: dict[int, Shapes] = field(default_factory=dict)
    style: DocumentStyle = field(default_factory=DocumentStyle)


class ParseService:
    def __init__(
        self,
        documents: DocumentService,
        layout: LayoutService,
        ocr: OcrBackend | None,
        metrics: Metrics,
        pool: ThreadPoolExecutor,
        *,
        pages_in_flight: int = 4,
        tables: TableStructureService | None = None,
        orientation: OrientationService | None = None,
    ) -> None:
        """``tables`` reads the grid of tables that have no text layer to find it from;
        ``orientation`` rights scanned pages turned by 90, 180 or 270 degrees before layout."""
        self.documents = documents
        self.layout = layout
        self.ocr = ocr
        self.tables = tables
        self.orientation = orientation
        self.metrics = metrics
        self._pool = pool
        self.pages_in_flight = pages_in_flight
        self._styles: collections.OrderedDict[tuple[bytes, tuple[int, ...]], DocumentStyle] = (
            collections.OrderedDict()
        )

    async def parse(
        self, document: bytes, options: ParseOptions
    ) -> AsyncIterator[ParsedPage | ParsedDocument]:
        """Yield each page of ``document`` (a PDF's bytes, or an image's) as it completes, in
        any order, then the whole document."""
        if options.text == "ocr" and self.ocr is None:
            raise RequestError(
                ErrorCode.UNSUPPORTED,
                "text 'ocr' needs an OCR model; this server runs with --ocr-model none",
            )
        done: list[ParsedPage] = []
        page_count = 1
        if options.is_pdf:
            plan = await self.documents.open_pdf(document, options.pages)
            page_count = plan.doc.page_count
            try:
                layer = TextLayer()
                if options.text != "ocr":
                    layer = await self._read_text_layer(plan, options, document)
                # Closed explicitly: an abandoned async generator would keep its page tasks
                # running until garbage collection.
                async with contextlib.aclosing(self._pdf_pages(plan, layer, options)) as pages:
                    async for page in pages:
                        page.pages, page.page_count = len(plan.pages), page_count
                        done.append(page)
                        yield page
            finally:
                await self.documents.close_pdf(plan)
        else:
            started = time.monotonic()
            rgb = await self.documents.decode_image(document)
            page = await self._page(rgb, 0, [], None, None, options, started, None)
            done.append(page)
            yield page
        done.sort(key=lambda p: p.page)
        if mark_repeated_furniture([(p.height, p.blocks) for p in done]):
            for page in done:
                set_markdown(page.blocks)
                page.markdown = page_markdown(page.blocks, include_furniture=options.furniture)
        pages_blocks = [p.blocks for p in done]
        yield ParsedDocument(
            pages=done,
            markdown=document_markdown(pages_blocks, include_furniture=options.furniture),
            chunks=chunk_blocks(
                pages_blocks, options.chunk_chars, include_furniture=options.furniture
            ),
            page_count=page_count,
        )

    # --- pages ----------------------------------------------------------------------------

    def _pdf_pages(
        self, plan: PdfPlan, layer: TextLayer, options: ParseOptions
    ) -> AsyncIterator[ParsedPage]:
        # Pages run concurrently so that their layout and OCR work batches, within a window so
        # that a long document holds few rendered pages at once, and its first pages finish
        # (and stream) first instead of every page finishing near the end.
        scale = options.scale

        async def one(page: int) -> ParsedPage:
            started = time.monotonic()
            rgb = await self.documents.render_page(plan, page, scale)
            lines = [line.scaled(scale) for line in layer.lines.get(page, ())]
            drawn = layer.shapes.get(page) or Shapes([], [])
            shapes = Shapes(
                [scale_box(b, scale, scale) for b in drawn.bullets],
                [scale_box(g, scale, scale) for g in drawn.grids],
            )
            style = layer.style if lines else None
            return await self._page(rgb, page, lines, shapes, style, options, started, plan)

        return windowed(plan.pages, one, self.pages_in_flight)

    async def _page(
        self,
        rgb: np.ndarray,
        page: int,
        lines: list[Line],
        shapes: Shapes | None,
        style: DocumentStyle | None,
        options: ParseOptions,
        started: float,
        plan: PdfPlan | None,
    ) -> ParsedPage:
        scan = not lines and options.text != "pdf" and self.ocr is not None
        if scan and self.orientation is not None:
            angle = await self.orientation.angle(rgb)
            if angle:
                rgb = await in_pool(self._pool, rotate, rgb, angle)
        height, width = rgb.shape[:2]
        if scan and self.ocr is not None and self.ocr.page_mode is not None:
            return await self._read_whole_page(rgb, page, options, started)
        layout = await self.layout.detect_array(rgb, page, started)
        layout_ms = (time.monotonic() - started) * 1000
        det = layout.detections
        regions = resolve_regions(
            [
                Region(region_kind(label), tuple(float(v) for v in box), float(score))  # type: ignore[arg-type]
                for box, label, score in zip(det.boxes, det.labels, det.scores, strict=True)
            ]
        )
        if shapes is not None:
            regions.extend(ruled_tables(regions, shapes.grids))
        texts: dict[int, str] = {}
        if scan:
            lines, texts = await self._ocr_page(rgb, regions)
            style = page_style(lines, page, height) if lines else DocumentStyle()
            retype_tabular_regions(regions, lines)
        elif lines and options.text == "auto" and self.ocr is not None:
            texts = await self._ocr_regions_without_text(rgb, regions, lines)
        tables = await self._tables(rgb, regions, lines, plan, page, options.scale)
        blocks = build_blocks(
            PageInput(
                page=page,
                width=width,
                height=height,
                regions=regions,
                lines=lines,
                style=style or DocumentStyle(),
                bullets=shapes.bullets if shapes is not None else [],
                tables=tables,
                texts=texts,
            )
        )
        set_markdown(blocks)
        return await self._finish(rgb, blocks, page, options, started, layout_ms)

    async def _read_whole_page(
        self, rgb: np.ndarray, page: int, options: ParseOptions, started: float
    ) -> ParsedPage:
        """A page without a text layer, read whole by a page-level model: its markdown, as
        blocks (:mod:`ragws.pipeline.vlm_pages`). No layout: the model finds the structure."""
        assert self.ocr is not None and self.ocr.page_mode is not None
        height, width = rgb.shape[:2]
        whole = (0.0, 0.0, float(width), float(height))
        (markdown,) = await self.ocr.read_regions(rgb, [whole], [self.ocr.page_mode])
        # Each block's markdown is the model's own (page_blocks sets it). Its figures have no
        # place on the page to crop, so none gets an image, whatever ``figures`` asks.
        blocks = page_blocks(markdown, page, width, height)
        return await self._finish(rgb, blocks, page, replace(options, figures=False), started)

    async def _finish(
        self,
        rgb: np.ndarray,
        blocks: list[Block],
        page: int,
        options: ParseOptions,
        started: float,
        layout_ms: float = 0.0,
    ) -> ParsedPage:
        """The page's figures (when asked for), its source, the metric, its markdown."""
        if options.figures:
            await self._attach_figures(rgb, blocks)
        sources = {b.source for b in blocks if b.source != "none"}
        source = sources.pop() if len(sources) == 1 else ("mixed" if sources else "none")
        self.metrics.parse_pages_total.labels(source).inc()
        height, width = rgb.shape[:2]
        return ParsedPage(
            page=page,
            width=width,
            height=height,
            blocks=blocks,
            markdown=page_markdown(blocks, include_furniture=options.furniture),
            source=source,
            layout_ms=layout_ms,
            total_ms=(time.monotonic() - started) * 1000,
        )

    async def _ocr_page(
        self, rgb: np.ndarray, regions: list[Region]
    ) -> tuple[list[Line], dict[int, str]]:
        """A page without a text layer: every line the line OCR finds, or for a backend that
        reads regions (GOT-OCR2) the text of every region, markup for tables and equations."""
        assert self.ocr is not None
        found = await self.ocr.read_page_lines(rgb)
        if found is not None:
            return [ocr_line(text, box) for text, box in found], {}
        if not regions:
            height, width = rgb.shape[:2]
            regions.append(Region("text", (0.0, 0.0, float(width), float(height))))
        wanted = [i for i, r in enumerate(regions) if r.kind != "figure"]
        return [], await self._read(rgb, regions, wanted)

    async def _ocr_regions_without_text(
        self, rgb: np.ndarray, regions: list[Region], lines: list[Line]
    ) -> dict[int, str]:
        """Regions a born-digital page has no text for (a figure of text, paths) are OCR'd, and
        equations too when the backend writes LaTeX."""
        wanted = regions_without_text(lines, regions, READ_KINDS)
        if self.ocr is not None and self.ocr.markup:
            # LaTeX from a markup model beats a formula's text layer, which is out of order.
            wanted += [i for i, r in enumerate(regions) if r.kind == "equation"]
        return await self._read(rgb, regions, wanted) if wanted else {}

    async def _read(
        self, rgb: np.ndarray, regions: list[Region], wanted: list[int]
    ) -> dict[int, str]:
        assert self.ocr is not None
        # Each region with its type's task: an element-level model reads a table as a table
        # (HTML or markdown) and a formula as LaTeX; GOT-OCR2 with format for both.
        modes = [self.ocr.mode_for(regions[i].kind) for i in wanted]
        texts = await self.ocr.read_regions(rgb, [regions[i].bbox for i in wanted], modes)
        if self.ocr.page_mode is not None:  # a page task's answer: its front matter goes
            texts = [strip_front_matter(text)[0] for text in texts]
        return {i: text.strip() for i, text in zip(wanted, texts, strict=True) if text.strip()}

    async def _tables(
        self,
        rgb: np.ndarray,
        regions: list[Region],
        lines: list[Line],
        plan: PdfPlan | None,
        page: int,
        scale: float,
    ) -> dict[int, Table]:
        """The grid of each table region: pymupdf's table finder on a born-digital page, else
        the table-structure model on the crop, with the words already read as cell text."""
        found: dict[int, Table] = {}
        wanted = [i for i, r in enumerate(regions) if r.kind == "table"]
        if not wanted:
            return found
        owners = assign_lines(lines, regions)
        for i in wanted:
            mine = [ln for ln, owner in zip(lines, owners, strict=True) if owner == i]
            table = None
            if plan is not None and mine and mine[0].source == "pdf":
                clip = scale_box(regions[i].bbox, 1 / scale, 1 / scale)
                table = await self.documents.in_worker(
                    plan, PdfDocument.table, page, clip, what=f"finding the table on page {page}"
                )
                if table is not None:
                    table = table.scaled(scale)
            if table is None and mine and self.tables is not None:
                table = await self._structure(rgb, regions[i].bbox, mine)
            # One row or one column is no table (prose the layout model boxed as one).
            if table is not None and table.cells and min(table.n_rows, table.n_cols) >= 2:
                found[i] = table
        return found

    async def _structure(self, rgb: np.ndarray, box: BBox, lines: list[Line]) -> Table | None:
        """The table-structure model on a region's crop, its cells filled with the region's
        lines (or, where a line spans cells, its words spread evenly over the line's width);
        boxes back in page pixels."""
        assert self.tables is not None
        height, width = rgb.shape[:2]
        x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
        x1, y1 = min(width, int(box[2]) + 1), min(height, int(box[3]) + 1)
        if x1 - x0 < 8 or y1 - y0 < 8:
            return None
        crop = np.ascontiguousarray(rgb[y0:y1, x0:x1])
        words = [
            (wx0 - x0, wy0 - y0, wx1 - x0, wy1 - y0, text)
            for line in lines
            for wx0, wy0, wx1, wy1, text in _line_words(line)
        ]
        table = await self.tables.recognize(crop, words)
        return table.shifted(x0, y0) if table.cells else None

    async def _attach_figures(self, rgb: np.ndarray, blocks: Sequence[Block]) -> None:
        for block in blocks:
            if block.type == "figure":
                x0, y0, x1, y1 = (round(v) for v in block.bbox)
                crop = np.ascontiguousarray(rgb[max(0, y0) : y1, max(0, x0) : x1])
                if crop.size:
                    block.image = await in_pool(self._pool, encode_jpeg, crop)

    async def _read_text_layer(
        self, plan: PdfPlan, options: ParseOptions, document: bytes
    ) -> TextLayer:
        """Every selected page's lines and shapes (read in the document workers, pages in
        parallel), and the document's style decided from all of them, or from
        ``options.style_pages`` (a page range parsed as part of a larger selection: decided
        once per document and selection, and kept for the next ranges)."""
        style, key, wanted = None, None, list(plan.pages)
        if options.style_pages is not None:
            if max(options.style_pages) >= plan.doc.page_count:
                raise bad_request(
                    f"field 'style_pages' lists a page past the end of the document "
                    f"({plan.doc.page_count} pages)"
                )
            key = (await in_pool(self._pool, _digest, document), options.style_pages)
            style = self._styles.get(key)
            if style is None:
                selected = set(wanted)
                wanted += [p for p in options.style_pages if p not in selected]
        reads = [
            asyncio.ensure_future(
                self.documents.in_worker(
                    plan, PdfDocument.text, page, what=f"reading the text of page {page}"
                )
            )
            for page in wanted
        ]
        try:
            texts = await asyncio.gather(*reads)
        finally:
            for read in reads:  # one page failed: the others are not wanted
                read.cancel()
        layer = TextLayer()
        read = {}
        for page, (lines, shapes, height) in zip(wanted, texts, strict=True):
            layer.lines[page], layer.shapes[page] = lines, shapes
            read[page] = (page, height, lines)
        if style is None:
            decided_by = options.style_pages or plan.pages
            style = await in_pool(self._pool, analyze, [read[page] for page in decided_by])
        if key is not None:
            self._styles[key] = style
            self._styles.move_to_end(key)
            while len(self._styles) > STYLES_KEPT:
                self._styles.popitem(last=False)
        layer.style = style
        return layer


def _digest(document: bytes) -> bytes:
    return hashlib.blake2b(document, digest_size=16).digest()


def _line_words(line: Line) -> list[tuple[float, float, float, float, str]]:
    """A line's words with boxes: its width shared by character count (a line of the text
    layer or of OCR knows its own box, not each word's)."""
    parts = line.text.split()
    total = sum(len(p) for p in parts) + max(0, len(parts) - 1)
    if not parts or total == 0:
        return []
    x0, y0, x1, y1 = line.bbox
    per_char = (x1 - x0) / total
    out, at = [], 0
    for part in parts:
        start = x0 + at * per_char
        out.append((start, y0, start + len(part) * per_char, y1, part))
        at += len(part) + 1
    return out
