"""Text lines with their typography: what the parse pipeline builds blocks from.

A :class:`Line` is one visual line of text with the features that tell structure apart: font
size, weight and whether the font is monospaced. Lines come from a PDF's own text layer
(:func:`pdf_lines`, from pymupdf's ``get_text("dict")`` spans) or from OCR (:func:`ocr_line`,
where the line's height stands for its size and nothing is known of its font).

The functions that take a pymupdf page must run on the PDF thread; everything else is pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import pymupdf

from ragws.pipeline.geometry import BBox

#: Text-layer extraction flags: whitespace as written (code keeps its spaces), text clipped to
#: the page, ligatures expanded (``ﬁ`` → ``fi``, so words and hyphenation see plain letters).
TEXT_FLAGS = pymupdf.TEXT_PRESERVE_WHITESPACE | pymupdf.TEXT_MEDIABOX_CLIP
#: A gap on one baseline this many font sizes wide separates cells, not words.
TAB_GAP = 2.0
#: Pieces on one baseline further apart than this many font sizes stay separate lines.
JOIN_GAP = 3.0
_BOLD_FLAG = 16
_MONO_FLAG = 8
_BOLD_NAME = re.compile(r"bold|black|heavy|semibold|demi|medi(?!um)|[-,]bd?\b", re.IGNORECASE)
_MONO_NAME = re.compile(r"mono|courier|consol|menlo|code|typewriter|^cmtt|^sftt|fixed", re.I)


@dataclass(frozen=True, slots=True)
class Line:
    """One visual line of text on a page.

    ``size`` is the font size in page units (points for the text layer; for OCR, the line's
    height, which is comparable between lines of one page only). ``group`` is the text layer's
    block number (lines of one MuPDF block are one run of text), -1 for OCR lines.
    """

    bbox: BBox
    text: str
    size: float
    bold: bool = False
    mono: bool = False
    group: int = -1
    source: str = "pdf"  # "pdf" | "ocr"
    horizontal: bool = True  # written left to right (not a rotated margin stamp)
    tabbed: bool = False  # pieces far apart on one baseline: a row of cells, not a sentence

    @property
    def height(self) -> float:
        return self.bbox[3] - self.bbox[1]

    @property
    def width(self) -> float:
        return self.bbox[2] - self.bbox[0]

    def scaled(self, factor: float) -> Line:
        """The line in other units (points → rendered pixels); ``size`` stays in points."""
        x0, y0, x1, y1 = self.bbox
        return replace(self, bbox=(x0 * factor, y0 * factor, x1 * factor, y1 * factor))


def pdf_lines(page: pymupdf.Page) -> list[Line]:
    """The page's text layer as lines, in points, in the text layer's own order.

    Pieces of one visual line that MuPDF keeps apart (a section number and its title, an
    equation and its number) are joined when they belong to one text block and sit on one
    baseline. Lines that are not horizontal are kept too, as their own lines: nothing of the
    text layer is dropped here.
    """
    data = page.get_text("dict", flags=TEXT_FLAGS)
    lines: list[Line] = []
    for block in data.get("blocks", ()):
        if block.get("type", 0) != 0:
            continue
        pieces = [_line(raw, block.get("number", -1)) for raw in block.get("lines", ())]
        lines.extend(_join_baselines([p for p in pieces if p is not None]))
    return lines


def _line(raw: dict, group: int) -> Line | None:
    spans = [s for s in raw.get("spans", ()) if s.get("text")]
    text = "".join(s["text"] for s in spans)
    if not text.strip():
        return None
    weights = [(len(s["text"].strip()), s) for s in spans]
    total = sum(n for n, _ in weights) or 1
    size_votes: dict[float, int] = {}
    bold = mono = 0
    for n, span in weights:
        size_votes[round(float(span["size"]), 1)] = size_votes.get(round(span["size"], 1), 0) + n
        font = span.get("font", "")
        flags = int(span.get("flags", 0))
        if flags & _BOLD_FLAG or _BOLD_NAME.search(font):
            bold += n
        if flags & _MONO_FLAG or _MONO_NAME.search(font):
            mono += n
    size = max(size_votes.items(), key=lambda kv: (kv[1], kv[0]))[0]
    x0, y0, x1, y1 = (float(v) for v in raw["bbox"])
    dx, dy = raw.get("dir", (1.0, 0.0))
    return Line(
        bbox=(x0, y0, x1, y1),
        text=text.rstrip(),
        size=size,
        bold=bold >= 0.8 * total,
        mono=mono >= 0.8 * total,
        group=group,
        horizontal=dx > 0.99 and abs(dy) < 0.01,
    )


def _join_baselines(lines: list[Line]) -> list[Line]:
    out: list[Line] = []
    for line in lines:
        prev = out[-1] if out else None
        if prev is not None and _same_baseline(prev, line):
            gap = max(0.0, line.bbox[0] - prev.bbox[2])
            joined = prev.text + (" " if gap > 0.15 * line.size else "") + line.text.lstrip()
            total = len(prev.text) + len(line.text) or 1
            out[-1] = Line(
                bbox=(
                    prev.bbox[0],
                    min(prev.bbox[1], line.bbox[1]),
                    line.bbox[2],
                    max(prev.bbox[3], line.bbox[3]),
                ),
                text=joined,
                size=prev.size if len(prev.text) >= len(line.text) else line.size,
                bold=(prev.bold * len(prev.text) + line.bold * len(line.text)) >= 0.8 * total,
                mono=(prev.mono * len(prev.text) + line.mono * len(line.text)) >= 0.8 * total,
                group=prev.group,
                tabbed=prev.tabbed or gap > TAB_GAP * max(prev.size, line.size),
            )
        else:
            out.append(line)
    return out


def _same_baseline(a: Line, b: Line) -> bool:
    overlap = min(a.bbox[3], b.bbox[3]) - max(a.bbox[1], b.bbox[1])
    return (
        b.bbox[0] >= a.bbox[2] - 0.5 * b.size  # to the right, not wrapped back
        and overlap >= 0.6 * min(a.height, b.height)
        and b.bbox[0] - a.bbox[2] < JOIN_GAP * max(a.size, b.size)
    )


def ocr_line(text: str, bbox: BBox) -> Line:
    """A line read by OCR. Its character pitch (width per character) stands for the font
    size: a detector's box height varies with ascenders, descenders and two lines merged,
    while the pitch follows the type size. Lines too short to measure get no size, so they
    are never taken for headings."""
    chars = len(text.strip())
    size = (bbox[2] - bbox[0]) / chars if chars >= 4 else 0.0
    return Line(bbox=bbox, text=text, size=size, group=-1, source="ocr")


def words(lines: Iterable[Line]) -> list[str]:
    """Every whitespace-separated word of some lines, in order."""
    return [w for line in lines for w in line.text.split()]


def dominant_size(lines: Sequence[Line]) -> float:
    """The font size that most characters of ``lines`` are set in (monospace aside): the body
    text's size. 0 when there is no text."""
    votes: dict[float, int] = {}
    for line in lines:
        if not line.mono:
            key = round(line.size * 2) / 2
            votes[key] = votes.get(key, 0) + len(line.text)
    if not votes:
        votes = {round(line.size * 2) / 2: len(line.text) for line in lines}
    return max(votes.items(), key=lambda kv: (kv[1], -kv[0]))[0] if votes else 0.0


@dataclass(slots=True)
class Shapes:
    """What a page's vector drawings say about its text, in points."""

    bullets: list[BBox]  # list bullets drawn as small shapes
    grids: list[BBox]  # areas ruled like a table


def page_shapes(page: pymupdf.Page, limit: int = 5000) -> Shapes:
    """Bullets and ruled areas from the page's drawings.

    * Bullets: small, roughly square shapes (browsers draw ``<ul>`` discs and squares as paths,
      so the text layer has no marker).
    * Ruled areas: thin rules (lines, or rectangles at most 2 pt across) that touch each other,
      grouped; a group with two horizontal and two vertical rules, or three horizontal ones
      (a booktabs table), is a table's grid, whatever the layout model saw.

    At most ``limit`` paths are looked at: a page of vector art has neither worth the time.
    """
    bullets: list[BBox] = []
    rules: list[BBox] = []
    for n, path in enumerate(page.get_cdrawings()):
        if n >= limit:
            break
        x0, y0, x1, y1 = (float(v) for v in path["rect"])
        w, h = x1 - x0, y1 - y0
        if 1.5 <= w <= 9 and 1.5 <= h <= 9 and abs(w - h) <= 0.25 * max(w, h):
            bullets.append((x0, y0, x1, y1))
        elif (w <= 2.0 and h >= 6) or (h <= 2.0 and w >= 6):
            rules.append((x0, y0, x1, y1))
    return Shapes(bullets, _grids(rules))


def _grids(rules: list[BBox], reach: float = 2.5) -> list[BBox]:
    parent = list(range(len(rules)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def near(a: BBox, b: BBox) -> bool:
        return (
            a[0] - reach <= b[2]
            and b[0] - reach <= a[2]
            and a[1] - reach <= b[3]
            and b[1] - reach <= a[3]
        )

    order = sorted(range(len(rules)), key=lambda i: rules[i][1])
    for k, i in enumerate(order):
        for j in order[k + 1 :]:
            if rules[j][1] - reach > rules[i][3] + 400:
                break
            if near(rules[i], rules[j]):
                parent[find(i)] = find(j)
    groups: dict[int, list[BBox]] = {}
    for i, rule in enumerate(rules):
        groups.setdefault(find(i), []).append(rule)
    grids = []
    for members in groups.values():
        # Rules at distinct positions: a bold rule drawn three times is still one rule.
        rows = {round(r[1]) for r in members if r[2] - r[0] > r[3] - r[1]}
        cols = {round(r[0]) for r in members if r[2] - r[0] <= r[3] - r[1]}
        if (len(rows) >= 2 and len(cols) >= 2) or len(rows) >= 3:
            grids.append(
                (
                    min(r[0] for r in members),
                    min(r[1] for r in members),
                    max(r[2] for r in members),
                    max(r[3] for r in members),
                )
            )
    return grids
