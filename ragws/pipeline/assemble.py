"""Blocks of a page and what a RAG pipeline stores of them: reading order, markdown, chunks.

The parse pipeline hands this module one page at a time as :class:`Block` s (typed by
:mod:`ragws.pipeline.structure`). Here they get:

* a column-aware reading order (:func:`reading_order`);
* markdown per block, per page and per document (:func:`render`, :func:`page_markdown`,
  :func:`document_markdown`);
* chunks cut on block boundaries, each knowing the pages and boxes it came from and the
  section headings it falls under (:func:`chunk_blocks`), so an answer can be traced back.

Everything here is pure: no I/O, no models, no event loop. Geometry is in the pixels of the
rendered page the layout model saw.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ragws.pipeline.tables import Table

BBox = tuple[float, float, float, float]  # x0, y0, x1, y1

#: Block types, whatever layout model found the regions (see ragws.pipeline.structure).
BLOCK_TYPES: tuple[str, ...] = (
    "title",
    "heading",
    "text",
    "list",
    "code",
    "table",
    "equation",
    "figure",
    "caption",
    "footnote",
    "header",
    "footer",
)
#: Page furniture: repeated on every page and noise to a reader, so left out of markdown by default.
FURNITURE: frozenset[str] = frozenset({"header", "footer"})
HEADINGS: frozenset[str] = frozenset({"title", "heading"})


@dataclass(slots=True)
class Block:
    """One block of a page: a heading, a paragraph, a list, a table, a figure …

    Mutable on purpose: :func:`reading_order` writes ``order``, :func:`set_markdown` writes
    ``markdown`` and the parse pipeline adds ``image``. Functions that need to tell blocks
    apart use their identity, not their value.
    """

    type: str  # one of BLOCK_TYPES
    bbox: BBox  # in the rendered page's pixels
    page: int  # 0-based
    text: str = ""
    source: str = "none"  # "pdf" (text layer) | "ocr" | "none"
    score: float = 1.0  # layout confidence
    order: int = -1  # position in reading order on its page, set by reading_order
    image: bytes | None = None  # JPEG crop of a figure, when the client asked for it
    level: int | None = None  # headings: 1 for the title, 2.. for sections
    items: list[dict[str, Any]] | None = None  # lists: {"text", "level", "marker"} per item
    table: Table | None = None  # tables: the cells, when a grid could be read
    markdown: str = ""  # set by set_markdown

    def __post_init__(self) -> None:
        if self.type not in BLOCK_TYPES:
            raise ValueError(f"unknown block type {self.type!r}; one of {BLOCK_TYPES}")

    def to_dict(self) -> dict[str, Any]:
        """The block as a result frame carries it (the frame carries the page)."""
        out: dict[str, Any] = {
            "type": self.type,
            "bbox": _round_bbox(self.bbox),
            "text": self.text,
            "markdown": self.markdown,
            "order": self.order,
            "source": self.source,
            "score": round(float(self.score), 4),
        }
        if self.level is not None:
            out["level"] = self.level
        if self.items is not None:
            out["items"] = [dict(item) for item in self.items]
        if self.table is not None:
            out["html"] = self.table.to_html()
            out["cells"] = [cell.to_dict() for cell in self.table.cells]
        if self.image is not None:
            out["image"] = self.image
        return out


def _round_bbox(bbox: BBox) -> list[float]:
    return [round(float(v), 2) for v in bbox]


# --- reading order ------------------------------------------------------------------------


def reading_order(blocks: Sequence[Block], page_width: float, page_height: float) -> list[Block]:
    """The blocks of one page in reading order, with ``order`` set to 0..n-1 on each.

    Headers come first and footers last, wherever the layout model put them; everything else
    (``abandon`` included) is ordered by position, by this rule applied recursively to a set
    of blocks:

    1. **Columns.** Two blocks share a column when their x-intervals overlap by more than a
       tolerance (see below); the connected groups are the columns. With several, columns
       whose vertical extents overlap are read left to right, and groups of columns that
       stand one above another top to bottom (so a page number under a gutter comes last,
       not between the columns). Each column is then ordered by the same rule.
    2. **Bands.** One group left means something joins the columns: a block that overlaps
       two blocks which do not overlap each other *spans* them. A spanning block with no
       block beside it (x-disjoint and overlapping it vertically) is full-width: a title,
       an abstract, a wide figure. Full-width blocks cut the set into horizontal bands;
       each band is read whole (all its columns) before the full-width block below it.
    3. **One column.** With nothing spanning, every block overlaps every other in x:
       top to bottom.

    A spanning block that has something beside it (a left-column paragraph above two small
    figures, with the right column next to it) cuts nothing. If no block is full-width, the
    columns are found without the spanning blocks, and each of those joins the column it
    overlaps most.

    The tolerances make the rule robust to boxes that touch or bleed: x-intervals overlap
    only by more than 10% of the narrower block (and 0.5% of the page), so a paragraph
    bleeding into the gutter joins no column but its own, while jittered left edges of one
    column overlap almost wholly. Ties fall back to position, then input order, so the
    result is deterministic.
    """
    if not blocks:
        return []
    geo = _Geometry([_sorted_bbox(b.bbox) for b in blocks], page_width, page_height)
    headers = [i for i, b in enumerate(blocks) if b.type == "header"]
    footers = [i for i, b in enumerate(blocks) if b.type == "footer"]
    body = [i for i, b in enumerate(blocks) if b.type not in ("header", "footer")]
    ordered = [blocks[i] for i in geo.order(headers) + geo.order(body) + geo.order(footers)]
    for n, block in enumerate(ordered):
        block.order = n
    return ordered


def _sorted_bbox(bbox: BBox) -> BBox:
    x0, y0, x1, y1 = (float(v) for v in bbox)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


@dataclass(slots=True)
class _Geometry:
    """The boxes of one page, addressed by index, and the overlap tests on them."""

    boxes: list[BBox]
    page_width: float
    page_height: float
    x_tol: float = field(init=False)
    y_tol: float = field(init=False)

    def __post_init__(self) -> None:
        self.x_tol = max(1.0, 0.005 * self.page_width)
        self.y_tol = max(1.0, 0.005 * self.page_height)

    def x_overlap(self, i: int, j: int) -> bool:
        a, b = self.boxes[i], self.boxes[j]
        overlap = min(a[2], b[2]) - max(a[0], b[0])
        narrower = min(a[2] - a[0], b[2] - b[0])
        return overlap > max(self.x_tol, 0.1 * narrower)

    def y_overlap(self, i: int, j: int) -> bool:
        a, b = self.boxes[i], self.boxes[j]
        return min(a[3], b[3]) - max(a[1], b[1]) > self.y_tol

    def key(self, i: int) -> tuple[float, float, int]:
        return self.boxes[i][1], self.boxes[i][0], i

    def order(self, idx: list[int]) -> list[int]:
        if len(idx) <= 1:
            return list(idx)
        columns = self._components(idx)
        if len(columns) > 1:
            cutters = self._cutters(idx, columns)
            if cutters:
                return self._order_bands(idx, cutters)
            cut = self._new_row_of_columns(idx, columns)
            if cut is not None:
                y, between = cut
                above = [i for i in idx if self.boxes[i][3] <= y + self.y_tol]
                taken = set(above)
                return (
                    self.order([i for i in above if i not in between])
                    + self.order(between)
                    + self.order([i for i in idx if i not in taken])
                )
            return self._order_columns(columns)
        spanning = [i for i in idx if self._spans(i, idx)]
        if not spanning:
            return sorted(idx, key=self.key)
        full = [i for i in spanning if not any(self._beside(i, j) for j in idx)]
        if full:
            return self._order_bands(idx, full)
        # Spanning blocks with neighbours beside them: find columns without them.
        weak = set(spanning)
        rest = [i for i in idx if i not in weak]
        columns = self._components(rest)
        if len(columns) > 1:
            targets = []
            for i in spanning:
                overlaps = [self._overlap_with(i, col) for col in columns]
                targets.append(overlaps.index(max(overlaps)))
            for i, c in zip(spanning, targets, strict=True):
                columns[c].append(i)
            return self._order_columns(columns)
        return sorted(idx, key=self.key)

    def _cutters(self, idx: list[int], columns: list[list[int]]) -> list[int]:
        """Blocks that cut columns into bands although they are narrow: a heading set across
        the page whose box only covers its words. One line high (3% of the page at most),
        nothing beside it, blocks of another column above it and one starting right below.
        """
        column_of = {i: c for c, col in enumerate(columns) for i in col}
        near = 0.04 * self.page_height
        found = []
        for i in idx:
            box = self.boxes[i]
            if box[3] - box[1] > 0.03 * self.page_height:
                continue
            if any(self._beside(i, j) for j in idx):
                continue
            others = [j for j in idx if column_of[j] != column_of[i]]
            above = any(self.boxes[j][3] <= box[1] + self.y_tol for j in others)
            # ... and another column going on right under it: under a heading that spans
            # the page, every column starts again at once.
            below = any(box[3] - self.y_tol <= self.boxes[j][1] <= box[3] + near for j in others)
            if above and below:
                found.append(i)
        return found

    def _new_row_of_columns(
        self, idx: list[int], columns: list[list[int]]
    ) -> tuple[float, list[int]] | None:
        """The height at which the columns start again below a block set between them (a
        table that spans the columns but is no wider than one): every column that goes on
        below starts within a line of it, nothing crosses it, one column above it runs up to
        it (the block set between) and another ended well before it (columns flowing on
        would not leave one empty for that long). Returns the height and the blocks set
        between: those above it and below where every other column ended, read after the
        columns above them."""
        column_of = {i: c for c, col in enumerate(columns) for i in col}
        near = 0.03 * self.page_height  # a heading and its margins
        for y in sorted({self.boxes[i][1] for i in idx}):
            if any(
                self.boxes[i][1] < y - self.y_tol < y + self.y_tol < self.boxes[i][3] for i in idx
            ):
                continue
            above = [i for i in idx if self.boxes[i][3] <= y + self.y_tol]
            below = [i for i in idx if self.boxes[i][1] >= y - self.y_tol]
            shared = {column_of[i] for i in above} & {column_of[i] for i in below}
            if len(shared) < 2:
                continue
            start = {c: min(self.boxes[i][1] for i in below if column_of[i] == c) for c in shared}
            end = {c: max(self.boxes[i][3] for i in above if column_of[i] == c) for c in shared}
            last = max(shared, key=lambda c: (end[c], -c))  # the column running up to the cut
            others = max(e for c, e in end.items() if c != last)
            if (
                max(start.values()) - y <= 1.5 * near
                and y - end[last] <= near
                and y - min(end.values()) >= 0.06 * self.page_height
            ):
                between = [
                    i
                    for i in above
                    if column_of[i] == last and self.boxes[i][1] >= others - self.y_tol
                ]
                return y, between
        return None

    def _components(self, idx: list[int]) -> list[list[int]]:
        """Groups of blocks connected by x-overlap, each in input order."""
        parent = {i: i for i in idx}

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for n, i in enumerate(idx):
            for j in idx[n + 1 :]:
                if self.x_overlap(i, j):
                    parent[find(i)] = find(j)
        groups: dict[int, list[int]] = {}
        for i in idx:
            groups.setdefault(find(i), []).append(i)
        return list(groups.values())

    def _order_columns(self, columns: list[list[int]]) -> list[int]:
        extents = [
            (
                min(self.boxes[i][0] for i in col),
                min(self.boxes[i][1] for i in col),
                max(self.boxes[i][3] for i in col),
            )
            for col in columns
        ]
        # Columns side by side (vertical extents overlapping) form one row of columns.
        rows: list[list[int]] = []
        row_bottom = 0.0
        for c in sorted(range(len(columns)), key=lambda c: (extents[c][1], extents[c][0])):
            if rows and extents[c][1] < row_bottom - self.y_tol:
                rows[-1].append(c)
                row_bottom = max(row_bottom, extents[c][2])
            else:
                rows.append([c])
                row_bottom = extents[c][2]
        out: list[int] = []
        for row in rows:
            for c in sorted(row, key=lambda c: (extents[c][0], extents[c][1])):
                out.extend(self.order(columns[c]))
        return out

    def _spans(self, i: int, idx: list[int]) -> bool:
        """Whether ``i`` overlaps two blocks that do not overlap each other."""
        touching = [j for j in idx if j != i and self.x_overlap(i, j)]
        if len(touching) < 2:
            return False
        # The pair most likely apart: the one ending leftmost and the one starting rightmost.
        left = min(touching, key=lambda j: (self.boxes[j][2], j))
        right = max(touching, key=lambda j: (self.boxes[j][0], -j))
        return left != right and not self.x_overlap(left, right)

    def _beside(self, i: int, j: int) -> bool:
        return i != j and not self.x_overlap(i, j) and self.y_overlap(i, j)

    def _overlap_with(self, i: int, column: list[int]) -> float:
        a = self.boxes[i]
        return sum(
            max(0.0, min(a[2], self.boxes[j][2]) - max(a[0], self.boxes[j][0])) for j in column
        )

    def _order_bands(self, idx: list[int], full: list[int]) -> list[int]:
        """Full-width blocks in vertical order, each band between them read before the next."""
        full = sorted(full, key=lambda i: (self._center_y(i), self.boxes[i][0], i))
        centers = [self._center_y(i) for i in full]
        bands: list[list[int]] = [[] for _ in range(len(full) + 1)]
        members = set(full)
        for i in idx:
            if i not in members:
                bands[bisect_right(centers, self._center_y(i))].append(i)
        out = self.order(bands[0])
        for breaker, band in zip(full, bands[1:], strict=True):
            out.append(breaker)
            out.extend(self.order(band))
        return out

    def _center_y(self, i: int) -> float:
        return (self.boxes[i][1] + self.boxes[i][3]) / 2


# --- markdown -----------------------------------------------------------------------------

_TABLE_MARKUP = re.compile(r"^\s*\||<table|<tr|\\begin\{", re.IGNORECASE)
_DISPLAY_MATH = ("$$", "\\[", "\\begin")
_NUMBERED_MARKER = re.compile(r"^\(?(\d{1,3})[.)]\)?$")


def _prose(text: str) -> str:
    return " ".join(text.split())


def _lines(text: str) -> str:
    """Line breaks kept, blank lines dropped: a blank line would end the block in markdown."""
    return "\n".join(line for line in (" ".join(raw.split()) for raw in text.splitlines()) if line)


def _verbatim(text: str) -> str:
    """Markup kept as written, less blank lines and trailing whitespace."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines() if line.strip())


def _equation(text: str) -> str:
    """One display block, number included; markup an OCR model wrote is kept as written."""
    text = text.strip()
    if any(mark in text for mark in _DISPLAY_MATH):
        return _verbatim(text)
    # Inline delimiters around a display formula would nest inside the $$ block.
    if len(text) > 2 and text.startswith("$") and text.endswith("$"):
        text = text[1:-1].strip()
    elif text.startswith("\\(") and text.endswith("\\)"):
        text = text[2:-2].strip()
    return f"$$\n{_lines(text)}\n$$"


def _list(items: Sequence[dict[str, Any]]) -> str:
    """Nested markdown list items: each nested item indented to its parent's text."""
    out: list[str] = []
    offsets: list[int] = []  # where the text of the open item at each level starts
    for item in items:
        offsets = offsets[: max(0, int(item.get("level", 0)))]
        indent = offsets[-1] if offsets else 0
        marker = str(item.get("marker") or "-")
        number = _NUMBERED_MARKER.match(marker)
        if number:
            prefix = f"{number.group(1)}. "
        elif marker in ("-", "*", "+"):
            prefix = "- "
        else:
            prefix = f"- {marker} "  # (a), i.: kept as written, in a bullet item
        offsets.append(indent + (len(prefix) if number or prefix == "- " else 2))
        out.append(" " * indent + prefix + _prose(str(item.get("text", ""))))
    return "\n".join(out)


def _code(text: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}\n{text.rstrip()}\n{fence}"


def render(block: Block, figure_k: int = 1) -> str:
    """One block's markdown; empty for an empty block. Blank lines occur only inside code, so
    a block is one markdown paragraph (or one fenced block)."""
    kind = block.type
    if kind == "figure":
        placeholder = f"![figure](#page-{block.page + 1}-figure-{figure_k})"
        text = _lines(block.text)
        return f"{placeholder}\n{text}" if text else placeholder
    if kind == "table" and block.table is not None and block.table.cells:
        return block.table.to_markdown()
    if not block.text.strip():
        return ""
    if kind in HEADINGS:
        level = block.level or (1 if kind == "title" else 2)
        return f"{'#' * min(6, max(1, level))} {_prose(block.text)}"
    if kind == "list":
        return _list(block.items) if block.items else _lines(block.text)
    if kind == "code":
        return _code(block.text)
    if kind == "table":
        return _verbatim(block.text) if _TABLE_MARKUP.search(block.text) else _lines(block.text)
    if kind == "equation":
        return _equation(block.text)
    return _prose(block.text)


def set_markdown(blocks: Sequence[Block]) -> None:
    """Write each block's own markdown into ``block.markdown`` (blocks of one page, in
    reading order: figures are numbered on their page in that order)."""
    figures = 0
    for block in blocks:
        if block.type == "figure":
            figures += 1
        block.markdown = render(block, figures)


def _rendered(blocks: Sequence[Block], include_furniture: bool) -> Iterator[tuple[Block, str]]:
    """Each kept block of one page with its markdown, in the order given."""
    figures = 0
    for block in blocks:
        if block.type == "figure":
            figures += 1
        if block.type in FURNITURE and not include_furniture:
            continue
        markdown = block.markdown or render(block, figures)
        if markdown:
            yield block, markdown


def page_markdown(blocks: Sequence[Block], *, include_furniture: bool = False) -> str:
    """Markdown of one page's blocks, taken in the order given (normally reading order).

    Titles and headings become ``#`` headings at their level, prose becomes paragraphs, lists
    nested markdown lists, code fenced blocks, tables pipe tables (HTML where a cell spans
    rows or columns), equations ``$$`` blocks; a figure becomes a placeholder
    ``![figure](#page-P-figure-K)`` followed by the text it holds. Headers and footers are
    left out unless ``include_furniture``, as are empty blocks. Blocks are separated by one
    blank line.
    """
    return "\n\n".join(md for _, md in _rendered(blocks, include_furniture))


def document_markdown(pages: Sequence[Sequence[Block]], *, include_furniture: bool = False) -> str:
    """Every page's markdown, one blank line apart; pages with nothing to show are skipped."""
    rendered = (page_markdown(blocks, include_furniture=include_furniture) for blocks in pages)
    return "\n\n".join(md for md in rendered if md)


# --- chunks -------------------------------------------------------------------------------


@dataclass(slots=True)
class Chunk:
    """A piece of the document's markdown for a vector store, with where it came from."""

    text: str
    pages: list[int]  # sorted, unique, 0-based
    bboxes: list[tuple[int, BBox]]  # (page, bbox) of each block in it, in order
    headings: list[str] = field(default_factory=list)  # the section path at its first block

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "pages": list(self.pages),
            "bboxes": [{"page": p, "bbox": _round_bbox(b)} for p, b in self.bboxes],
            "headings": list(self.headings),
        }


@dataclass(frozen=True, slots=True)
class _Piece:
    text: str
    page: int
    bbox: BBox
    heading: bool
    path: tuple[str, ...] = ()  # headings in force at this block, outermost first


def _joined_len(pieces: Sequence[_Piece]) -> int:
    return sum(len(p.text) for p in pieces) + 2 * max(0, len(pieces) - 1)


def _trailing_headings(pieces: list[_Piece]) -> tuple[list[_Piece], list[_Piece]]:
    """``pieces`` split before the headings it ends with."""
    k = len(pieces)
    while k and pieces[k - 1].heading:
        k -= 1
    return pieces[:k], pieces[k:]


_SENTENCE_END = re.compile(r"[.!?](?=\s)")


def _take(text: str, limit: int) -> tuple[str, str]:
    """The longest head of ``text`` of at most ``limit`` characters, cut at a sentence end in
    its second half if there is one, else at whitespace, else anywhere; and the rest."""
    if len(text) <= limit:
        return text, ""
    window = text[: limit + 1]  # the character after the cut tells a sentence end or a space
    ends = [m.end() for m in _SENTENCE_END.finditer(window) if m.end() * 2 >= limit]
    cut = ends[-1] if ends else max(window.rfind(" "), window.rfind("\n"))
    head = text[:cut].rstrip() if cut > 0 else ""
    if not head:
        head, cut = text[:limit], limit
    return head, text[cut:].lstrip()


def _split(text: str, limit: int) -> list[str]:
    parts: list[str] = []
    while text:
        head, text = _take(text, limit)
        parts.append(head)
    return parts


def _chunk(pieces: Sequence[_Piece]) -> Chunk:
    return Chunk(
        text="\n\n".join(p.text for p in pieces),
        pages=sorted({p.page for p in pieces}),
        bboxes=[(p.page, p.bbox) for p in pieces],
        headings=list(pieces[0].path),
    )


class _HeadingPath:
    """The section headings in force while walking a document's blocks in order."""

    def __init__(self) -> None:
        self._open: list[tuple[int, str]] = []

    def see(self, block: Block) -> tuple[str, ...]:
        if block.type == "heading" and block.text.strip():
            level = block.level or 2
            self._open = [(lv, text) for lv, text in self._open if lv < level]
            self._open.append((level, _prose(block.text)))
        return tuple(text for _, text in self._open)


def chunk_blocks(
    pages: Sequence[Sequence[Block]],
    chunk_chars: int = 1500,
    *,
    include_furniture: bool = False,
) -> list[Chunk]:
    """Chunks of at most ``chunk_chars`` characters over the document's blocks, page by page.

    Each block contributes its markdown as :func:`page_markdown` renders it; a chunk is its
    blocks' markdown joined by a blank line. Chunks are cut on block boundaries only: a block
    joins the current chunk while the chunk stays within ``chunk_chars``. So that sections
    start chunks, a heading starts a new chunk once the current one is half full, and a
    heading never ends a chunk that more blocks follow: it moves to the next chunk with them.
    The one exception is a heading that cannot share a chunk with the block after it; it then
    makes a chunk of its own rather than overfill one.

    A block longer than ``chunk_chars`` is the only one ever cut: at sentence ends where it
    can be, else at whitespace, each piece a chunk with the block's page and box (a heading
    that precedes it rides with the first piece when there is room).
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be ≥ 1, got {chunk_chars}")
    path = _HeadingPath()
    chunks: list[Chunk] = []
    current: list[_Piece] = []

    def emit(pieces: Sequence[_Piece]) -> None:
        if pieces:
            chunks.append(_chunk(pieces))

    for blocks in pages:
        for block, markdown in _rendered(blocks, include_furniture):
            piece = _Piece(
                markdown, block.page, block.bbox, block.type in HEADINGS, path.see(block)
            )
            if len(markdown) > chunk_chars:
                body, headings = _trailing_headings(current)
                emit(body)
                current = []
                rest = markdown
                if headings:
                    room = chunk_chars - _joined_len(headings) - 2
                    if room >= max(1, chunk_chars // 4):
                        head, rest = _take(rest, room)
                        emit([*headings, _Piece(head, piece.page, piece.bbox, False, piece.path)])
                    else:
                        emit(headings)
                for part in _split(rest, chunk_chars):
                    emit([_Piece(part, piece.page, piece.bbox, False, piece.path)])
                continue
            if piece.heading and 2 * _joined_len(current) >= chunk_chars:
                body, headings = _trailing_headings(current)
                if body:
                    emit(body)
                    current = headings
            if current and _joined_len(current) + 2 + len(markdown) > chunk_chars:
                body, headings = _trailing_headings(current)
                emit(body)
                current = headings
                if current and _joined_len(current) + 2 + len(markdown) > chunk_chars:
                    emit(current)
                    current = []
            current.append(piece)
    emit(current)
    return chunks


def overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Area of the intersection of two ``[x0, y0, x1, y1]`` boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def area(box: tuple[float, float, float, float]) -> float:
    """Area of an ``[x0, y0, x1, y1]`` box (0 when empty)."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
