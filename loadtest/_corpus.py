"""The parse-quality corpus: documents with known structure, typeset as PDFs.

Each document is a list of blocks (headings, paragraphs, nested lists, code, tables, some with
merged cells) drawn from a seeded generator, so the corpus is the same on every machine. The
blocks are written twice: as markdown, the ground truth, and as HTML, which Chromium typesets
(``page.pdf()`` through Playwright) in three layouts. A fourth layout rasterises the
headers-and-footers PDFs into image-only PDFs, for OCR. Running headers and page-number
footers are not in the ground truth; the strings are kept so that a parser's leaking of them
can be counted.
"""

from __future__ import annotations

import html
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
)
LAYOUTS = ("one-column", "two-column", "headers-footers", "scans")
#: Resolution of the image-only copies.
SCAN_DPI = 150


# --- blocks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heading:
    level: int  # 1 = the title
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class ListItem:
    text: str
    level: int  # 0 = top
    ordered: bool


@dataclass(frozen=True)
class ListBlock:
    items: tuple[ListItem, ...]


@dataclass(frozen=True)
class Code:
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    text: str
    rowspan: int = 1
    colspan: int = 1


@dataclass(frozen=True)
class Table:
    rows: tuple[tuple[Cell, ...], ...]  # cells as HTML lists them (spanned positions left out)
    header_rows: int = 1
    ruled: bool = True

    @property
    def spanned(self) -> bool:
        return any(c.rowspan > 1 or c.colspan > 1 for row in self.rows for c in row)


Block = Heading | Paragraph | ListBlock | Code | Table


@dataclass(frozen=True)
class Document:
    name: str
    blocks: tuple[Block, ...]
    running_header: str  # printed on every page in the headers-footers layout, never in the text

    @property
    def markdown(self) -> str:
        return to_markdown(self.blocks)


# --- markdown (the ground truth) and HTML (what is typeset) ------------------------------------


def _table_html(table: Table, head_tag: str = "td") -> str:
    rows = []
    for r, row in enumerate(table.rows):
        tag = head_tag if r < table.header_rows else "td"
        cells = []
        for cell in row:
            attrs = (f' rowspan="{cell.rowspan}"' if cell.rowspan > 1 else "") + (
                f' colspan="{cell.colspan}"' if cell.colspan > 1 else ""
            )
            cells.append(f"<{tag}{attrs}>{html.escape(cell.text)}</{tag}>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _list_markdown(block: ListBlock) -> str:
    lines, counters = [], {}
    for item in block.items:
        for deeper in [k for k in counters if k > item.level]:
            del counters[deeper]
        if item.ordered:
            counters[item.level] = counters.get(item.level, 0) + 1
            marker = f"{counters[item.level]}."
        else:
            marker = "-"
        lines.append("  " * item.level + f"{marker} {item.text}")
    return "\n".join(lines)


def to_markdown(blocks: Sequence[Block]) -> str:
    """Blocks as markdown: ``#``… headings, paragraphs, ``-``/``1.`` lists nested by two
    spaces a level, fenced code, pipe tables, HTML tables where a cell spans."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append("#" * block.level + " " + block.text)
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, ListBlock):
            parts.append(_list_markdown(block))
        elif isinstance(block, Code):
            parts.append("```\n" + "\n".join(block.lines) + "\n```")
        elif block.spanned:
            parts.append(_table_html(block))
        else:
            header, *body = ([c.text for c in row] for row in block.rows)
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in body]
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _list_html(block: ListBlock) -> str:
    out: list[str] = []
    stack: list[str] = []  # open list tags
    for item in block.items:
        tag = "ol" if item.ordered else "ul"
        while len(stack) > item.level + 1:
            out.append(f"</li></{stack.pop()}>")
        if len(stack) == item.level + 1:
            out.append("</li>")
        else:
            out.append(f"<{tag}>")
            stack.append(tag)
        out.append(f"<li>{html.escape(item.text)}")
    while stack:
        out.append(f"</li></{stack.pop()}>")
    return "".join(out)


def to_html(blocks: Sequence[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, ListBlock):
            parts.append(_list_html(block))
        elif isinstance(block, Code):
            parts.append("<pre>" + html.escape("\n".join(block.lines)) + "</pre>")
        else:
            cls = "ruled" if block.ruled else "open"
            parts.append(_table_html(block, "th").replace("<table>", f'<table class="{cls}">', 1))
    return "\n".join(parts)


CSS = """
@page { size: A4; }
body { font-family: 'DejaVu Serif', serif; font-size: 10.5pt; line-height: 1.35; margin: 0; }
h1 { font-family: 'DejaVu Sans', sans-serif; font-size: 20pt; margin: 0 0 10pt; }
h2 { font-family: 'DejaVu Sans', sans-serif; font-size: 14pt; margin: 14pt 0 6pt; }
h3 { font-family: 'DejaVu Sans', sans-serif; font-size: 11.5pt; margin: 10pt 0 4pt; }
h1, h2, h3 { break-after: avoid; }
p { margin: 0 0 6pt; text-align: justify; }
ul, ol { margin: 0 0 6pt; padding-left: 18pt; }
pre { font-family: 'DejaVu Sans Mono', monospace; font-size: 8.5pt; background: #f3f3f3;
      padding: 5pt; margin: 0 0 8pt; white-space: pre-wrap; break-inside: avoid; }
table { border-collapse: collapse; margin: 4pt 0 10pt; font-size: 9.5pt; break-inside: avoid; }
th, td { padding: 2pt 7pt; text-align: left; vertical-align: top; }
th { font-family: 'DejaVu Sans', sans-serif; font-weight: bold; }
table.ruled th, table.ruled td { border: 0.6pt solid #333; }
table.open { border-top: 1pt solid #000; border-bottom: 1pt solid #000; }
table.open tr:first-child th { border-bottom: 0.6pt solid #000; }
.two .flow { column-count: 2; column-gap: 9mm; }
.two h1, .two h2, .two table { column-span: all; }
"""


def page_html(doc: Document, layout: str) -> str:
    body_class = "two" if layout == "two-column" else "one"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><style>{CSS}</style></head>"
        f"<body class='{body_class}'><div class='flow'>{to_html(doc.blocks)}</div></body></html>"
    )


def _header_template(text: str) -> str:
    style = "font-family: 'DejaVu Sans', sans-serif; font-size: 8pt; width: 100%; margin: 0 18mm;"
    return f'<div style="{style}">{html.escape(text)}</div>'


FOOTER_TEMPLATE = (
    "<div style=\"font-family: 'DejaVu Sans', sans-serif; font-size: 8pt; width: 100%; "
    'text-align: center;">Page <span class="pageNumber"></span> of '
    '<span class="totalPages"></span></div>'
)


# --- the generator --------------------------------------------------------------------------------


def _w(text: str) -> list[str]:
    return text.split()


_COMMON = _w(
    "the of and to in a is that for it as was with be by on not this are from at or an which "
    "have has had were been their there would can could more most other some such into only "
    "over also after first two three new used between each under while where when both during "
    "because however through about against without within several often least same those these "
    "many every since before often since around across along upon per via"
)
_VERBS = _w(
    "measured recorded reduced increased compared selected observed estimated reported "
    "described improved removed produced required collected verified adjusted rejected "
    "calibrated sampled reviewed computed predicted documented tested updated ranked merged "
    "delivered scheduled inspected captured extended"
)
_ADJ = _w(
    "annual stable narrow broad coastal regional manual routine gradual direct nominal average "
    "typical initial final minor major steady modest careful simple robust external internal "
    "partial distinct rapid uneven seasonal northern southern central remote"
)
TOPICS = {
    "coastal": _w(
        "shoreline dune sediment tide gauge transect erosion beach harbour wave storm groyne "
        "estuary cliff marsh survey lidar profile berm inlet current"
    ),
    "grid": _w(
        "feeder transformer substation load voltage breaker outage meter tariff turbine "
        "inverter capacity demand circuit relay conductor frequency battery dispatch reserve"
    ),
    "clinic": _w(
        "patient cohort dosage trial ward nurse referral symptom clinic therapy outcome "
        "protocol screening admission biopsy consent follow registry triage diagnosis"
    ),
    "warehouse": _w(
        "pallet shipment carrier forklift inventory aisle order picker dock invoice supplier "
        "freight parcel barcode route depot container manifest backlog rack"
    ),
    "orchard": _w(
        "orchard cultivar rootstock blossom harvest pruning irrigation canopy yield frost "
        "pollinator grafting soil mulch fungicide sapling crate ripening acreage hedgerow"
    ),
    "compiler": _w(
        "parser token grammar register allocator bytecode lexer inliner optimizer pass module "
        "symbol linker runtime heap closure iterator scheduler buffer profile"
    ),
    "library": _w(
        "catalogue archive manuscript lending reader shelf periodical index curator "
        "digitisation loan folio donor binding acquisition reference edition census ledger map"
    ),
    "transit": _w(
        "timetable platform ridership fare corridor depot tram signal junction headway "
        "interchange ticket route terminus shuttle carriage viaduct boarding stop fleet"
    ),
    "brewery": _w(
        "barley malt hops fermentation yeast cask mash kettle cellar gravity bottling keg "
        "batch wort lager conditioning filtration tasting cooper grain"
    ),
}
_SECTIONS = _w(
    "Introduction Background Scope Methods Data Collection Site Description Results Analysis "
    "Discussion Limitations Deployment Evaluation Costs Risks Recommendations Outlook Summary"
)
_TITLES = {
    "coastal": "Shoreline Change along the Eastern Dunes",
    "grid": "Feeder Load Study for the Valley Substation",
    "clinic": "Outcomes of the Community Screening Programme",
    "warehouse": "Inventory Accuracy in the Northern Depot",
    "orchard": "Frost Damage and Yield in Upland Orchards",
    "compiler": "Register Allocation in the Bytecode Compiler",
    "library": "Digitisation of the Municipal Map Archive",
    "transit": "Headway Reliability on the Harbour Tram Corridor",
    "brewery": "Fermentation Control in Small Batch Brewing",
}
_SERIES = (
    "Qorvane Technical Notes",
    "Meridell Field Bulletin",
    "Ostrava Working Papers",
    "Kelsbury Review Series",
    "Tamsin Quarterly Memo",
    "Varga Institute Circular",
    "Holloway Survey Reports",
    "Brisk Valley Dossier",
    "Lunet Applied Notes",
)


class _Writer:
    def __init__(self, topic: str, seed: int) -> None:
        self.rng = random.Random(seed)
        self.nouns = TOPICS[topic]

    def word(self) -> str:
        roll = self.rng.random()
        if roll < 0.45:
            return self.rng.choice(_COMMON)
        if roll < 0.7:
            return self.rng.choice(self.nouns)
        if roll < 0.82:
            return self.rng.choice(_VERBS)
        if roll < 0.95:
            return self.rng.choice(_ADJ)
        return str(self.rng.choice((self.rng.randint(2, 99), self.rng.randint(1990, 2024))))

    def phrase(self, lo: int, hi: int) -> str:
        words = [self.word() for _ in range(self.rng.randint(lo, hi))]
        words[0] = words[0].capitalize()
        return " ".join(words)

    def sentence(self) -> str:
        text = self.phrase(8, 18)
        if self.rng.random() < 0.4:
            parts = text.split(" ")
            cut = self.rng.randint(3, len(parts) - 3)
            text = " ".join(parts[:cut]) + ", " + " ".join(parts[cut:])
        return text + "."

    def paragraph(self) -> Paragraph:
        return Paragraph(" ".join(self.sentence() for _ in range(self.rng.randint(3, 6))))

    def listing(self) -> ListBlock:
        ordered = self.rng.random() < 0.45
        items = []
        for _ in range(self.rng.randint(3, 5)):
            items.append(ListItem(self.phrase(4, 10), 0, ordered))
            if self.rng.random() < 0.35:
                nested_ordered = not ordered and self.rng.random() < 0.3
                for _ in range(self.rng.randint(2, 3)):
                    items.append(ListItem(self.phrase(3, 7), 1, nested_ordered))
        return ListBlock(tuple(items))

    def code(self) -> Code:
        noun, other = self.rng.sample(self.nouns, 2)
        limit = self.rng.randint(3, 40)
        fn = self.rng.choice(("load", "count", "scan", "rank", "merge")) + noun.capitalize()
        lines = [
            f"func {fn}(items []{noun.capitalize()}) int {{",
            "    total := 0",
            "    for i, it := range items {",
            f"        if it.{other} > {limit} {{",
            "            total += i",
            "        }",
            "    }",
        ]
        if self.rng.random() < 0.5:
            lines += [f'    log.Printf("{noun} %d", total)']
        lines += ["    return total", "}"]
        return Code(tuple(lines))

    def _value(self) -> str:
        return f"{self.rng.uniform(0, 100):.1f}" if self.rng.random() < 0.7 else self.word()

    def table(self, spanned: bool, ruled: bool) -> Table:
        labels = [n.capitalize() for n in self.rng.sample(self.nouns, 5)]
        if not spanned:
            cols = self.rng.randint(3, 4)
            header = tuple(Cell(t) for t in ["Item", *labels[: cols - 1]])
            rows = [header]
            for name in self.rng.sample(self.nouns, self.rng.randint(3, 5)):
                rows.append((Cell(name), *(Cell(self._value()) for _ in range(cols - 1))))
            return Table(tuple(rows), 1, ruled)
        if self.rng.random() < 0.5:  # a two-row header: groups spanning columns
            years = sorted(self.rng.sample(range(2015, 2025), 2))
            rows = [
                (Cell("Site", rowspan=2), *(Cell(str(y), colspan=2) for y in years)),
                tuple(Cell(q) for q in ("Mean", "Peak") * 2),
            ]
            for name in self.rng.sample(self.nouns, self.rng.randint(3, 4)):
                rows.append((Cell(name.capitalize()), *(Cell(self._value()) for _ in range(4))))
            return Table(tuple(rows), 2, ruled)
        # a first column whose groups span rows
        rows = [(Cell("Group"), Cell("Case"), Cell(labels[0]), Cell(labels[1]))]
        for group in self.rng.sample(_ADJ, 2):
            cases = self.rng.sample(self.nouns, self.rng.randint(2, 3))
            for k, case in enumerate(cases):
                first = (Cell(group.capitalize(), rowspan=len(cases)),) if k == 0 else ()
                rows.append((*first, Cell(case), Cell(self._value()), Cell(self._value())))
        return Table(tuple(rows), 1, ruled)


def _document(index: int) -> Document:
    topic = list(TOPICS)[index % len(TOPICS)]
    w = _Writer(topic, seed=1000 + index)
    numbering = ("numeric", "plain", "dotted")[index % 3]
    sections = w.rng.sample(_SECTIONS, w.rng.randint(4, 5))
    tables_left = 2 if index % 2 == 0 else 1
    blocks: list[Block] = [Heading(1, _TITLES[topic]), w.paragraph()]

    def title(numbers: Sequence[int], text: str) -> str:
        if numbering == "plain":
            return text
        label = ".".join(map(str, numbers)) + ("." if numbering == "dotted" else "")
        return f"{label} {text}"

    extras = ["list", "code", "table", "list", "table", "code"]
    w.rng.shuffle(extras)
    for s, name in enumerate(sections, start=1):
        blocks.append(Heading(2, title([s], name)))
        blocks.append(w.paragraph())
        subsections = w.rng.randint(0, 2)
        for k in range(1, subsections + 1):
            sub = " ".join(x.capitalize() for x in w.rng.sample(w.nouns, 2))
            blocks.append(Heading(3, title([s, k], sub)))
            blocks.append(w.paragraph())
            kind = extras.pop() if extras else None
            if kind == "list":
                blocks.append(w.listing())
            elif kind == "code":
                blocks.append(w.code())
            elif kind == "table" and tables_left:
                spanned = (index + tables_left) % 2 == 0 or index % 3 == 0
                blocks.append(w.table(spanned, ruled=(index + tables_left) % 3 != 0))
                tables_left -= 1
            if w.rng.random() < 0.5:
                blocks.append(w.paragraph())
        if subsections == 0:
            blocks.append(w.listing() if w.rng.random() < 0.6 else w.paragraph())
    if tables_left:
        blocks.append(w.table(spanned=True, ruled=True))
    blocks.append(w.paragraph())
    return Document(f"doc{index + 1:02d}-{topic}", tuple(blocks), _SERIES[index % len(_SERIES)])


def documents(count: int = 8) -> list[Document]:
    """The first ``count`` documents of the corpus (at most one per topic)."""
    return [_document(i) for i in range(min(count, len(TOPICS)))]


# --- typesetting ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusPdf:
    doc: Document
    layout: str
    path: Path
    pages: int
    furniture: tuple[str, ...]  # each running header and page-number line printed, once each

    @property
    def ground_truth(self) -> str:
        return self.doc.markdown


def chromium_available() -> bool:
    return CHROMIUM.exists()


def _typeset(browser, doc: Document, layout: str, path: Path) -> None:
    page = browser.new_page()
    try:
        page.set_content(page_html(doc, layout), wait_until="load")
        furniture = layout == "headers-footers"
        page.pdf(
            path=str(path),
            format="A4",
            print_background=True,
            display_header_footer=furniture,
            header_template=_header_template(doc.running_header) if furniture else "<span></span>",
            footer_template=FOOTER_TEMPLATE if furniture else "<span></span>",
            margin={
                "top": "22mm" if furniture else "18mm",
                "bottom": "22mm" if furniture else "18mm",
                "left": "18mm",
                "right": "18mm",
            },
        )
    finally:
        page.close()


def rasterise(source: Path, target: Path, dpi: int = SCAN_DPI) -> None:
    """An image-only copy of ``source``: each page rendered to a greyscale JPEG at ``dpi`` and
    placed on a page of the same size, with no text layer."""
    import pymupdf

    with pymupdf.open(source) as src, pymupdf.open() as out:
        for page in src:
            pix = page.get_pixmap(dpi=dpi, colorspace=pymupdf.csGRAY)
            new = out.new_page(width=page.rect.width, height=page.rect.height)
            new.insert_image(new.rect, stream=pix.tobytes("jpeg", jpg_quality=85))
        out.save(target, garbage=3, deflate=True)


def _page_count(path: Path) -> int:
    import pymupdf

    with pymupdf.open(path) as pdf:
        return pdf.page_count


def _furniture(doc: Document, layout: str, pages: int) -> tuple[str, ...]:
    if layout not in ("headers-footers", "scans"):
        return ()
    return tuple(
        s for p in range(1, pages + 1) for s in (doc.running_header, f"Page {p} of {pages}")
    )


def build(
    out_dir: Path, docs: Sequence[Document], layouts: Sequence[str] = LAYOUTS
) -> list[CorpusPdf]:
    """Typeset ``docs`` in ``layouts`` under ``out_dir/LAYOUT/NAME.pdf`` (and write each
    ground truth to ``out_dir/ground-truth/NAME.md``); the PDFs in layout order. Scans are
    made from the headers-footers PDFs, which are typeset for them if not asked for."""
    from playwright.sync_api import sync_playwright

    if not chromium_available():
        raise RuntimeError(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    truth = out_dir / "ground-truth"
    truth.mkdir(parents=True, exist_ok=True)
    for doc in docs:
        (truth / f"{doc.name}.md").write_text(doc.markdown)
    typeset = [layout for layout in LAYOUTS if layout != "scans" and layout in layouts]
    if "scans" in layouts and "headers-footers" not in typeset:
        typeset.append("headers-footers")  # the scans are its pages
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))
        try:
            for layout in typeset:
                (out_dir / layout).mkdir(parents=True, exist_ok=True)
                for doc in docs:
                    _typeset(browser, doc, layout, out_dir / layout / f"{doc.name}.pdf")
        finally:
            browser.close()
    if "scans" in layouts:
        (out_dir / "scans").mkdir(parents=True, exist_ok=True)
        for doc in docs:
            rasterise(
                out_dir / "headers-footers" / f"{doc.name}.pdf",
                out_dir / "scans" / f"{doc.name}.pdf",
            )
    pdfs = []
    for layout in layouts:
        for doc in docs:
            path = out_dir / layout / f"{doc.name}.pdf"
            pages = _page_count(path)
            pdfs.append(CorpusPdf(doc, layout, path, pages, _furniture(doc, layout, pages)))
    return pdfs
