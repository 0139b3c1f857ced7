"""Blocks from lines and regions: nothing lost, headings, lists, code, furniture, order.

Documents are written here with pymupdf, so every font, size and position is known. The
pure tests hand :func:`build_blocks` regions of our choosing (a figure around code, text
outside every region); the server tests run the real layout model, whose regions may fall
anywhere: what must hold whatever it finds is that no word of the text layer is lost and
that the typography decides the headings.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pymupdf
import pytest

from ragws.pipeline.chunks import chunk_blocks
from ragws.pipeline.markdown import document_markdown, set_markdown
from ragws.pipeline.structure import (
    DocumentStyle,
    PageInput,
    Region,
    analyze,
    build_blocks,
    dehyphenate,
    numbering_level,
    page_style,
    retype_tabular_regions,
)
from ragws.pipeline.textlayer import TEXT_FLAGS, Line, ocr_line, page_shapes, pdf_lines

from .test_parse import parse_ws

BODY = (
    "Retrieval pipelines store passages with their section so that an answer can cite "
    "where it came from and a reader can check it"
)
MARKERS = re.compile(r"^(?:[•·]|\d{1,2}[.)]|\([a-z]\))$")


def words_of_layer(doc: pymupdf.Document) -> Counter[str]:
    """Every word of the text layer, list markers aside (blocks keep items, not markers)."""
    found: Counter[str] = Counter()
    for page in doc:
        for word in page.get_text("words", flags=TEXT_FLAGS):
            if not MARKERS.match(word[4]):
                found[word[4]] += 1
    return found


def words_of_blocks(blocks) -> Counter[str]:
    found: Counter[str] = Counter()
    for block in blocks:
        text = block["text"] if isinstance(block, dict) else block.text
        for word in text.split():
            if word != "|" and not MARKERS.match(word):
                found[word] += 1
    return found


def wrap(text: str, width: int = 70) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return [*lines, current]


class Writer:
    """Lines down a page with pymupdf's base-14 fonts, new pages as needed."""

    def __init__(self, doc: pymupdf.Document, furniture: bool = True) -> None:
        self.doc = doc
        self.furniture = furniture
        self.page: pymupdf.Page | None = None
        self.y = 0.0
        self.new_page()

    def new_page(self) -> None:
        self.page = self.doc.new_page(width=612, height=792)
        number = self.doc.page_count
        if self.furniture:
            self.page.insert_text((230, 36), "Journal of Document Parsing", fontsize=9)
            self.page.insert_text((296, 770), f"Page {number}", fontsize=9)
        self.y = 90.0

    def line(self, text: str, size: float = 10, font: str = "helv", x: float = 72, gap=0.0):
        if self.y + gap + size * 1.3 > 720:
            self.new_page()
        self.y += gap + size * 1.25
        assert self.page is not None
        self.page.insert_text((x, self.y), text, fontsize=size, fontname=font)

    def paragraph(self, text: str, gap: float = 8) -> None:
        for n, line in enumerate(wrap(text)):
            self.line(line, gap=gap if n == 0 else 0)


def rich_document() -> bytes:
    """Three pages: title, numbered headings at three sizes, a bold run-in heading,
    paragraphs, bullet and numbered lists (nested), code, running header and footer."""
    doc = pymupdf.open()
    w = Writer(doc)
    w.line("Parsing Documents for Retrieval", size=24, font="hebo")
    w.paragraph(BODY + " in the first paragraph of the document.", gap=14)
    w.line("1 Introduction", size=16, font="hebo", gap=16)
    w.paragraph(BODY + " and the introduction says why.")
    w.paragraph("A second paragraph starts after a gap. " + BODY + ".")
    w.line("1.1 Background", size=13, font="hebo", gap=14)
    w.paragraph("Items follow.")
    w.line("• apples are listed first", x=84, gap=6)
    w.line("• bananas come second and their item runs on", x=84)
    w.line("over two lines of the page", x=94)
    w.line("• cherries hold a nested list", x=84)
    w.line("• nested item one", x=104)
    w.line("• nested item two", x=104)
    w.line("1. the first step", x=84, gap=10)
    w.line("2. the second step", x=84)
    w.line("2 Methods", size=16, font="hebo", gap=16)
    w.paragraph(BODY + " before the code.")
    for n, code in enumerate(["def parse(doc):", "    for page in doc:", "        yield page"]):
        w.line(code, font="cour", gap=8 if n == 0 else 0)
    w.line("Notes on the data", font="hebo", gap=14)
    w.paragraph(BODY + " under a bold heading at body size.")
    w.new_page()
    w.line("2.1 Data", size=13, font="hebo")
    for k in range(3):
        w.paragraph(f"Paragraph {k} of the data section. " + BODY + ".")
    w.line("3 Results", size=16, font="hebo", gap=16)
    w.paragraph(BODY + " in the results.")
    data = doc.tobytes()
    doc.close()
    return data


async def test_nothing_lost_levels_lists_code_and_furniture(start_server, connect):
    pdf = rich_document()
    server = await start_server()
    client, _ = await connect(server)
    pages, done, _ = await parse_ws(client, 1, pdf=pdf, chunk_chars=500)
    assert done["type"] == "done", done
    blocks = [b for n in sorted(pages) for b in pages[n]["blocks"]]
    with pymupdf.open(stream=pdf, filetype="pdf") as doc:
        assert words_of_blocks(blocks) == words_of_layer(doc)
    headings = [(b["type"], b["level"], b["text"]) for b in blocks if "level" in b]
    assert headings == [
        ("title", 1, "Parsing Documents for Retrieval"),
        ("heading", 2, "1 Introduction"),
        ("heading", 3, "1.1 Background"),
        ("heading", 2, "2 Methods"),
        ("heading", 4, "Notes on the data"),
        ("heading", 3, "2.1 Data"),
        ("heading", 2, "3 Results"),
    ]
    markdown = done["markdown"]
    assert markdown.startswith("# Parsing Documents for Retrieval\n\n")
    assert "\n## 1 Introduction\n" in markdown and "\n### 2.1 Data\n" in markdown
    assert (
        "- apples are listed first\n- bananas come second and their item runs on over two lines"
        " of the page\n- cherries hold a nested list\n  - nested item one\n  - nested item two"
        "\n\n1. the first step\n2. the second step"
    ) in markdown
    assert "```\ndef parse(doc):\n    for page in doc:\n        yield page\n```" in markdown
    # Paragraphs stay apart.
    assert "\n\nA second paragraph starts after a gap." in markdown
    assert sum(1 for b in blocks if b["text"].startswith("Paragraph ")) == 3
    # Running header and page numbers: furniture blocks, kept in JSON, out of the markdown.
    furniture = [(b["type"], b["text"]) for b in blocks if b["type"] in ("header", "footer")]
    assert len(pages) >= 2
    assert sorted(set(furniture)) == [
        *(("footer", f"Page {n + 1}") for n in sorted(pages)),
        ("header", "Journal of Document Parsing"),
    ]
    assert "Journal of" not in markdown and "Page 2" not in markdown
    # Chunks know their section.
    by_text = {c["text"].split("\n\n")[0][:20]: c["headings"] for c in done["chunks"]}
    assert by_text["### 2.1 Data"] == ["2 Methods", "2.1 Data"]
    assert all(c["headings"] for c in done["chunks"][1:])


def two_columns_with_equation() -> bytes:
    """Two columns above and below a full-width equation with its number at the margin."""
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    for col, x in (("Left", 60), ("Right", 320)):
        for k, top in enumerate((80, 200)):
            for n in range(6):
                page.insert_text((x, top + n * 13), f"{col}{k} line {n} of text here", fontsize=10)
    page.insert_text((150, 300), "E = m c 2 + sum of the other terms here", fontsize=12)
    page.insert_text((540, 300), "(1)", fontsize=10)
    for col, x in (("Lower", 60), ("Under", 320)):
        for n in range(6):
            page.insert_text((x, 340 + n * 13), f"{col} line {n} of text here", fontsize=10)
    data = doc.tobytes()
    doc.close()
    return data


def test_full_width_equation_cuts_the_columns_into_bands():
    pdf = two_columns_with_equation()
    with pymupdf.open(stream=pdf, filetype="pdf") as doc:
        lines = pdf_lines(doc[0])
    regions = [
        Region("text", (55, 65, 290, 150)),
        Region("text", (55, 185, 290, 270)),
        Region("text", (315, 65, 560, 150)),
        Region("text", (315, 185, 560, 270)),
        Region("equation", (140, 285, 480, 305)),
        Region("text", (55, 325, 290, 420)),
        Region("text", (315, 325, 560, 420)),
    ]
    style = analyze([(0, 792, lines)])
    blocks = build_blocks(PageInput(0, 612, 792, regions, lines, style))
    firsts = [b.text.split()[0] for b in blocks]
    assert firsts == ["Left0", "Left1", "Right0", "Right1", "E", "Lower", "Under"]
    equation = blocks[4]
    assert equation.type == "equation" and equation.text.endswith("(1)")
    set_markdown(blocks)
    assert equation.markdown.startswith("$$\nE = m c 2") and equation.markdown.endswith("(1)\n$$")


def code_in_a_figure_and_stray_text() -> bytes:
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    page.draw_rect(pymupdf.Rect(60, 60, 400, 160))
    for n, code in enumerate(["for x in range(3):", "    print(x)", "done = True"]):
        page.insert_text((70, 80 + 14 * n), code, fontname="cour", fontsize=10)
    page.insert_text((70, 150), "Listing 1: a loop", fontsize=9)
    for n in range(3):
        page.insert_text((60, 200 + 13 * n), f"Body text line {n} inside the region", fontsize=10)
    page.insert_text((60, 400), "A remark no region holds.", fontsize=10)
    page.insert_text((450, 600), "Box label", fontsize=10)
    data = doc.tobytes()
    doc.close()
    return data


def test_code_in_a_figure_region_and_text_outside_every_region():
    pdf = code_in_a_figure_and_stray_text()
    with pymupdf.open(stream=pdf, filetype="pdf") as doc:
        lines = pdf_lines(doc[0])
        expected = words_of_layer(doc)
    regions = [
        Region("figure", (55, 55, 405, 140)),
        Region("caption", (55, 140, 405, 160)),
        Region("text", (55, 185, 400, 240)),
        Region("figure", (440, 580, 560, 620)),  # a diagram with a word in it
        Region("figure", (100, 650, 300, 700)),  # a picture: no text
    ]
    blocks = build_blocks(PageInput(0, 612, 792, regions, lines, analyze([(0, 792, lines)])))
    assert words_of_blocks(blocks) == expected
    kinds = [(b.type, b.text.split("\n")[0][:34]) for b in blocks]
    assert kinds == [
        ("code", "for x in range(3):"),
        ("caption", "Listing 1: a loop"),
        ("text", "Body text line 0 inside the region"),
        ("text", "A remark no region holds."),
        ("figure", ""),
        ("figure", "Box label"),
    ]
    assert blocks[0].text == "for x in range(3):\n    print(x)\ndone = True"


def test_header_region_that_is_the_title_is_kept_and_layout_furniture_is_not_trusted():
    doc = pymupdf.open()
    for n in range(3):
        page = doc.new_page(width=612, height=792)
        if n == 0:
            page.insert_text((72, 40), "A Title Set Large", fontsize=22, fontname="hebo")
        page.insert_text((500, 40), f"Draft {n + 1}", fontsize=8)
        for k in range(5):
            page.insert_text(
                (72, 120 + 14 * k), f"Page {n} body line {k} says something", fontsize=10
            )
    pages = [(n, 792.0, pdf_lines(doc[n])) for n in range(3)]
    style = analyze(pages)
    page0 = pages[0][2]
    regions = [Region("header", (60, 15, 400, 50)), Region("header", (480, 25, 560, 45))]
    regions.append(Region("text", (60, 100, 560, 200)))
    blocks = build_blocks(PageInput(0, 612, 792, regions, page0, style))
    assert [(b.type, b.text) for b in blocks][:2] == [
        ("header", "Draft 1"),
        ("title", "A Title Set Large"),
    ]
    assert blocks[1].level == 1
    # A header region whose text appears once is text, not furniture.
    single = [Line((72, 30, 300, 42), "Only here once", 10)]
    only = build_blocks(
        PageInput(1, 612, 792, [Region("header", (60, 20, 320, 50))], single, style)
    )
    assert [(b.type, b.text) for b in only] == [("text", "Only here once")]


@pytest.mark.parametrize(
    ("text", "level"),
    [
        ("2 Methods", 2),
        ("2.3 Data", 3),
        ("2.3.1 Sources", 4),
        ("IV. Results", 2),
        ("Appendix B Proofs", 2),
        ("A.1 Lemmas", 3),
        ("A. Setup", 2),
        ("Methods", None),
        ("I think so", None),
        ("A study", None),
        ("2023 was a year", None),
    ],
)
def test_numbering_levels(text, level):
    assert numbering_level(text) == level


def test_dehyphenation_across_ligatures_and_compounds():
    font = Path("/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf")  # comes with chromium
    if not font.is_file():
        pytest.skip(f"{font} is missing: a font with an 'fi' ligature glyph is needed")
    doc = pymupdf.open()
    page = doc.new_page()
    page.insert_font(fontname="dv", fontfile=str(font))
    # "ﬁ" is one glyph in the font; the text layer spells it out, so "af-" + "ﬁliations" joins.
    page.insert_text((72, 72), "their af-", fontsize=11, fontname="dv")
    page.insert_text((72, 86), "\ufb01liations and end-", fontsize=11, fontname="dv")
    page.insert_text((72, 100), "to-end tests", fontsize=11, fontname="dv")
    assert "\ufb01liations" in [w[4] for w in page.get_text("words")]
    lines = pdf_lines(page)
    text = dehyphenate("\n".join(line.text for line in lines))
    assert text.split() == ["their", "affiliations", "and", "end-to-end", "tests"]


def test_bullets_drawn_as_shapes_make_list_items():
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    for n, (x, text) in enumerate([(90, "alpha"), (90, "beta"), (120, "gamma"), (90, "delta")]):
        y = 100 + 15 * n
        page.draw_circle((x - 8, y - 3.5), 2, fill=(0, 0, 0))
        page.insert_text((x, y), text, fontsize=11)
    lines, bullets = pdf_lines(page), page_shapes(page).bullets
    assert len(bullets) == 4
    blocks = build_blocks(
        PageInput(0, 612, 792, [], lines, analyze([(0, 792, lines)]), bullets=bullets)
    )
    assert len(blocks) == 1 and blocks[0].type == "list"
    assert [(i["text"], i["level"]) for i in blocks[0].items] == [
        ("alpha", 0),
        ("beta", 0),
        ("gamma", 1),
        ("delta", 0),
    ]


def test_ocr_lines_use_their_character_pitch():
    lines = [ocr_line("Big Heading", (50, 40, 400, 90))]
    lines += [
        ocr_line(f"body line {n} of the scan", (50, 110 + 30 * n, 500, 132 + 30 * n))
        for n in range(8)
    ]
    style = page_style(lines, 0, 1400)
    blocks = build_blocks(PageInput(0, 1000, 1400, [], lines, style, source="ocr"))
    assert [(b.type, b.level) for b in blocks] == [("title", 1), ("text", None)]
    assert blocks[1].source == "ocr" and blocks[1].text.startswith("body line 0")
    # With no style at all (nothing known), every line still lands in a block.
    plain = build_blocks(PageInput(0, 1000, 1400, [], lines, DocumentStyle(), source="ocr"))
    assert " ".join(b.text for b in plain).split() == " ".join(ln.text for ln in lines).split()


def _ocr_body(top: float, n: int) -> list[Line]:
    text = "the body of the scanned report runs on in lines of the same length and type"
    return [
        ocr_line(text, (50, top + 30 * k, 50 + 7.0 * len(text), top + 22 + 30 * k))
        for k in range(n)
    ]


def test_ocr_headings_title_lines_and_numbered_sections():
    """On a scan (character pitch, no fonts): a title wrapped over two lines whose pitches
    differ stays one title; "1. Description" set large is a heading, not a list item;
    headings whose pitches differ by a few percent share a level; a numbered line at body
    size stays a list item."""
    lines = [
        ocr_line("Outcomes of the Community Screening", (50, 40, 50 + 35 * 21.0, 90)),
        ocr_line("Programme", (50, 96, 50 + 9 * 25.0, 146)),
        *_ocr_body(170, 4),
        ocr_line("1. Description", (50, 300, 50 + 14 * 10.0, 326)),
        *_ocr_body(340, 4),
        ocr_line("Site survey", (50, 470, 50 + 11 * 10.6, 496)),
        *_ocr_body(510, 3),
        ocr_line("1. check the stations once a week", (50, 620, 50 + 33 * 7.0, 642)),
        ocr_line("2. report the readings monthly", (50, 650, 50 + 30 * 7.0, 672)),
    ]
    style = page_style(lines, 0, 1400)
    blocks = build_blocks(PageInput(0, 1000, 1400, [], lines, style, source="ocr"))
    got = [(b.type, b.level, b.text.split()[0]) for b in blocks]
    assert got[0] == ("title", 1, "Outcomes") and "Programme" in blocks[0].text
    assert ("heading", 2, "1.") in got and ("heading", 2, "Site") in got
    assert got[-1][0] == "list" and len(blocks[-1].items) == 2


def test_a_scanned_table_the_layout_model_calls_an_equation_is_a_table():
    cells = [["Group", "Case", "Score"], ["Rapid", "wave", "68.2"], ["Slow", "tide", "4.2"]]
    lines = [
        ocr_line(text, (100 + 120 * c, 200 + 30 * r, 160 + 120 * c, 222 + 30 * r))
        for r, row in enumerate(cells)
        for c, text in enumerate(row)
    ]
    formula = [ocr_line("E = m c2", (100, 500, 300, 530)), ocr_line("(1)", (700, 500, 740, 530))]
    regions = [Region("equation", (90, 190, 460, 300)), Region("equation", (90, 490, 760, 540))]
    retype_tabular_regions(regions, lines + formula)
    assert [r.kind for r in regions] == ["table", "equation"]


def test_chunks_and_markdown_of_a_built_document():
    pdf = rich_document()
    with pymupdf.open(stream=pdf, filetype="pdf") as doc:
        pages = [(n, 792.0, pdf_lines(doc[n])) for n in range(doc.page_count)]
    style = analyze(pages)
    assert style.title is not None and style.body_size == 10
    built = []
    for n, height, lines in pages:
        blocks = build_blocks(PageInput(n, 612, height, [], lines, style))
        set_markdown(blocks)
        built.append(blocks)
    markdown = document_markdown(built)
    assert markdown.startswith("# Parsing Documents for Retrieval")
    chunks = chunk_blocks(built, 400)
    assert [c.headings for c in chunks][-1] == ["3 Results"]


def test_repeated_furniture_of_ocr_pages_found_at_the_end():
    from ragws.pipeline.blocks import Block
    from ragws.pipeline.structure import mark_repeated_furniture

    pages = []
    for n in range(3):
        blocks = [
            Block("text", (100, 20, 600, 50), n, "ACME Quarterly Report", "ocr"),
            Block("text", (100, 200, 900, 400), n, "Body text of the page " * 5, "ocr"),
            Block("text", (450, 1350, 550, 1380), n, f"- {n + 1} -", "ocr"),
            Block("heading", (100, 1330, 600, 1370), n, "Only on one page", "ocr", level=2),
        ]
        pages.append((1400.0, blocks if n == 0 else blocks[:3]))
    assert mark_repeated_furniture(pages)
    first = pages[0][1]
    assert [b.type for b in first] == ["header", "text", "footer", "heading"]
    assert all(b.type == "header" for _, bs in pages for b in bs[:1])
    assert not mark_repeated_furniture([(1400.0, [Block("text", (0, 0, 9, 9), 0, "x", "pdf")])])


def test_a_bold_paragraph_is_not_a_heading():
    body = [
        Line((72, 100 + 14 * n, 500, 112 + 14 * n), f"Plain body line {n} ends here." * 2, 10)
        for n in range(6)
    ]
    bold = [
        Line(
            (72, 200 + 14 * n, 500, 212 + 14 * n),
            f"Bold words in a long note {n} " * 2,
            10,
            bold=True,
        )
        for n in range(3)
    ]
    short = [Line((72, 260, 200, 272), "Short bold heading", 10, bold=True)]
    lines = body + bold + short
    style = analyze([(0, 792, lines)])
    blocks = build_blocks(PageInput(0, 612, 792, [], lines, style))
    assert [b.type for b in blocks] == ["text", "text", "heading"]
    assert blocks[1].text.startswith("Bold words in a long note 0")


def test_a_running_header_never_starts_a_paragraph():
    header = Line((300, 20, 500, 34), "Field Bulletin", 10)
    body = [
        Line((72, 120 + 14 * n, 540, 132 + 14 * n), f"continued text {n} from before", 10)
        for n in range(3)
    ]
    lines = [header, *body]
    regions = [Region("text", (290, 15, 510, 40)), Region("text", (60, 110, 550, 170))]
    blocks = build_blocks(PageInput(0, 612, 792, regions, lines, DocumentStyle(body_size=10)))
    assert [b.text.split()[0] for b in blocks] == ["Field", "continued"]
    # Away from the bands, a region cut mid-sentence is joined again.
    moved = [Line((300, 90, 500, 104), "Field Bulletin", 10), *body]
    regions[0] = Region("text", (290, 85, 510, 106))
    joined = build_blocks(PageInput(0, 612, 792, regions, moved, DocumentStyle(body_size=10)))
    assert len(joined) == 1 and joined[0].text.startswith("Field Bulletin continued text 0")


def test_code_cut_by_a_column_break_stays_one_listing():
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    for n in range(20):
        page.insert_text(
            (50, 80 + 14 * n), f"left column prose line number {n} runs on", fontsize=10
        )
    code = ["func total(items []Item) int {", "    sum := 0", "    for _, it := range items {"]
    for n, text in enumerate(code):
        page.insert_text((50, 400 + 12 * n), text, fontsize=9, fontname="cour")
    page.insert_text((320, 80), "        sum += it.n", fontsize=9, fontname="cour")
    page.insert_text((320, 92), "    }", fontsize=9, fontname="cour")
    page.insert_text((320, 104), "}", fontsize=9, fontname="cour")
    for n in range(20):
        page.insert_text((320, 140 + 14 * n), f"right column prose line {n} goes on", fontsize=10)
    lines = pdf_lines(page)
    style = analyze([(0, 792.0, lines)])
    blocks = build_blocks(PageInput(0, 612, 792, [], lines, style))
    listings = [b for b in blocks if b.type == "code"]
    assert len(listings) == 1, [(b.type, b.text[:30]) for b in blocks]
    assert listings[0].text.splitlines()[0] == code[0]
    assert listings[0].text.splitlines()[-1] == "}"
