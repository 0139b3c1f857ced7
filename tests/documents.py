"""Documents the tests write for themselves, so that a clone with nothing beside it runs them.

:func:`write_paper` writes a born-digital paper with pymupdf, shaped like the two-column papers
layout models are trained on: a title, authors and an abstract on the first page; numbered
section and subsection headings; two columns of body text; ruled tables under their captions;
a drawn chart and a raster figure over theirs; references; a running header and page-number
footers. What the tests check it against is known here rather than read back from it: the
title, the headings in order, the pages, where each table and the title block were put.

The OCR images are cut from renders of the same pages: the title block, and each table with
its caption, at the resolution of a scan.

What is written is deterministic (one seeded generator for the prose), so a test that fails fails
again on the same document.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pymupdf

WIDTH, HEIGHT = 612.0, 792.0  # US letter, in points
MARGIN = 54.0
GUTTER = 18.0
COLUMN = (WIDTH - 2 * MARGIN - GUTTER) / 2
BODY_TOP, BODY_BOTTOM = 72.0, 726.0
BODY_FONT, BODY_SIZE, LEADING = "tiro", 10.0, 12.2
BOLD, ITALIC = "tibo", "tiit"

TITLE = "Blockwise Retrieval for Question Answering over Long Documents"
AUTHORS = "Maren Holt, Tobias Lindqvist, Ana Ferreira"
AFFILIATION = "Department of Computer Science, Northfield University"
RUNNING_HEADER = "Preprint. Under review."
PAGES = 10
SECTIONS = (
    "1 Introduction",
    "2 Background",
    "3 Blockwise Retrieval",
    "4 Experimental Setting",
    "5 Results",
    "6 Related Work",
    "7 Conclusion",
    "References",
)
SUBSECTIONS = (
    "3.1 Scoring Blocks",
    "3.2 Caching the Index",
    "5.1 Evaluating Context Length",
    "5.2 Impact on Answer Quality",
)
#: The page (from 0) with both tables at its top; the chart is on page 0, the raster figure on 5.
TABLES_PAGE = 4
TABLE_1 = (
    "Table 1: Memory per device when each method reads a document of 128K tokens.",
    ("Method", "Context", "Memory (GB)", "Tokens/s"),
    (
        ("Full attention", "32K", "61.4", "2140"),
        ("Sliding window", "128K", "38.2", "3310"),
        ("Recurrent memory", "128K", "29.7", "2875"),
        ("Sparse heads", "128K", "24.9", "3580"),
        ("Blockwise retrieval", "128K", "17.3", "4120"),
        ("Blockwise retrieval", "512K", "19.8", "3960"),
    ),
)
TABLE_2 = (
    "Table 2: Exact match on four question answering benchmarks.",
    ("Benchmark", "Questions", "Baseline", "Ours"),
    (
        ("NarrativeQA", "10557", "24.1", "31.6"),
        ("Qasper", "1451", "28.9", "35.2"),
        ("QuALITY", "2128", "41.3", "47.8"),
        ("MultiFieldQA", "1200", "36.5", "42.0"),
    ),
)

_SUBJECTS = (
    "the retriever",
    "each attention head",
    "the long context model",
    "our method",
    "the baseline",
    "a sparse index",
    "the reader",
    "the encoder",
    "every query",
    "the scheduler",
    "a block of 512 tokens",
    "the ranking stage",
)
_VERBS = (
    "selects",
    "ranks",
    "compresses",
    "attends to",
    "reads",
    "scores",
    "caches",
    "merges",
    "filters",
    "revisits",
    "summarises",
    "keeps",
)
_OBJECTS = (
    "the relevant passages",
    "the cached keys and values",
    "every block of the document",
    "the answers of earlier turns",
    "a small set of candidate spans",
    "the whole input in one pass",
    "the distant evidence",
    "the first and last sections",
    "the passages with the highest scores",
    "the tokens that matter most",
)
_TAILS = (
    "with little extra memory",
    "in a single pass",
    "across 16 devices",
    "without any fine tuning",
    "at 128K tokens",
    "on every benchmark we tried",
    "before the answer is written",
    "while the cost stays linear",
    "as Table 1 shows",
    "within 3 percent of full attention",
    "for documents of any length",
    "at a fraction of the cost",
)


def _sentence(rng: random.Random) -> str:
    first = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    if rng.random() < 0.6:
        first += " " + rng.choice(_TAILS)
    if rng.random() < 0.3:
        first += f", and {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    return first[0].upper() + first[1:] + "."


def prose(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(sentences))


@functools.cache
def font(name: str) -> pymupdf.Font:
    return pymupdf.Font(name)


@functools.cache
def _advances(name: str) -> dict[str, float]:
    # Measured once per font: pymupdf measures a string a character at a time in Python,
    # far too slowly for a whole paper.
    return {chr(c): font(name).glyph_advance(c) for c in range(32, 256)}


def text_width(text: str, name: str, size: float) -> float:
    advances = _advances(name)
    return size * sum(advances[ch] for ch in text)


def wrap(text: str, width: float, face: str = BODY_FONT, size: float = BODY_SIZE) -> list[str]:
    """Greedy word wrap to ``width`` points: lines break between words only, never with a
    hyphen, so the text layer and a reading of the page agree word for word."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if line and text_width(candidate, face, size) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return [*lines, line] if line else lines


# --- what a page holds ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Heading:
    text: str
    size: float


@dataclasses.dataclass(frozen=True)
class Paragraph:
    text: str
    font: str = BODY_FONT
    size: float = BODY_SIZE


@dataclasses.dataclass(frozen=True)
class Chart:
    """A bar chart drawn with vector paths, its caption under it."""

    caption: str
    height: float = 150.0


@dataclasses.dataclass(frozen=True)
class Picture:
    """A raster figure (an attention map as a PNG), its caption under it."""

    caption: str
    height: float = 170.0


Item = Heading | Paragraph | Chart | Picture


@dataclasses.dataclass
class Paper:
    """The PDF and where things were put on it, in points."""

    pdf: bytes
    title_block: pymupdf.Rect  # page 0: the title and the authors
    tables: list[pymupdf.Rect]  # on TABLES_PAGE: each table with its caption

    def crop_png(self, page: int, rect: pymupdf.Rect, scale: float = 2.0, pad: float = 6) -> bytes:
        """A region of a page as a PNG, as a scanner would give it."""
        clip = pymupdf.Rect(rect.x0 - pad, rect.y0 - pad, rect.x1 + pad, rect.y1 + pad)
        with pymupdf.open(stream=self.pdf, filetype="pdf") as doc:
            matrix = pymupdf.Matrix(scale, scale)
            return doc[page].get_pixmap(matrix=matrix, clip=clip, alpha=False).tobytes("png")


def _content(rng: random.Random) -> Iterator[Item]:
    """The body, in reading order; its length makes the paper exactly PAGES pages."""
    paragraphs = {
        "1 Introduction": (7, 6, 8, 5, 7, 6, 7),
        "2 Background": (8, 7, 6, 7, 6, 8, 7, 6, 7),
        "3 Blockwise Retrieval": (6, 7, 5, 6),
        "3.1 Scoring Blocks": (7, 8, 6, 7, 8, 6),
        "3.2 Caching the Index": (8, 6, 7, 6, 7, 8),
        "4 Experimental Setting": (7, 6, 8, 7, 6, 8, 7, 6, 7, 8),
        "5 Results": (5, 6),
        "5.1 Evaluating Context Length": (8, 7, 6, 7, 8, 6, 7),
        "5.2 Impact on Answer Quality": (7, 8, 6, 7, 6, 7, 8),
        "6 Related Work": (8, 7, 8, 6, 7, 8, 7, 6, 7, 8, 6),
        "7 Conclusion": (6, 5, 6, 7),
    }
    for heading, counts in paragraphs.items():
        yield Heading(heading, 12.0 if heading[1] == " " else 10.5)
        for i, count in enumerate(counts):
            yield Paragraph(prose(rng, count))
            if heading == "1 Introduction" and i == 1:
                yield Chart("Figure 1: Memory per device as the context grows, for each method.")
            if heading == "5.1 Evaluating Context Length" and i == 1:
                yield Picture("Figure 2: Scores of the retrieval heads over the blocks of a query.")
    yield Heading("References", 12.0)
    for n in range(1, 19):
        authors = ", ".join(rng.sample(("A. Moreau", "J. Park", "L. Chen", "R. Okafor"), 2))
        title = prose(rng, 1).rstrip(".")
        yield Paragraph(
            f"[{n}] {authors}. {title}. In Proceedings, 20{rng.randint(15, 24)}.", size=9
        )


class _Sheet:
    """One page being written: its text goes through one TextWriter and its lines and fills
    through one Shape, both put on the page by :meth:`finish` (pymupdf's one-call-per-string
    helpers cost milliseconds each)."""

    def __init__(self, page: pymupdf.Page) -> None:
        self.page = page
        self.writer = pymupdf.TextWriter(page.rect)
        self.shape = page.new_shape()

    def text(self, x: float, baseline: float, text: str, face: str, size: float) -> None:
        self.writer.append((x, baseline), text, font=font(face), fontsize=size)

    def centred(self, baseline: float, text: str, face: str, size: float) -> pymupdf.Rect:
        width = text_width(text, face, size)
        self.text((WIDTH - width) / 2, baseline, text, face, size)
        return pymupdf.Rect(
            (WIDTH - width) / 2, baseline - size, (WIDTH + width) / 2, baseline + size / 4
        )

    def line(self, a: tuple[float, float], b: tuple[float, float], width: float = 0.6) -> None:
        self.shape.draw_line(a, b)
        self.shape.finish(color=(0, 0, 0), width=width)

    def fill(self, rect: pymupdf.Rect, colour: tuple[float, float, float]) -> None:
        self.shape.draw_rect(rect)
        self.shape.finish(color=None, fill=colour)

    def finish(self) -> None:
        self.shape.commit()
        self.writer.write_text(self.page)


class _Writer:
    """Flows items down two columns, page after page, under a running header and over a
    page-number footer."""

    def __init__(self, doc: pymupdf.Document) -> None:
        self.doc = doc
        self.sheets: list[_Sheet] = []
        self.tables: list[pymupdf.Rect] = []
        self._new_page()

    @property
    def sheet(self) -> _Sheet:
        return self.sheets[-1]

    def _new_page(self) -> None:
        if self.sheets:  # a page must be finished while it is the newest
            self.sheet.finish()
        sheet = _Sheet(self.doc.new_page(width=WIDTH, height=HEIGHT))
        number = len(self.sheets)
        if number:  # the first page has the title at its top instead
            sheet.centred(44, RUNNING_HEADER, ITALIC, 9)
        sheet.centred(758, str(number + 1), BODY_FONT, 10)
        self.sheets.append(sheet)
        self.column, self.top = 0, BODY_TOP
        if number == TABLES_PAGE:
            y = BODY_TOP
            for spec in (TABLE_1, TABLE_2):
                self.tables.append(_table(sheet, y, spec))
                y = self.tables[-1].y1 + 20
            self.top = y
        self.y = self.top

    @property
    def x(self) -> float:
        return MARGIN + self.column * (COLUMN + GUTTER)

    def room(self, height: float) -> None:
        """Go on in the next column (or page) unless ``height`` fits in this one."""
        if self.y + height <= BODY_BOTTOM:
            return
        if self.column == 0:
            self.column, self.y = 1, self.top
        else:
            self._new_page()

    def write(self, item: Item) -> None:
        if isinstance(item, Heading):
            self.room(item.size + 6 + 3 * LEADING)  # a heading keeps with its first lines
            self.sheet.text(self.x, self.y + 6 + item.size, item.text, BOLD, item.size)
            self.y += item.size + 12
        elif isinstance(item, Paragraph):
            leading = LEADING * item.size / BODY_SIZE
            for line in wrap(item.text, COLUMN, item.font, item.size):
                self.room(leading)
                self.sheet.text(self.x, self.y + item.size, line, item.font, item.size)
                self.y += leading
            self.y += 5
        else:
            caption = wrap(item.caption, COLUMN, BODY_FONT, 9)
            self.room(item.height + 8 + len(caption) * 11)
            frame = pymupdf.Rect(self.x, self.y + 4, self.x + COLUMN, self.y + 4 + item.height)
            if isinstance(item, Chart):
                _chart(self.sheet, frame)
            else:
                self.sheet.page.insert_image(frame, stream=_attention_png(), keep_proportion=False)
            self.y = frame.y1 + 6
            for line in caption:
                self.sheet.text(self.x, self.y + 9, line, BODY_FONT, 9)
                self.y += 11
            self.y += 8


def _title_page(sheet: _Sheet, rng: random.Random) -> tuple[pymupdf.Rect, float]:
    """Title, authors, affiliation and abstract; returns the title block and where the columns
    start."""
    block = sheet.centred(92, TITLE, BOLD, 16)
    block |= sheet.centred(122, AUTHORS, BODY_FONT, 11)
    block |= sheet.centred(137, AFFILIATION, ITALIC, 10)
    sheet.centred(172, "Abstract", BOLD, 12)
    y = 188.0
    for line in wrap(prose(rng, 8), WIDTH - 2 * 90.0):
        sheet.text(90.0, y + BODY_SIZE, line, BODY_FONT, BODY_SIZE)
        y += LEADING
    return block, y + 18


def _table(sheet: _Sheet, y: float, spec: tuple) -> pymupdf.Rect:
    """A ruled table, full width, under its caption; returns the caption and table together."""
    caption, header, rows = spec
    x0, x1 = MARGIN + 30, WIDTH - MARGIN - 30
    top = y
    for line in wrap(caption, x1 - x0, BODY_FONT, 9):
        sheet.text(x0, y + 9, line, BODY_FONT, 9)
        y += 11
    y += 4
    row_height = 15.0
    edges = [x0]
    for share in (0.34, 0.18, 0.24, 0.24):
        edges.append(edges[-1] + share * (x1 - x0))
    for r, cells in enumerate((header, *rows)):
        for c, cell in enumerate(cells):
            sheet.text(
                edges[c] + 5, y + r * row_height + 11, cell, BOLD if r == 0 else BODY_FONT, 9
            )
    bottom = y + (len(rows) + 1) * row_height
    for r in range(len(rows) + 2):
        sheet.line((x0, y + r * row_height), (x1, y + r * row_height))
    for x in edges:
        sheet.line((x, y), (x, bottom))
    return pymupdf.Rect(x0, top, x1, bottom)


def _chart(sheet: _Sheet, frame: pymupdf.Rect) -> None:
    """Bars for five methods with axes, ticks and labels, drawn as vector paths."""
    left, bottom = frame.x0 + 30, frame.y1 - 22
    top, right = frame.y0 + 8, frame.x1 - 8
    values = (61.4, 38.2, 29.7, 24.9, 17.3)
    colours = ((0.2, 0.4, 0.7), (0.9, 0.5, 0.1), (0.3, 0.6, 0.3), (0.7, 0.2, 0.3), (0.5, 0.4, 0.7))
    step = (right - left) / len(values)
    for i, (value, colour) in enumerate(zip(values, colours, strict=True)):
        height = (bottom - top) * value / 70
        bar = pymupdf.Rect(left + i * step + 6, bottom - height, left + (i + 1) * step - 6, bottom)
        sheet.fill(bar, colour)
        sheet.text(bar.x0 + 2, bottom + 11, f"M{i + 1}", "helv", 7)
    sheet.line((left, top), (left, bottom), 0.8)
    sheet.line((left, bottom), (right, bottom), 0.8)
    for tick in (0, 20, 40, 60):
        y = bottom - (bottom - top) * tick / 70
        sheet.line((left - 3, y), (left, y), 0.8)
        sheet.text(left - 16, y + 2.5, str(tick), "helv", 7)
    sheet.text(frame.x0 + 60, frame.y1 - 1, "Memory (GB) by method", "helv", 7)


def _attention_png(size: int = 192) -> bytes:
    """A smooth, map-like raster: what a heat map or a photograph gives a layout model."""
    y, x = np.mgrid[0:size, 0:size] / size
    value = 0.5 + 0.25 * np.sin(9 * x) * np.cos(7 * y) + 0.25 * np.exp(-((x - y) ** 2) * 40)
    rgb = np.stack([value, 0.3 + 0.5 * value**2, 1.0 - value], axis=-1)
    samples = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    pix = pymupdf.Pixmap(pymupdf.csRGB, size, size, samples.tobytes(), False)
    return pix.tobytes("png")


def _declare_afm_metrics(doc: pymupdf.Document) -> None:
    """Declare each font's ascent and descent as its AFM states them, as LaTeX's PDFs do.

    pymupdf declares the font's bounding box instead, so its text layer's line boxes are a
    third taller than a LaTeX paper's: up to half a line's box is then empty space above and
    below the letters, outside the box a layout model draws around them."""
    for xref in range(1, doc.xref_length()):
        if doc.xref_get_key(xref, "Type") != ("name", "/FontDescriptor"):
            continue
        helvetica = "Helvetica" in doc.xref_get_key(xref, "FontName")[1]
        doc.xref_set_key(xref, "Ascent", "718" if helvetica else "683")
        doc.xref_set_key(xref, "Descent", "-207" if helvetica else "-217")


def write_paper(latex_metrics: bool = True) -> Paper:
    """The paper; ``latex_metrics=False`` keeps the line boxes pymupdf's fonts get (see
    :func:`_declare_afm_metrics`)."""
    rng = random.Random(2024)
    doc = pymupdf.open()
    writer = _Writer(doc)
    title_block, writer.top = _title_page(writer.sheet, rng)
    writer.y = writer.top
    for item in _content(rng):
        writer.write(item)
    writer.sheet.finish()
    assert len(doc) == PAGES, f"the paper came out at {len(doc)} pages, not {PAGES}"
    if latex_metrics:
        _declare_afm_metrics(doc)
    doc.set_metadata({"title": TITLE, "author": AUTHORS})
    pdf = doc.tobytes(garbage=3, deflate=True)
    doc.close()
    return Paper(pdf, title_block, writer.tables)


def write_fixtures(folder: Path) -> Path:
    """The generated documents under the names the shared fixtures folder uses, for scripts
    that read a folder (the load scripts): the paper, two table crops, a title crop."""
    paper = write_paper()
    (folder / "paper.pdf").write_bytes(paper.pdf)
    (folder / "title.png").write_bytes(paper.crop_png(0, paper.title_block))
    for n, rect in enumerate(paper.tables, 1):
        (folder / f"table{n}.png").write_bytes(paper.crop_png(TABLES_PAGE, rect))
    return folder


def repeated(pdf: bytes, times: int) -> bytes:
    """The PDF's pages ``times`` over, as one document: for tests that need more pages in
    flight than the paper has."""
    with pymupdf.open(stream=pdf, filetype="pdf") as src, pymupdf.open() as out:
        for _ in range(times):
            out.insert_pdf(src)
        return out.tobytes(garbage=3, deflate=True)
