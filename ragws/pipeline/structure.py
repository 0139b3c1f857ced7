"""Lines and layout regions → typed blocks: where a page's structure is decided.

Layout regions classify and group text; they never filter it. Every line of a page (from the
PDF's text layer or from OCR) ends up in exactly one block:

* each line goes to the layout region that holds most of it (at least half); lines no region
  holds form blocks of their own, grouped as the text layer grouped them (or by proximity);
* a region's lines are cut into blocks by what the lines say: headings (font size and weight
  against the document's body text, numbering such as ``2.3`` or ``IV.``), code (monospaced
  runs, line breaks and indentation kept), list items (a bullet drawn beside the line or a
  marker such as ``1.`` / ``(a)``; nesting from indentation), captions, and paragraphs (vertical
  gaps, first-line indents, a short line that ends a sentence);
* tables, figures and equations keep their region; a figure whose text layer holds text is
  read (a code block when that text is monospaced, else the figure's own text); an equation
  takes the number printed beside it;
* running headers and footers are found by repetition across pages (the same text, digits
  aside, in the same band of the page) and page-number patterns, not by the layout class.

:class:`DocumentStyle` holds what is decided over the whole document (body size, heading
styles, the title, furniture); :func:`build_blocks` applies it to one page. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ragws.pipeline.blocks import Block
from ragws.pipeline.geometry import BBox, area, overlap, union
from ragws.pipeline.reading_order import reading_order
from ragws.pipeline.textlayer import Line, dominant_size

if TYPE_CHECKING:
    from ragws.pipeline.tables import Table

#: Layout region kinds, after :func:`region_kind`.
REGION_KINDS = frozenset(
    {"text", "title", "list", "figure", "caption", "table", "footnote", "equation"}
    | {"header", "footer", "abandon"}
)
_REGION_ALIASES: dict[str, str] = {
    "plain_text": "text",
    "paragraph": "text",
    "reference": "text",
    "abstract": "text",
    "section_header": "title",
    "heading": "title",
    "doc_title": "title",
    "paragraph_title": "title",
    "figure_caption": "caption",
    "table_caption": "caption",
    "equation_caption": "caption",
    "formula_caption": "caption",
    "figure_title": "caption",
    "table_title": "caption",
    "table_footnote": "footnote",
    "isolate_formula": "equation",
    "isolated_formula": "equation",
    "interline_equation": "equation",
    "formula": "equation",
    "page_header": "header",
    "page_footer": "footer",
    "list_item": "list",
    "picture": "figure",
    "image": "figure",
    "chart": "figure",
}

#: Share of a page's height at the top and bottom where running headers and footers live.
FURNITURE_BAND = 0.09
#: A heading is set at least this much larger than the body text (or bold at body size).
HEADING_RATIO = 1.12
#: OCR pitches this close (as a fraction) are taken for one type size.
OCR_SIZE_TOLERANCE = 0.15
_MAX_HEADING_WORDS = 20

_NUMBERED_HEADING = re.compile(
    r"^(?:(?:chapter|section|part|appendix)\s+)?"
    r"(?P<num>(?:\d{1,2}|[A-Z])(?:\.\d{1,2}){0,4}|[IVX]{1,5})"
    r"(?:\.|:|\s)\s*\S",
    re.IGNORECASE,
)
_CAPTION = re.compile(
    r"^(?:figure|fig\.|table|tab\.|algorithm|listing|chart|scheme|plate)\s*"
    r"(?:[A-Z]?\d+|[IVX]+)(?:\.\d+)*\s*[.:|]",
    re.IGNORECASE,
)
_BULLET_CHARS = "•◦▪▫●○■□‣⁃∙·-–—*➢►▶✓✔"
_ITEM_MARKER = re.compile(
    rf"^(?:(?P<bullet>[{re.escape(_BULLET_CHARS)}])"
    r"|(?P<number>\(?(?:\d{1,3}|[a-z]|[ivx]{1,4})[.)]))\s+(?=\S)"
)
_EQUATION_NUMBER = re.compile(r"^\(\s*(?:\d{1,3}(?:\.\d{1,3})?[a-z]?|[A-Z]\.\d{1,3})\s*\)$")
_PAGE_NUMBER = re.compile(
    r"^(?:page|p\.|seite|pág\.?)?\s*(?:#+|[ivxlc]+)(?:\s*(?:of|/|de|von)\s*#+)?$|^[-–—]\s*#+\s*[-–—]$",
    re.IGNORECASE,
)
#: A lone monospaced line is code only with something code-like in it (not an e-mail address).
_CODE_CHARS = re.compile(r"[(){}\[\]=;<>$#|]|^\s{2,}|^\s*(?:def|class|import|return|if|for)\b")
#: Characters of formulas that tables of words and numbers seldom hold.
_MATH_CHARS = frozenset("=+∑∫√±≤≥^\\∂∞≈×÷")
_SENTENCE_END = re.compile(r"[.!?:;][\"')\]]?$")
_BROKEN_WORD = re.compile(r"([^\W\d_])-\n([a-z]\S*)")


def region_kind(label: str) -> str:
    """The region kind for a layout model's class name (case, spaces and hyphens aside); a
    name not known here is ``"text"``, so its content is still read."""
    key = re.sub(r"[\s\-_]+", "_", label.strip().lower()).strip("_")
    if key in REGION_KINDS:
        return key
    return _REGION_ALIASES.get(key, "text")


def furniture_key(text: str) -> str:
    """What makes two running headers the same: lower case, digits as ``#``, spaces folded."""
    return " ".join(re.sub(r"\d+", "#", text.lower()).split())


def dehyphenate(text: str) -> str:
    """Join words broken across lines by a hyphen: "cap-" + "ture" → "capture", but "end-" +
    "to-end" → "end-to-end" (a continuation with a hyphen of its own is a compound)."""

    def join(match: re.Match[str]) -> str:
        rest = match.group(2)
        return match.group(1) + ("-" if "-" in rest else "") + rest

    return _BROKEN_WORD.sub(join, text)


def prose(lines: Sequence[str]) -> str:
    """Lines of running text as one paragraph: hyphenated breaks joined, spaces folded."""
    return " ".join(dehyphenate("\n".join(line.strip() for line in lines)).split())


# --- the document's style ------------------------------------------------------------------


@dataclass(slots=True)
class DocumentStyle:
    """What is decided once per document and applied to every page.

    ``heading_styles`` are the (size, bold) pairs headings are set in, most prominent first:
    the first is level 2, the next level 3, and so on (the title is level 1). Numbered headings
    take their level from their numbering instead (``2`` → 2, ``2.3`` → 3).
    """

    body_size: float = 0.0
    heading_styles: list[tuple[float, bool]] = field(default_factory=list)
    title: tuple[int, frozenset[str]] | None = None  # (page, texts of its lines)
    furniture: dict[str, str] = field(default_factory=dict)  # furniture_key → header|footer
    heading_ratio: float = HEADING_RATIO  # size over the body's from which a line is a heading
    # Sizes within this fraction of each other are one style: 0 for a text layer's exact
    # sizes, more for OCR pitches, which are measured to a few percent.
    size_tolerance: float = 0.0

    def heading_level(self, line: Line, page: int, hinted: bool = False) -> int | None:
        """The heading level of ``line`` (1 for the title), or None when it is not a heading.

        ``hinted``: the layout model calls the line's region a title, which admits a heading
        set at body size without bold when it is short.
        """
        if self.title is not None and page == self.title[0] and line.text in self.title[1]:
            return 1
        text = line.text.strip()
        if not _may_be_heading(line) or self.body_size <= 0:
            return None
        words = len(text.split())
        ratio = line.size / self.body_size
        style = _style_key(line)
        if ratio >= self.heading_ratio or (line.bold and ratio >= 0.9 and words <= 14):
            level = self._style_level(style)
        elif hinted and ratio >= 0.95 and words <= 12 and not _SENTENCE_END.search(text):
            level = self._lowest_level()
        else:
            return None
        numbered = numbering_level(text)
        return numbered if numbered is not None else level

    def _style_level(self, style: tuple[float, bool]) -> int:
        for n, known in enumerate(self.heading_styles):
            if known[1] == style[1] and abs(known[0] - style[0]) <= self.size_tolerance * known[0]:
                return min(6, 2 + n)
        # Not seen in the pre-pass (an OCR'd page): place it among the known sizes.
        larger = sum(1 for s in self.heading_styles if (s[0], s[1]) > style)
        return min(6, 2 + larger)

    def _lowest_level(self) -> int:
        return min(6, 2 + len(self.heading_styles))

    def furniture_kind(self, line: Line, page_height: float) -> str | None:
        """``"header"`` or ``"footer"`` when the line is page furniture, else None: it repeats
        in its band across pages, or it is a page number in a band."""
        band = _band(line, page_height)
        if band is None:
            return None
        key = furniture_key(line.text)
        if self.furniture.get(key) == band or _PAGE_NUMBER.match(key):
            return band
        return None


def _may_be_heading(line: Line) -> bool:
    """What no heading is: code, a rotated stamp, a row of table cells, a caption, a long
    sentence, a list of names (an author line)."""
    text = line.text.strip()
    words = len(text.split())
    return (
        0 < words <= _MAX_HEADING_WORDS
        and not line.mono
        and line.horizontal
        and not line.tabbed
        and text.count(",") < 2
        and not _CAPTION.match(text)
    )


def numbering_level(text: str) -> int | None:
    """A heading's level from its numbering: ``2 Methods`` → 2, ``2.3 Data`` → 3,
    ``IV. Results`` → 2, ``Appendix B`` → 2, ``A.1 Proofs`` → 3; None without numbering."""
    match = _NUMBERED_HEADING.match(text.strip())
    if match is None:
        return None
    num = match.group("num")
    head = text.strip()[: match.start("num")].lower()
    if (
        re.fullmatch(r"[IVX]{1,5}", num)
        and "." not in text[match.end("num") : match.end("num") + 1]
    ):
        # A roman numeral needs its dot ("IV. Results"); "I think" is not a heading.
        return None if not head else 2
    if len(num) == 1 and num.isalpha() and not head and text.strip()[1:2] != ".":
        return None  # "A." alone: a lettered section only with a dot after it
    return min(6, 2 + num.count("."))


def _style_key(line: Line) -> tuple[float, bool]:
    return round(line.size * 2) / 2, line.bold


def _band(line: Line, page_height: float) -> str | None:
    center = (line.bbox[1] + line.bbox[3]) / 2
    if center <= FURNITURE_BAND * page_height:
        return "header"
    if center >= (1 - FURNITURE_BAND) * page_height:
        return "footer"
    return None


def analyze(
    pages: Sequence[tuple[int, float, Sequence[Line]]], title_tolerance: float = 0.05
) -> DocumentStyle:
    """The style of a document from its pages' lines: ``(page number, page height, lines)``,
    lines in any one unit (points for the text layer).

    * body size: the size most characters are set in;
    * furniture: keys of lines in a page's top or bottom band that recur on at least two
      pages (three when the document has more than six);
    * title: the largest text in the top half of page 0, when it is clearly larger than the
      body (consecutive lines of that size, within ``title_tolerance`` of it);
    * heading styles: sizes clearly above the body's, and bold text at body size, set in
      short lines; the more prominent first.
    """
    all_lines = [line for _, _, lines in pages for line in lines]
    style = DocumentStyle(body_size=dominant_size(all_lines))
    seen: dict[tuple[str, str], set[int]] = {}
    for page, height, lines in pages:
        for line in lines:
            band = _band(line, height)
            if band is not None:
                seen.setdefault((band, furniture_key(line.text)), set()).add(page)
    needed = 2 if len(pages) <= 6 else 3
    style.furniture = {key: band for (band, key), on in seen.items() if len(on) >= needed}
    style.title = _find_title(pages, style, title_tolerance)
    styles: set[tuple[float, bool]] = set()
    for page, height, lines in pages:
        for line in lines:
            if style.furniture_kind(line, height) is not None:
                continue
            if style.title is not None and page == style.title[0] and line.text in style.title[1]:
                continue
            if not _may_be_heading(line):
                continue
            words = len(line.text.split())
            ratio = line.size / style.body_size if style.body_size else 0
            if ratio >= HEADING_RATIO or (line.bold and ratio >= 0.9 and words <= 14):
                styles.add(_style_key(line))
    style.heading_styles = sorted(styles, key=lambda s: (-s[0], not s[1]))
    return style


def _find_title(
    pages: Sequence[tuple[int, float, Sequence[Line]]], style: DocumentStyle, tolerance: float
) -> tuple[int, frozenset[str]] | None:
    first = next((p for p in pages if p[0] == 0), None)
    if first is None or style.body_size <= 0:
        return None
    _, height, lines = first
    top = [
        line
        for line in lines
        if line.bbox[1] < 0.5 * height
        and _may_be_heading(line)
        and style.furniture_kind(line, height) is None
        and len(line.text.split()) <= 30
    ]
    if not top:
        return None
    largest = max(line.size for line in top)
    if largest < 1.25 * style.body_size:
        return None
    chosen = [line for line in top if abs(line.size - largest) <= tolerance * largest]
    # The title is one run: the first line of the largest size and those right under it.
    chosen.sort(key=lambda line: line.bbox[1])
    run = [chosen[0]]
    for line in chosen[1:]:
        if line.bbox[1] - run[-1].bbox[3] <= 1.5 * line.height:
            run.append(line)
    return 0, frozenset(line.text for line in run)


def mark_repeated_furniture(pages: Sequence[tuple[float, Sequence[Block]]]) -> bool:
    """Running headers and footers of OCR'd pages, found once every page is read: short
    blocks in a page's top or bottom band whose text recurs across pages (as
    :func:`analyze` finds them in a text layer before any page is parsed). ``pages`` are
    (page height, blocks); matching blocks become ``header``/``footer`` in place. Returns
    whether any did."""
    seen: dict[tuple[str, str], set[int]] = {}
    candidates: list[tuple[Block, str, str]] = []
    for height, blocks in pages:
        for block in blocks:
            if block.source != "ocr" or block.type not in ("text", "heading", "title"):
                continue
            if len(block.text.split()) > 15:
                continue
            line = Line(block.bbox, block.text, 1.0)
            band = _band(line, height)
            if band is None:
                continue
            key = furniture_key(block.text)
            seen.setdefault((band, key), set()).add(block.page)
            candidates.append((block, band, key))
    needed = 2 if len(pages) <= 6 else 3
    changed = False
    for block, band, key in candidates:
        if len(seen[(band, key)]) >= needed or _PAGE_NUMBER.match(key):
            block.type, block.level = band, None
            changed = True
    return changed


def page_style(lines: Sequence[Line], page: int, height: float) -> DocumentStyle:
    """The style of one OCR'd page, from its lines' character pitch alone (no fonts are
    known): the common pitch is the body; clearly larger type is a heading, ranked by size."""
    # A title's lines are one size, but the pitch of a short line ("Programme") strays most.
    style = analyze([(page, height, lines)], title_tolerance=2 * OCR_SIZE_TOLERANCE)
    style.furniture = {}
    # A pitch is measured to a few percent: only clearly larger type counts as a heading, and
    # pitches close to each other are one size (a short word's pitch strays the most).
    style.heading_ratio = 1.2
    style.size_tolerance = OCR_SIZE_TOLERANCE
    sizes = sorted(
        (s[0] for s in style.heading_styles if s[0] >= style.heading_ratio * style.body_size),
        reverse=True,
    )
    clusters: list[float] = []
    for size in sizes:
        if not clusters or size < (1 - OCR_SIZE_TOLERANCE) * clusters[-1]:
            clusters.append(size)
    # Each cluster is named by its middle, so that a size within the tolerance of any member
    # finds it.
    style.heading_styles = [
        (_middle([s for s in sizes if top >= s >= (1 - OCR_SIZE_TOLERANCE) * top]), False)
        for top in clusters
    ]
    return style


def _middle(sizes: list[float]) -> float:
    return (max(sizes) + min(sizes)) / 2


# --- one page --------------------------------------------------------------------------------


@dataclass(slots=True)
class Region:
    """A layout region of a page, in the rendered page's pixels."""

    kind: str
    bbox: BBox
    score: float = 1.0


@dataclass(slots=True)
class _Unit:
    """A region, or a run of lines no region holds, with the lines it got."""

    kind: str
    bbox: BBox
    lines: list[Line]
    score: float = 1.0
    region: int | None = None  # index of its layout region


@dataclass(slots=True)
class PageInput:
    """What :func:`build_blocks` needs of one page, everything in the rendered page's pixels.

    ``tables`` holds the table read for a table region (by region index), ``texts`` the text
    read by OCR for a region with no lines, ``bullets`` the bullet shapes drawn on the page.
    """

    page: int
    width: float
    height: float
    regions: list[Region]
    lines: list[Line]
    style: DocumentStyle
    source: str = "pdf"
    bullets: list[BBox] = field(default_factory=list)
    tables: dict[int, Table] = field(default_factory=dict)
    texts: dict[int, str] = field(default_factory=dict)


#: A region this much inside another is part of it, not a region of its own.
CONTAINED = 0.8


def resolve_regions(regions: list[Region]) -> list[Region]:
    """Resolve overlapping regions, which layout models report across classes.

    * A region mostly inside a table or figure is part of it (cell text, axis labels): dropped,
      except captions, headers and footers. Of a table and a figure around the same thing,
      the higher-scoring one stays.
    * Of two other regions where one lies mostly inside the other, the inner one is dropped
      (e.g. a "title" and a "text" box around the same heading; of two near-identical boxes a
      title is kept, else the higher-scoring one). Its lines go to the outer region, where the
      lines themselves decide what is a heading.
    """
    order = sorted(
        range(len(regions)), key=lambda i: (regions[i].kind != "title", -regions[i].score)
    )
    kept: set[int] = set()
    for i in order:
        region = regions[i]
        if region.kind in ("table", "figure"):
            # Of a table and a figure drawn around the same thing, the likelier one.
            twin = any(
                j in kept
                and other.kind in ("table", "figure")
                and overlap(region.bbox, other.bbox) >= CONTAINED * area(region.bbox)
                for j, other in enumerate(regions)
            )
            if not twin:
                kept.add(i)
            continue
        exempt = region.kind in ("caption", "header", "footer", "abandon")
        inside = False
        for j, other in enumerate(regions):
            if j == i or overlap(region.bbox, other.bbox) < CONTAINED * area(region.bbox):
                continue
            container = other.kind in ("table", "figure")
            if (container and not exempt) or (
                not container and (j in kept or area(other.bbox) > area(region.bbox))
            ):
                inside = True
            if inside:
                break
        if not inside:
            kept.add(i)
    return [r for i, r in enumerate(regions) if i in kept]


def ruled_tables(regions: Sequence[Region], grids: Sequence[BBox]) -> list[Region]:
    """Table regions for ruled grids the layout model did not box as tables (it misses many
    tables of documents unlike those it was trained on); a grid mostly inside a table or
    figure region is that region's."""
    found = []
    for grid in grids:
        inside = any(
            r.kind in ("table", "figure") and overlap(grid, r.bbox) >= 0.5 * area(grid)
            for r in regions
        )
        if not inside and area(grid) > 0:
            found.append(Region("table", grid, 1.0))
    return found


def retype_tabular_regions(regions: list[Region], lines: Sequence[Line]) -> None:
    """Equation and text regions of an OCR'd page whose lines form a grid become tables, in
    place. The layout model boxes a scanned table well but often calls it an equation; OCR
    then finds one box per cell, in rows that share their column edges, and a formula has no
    such grid."""
    owners = assign_lines(lines, regions)
    for i, region in enumerate(regions):
        if region.kind in ("equation", "text"):
            mine = [ln for ln, owner in zip(lines, owners, strict=True) if owner == i]
            if mine and all(ln.source == "ocr" for ln in mine) and _grid_like(mine):
                region.kind = "table"


def _grid_like(lines: Sequence[Line]) -> bool:
    if len(lines) < 6 or any(ch in ln.text for ln in lines for ch in _MATH_CHARS):
        return False
    rows: list[list[Line]] = []
    for line in sorted(lines, key=lambda ln: (ln.bbox[1] + ln.bbox[3]) / 2):
        cy = (line.bbox[1] + line.bbox[3]) / 2
        if rows and cy <= max(ln.bbox[3] for ln in rows[-1]):
            rows[-1].append(line)
        else:
            rows.append([line])
    multi = [row for row in rows if len(row) >= 2]
    if len(multi) < 3 or len(multi) < 0.6 * len(rows):
        return False
    # Columns: left edges that recur, within half a line height, in at least half the rows.
    height = sorted(ln.height for ln in lines)[len(lines) // 2]
    edges = sorted(ln.bbox[0] for row in multi for ln in row)
    columns: list[list[float]] = []
    for x in edges:
        if columns and x - columns[-1][-1] <= 0.5 * height:
            columns[-1].append(x)
        else:
            columns.append([x])
    return sum(1 for col in columns if len(col) >= 0.5 * len(multi)) >= 2


def regions_without_text(
    lines: Sequence[Line], regions: Sequence[Region], kinds: Collection[str]
) -> list[int]:
    """Regions of ``kinds`` that hold no line at all (none with half its area inside), which
    only OCR can read. A region whose lines another, nested region owns has text: reading it
    again would put that text in two blocks."""
    return [
        i
        for i, region in enumerate(regions)
        if region.kind in kinds
        and not any(overlap(ln.bbox, region.bbox) >= 0.5 * area(ln.bbox) for ln in lines)
    ]


def assign_lines(lines: Sequence[Line], regions: Sequence[Region]) -> list[int | None]:
    """The region each line belongs to: the one holding most of its area, if at least half
    (the smaller region on a tie); None for a line no region holds."""
    owners: list[int | None] = []
    for line in lines:
        own = max(area(line.bbox), 1e-6)
        best: tuple[float, float, int] | None = None
        for i, region in enumerate(regions):
            share = overlap(line.bbox, region.bbox) / own
            if share >= 0.5:
                candidate = (share, -area(region.bbox), i)
                if best is None or candidate > best:
                    best = candidate
        owners.append(best[2] if best is not None else None)
    return owners


def build_blocks(page: PageInput) -> list[Block]:
    """The blocks of one page in reading order, every line in exactly one of them."""
    units = _units(page)
    placed = [
        Block(type=_order_type(u.kind), bbox=u.bbox, page=page.page, score=u.score) for u in units
    ]
    ordered = reading_order(placed, page.width, page.height)
    by_id = {id(b): u for b, u in zip(placed, units, strict=True)}
    blocks: list[Block] = []
    starts: set[int] = set()  # blocks that begin a unit: only those may continue another
    for placeholder in ordered:
        made = _unit_blocks(by_id[id(placeholder)], page)
        if made:
            starts.add(id(made[0]))
        blocks.extend(made)
    blocks = _join_continuations(blocks, starts, page.height)
    for n, block in enumerate(blocks):
        block.order = n
    return blocks


def _join_continuations(blocks: list[Block], starts: set[int], height: float) -> list[Block]:
    """A paragraph the layout model cut in two (a region boundary mid-sentence) made whole:
    text that starts a region in lower case right after prose that did not end a sentence.
    A block in the page's top band is no paragraph's first half: it is a running header (the
    page's first paragraph often continues the previous page's last); one in the bottom band
    may well be, at the foot of a column. Likewise a
    code listing or a list that a column break or region edge cut in two: a unit that starts
    with code right after code, or with list items right after a list, goes on with it."""
    out: list[Block] = []
    for block in blocks:
        prev = out[-1] if out else None
        if (
            prev is not None
            and id(block) in starts
            and block.type == prev.type
            and block.type in ("code", "list")
            and block.source == prev.source
        ):
            prev.text = f"{prev.text}\n{block.text}"
            prev.bbox = union(prev.bbox, block.bbox)
            if prev.items is not None and block.items is not None:
                prev.items.extend(block.items)
            continue
        if (
            prev is not None
            and id(block) in starts
            and block.type == "text"
            and prev.type in ("text", "caption", "footnote")
            and prev.text
            and _band(Line(prev.bbox, prev.text, 1.0), height) != "header"
            and block.text[:1].islower()
            and not _SENTENCE_END.search(prev.text)
        ):
            prev.text = prose([prev.text, block.text])
            prev.bbox = union(prev.bbox, block.bbox)
            continue
        out.append(block)
    return out


def _order_type(kind: str) -> str:
    # Reading order puts headers first and footers last, whatever their position.
    return kind if kind in ("header", "footer") else "text"


def _units(page: PageInput) -> list[_Unit]:
    owners = assign_lines(page.lines, page.regions)
    furniture: list[_Unit] = []
    units = [
        _Unit(kind=r.kind, bbox=r.bbox, lines=[], score=r.score, region=i)
        for i, r in enumerate(page.regions)
    ]
    orphans: list[Line] = []
    for line, owner in zip(page.lines, owners, strict=True):
        kind = page.style.furniture_kind(line, page.height)
        if kind is not None:
            furniture.append(_Unit(kind=kind, bbox=line.bbox, lines=[line]))
        elif owner is None:
            orphans.append(line)
        else:
            units[owner].lines.append(line)
    _attach_equation_numbers(units, orphans)
    _attach_to_near_edges(units, orphans)
    kept: list[_Unit] = []
    for unit in units:
        if unit.kind in ("header", "footer", "abandon"):
            # Not furniture by repetition: the layout class alone does not drop text.
            unit.kind = "text"
        if unit.lines or unit.kind in ("figure", "table", "equation") or unit.region in page.texts:
            unit.bbox = union(unit.bbox, *(line.bbox for line in unit.lines))
            kept.append(unit)
    kept.extend(_orphan_units(orphans))
    return kept + furniture


def _attach_equation_numbers(units: list[_Unit], orphans: list[Line]) -> None:
    """An equation's number printed beside it, outside its region, joins the equation."""
    equations = [u for u in units if u.kind == "equation"]
    if not equations:
        return
    for line in list(orphans):
        if not _EQUATION_NUMBER.match(line.text.strip()):
            continue
        cy = (line.bbox[1] + line.bbox[3]) / 2
        for unit in equations:
            if unit.bbox[1] - line.height <= cy <= unit.bbox[3] + line.height:
                unit.lines.append(line)
                orphans.remove(line)
                break


def _attach_to_near_edges(units: list[_Unit], orphans: list[Line]) -> None:
    """A line just outside a region's left or right edge, on a row of that region's lines, is
    the region's: a layout box drawn too tight, or a listing's line numbers beside its code."""
    for line in list(orphans):
        cy = (line.bbox[1] + line.bbox[3]) / 2
        best: tuple[float, _Unit] | None = None
        for unit in units:
            if not unit.lines or unit.kind in ("header", "footer"):
                continue
            on_row = any(ln.bbox[1] <= cy <= ln.bbox[3] for ln in unit.lines)
            if not on_row and not unit.bbox[1] <= cy <= unit.bbox[3]:
                continue
            distance = max(unit.bbox[0] - line.bbox[2], line.bbox[0] - unit.bbox[2])
            reach = (2.0 if on_row else 1.0) * line.height
            if distance <= reach and (best is None or distance < best[0]):
                best = (distance, unit)
        if best is not None:
            best[1].lines.append(line)
            orphans.remove(line)


def _orphan_units(lines: list[Line]) -> list[_Unit]:
    """Lines no region holds, grouped into runs: the lines of one text-layer block, joined by
    the next line close below that starts within the run's width (a nested list item the text
    layer put in a block of its own; OCR lines, which have no blocks). The runs are cut into
    paragraphs later, as a region's lines are."""
    units: list[_Unit] = []
    for line in sorted(lines, key=lambda ln: (ln.group, ln.bbox[1], ln.bbox[0])):
        last = units[-1] if units else None
        if last is not None and _same_run(last, line):
            last.lines.append(line)
            last.bbox = union(last.bbox, line.bbox)
        else:
            units.append(_Unit(kind="text", bbox=line.bbox, lines=[line]))
    return units


def _same_run(run: _Unit, line: Line) -> bool:
    prev = run.lines[-1]
    if prev.group >= 0 and prev.group == line.group:
        return True
    gap = line.bbox[1] - prev.bbox[3]
    reach = 2 * prev.height
    return (
        -0.5 * prev.height <= gap <= 1.2 * prev.height
        and run.bbox[0] - reach <= line.bbox[0] <= run.bbox[2] + reach
    )


# --- a unit's blocks -------------------------------------------------------------------------


def _unit_blocks(unit: _Unit, page: PageInput) -> list[Block]:
    lines = _reading_lines(unit.lines)
    make = _maker(unit, page)
    if unit.kind in ("header", "footer"):
        return [make(unit.kind, text=prose([ln.text for ln in lines]), lines=lines)]
    if unit.kind == "table":
        return _table_blocks(unit, lines, page, make)
    if unit.kind == "equation":
        if unit.region in page.texts or not lines:
            text = page.texts.get(unit.region, "") if unit.region is not None else ""
            return [make("equation", text=text.strip(), lines=[], bbox=unit.bbox)]
        return [make("equation", text=_equation_text(lines), lines=lines, bbox=unit.bbox)]
    if unit.kind == "figure":
        return _figure_blocks(unit, lines, page, make)
    if not lines:
        text = page.texts.get(unit.region, "") if unit.region is not None else ""
        if not text.strip():
            return []
        if unit.kind == "title":
            return [make("heading", text=prose(text.splitlines()), bbox=unit.bbox, level=2)]
        kind = _default_kind(unit.kind)
        return [make(kind, text=prose(text.splitlines()), bbox=unit.bbox)]
    return _text_blocks(unit, lines, page, make)


Maker = Callable[..., Block]


def _maker(unit: _Unit, page: PageInput) -> Maker:
    def make(
        kind: str,
        *,
        text: str = "",
        lines: Sequence[Line] = (),
        bbox: BBox | None = None,
        **extra: object,
    ) -> Block:
        box = bbox if bbox is not None else union(lines[0].bbox, *(ln.bbox for ln in lines))
        source = lines[0].source if lines else ("ocr" if text else "none")
        block = Block(type=kind, bbox=box, page=page.page, text=text, source=source)
        block.score = unit.score
        for key, value in extra.items():
            setattr(block, key, value)
        return block

    return make


def _reading_lines(lines: Sequence[Line]) -> list[Line]:
    """Lines top to bottom; lines on one row (overlapping vertically) left to right."""
    rows: list[list[Line]] = []
    for line in sorted(lines, key=lambda ln: (ln.bbox[1], ln.bbox[0])):
        row = rows[-1] if rows else None
        if row is not None:
            top, bottom = min(ln.bbox[1] for ln in row), max(ln.bbox[3] for ln in row)
            if min(bottom, line.bbox[3]) - max(top, line.bbox[1]) >= 0.5 * line.height:
                row.append(line)
                continue
        rows.append([line])
    return [line for row in rows for line in sorted(row, key=lambda ln: ln.bbox[0])]


def _equation_text(lines: Sequence[Line]) -> str:
    body = [ln.text.strip() for ln in lines if not _EQUATION_NUMBER.match(ln.text.strip())]
    numbers = [ln.text.strip() for ln in lines if _EQUATION_NUMBER.match(ln.text.strip())]
    return " ".join(body + numbers)


def _table_blocks(unit: _Unit, lines: list[Line], page: PageInput, make: Maker) -> list[Block]:
    table = page.tables.get(unit.region) if unit.region is not None else None
    if table is None and _mostly_mono(lines):
        return _code_blocks(unit, lines, page, make)
    if table is None or not table.cells:
        if not lines:
            # Read by a backend that writes markup (GOT-OCR2's tables), or nothing at all.
            text = page.texts.get(unit.region, "") if unit.region is not None else ""
            return [make("table", text=text.strip(), bbox=unit.bbox)] if text.strip() else []
        rows = _rows(lines)
        if all(len(row) == 1 for row in rows):
            # One line per row, nothing side by side: prose the layout model took for a table.
            return _text_blocks(unit, lines, page, make, kind="text")
        # No grid could be read: the rows as lines, so the text is still there.
        text = "\n".join(" | ".join(ln.text.strip() for ln in row) for row in rows)
        return [make("table", text=text, lines=lines, bbox=unit.bbox)]
    inside, rest = [], []
    for line in lines:
        (inside if _in_table(line, table, unit.bbox) else rest).append(line)
    blocks = [make("table", text=table.text(), lines=inside, bbox=unit.bbox, table=table)]
    # The cells' text comes from the lines the region holds, whichever fell inside a cell.
    blocks[0].source = lines[0].source
    if rest:
        blocks.extend(_text_blocks(unit, rest, page, make, kind="text"))
    return blocks


def _in_table(line: Line, table: Table, region: BBox) -> bool:
    boxes = [c.bbox for c in table.cells if c.bbox is not None]
    if not boxes:
        return True
    covered = max(overlap(line.bbox, b) for b in boxes) if boxes else 0.0
    if covered >= 0.3 * max(area(line.bbox), 1e-6):
        return True
    # Words of the line may still be in a cell's text even if the box math disagrees.
    words = set(line.text.split())
    cell_words = {w for c in table.cells for w in c.text.split()}
    return bool(words) and words <= cell_words


def _rows(lines: Sequence[Line]) -> list[list[Line]]:
    rows: list[list[Line]] = []
    for line in lines:
        if rows:
            last = rows[-1][-1]
            if min(last.bbox[3], line.bbox[3]) - max(last.bbox[1], line.bbox[1]) >= 0.5 * min(
                last.height, line.height
            ):
                rows[-1].append(line)
                continue
        rows.append([line])
    return rows


def _figure_blocks(unit: _Unit, lines: list[Line], page: PageInput, make: Maker) -> list[Block]:
    if not lines:
        return [make("figure", bbox=unit.bbox)]
    if _mostly_mono(lines):
        return _code_blocks(unit, lines, page, make)
    # Text the figure holds (labels, a diagram's words): kept with the figure, line by line.
    text = "\n".join(" ".join(row_text.split()) for row_text in _row_texts(lines))
    return [make("figure", text=text, lines=lines, bbox=unit.bbox)]


def _code_blocks(unit: _Unit, lines: list[Line], page: PageInput, make: Maker) -> list[Block]:
    """A listing: its code, and the prose around it in the same region (a caption under it)
    as blocks of their own. Prose is a row with no monospaced piece and more than two words
    (a line number beside the code is neither)."""
    code: list[Line] = []
    prose_lines: list[Line] = []
    for row in _rows(lines):
        if any(ln.mono for ln in row) or sum(len(ln.text.split()) for ln in row) <= 2:
            code.extend(row)
        else:
            prose_lines.extend(row)
    blocks = [make("code", text=_code_text(code), lines=code)] if code else []
    if prose_lines:
        blocks.extend(_text_blocks(unit, prose_lines, page, make, kind="text"))
    return blocks


def _mostly_mono(lines: Sequence[Line]) -> bool:
    mono = sum(len(ln.text) for ln in lines if ln.mono)
    return bool(lines) and mono >= 0.6 * sum(len(ln.text) for ln in lines)


def _row_texts(lines: Sequence[Line]) -> list[str]:
    return [" ".join(ln.text.strip() for ln in row) for row in _rows(lines)]


def _code_text(lines: Sequence[Line]) -> str:
    """Code lines with their indentation (from each line's left edge, in characters) and the
    blank lines between them kept; pieces of one row (a line number and its code) joined."""
    widths = [ln.width / len(ln.text) for ln in lines if len(ln.text.strip()) >= 2]
    char = sorted(widths)[len(widths) // 2] if widths else max(1.0, lines[0].height / 2)
    left = min(ln.bbox[0] for ln in lines)
    out: list[str] = []
    prev: list[Line] | None = None
    for row in _rows(_reading_lines(lines)):
        if prev is not None:
            height = max(max(ln.height for ln in prev), 1.0)
            gap = min(ln.bbox[1] for ln in row) - max(ln.bbox[3] for ln in prev)
            out.extend([""] * max(0, min(3, int(gap / (0.9 * height)))))
        text = ""
        x = left
        for piece in row:
            raw = piece.text.rstrip()
            stripped = raw.lstrip(" ")
            spaces = max(round((piece.bbox[0] - x) / char), 1 if text else 0)
            text += " " * (spaces + len(raw) - len(stripped)) + stripped
            x = piece.bbox[2]
        out.append(text)
        prev = row
    return "\n".join(out)


# --- running text: headings, lists, code, captions, paragraphs ------------------------------


@dataclass(slots=True)
class _Piece:
    kind: str  # heading | code | item | text | caption | footnote
    lines: list[Line]
    level: int = 0  # heading level
    marker: str = ""  # list item marker
    indent: float = 0.0  # list item marker's x


def _text_blocks(
    unit: _Unit, lines: list[Line], page: PageInput, make: Maker, kind: str | None = None
) -> list[Block]:
    kind = kind or unit.kind
    pieces = _pieces(lines, page, hinted=kind == "title", default=_default_kind(kind))
    blocks: list[Block] = []
    k = 0
    while k < len(pieces):
        piece = pieces[k]
        if piece.kind == "item":
            items = [piece]
            k += 1
            while k < len(pieces) and pieces[k].kind == "item" and _same_list(items, pieces[k]):
                items.append(pieces[k])
                k += 1
            blocks.append(_list_block(items, make))
            continue
        k += 1
        texts = [ln.text for ln in piece.lines]
        if piece.kind == "heading":
            text = " ".join(" ".join(t.split()) for t in texts)
            level = piece.level
            block_type = "title" if level == 1 else "heading"
            blocks.append(make(block_type, text=text, lines=piece.lines, level=level))
        elif piece.kind == "code" and (len(piece.lines) > 1 or _CODE_CHARS.search(texts[0])):
            blocks.append(make("code", text=_code_text(piece.lines), lines=piece.lines))
        else:
            blocks.append(make(piece.kind, text=prose(texts), lines=piece.lines))
    return blocks


def _same_list(items: list[_Piece], item: _Piece) -> bool:
    """Whether ``item`` continues the list of ``items``: a numbered list right after a bullet
    list (or the other way round) at the same indentation is a list of its own."""
    first = items[0]
    tolerance = max(2.0, 0.8 * first.lines[0].height)
    if abs(item.indent - first.indent) > tolerance:
        return True
    return (item.marker == "-") == (first.marker == "-")


def _default_kind(kind: str) -> str:
    return {"caption": "caption", "footnote": "footnote"}.get(kind, "text")


def _list_block(items: list[_Piece], make: Maker) -> Block:
    indents: list[float] = []
    tolerance = max(2.0, 0.8 * min(ln.height for it in items for ln in it.lines))
    for x in sorted({it.indent for it in items}):
        if not indents or x - indents[-1] > tolerance:
            indents.append(x)
    entries = []
    for it in items:
        level = max(i for i, x in enumerate(indents) if it.indent >= x - tolerance)
        text = prose([_strip_marker(it.lines[0].text), *(ln.text for ln in it.lines[1:])])
        entries.append({"text": text, "level": level, "marker": it.marker})
    lines = [ln for it in items for ln in it.lines]
    text = "\n".join(e["text"] for e in entries)
    return make("list", text=text, lines=lines, items=entries)


def _strip_marker(text: str) -> str:
    return _ITEM_MARKER.sub("", text.strip(), count=1)


def _pieces(lines: list[Line], page: PageInput, *, hinted: bool, default: str) -> list[_Piece]:
    """Cut a unit's lines into pieces: each heading, code run, list item or paragraph."""
    height = sorted(ln.height for ln in lines)[len(lines) // 2]
    left = min(ln.bbox[0] for ln in lines)
    right = max(ln.bbox[2] for ln in lines)
    pieces: list[_Piece] = []
    for line in lines:
        level = page.style.heading_level(line, page.page, hinted=hinted)
        marker = _marker(line, page.bullets)
        prev = pieces[-1] if pieces else None
        last = prev.lines[-1] if prev else None
        gap = line.bbox[1] - last.bbox[3] if last is not None else 0.0
        # "3. Outlook" is a heading when set bold or large, else a numbered list item.
        plain = not line.bold and line.size < page.style.heading_ratio * page.style.body_size
        if level is not None and not (marker and level > 1 and plain):
            if prev and prev.kind == "heading" and prev.level == level and gap < 0.8 * height:
                prev.lines.append(line)
            else:
                pieces.append(_Piece("heading", [line], level=level))
            continue
        if line.mono:
            if prev and prev.kind == "code" and gap < 2.5 * height:
                prev.lines.append(line)
            else:
                pieces.append(_Piece("code", [line]))
            continue
        if marker:
            pieces.append(_Piece("item", [line], marker=marker[0], indent=marker[1]))
            continue
        if (
            prev
            and prev.kind == "item"
            and line.bbox[0] > prev.indent + 0.3 * height
            and gap < 0.6 * height
        ):
            # A continuation of the item: indented past its marker, no paragraph gap.
            prev.lines.append(line)
            continue
        if (
            prev
            and prev.kind in ("text", "caption", "footnote")
            and last is not None
            and not _paragraph_break(last, line, gap, height, left, right)
        ):
            prev.lines.append(line)
            continue
        kind = "caption" if _CAPTION.match(line.text.strip()) else default
        pieces.append(_Piece(kind, [line]))
    for piece in pieces:
        if piece.kind == "heading" and piece.level > 1:
            words = sum(len(ln.text.split()) for ln in piece.lines)
            if words > _MAX_HEADING_WORDS:
                piece.kind = default  # a paragraph set large or bold, not a heading
    return pieces


def _paragraph_break(
    last: Line, line: Line, gap: float, height: float, left: float, right: float
) -> bool:
    # OCR boxes hug the glyphs and vary from line to line: a wider gap before a new paragraph.
    if gap > (0.7 if line.source == "ocr" else 0.5) * height or gap < -0.5 * height:
        return True
    if last.group >= 0 and line.group >= 0 and last.group != line.group and gap > 0.2 * height:
        return True
    if left + 0.8 * height < line.bbox[0] < left + 5 * height and last.bbox[0] < line.bbox[0]:
        return True  # a first-line indent
    short = last.bbox[2] < right - 3 * height
    return short and bool(_SENTENCE_END.search(last.text.strip()))


def _marker(line: Line, bullets: Sequence[BBox]) -> tuple[str, float] | None:
    """A list item's marker and the marker's x: a bullet shape just left of the line, or a
    marker written at its start."""
    cy = (line.bbox[1] + line.bbox[3]) / 2
    for b in bullets:
        bcy = (b[1] + b[3]) / 2
        if abs(bcy - cy) <= 0.4 * line.height and 0 <= line.bbox[0] - b[2] <= 3 * line.height:
            return "-", b[0]
    match = _ITEM_MARKER.match(line.text.strip())
    if match is None:
        return None
    if match.group("bullet"):
        return "-", line.bbox[0]
    return match.group("number"), line.bbox[0]
