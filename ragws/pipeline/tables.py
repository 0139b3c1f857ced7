"""Tables: a grid of cells with spans, and how one is read from a PDF page or a structure model.

A :class:`Table` is what a ``table`` block carries (see docs/protocol.md): its cells with
0-based row/column and spans, rendered as a GitHub pipe table when no cell spans rows or
columns, else as HTML. Born-digital tables come from pymupdf's own table finder
(:func:`table_from_pymupdf`); tables in images come from a structure model's grid filled with
OCR or text-layer words (:func:`table_from_structure`).
"""

from __future__ import annotations

import html
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pymupdf
import pymupdf.table

from ragws.pipeline.geometry import BBox, area, overlap, scale

#: A word or line with its box: (x0, y0, x1, y1, text).
Word = tuple[float, float, float, float, str]


@dataclass(slots=True)
class Cell:
    row: int
    col: int
    row_span: int = 1
    col_span: int = 1
    text: str = ""
    bbox: BBox | None = None


@dataclass(slots=True)
class Table:
    cells: list[Cell] = field(default_factory=list)
    n_rows: int = 0
    n_cols: int = 0

    def has_spans(self) -> bool:
        return any(c.row_span > 1 or c.col_span > 1 for c in self.cells)

    def rows(self) -> list[list[Cell]]:
        """Cells grouped by their first row, each row left to right."""
        rows: list[list[Cell]] = [[] for _ in range(self.n_rows)]
        for cell in self.cells:
            rows[cell.row].append(cell)
        return [sorted(row, key=lambda c: c.col) for row in rows]

    def to_html(self) -> str:
        parts = ["<table>"]
        for row in self.rows():
            parts.append("<tr>")
            for cell in row:
                attrs = ""
                if cell.row_span > 1:
                    attrs += f' rowspan="{cell.row_span}"'
                if cell.col_span > 1:
                    attrs += f' colspan="{cell.col_span}"'
                text = html.escape(cell.text).replace("\n", "<br>")
                parts.append(f"<td{attrs}>{text}</td>")
            parts.append("</tr>")
        parts.append("</table>")
        return "".join(parts)

    def to_markdown(self) -> str:
        """A GitHub pipe table (first row = header) when no cell spans, else :meth:`to_html`."""
        if self.has_spans() or not self.n_rows or not self.n_cols:
            return self.to_html()
        grid = [["" for _ in range(self.n_cols)] for _ in range(self.n_rows)]
        for cell in self.cells:
            grid[cell.row][cell.col] = _md_cell(cell.text)
        lines = ["| " + " | ".join(grid[0]) + " |", "|" + "---|" * self.n_cols]
        lines += ["| " + " | ".join(row) + " |" for row in grid[1:]]
        return "\n".join(lines)

    def text(self) -> str:
        """Rows as lines, cells joined by ``" | "`` (a cell's own line breaks become spaces)."""
        return "\n".join(
            " | ".join(" ".join(c.text.split()) for c in row) for row in self.rows() if row
        )

    def scaled(self, sx: float, sy: float | None = None) -> Table:
        """The same table with every bbox multiplied (PDF points → rendered pixels)."""
        sy = sx if sy is None else sy
        return self._mapped(lambda b: scale(b, sx, sy))

    def shifted(self, dx: float, dy: float) -> Table:
        """The same table with every bbox moved (crop pixels → page pixels)."""
        return self._mapped(lambda b: (b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy))

    def _mapped(self, move: Callable[[BBox], BBox]) -> Table:
        cells = [
            Cell(
                c.row,
                c.col,
                c.row_span,
                c.col_span,
                c.text,
                None if c.bbox is None else move(c.bbox),
            )
            for c in self.cells
        ]
        return Table(cells, self.n_rows, self.n_cols)


def _md_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


# --- born-digital: pymupdf's table finder ----------------------------------------------------

# pymupdf ≥ 2 gates ``find_tables`` by the page layout of the separate ``pymupdf-layout``
# package whenever that package is installed (a non-commercial licence, and ~0.4 s of ONNX
# per call on a CPU): the table regions here come from ragws's own layout model, so the
# finder is asked to look where it is told, whatever else the environment holds.
_FINDER_OPTIONS = (
    {"use_layout": False}
    if "use_layout" in inspect.signature(pymupdf.table.find_tables).parameters
    else {}
)


def table_from_pymupdf(page, clip: Sequence[float] | None = None) -> Table | None:
    """The largest table pymupdf finds inside ``clip`` (PDF points), ruled lines first, then
    text alignment; ``None`` when neither finds a table of at least two rows and two columns.
    Cell bboxes are in PDF points."""
    for strategy in ("lines", "text"):
        try:
            found = page.find_tables(clip=clip, strategy=strategy, **_FINDER_OPTIONS)
        except Exception:  # pymupdf raises on degenerate clips; no table there
            continue
        # The finder may return a table whose rules only cross the clip: keep those inside.
        candidates = [
            t
            for t in found.tables
            if t.row_count >= 2
            and t.col_count >= 2
            and (clip is None or overlap(t.bbox, clip) >= 0.5 * area(t.bbox))
        ]
        if candidates:
            best = max(candidates, key=lambda t: area(t.bbox))
            table = _convert(best, page.get_text("words", clip=best.bbox))
            if strategy == "text":
                # Rows found from text alignment alone come with empty rows between lines
                # of text (the gaps between baselines); there they are artefacts.
                table = _without_empty_rows(table)
            if table.n_rows >= 2 and table.n_cols >= 2:
                return table
    return None


def _convert(found, words: Sequence[tuple]) -> Table:
    """A pymupdf ``Table`` as a :class:`Table`: a merged cell appears once in ``rows[i].cells``
    (None where it covers other positions); its spans are the grid rows and columns its bbox
    covers. A cell's text is the text layer's words whose centre lies in it, in reading order
    (``Table.extract`` splits some words at punctuation: "1.20" came out as "120\\n.")."""
    rows = found.rows
    n_rows, n_cols = len(rows), max(len(r.cells) for r in rows)
    col_x: list[tuple[float, float] | None] = [None] * n_cols
    for row in rows:
        for j, box in enumerate(row.cells):
            if box is not None:
                old = col_x[j]
                # A column's extent is that of its narrowest cell starting there (not merged).
                if old is None or box[2] - box[0] < old[1] - old[0]:
                    col_x[j] = (box[0], box[2])
    row_y = [(r.bbox[1], r.bbox[3]) for r in rows]
    cells: list[Cell] = []
    for i, row in enumerate(rows):
        for j, box in enumerate(row.cells):
            if box is None:
                continue
            col_span = 1
            while j + col_span < n_cols and _covers(box[0], box[2], col_x[j + col_span]):
                col_span += 1
            row_span = 1
            while i + row_span < n_rows and _covers(box[1], box[3], row_y[i + row_span]):
                row_span += 1
            cells.append(Cell(i, j, row_span, col_span, "", tuple(box)))
    owned: list[list[Word]] = [[] for _ in cells]
    for x0, y0, x1, y1, text, *_ in words:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        for k, cell in enumerate(cells):
            b = cell.bbox
            if b[0] <= cx <= b[2] and b[1] <= cy <= b[3]:
                owned[k].append((x0, y0, x1, y1, text))
                break
    for cell, mine in zip(cells, owned, strict=True):
        cell.text = _reading_order(mine)
    return Table(cells, n_rows, n_cols)


def _without_empty_rows(table: Table) -> Table:
    """The table without rows whose cells are all empty and that no spanning cell crosses."""
    keep: list[int] = []
    for i in range(table.n_rows):
        touching = [c for c in table.cells if c.row <= i < c.row + c.row_span]
        spanned = any(c.row_span > 1 for c in touching)
        if spanned or any(c.text.strip() for c in touching):
            keep.append(i)
    if len(keep) == table.n_rows:
        return table
    new_row = {old: new for new, old in enumerate(keep)}
    cells = [
        Cell(new_row[c.row], c.col, c.row_span, c.col_span, c.text, c.bbox)
        for c in table.cells
        if c.row in new_row
    ]
    return Table(cells, len(keep), table.n_cols)


def _covers(lo: float, hi: float, extent: tuple[float, float] | None) -> bool:
    """Whether [lo, hi] holds most of ``extent`` (grid lines are shared, so allow a tolerance)."""
    if extent is None:
        return False
    a, b = extent
    mid = (a + b) / 2
    return lo <= mid <= hi and hi >= b - 0.25 * (b - a)


# --- image tables: a structure model's grid filled with words ---------------------------------


def table_from_structure(structure, words: Sequence[Word]) -> Table:
    """Fill a structure model's cells (anything with ``cells``: row, col, row_span, col_span,
    bbox; ``n_rows``, ``n_cols``) with text: each word or line box goes to the cell it overlaps
    most (or, overlapping none, the nearest cell); words of one cell are joined in reading
    order (lines top to bottom, then left to right). Boxes are in the same pixels."""
    cells = [
        Cell(c.row, c.col, c.row_span, c.col_span, "", tuple(c.bbox) if c.bbox else None)
        for c in structure.cells
    ]
    owned: list[list[Word]] = [[] for _ in cells]
    boxed = [i for i, c in enumerate(cells) if c.bbox is not None]
    for word in words:
        if not boxed or not word[4].strip():
            continue
        best = max(boxed, key=lambda i: (overlap(word, cells[i].bbox), -_gap(word, cells[i].bbox)))
        owned[best].append(word)
    for cell, mine in zip(cells, owned, strict=True):
        cell.text = _reading_order(mine)
    return Table(cells, structure.n_rows, structure.n_cols)


def _gap(word: Sequence[float], box: BBox) -> float:
    cx, cy = (word[0] + word[2]) / 2, (word[1] + word[3]) / 2
    dx = max(box[0] - cx, 0.0, cx - box[2])
    dy = max(box[1] - cy, 0.0, cy - box[3])
    return dx * dx + dy * dy


def _reading_order(words: list[Word]) -> str:
    """Words joined into lines (a word joins a line its vertical centre falls in), lines top
    to bottom, words left to right, lines joined with spaces."""
    lines: list[list[Word]] = []
    for word in sorted(words, key=lambda w: (w[1] + w[3]) / 2):
        cy = (word[1] + word[3]) / 2
        if lines and lines[-1][0][1] <= cy <= lines[-1][0][3]:
            lines[-1].append(word)
        else:
            lines.append([word])
    return " ".join(" ".join(w[4].strip() for w in sorted(ln, key=lambda w: w[0])) for ln in lines)
