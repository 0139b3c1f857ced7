"""Parse-quality metrics: markdown out of a parser against the ground-truth markdown.

NID, NID-S, TEDS, TEDS-S, MHS and MHS-S follow opendataloader-bench's evaluator
(``src/evaluator*.py`` and ``src/converter_markdown_table.py`` in
github.com/opendataloader-project/opendataloader-bench): pipe tables become HTML tables first,
a metric is ``None`` when the ground truth has nothing for it to measure (no table: no TEDS; no
heading: no MHS), and Overall is the mean of the NID, TEDS and MHS that are not ``None``.
Heading levels, word recall and furniture leak are this benchmark's own.

The HTML of tables is read with the standard library's parser rather than lxml; for the
well-formed tables of a ground truth and of the engines measured here the trees are the same.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from statistics import fmean

from apted import APTED, Config
from rapidfuzz import fuzz
from rapidfuzz.distance import Levenshtein

_WS = re.compile(r"\s+")
_HTML_TABLE = re.compile(r"<table[^>]*?>.*?</table>", re.IGNORECASE | re.DOTALL)
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_TAG = re.compile(r"<[^>]+>")
_WORD = re.compile(r"[^\W_]+")
_EMPHASIS = re.compile(r"[*_`]+")  # bold, italic and code marks around a heading's text


def _normalize(text: str) -> str:
    return _WS.sub(" ", text).strip()


# --- pipe tables → HTML (their converter_markdown_table) ---------------------------------------


def _split_row(line: str) -> list[str] | None:
    trimmed = line.strip()
    if not trimmed or "|" not in trimmed:
        return None
    cells = trimmed.split("|")
    if trimmed.startswith("|"):
        cells = cells[1:]
    if cells and trimmed.endswith("|"):
        cells = cells[:-1]
    return [cell.strip() for cell in cells] or None


def _is_separator(cells: list[str]) -> bool:
    return bool(cells) and all(
        (c := cell.replace(" ", "")) and set(c) <= {"-", ":"} for cell in cells
    )


def _fit(cells: list[str], width: int) -> list[str]:
    """Their repair of short rows: a 3-cell row in a wider table spans its middle cell."""
    if width <= 0 or len(cells) == width:
        return cells
    if len(cells) == 3 and width > 3:
        return [cells[0]] + [cells[1]] * (width - 2) + [cells[2]]
    if len(cells) < width:
        return cells + [""] * (width - len(cells))
    return cells[:width]


def pipe_tables_to_html(markdown: str) -> str:
    """Every pipe table (a row, a ``---`` separator row, rows) as one line of HTML; the rest
    unchanged. The header row's cells become ``<th>`` (TEDS treats them as ``<td>``)."""
    lines = markdown.splitlines(keepends=True)
    out: list[str] = []
    i = 0
    while i < len(lines):
        header = _split_row(lines[i])
        separator = _split_row(lines[i + 1]) if header and i + 1 < len(lines) else None
        if not header or not separator or not _is_separator(separator):
            out.append(lines[i])
            i += 1
            continue
        width = max(len(header), len(separator))
        header = _fit(header, width)
        rows: list[list[str]] = []
        j = i + 2
        while j < len(lines) and (cells := _split_row(lines[j])):
            rows.append(_fit(cells, width))
            j += 1
        if all(cell == "" for cell in header) and rows:
            header = rows.pop(0)
        head = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>"
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
        )
        ending = lines[i][len(lines[i].rstrip("\r\n")) :]
        out.append(f"<table>{head}{body}</table>{ending}")
        i = j
    return "".join(out)


# --- NID: reading order and text ----------------------------------------------------------------


def nid(gt: str, pred: str) -> tuple[float | None, float | None]:
    """(NID, NID-S): normalized indel similarity (``rapidfuzz.fuzz.ratio`` / 100) of the two
    documents with whitespace runs collapsed, pipe tables as HTML; NID-S with every table cut
    out. ``None`` when the ground truth is empty. (Their ``evaluator_reading_order``.)"""
    gt_html, pred_html = pipe_tables_to_html(gt), pipe_tables_to_html(pred or "")
    if not _normalize(gt_html):
        return None, None
    full = fuzz.ratio(_normalize(gt_html), _normalize(pred_html)) / 100.0
    stripped = (
        fuzz.ratio(
            _normalize(_HTML_TABLE.sub(" ", gt_html)), _normalize(_HTML_TABLE.sub(" ", pred_html))
        )
        / 100.0
    )
    return full, stripped


# --- TEDS: tables as trees ---------------------------------------------------------------------


@dataclass(eq=False)
class _Node:
    tag: str
    colspan: int | None = None
    rowspan: int | None = None
    content: str = ""  # a cell's inner text and markup, as their tokenizer joins it
    children: list[_Node] | None = None
    inner: int = 0  # elements inside a cell (counted in the node total, not in the tree)

    def __post_init__(self) -> None:
        if self.children is None:
            self.children = []


def _span(value: str | None) -> int:
    try:
        return int(value or "1")
    except ValueError:
        return 1


class _TableReader(HTMLParser):
    """HTML → a tree of ``table``/``tr``/``td`` nodes; ``th`` is read as ``td``, ``thead`` and
    ``tbody`` are dropped, tables inside the outer wrapper become its children (as lxml reads
    their ``<table><html><body><table>…`` wrapping of several tables)."""

    VOID = frozenset({"br", "img", "hr", "meta", "input", "col", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = _Node("table")
        self.stack: list[_Node] = [self.root]
        self.cell: _Node | None = None
        self.cell_depth = 0  # open elements inside the current cell

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("thead", "tbody", "tfoot", "html", "body"):
            return
        if self.cell is not None:
            self.cell.inner += 1
            self.cell.content += f"<{tag}>"
            if tag not in self.VOID:
                self.cell_depth += 1
            return
        if tag in ("td", "th"):
            a = dict(attrs)
            self.cell = _Node("td", _span(a.get("colspan")), _span(a.get("rowspan")))
            self.stack[-1].children.append(self.cell)
            self.cell_depth = 0
            return
        node = _Node(tag)
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("thead", "tbody", "tfoot", "html", "body"):
            return
        if self.cell is not None:
            if tag in ("td", "th") and self.cell_depth == 0:
                self.cell = None
            elif self.cell_depth > 0:
                self.cell.content += f"</{tag}>"
                self.cell_depth -= 1
            return
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.content += data


def _count(node: _Node, root: bool = True) -> int:
    """Elements below ``root`` (lxml's ``len(table.xpath('.//*'))``)."""
    own = 0 if root else 1 + node.inner
    return own + sum(_count(child, root=False) for child in node.children)


def _cell_text(text: str) -> str:
    text = re.sub(r"<br\s*/?>", "\n", html.unescape(text))
    return _normalize(text)


class _TableConfig(Config):
    def __init__(self, structure_only: bool) -> None:
        self.structure_only = structure_only

    def rename(self, a: _Node, b: _Node) -> float:
        if a.tag != b.tag or a.colspan != b.colspan or a.rowspan != b.rowspan:
            return 1.0
        if a.tag != "td" or self.structure_only or not (a.content or b.content):
            return 0.0
        ta, tb = _cell_text(a.content), _cell_text(b.content)
        if not ta and not tb:
            return 0.0
        return Levenshtein.distance(ta, tb) / max(len(ta), len(tb))

    def children(self, node: _Node) -> list[_Node]:
        return node.children


def extract_tables(markdown: str) -> list[str]:
    """The HTML tables of ``markdown`` (pipe tables converted first), in document order."""
    return _HTML_TABLE.findall(pipe_tables_to_html(markdown or ""))


def _tables_tree(tables: Sequence[str]) -> _Node:
    reader = _TableReader()
    reader.feed("\n".join(tables))
    reader.close()
    return reader.root


def teds(gt: str, pred: str) -> tuple[float | None, float | None]:
    """(TEDS, TEDS-S): 1 − tree edit distance / node count between all of the ground truth's
    tables and all of the prediction's, each side one tree (a wrapper holding the tables in
    order; PubTabNet's TEDS as their ``evaluator_table`` runs it). Renaming a cell costs 1 when
    tag or spans differ, else the normalized Levenshtein distance of the cells' text (0 for
    TEDS-S). ``None`` when the ground truth has no table, 0 when the prediction has none."""
    gt_tables, pred_tables = extract_tables(gt), extract_tables(pred)
    if not gt_tables:
        return None, None
    if not pred_tables:
        return 0.0, 0.0
    gt_tree, pred_tree = _tables_tree(gt_tables), _tables_tree(pred_tables)
    nodes = max(_count(gt_tree), _count(pred_tree), 1)
    scores = []
    for structure_only in (False, True):
        distance = APTED(pred_tree, gt_tree, _TableConfig(structure_only)).compute_edit_distance()
        scores.append(1.0 - float(distance) / nodes)
    return scores[0], scores[1]


# --- MHS: headings and what lies under them ----------------------------------------------------


@dataclass(eq=False)
class _Section:
    tag: str  # "document", "heading" or "content"
    text: str = ""
    children: list[_Section] | None = None

    def __post_init__(self) -> None:
        if self.children is None:
            self.children = []


def _sections(markdown: str) -> _Section:
    """A document node with one child per heading (levels are not told apart) and, under each
    heading (or under the document before the first), one content node of the lines up to the
    next heading."""
    root = _Section("document")
    container, pending = root, []

    def flush() -> None:
        text = _normalize(" ".join(pending))
        if text:
            container.children.append(_Section("content", text))
        pending.clear()

    for line in (markdown or "").splitlines():
        match = _HEADING.match(line)
        if match:
            flush()
            container = _Section("heading", _normalize(match.group(2)))
            root.children.append(container)
        elif _normalize(line):
            pending.append(_normalize(line))
    flush()
    return root


class _SectionConfig(Config):
    def __init__(self, include_text: bool) -> None:
        self.include_text = include_text

    def rename(self, a: _Section, b: _Section) -> float:
        if a.tag != b.tag:
            return 1.0
        if not self.include_text or (not a.text and not b.text):
            return 0.0
        return Levenshtein.distance(a.text, b.text) / max(len(a.text), len(b.text), 1)

    def children(self, node: _Section) -> list[_Section]:
        return node.children


def _size(node: _Section) -> int:
    return 1 + sum(_size(child) for child in node.children)


def mhs(gt: str, pred: str) -> tuple[float | None, float | None]:
    """(MHS, MHS-S): 1 − tree edit distance / node count between the section trees of the two
    documents (their ``evaluator_heading_level``); renaming costs the normalized Levenshtein
    distance of the texts (MHS) or nothing (MHS-S) between nodes of the same kind. ``None``
    when the ground truth has no heading, 0 when the prediction has none."""
    gt_tree = _sections(pipe_tables_to_html(gt))
    if not any(child.tag == "heading" for child in gt_tree.children):
        return None, None
    pred_tree = _sections(pipe_tables_to_html(pred or ""))
    if not any(child.tag == "heading" for child in pred_tree.children):
        return 0.0, 0.0
    nodes = max(_size(gt_tree), _size(pred_tree), 1)
    scores = []
    for include_text in (True, False):
        distance = APTED(gt_tree, pred_tree, _SectionConfig(include_text)).compute_edit_distance()
        scores.append(min(1.0, max(0.0, 1.0 - float(distance) / nodes)))
    return scores[0], scores[1]


# --- this benchmark's own ------------------------------------------------------------------------


def words(markdown: str) -> Counter[str]:
    """The words of ``markdown`` as a multiset: HTML tags and markdown markup dropped, runs of
    letters and digits, case-folded."""
    return Counter(w.casefold() for w in _WORD.findall(_TAG.sub(" ", html.unescape(markdown))))


def word_recall(gt: str, pred: str) -> float | None:
    """The fraction of the ground truth's words (with multiplicity) that the output has."""
    want = words(gt)
    total = sum(want.values())
    if not total:
        return None
    have = words(pred or "")
    return sum(min(n, have[w]) for w, n in want.items()) / total


def furniture_leak(furniture: Sequence[str], pred: str) -> float | None:
    """The fraction of the furniture printed on the pages (running headers, page-number lines;
    one entry per printing) that shows up in the output, matched whole with whitespace runs
    collapsed and case ignored. ``None`` for documents without furniture."""
    if not furniture:
        return None
    text = _normalize(pred or "").casefold()
    printed = Counter(_normalize(s).casefold() for s in furniture)
    leaked = sum(min(n, text.count(s)) for s, n in printed.items())
    return leaked / sum(printed.values())


def _headings(markdown: str) -> Counter[tuple[int, str]]:
    return Counter(
        (len(m.group(1)), _normalize(_EMPHASIS.sub("", m.group(2))).casefold())
        for line in (markdown or "").splitlines()
        if (m := _HEADING.match(line))
    )


def heading_levels(gt: str, pred: str) -> float | None:
    """The fraction of the ground truth's headings that the output has as headings of the
    same level with the same text (emphasis marks dropped, whitespace collapsed, case
    ignored): what MHS, which does not tell levels apart, leaves out."""
    want = _headings(gt)
    if not want:
        return None
    have = _headings(pred)
    return sum(min(n, have[h]) for h, n in want.items()) / sum(want.values())


@dataclass(frozen=True)
class Scores:
    overall: float | None
    nid: float | None
    nid_s: float | None
    teds: float | None
    teds_s: float | None
    mhs: float | None
    mhs_s: float | None
    heading_levels: float | None
    word_recall: float | None
    furniture_leak: float | None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


FIELDS = tuple(Scores.__dataclass_fields__)


def score(gt: str, pred: str, furniture: Sequence[str] = ()) -> Scores:
    """Every metric of one document; Overall = mean of NID, TEDS, MHS that are not ``None``."""
    n, n_s = nid(gt, pred)
    t, t_s = teds(gt, pred)
    m, m_s = mhs(gt, pred)
    parts = [v for v in (n, t, m) if v is not None]
    return Scores(
        overall=fmean(parts) if parts else None,
        nid=n,
        nid_s=n_s,
        teds=t,
        teds_s=t_s,
        mhs=m,
        mhs_s=m_s,
        heading_levels=heading_levels(gt, pred),
        word_recall=word_recall(gt, pred),
        furniture_leak=furniture_leak(furniture, pred),
    )


def mean_scores(scores: Iterable[Scores]) -> dict[str, float | None]:
    """Each metric's mean over the documents where it is not ``None`` (as their aggregate)."""
    scores = list(scores)
    out: dict[str, float | None] = {}
    for name in FIELDS:
        values = [getattr(s, name) for s in scores if getattr(s, name) is not None]
        out[name] = fmean(values) if values else None
    return out
