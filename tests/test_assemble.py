"""Assembly of parsed pages: layout labels, reading order, markdown and RAG chunks."""

from __future__ import annotations

import random

import pytest

from ragws.pipeline.blocks import BLOCK_TYPES, FURNITURE, HEADINGS, Block
from ragws.pipeline.chunks import Chunk, chunk_blocks
from ragws.pipeline.markdown import document_markdown, page_markdown, render
from ragws.pipeline.reading_order import reading_order
from ragws.pipeline.structure import REGION_KINDS, region_kind
from ragws.serving.frames import block_fields, chunk_fields

W, H = 1000.0, 1400.0


def blk(
    kind: str,
    x0: float,
    y0: float,
    x1: float,
    y1: float,
    text: str = "",
    page: int = 0,
    level: int | None = None,
):
    return Block(kind, (x0, y0, x1, y1), page, text, level=level)


def texts(blocks: list[Block]) -> list[str]:
    return [b.text for b in blocks]


def shuffled(blocks: list[Block], seed: int) -> list[Block]:
    out = list(blocks)
    random.Random(seed).shuffle(out)
    return out


# --- labels -------------------------------------------------------------------------------

CDLA = {
    "text": "text",
    "title": "title",
    "figure": "figure",
    "figure_caption": "caption",
    "table": "table",
    "table_caption": "caption",
    "header": "header",
    "footer": "footer",
    "reference": "text",
    "equation": "equation",
}
DOCSTRUCTBENCH = {
    "title": "title",
    "plain text": "text",
    "abandon": "abandon",
    "figure": "figure",
    "figure_caption": "caption",
    "table": "table",
    "table_caption": "caption",
    "table_footnote": "footnote",
    "isolate_formula": "equation",
    "formula_caption": "caption",
}


@pytest.mark.parametrize(("label", "kind"), CDLA.items())
def test_cdla_classes(label, kind):
    assert region_kind(label) == kind


@pytest.mark.parametrize(("label", "kind"), DOCSTRUCTBENCH.items())
def test_docstructbench_classes(label, kind):
    assert region_kind(label) == kind


@pytest.mark.parametrize(
    ("label", "kind"),
    [
        ("Plain Text", "text"),
        ("PLAIN-TEXT", "text"),
        ("  Figure Caption ", "caption"),
        ("Isolate-Formula", "equation"),
        ("paragraph", "text"),
        ("Section-header", "title"),
        ("heading", "title"),
        ("Caption", "caption"),
        ("formula", "equation"),
        ("Page-header", "header"),
        ("page footer", "footer"),
        ("List-item", "list"),
        ("Picture", "figure"),
        ("image", "figure"),
    ],
)
def test_label_spelling_and_synonyms(label, kind):
    assert region_kind(label) == kind


@pytest.mark.parametrize("label", ["", "sticker", "watermark_xyz", "42"])
def test_unknown_labels_become_text(label):
    assert region_kind(label) == "text"


def test_type_sets():
    assert len(BLOCK_TYPES) == 12 and len(set(BLOCK_TYPES)) == 12
    assert set(FURNITURE) == {"header", "footer"} and set(HEADINGS) == {"title", "heading"}
    assert set(FURNITURE) | set(HEADINGS) <= set(BLOCK_TYPES)
    assert all(region_kind(k) == k for k in REGION_KINDS)


def test_block_rejects_unknown_type_and_serialises():
    with pytest.raises(ValueError, match="unknown block type"):
        Block("plain text", (0, 0, 1, 1), 0)
    b = Block("text", (1.234, 2.0, 3.456, 4.0), 3, "hi", "ocr", 0.987654, 2)
    assert block_fields(b) == {
        "type": "text",
        "bbox": [1.23, 2.0, 3.46, 4.0],
        "text": "hi",
        "markdown": "",
        "order": 2,
        "source": "ocr",
        "score": 0.9877,
    }
    b.image = b"\xff\xd8"
    assert block_fields(b)["image"] == b"\xff\xd8"
    heading = Block("heading", (0, 0, 1, 1), 0, "2 Methods", level=2)
    assert block_fields(heading)["level"] == 2 and "items" not in block_fields(heading)
    items = [{"text": "a", "level": 0, "marker": "-"}]
    assert block_fields(Block("list", (0, 0, 1, 1), 0, "a", items=items))["items"] == items


# --- reading order ------------------------------------------------------------------------


def two_column_page() -> list[Block]:
    """Title, two columns of 4, a wide figure, two columns of 4; header and footer misplaced."""
    return [
        blk("header", 100, 1300, 900, 1330, "H"),  # at the bottom, still read first
        blk("footer", 100, 20, 900, 40, "F"),  # at the top, still read last
        blk("title", 100, 60, 900, 120, "T"),
        blk("text", 102, 150, 478, 260, "L1"),
        blk("text", 98, 270, 481, 330, "L2"),
        blk("text", 101, 340, 479, 470, "L3"),
        blk("text", 99, 480, 480, 520, "L4"),
        blk("text", 520, 150, 900, 200, "R1"),
        blk("text", 523, 205, 898, 350, "R2"),
        blk("text", 519, 360, 901, 430, "R3"),
        blk("text", 521, 440, 899, 535, "R4"),
        blk("figure", 100, 560, 900, 800, "FIG"),
        blk("text", 100, 830, 480, 1000, "L5"),
        blk("text", 97, 1010, 482, 1100, "L6"),
        blk("text", 102, 1110, 479, 1150, "L7"),
        blk("text", 100, 1160, 480, 1250, "L8"),
        blk("text", 520, 830, 900, 900, "R5"),
        blk("text", 522, 910, 899, 1050, "R6"),
        blk("text", 518, 1060, 901, 1200, "R7"),
        blk("text", 520, 1210, 900, 1240, "R8"),
        blk("text", 485, 1320, 515, 1340, "12"),  # a page number under the gutter
    ]


TWO_COLUMN_ORDER = ["H", "T", "L1", "L2", "L3", "L4", "R1", "R2", "R3", "R4", "FIG"]
TWO_COLUMN_ORDER += ["L5", "L6", "L7", "L8", "R5", "R6", "R7", "R8", "12", "F"]


@pytest.mark.parametrize("seed", range(5))
def test_two_columns_with_full_width_title_and_figure(seed):
    ordered = reading_order(shuffled(two_column_page(), seed), W, H)
    assert texts(ordered) == TWO_COLUMN_ORDER
    assert [b.order for b in ordered] == list(range(len(ordered)))


def test_single_column_jitter_makes_no_columns():
    page = [
        blk("title", 103, 50, 700, 90, "a"),
        blk("text", 100, 100, 900, 300, "b"),
        blk("text", 96, 310, 903, 380, "c"),
        blk("equation", 400, 390, 600, 430, "d"),  # narrow and centred
        blk("text", 104, 440, 897, 700, "e"),
        blk("list", 110, 710, 880, 800, "f"),
        blk("text", 99, 795, 905, 1000, "g"),  # overlaps the list above a little
    ]
    assert texts(reading_order(shuffled(page, 1), W, H)) == list("abcdefg")


def test_three_columns():
    page = [blk("title", 50, 40, 950, 90, "T")]
    for c, x0 in enumerate((50, 360, 670)):
        for r, y0 in enumerate((120, 400, 800)):
            page.append(blk("text", x0 + r, y0, x0 + 280 - r, y0 + 250 + 30 * c, f"{c}{r}"))
    ordered = reading_order(shuffled(page, 2), W, H)
    assert texts(ordered) == ["T", "00", "01", "02", "10", "11", "12", "20", "21", "22"]


def test_side_by_side_figures_in_one_column():
    page = [
        blk("text", 100, 100, 900, 300, "p1"),
        blk("figure", 100, 320, 480, 600, "figL"),
        blk("figure", 520, 325, 900, 590, "figR"),
        blk("caption", 120, 610, 460, 650, "capL"),
        blk("caption", 540, 610, 880, 650, "capR"),
        blk("text", 100, 670, 900, 900, "p2"),
    ]
    ordered = reading_order(shuffled(page, 3), W, H)
    assert texts(ordered) == ["p1", "figL", "capL", "figR", "capR", "p2"]
    pair = reading_order([page[2], page[1]], W, H)
    assert texts(pair) == ["figL", "figR"]


def test_columns_bleeding_into_each_other_stay_apart():
    page = [
        blk("text", 100, 100, 508, 400, "L1"),  # 16 px past the right column's left edge
        blk("text", 100, 390, 505, 700, "L2"),  # overlaps L1 vertically
        blk("text", 492, 100, 900, 250, "R1"),
        blk("text", 495, 260, 900, 700, "R2"),
    ]
    assert texts(reading_order(shuffled(page, 4), W, H)) == ["L1", "L2", "R1", "R2"]


def test_left_column_with_figures_beside_right_column():
    page = [
        blk("title", 100, 40, 900, 80, "T"),
        blk("text", 100, 100, 480, 300, "P1"),
        blk("figure", 100, 320, 280, 450, "fa"),
        blk("figure", 300, 320, 480, 450, "fb"),
        blk("text", 100, 470, 480, 700, "P2"),
        blk("text", 520, 100, 900, 400, "Q1"),
        blk("text", 520, 410, 900, 700, "Q2"),
    ]
    ordered = reading_order(shuffled(page, 5), W, H)
    assert texts(ordered) == ["T", "P1", "fa", "fb", "P2", "Q1", "Q2"]


def test_one_block_and_no_blocks():
    assert reading_order([], W, H) == []
    only = blk("text", 10, 10, 20, 20, "x")
    assert reading_order([only], W, H) == [only] and only.order == 0


def test_random_pages_give_a_permutation_deterministically():
    rng = random.Random(7)
    for _ in range(200):
        page = []
        for n in range(rng.randint(1, 25)):
            x0, y0 = rng.uniform(0, 900), rng.uniform(0, 1300)
            kind = rng.choice(BLOCK_TYPES)
            x1, y1 = x0 + rng.uniform(1, 500), y0 + rng.uniform(1, 300)
            page.append(blk(kind, x0, y0, x1, y1, str(n)))
        first = texts(reading_order(page, W, H))
        assert sorted(first, key=int) == [str(n) for n in range(len(page))]
        assert texts(reading_order(page, W, H)) == first
        assert sorted(b.order for b in page) == list(range(len(page)))


# --- markdown -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "text", "markdown"),
    [
        ("title", "Deep\n  Learning ", "# Deep Learning"),
        ("heading", "Related\nwork", "## Related work"),
        ("text", "one line\nand  another\n", "one line and another"),
        ("caption", "Figure 1:\nA cat.", "Figure 1: A cat."),
        ("footnote", "* p < 0.05\nsignificant", "* p < 0.05 significant"),
        ("list", "- first\n\n- second  item \n- third", "- first\n- second item\n- third"),
        ("code", "def f():\n    return 1\n", "```\ndef f():\n    return 1\n```"),
        ("code", "a = '```'", "````\na = '```'\n````"),
        ("table", "| a | b |\n|---|---|\n| 1 | 2 |\n", "| a | b |\n|---|---|\n| 1 | 2 |"),
        ("table", "<table><tr><td>1</td></tr></table>", "<table><tr><td>1</td></tr></table>"),
        ("table", "\\begin{tabular}{cc}\n1 & 2\n\\end{tabular}", None),
        ("table", "name score\nalice 3", "name score\nalice 3"),
        ("equation", "$$E = mc^2$$", "$$E = mc^2$$"),
        ("equation", "\\[ a+b \\]", "\\[ a+b \\]"),
        ("equation", "\\begin{align}x\\end{align}", "\\begin{align}x\\end{align}"),
        ("equation", "E = mc^2 (1)", "$$\nE = mc^2 (1)\n$$"),
        ("equation", "$\\frac{a}{b}$", "$$\n\\frac{a}{b}\n$$"),
        ("equation", "x + y = 3", "$$\nx + y = 3\n$$"),
    ],
)
def test_markdown_of_each_type(kind, text, markdown):
    expected = text.strip() if markdown is None else markdown
    assert page_markdown([blk(kind, 0, 0, 1, 1, text)]) == expected


def test_heading_levels_and_nested_lists():
    assert render(blk("heading", 0, 0, 1, 1, "2.3 Data", level=3)) == "### 2.3 Data"
    assert render(blk("heading", 0, 0, 1, 1, "Deep", level=9)) == "###### Deep"
    items = [
        {"text": "fruit", "level": 0, "marker": "-"},
        {"text": "apple", "level": 1, "marker": "-"},
        {"text": "first  step", "level": 2, "marker": "1."},
        {"text": "then", "level": 2, "marker": "2)"},
        {"text": "aside", "level": 1, "marker": "(a)"},
        {"text": "tools", "level": 0, "marker": "-"},
    ]
    block = Block("list", (0, 0, 1, 1), 0, "x", items=items)
    assert render(block) == (
        "- fruit\n  - apple\n    1. first step\n    2. then\n  - (a) aside\n- tools"
    )


def test_page_markdown_figures_furniture_and_empties():
    page = [
        blk("header", 0, 0, 1, 1, "Journal of Things"),
        blk("heading", 0, 0, 1, 1, "Intro", level=3),
        blk("figure", 0, 0, 1, 1, "", page=4),
        blk("caption", 0, 0, 1, 1, "Figure 1: x"),
        blk("text", 0, 0, 1, 1, "   \n "),
        blk("figure", 0, 0, 1, 1, "axis 0 1 2\nlabel", page=4),
        blk("header", 0, 0, 1, 1, "arXiv:1234"),
        blk("footer", 0, 0, 1, 1, "page 5"),
    ]
    assert page_markdown(page) == (
        "### Intro\n\n![figure](#page-5-figure-1)\n\nFigure 1: x\n\n"
        "![figure](#page-5-figure-2)\naxis 0 1 2\nlabel"
    )
    with_furniture = page_markdown(page, include_furniture=True)
    assert with_furniture.startswith("Journal of Things\n\n### Intro\n\n")
    assert with_furniture.endswith("label\n\narXiv:1234\n\npage 5")
    assert page_markdown([]) == ""
    assert page_markdown([blk("footer", 0, 0, 1, 1, "p. 1")]) == ""


def test_document_markdown():
    cover = [blk("header", 0, 0, 1, 1, "Running head"), blk("figure", 0, 0, 1, 1, page=0)]
    first = [
        blk("header", 0, 0, 1, 1, "Running head", page=1),
        blk("title", 0, 0, 1, 1, "A Paper", page=1, level=1),
        blk("text", 0, 0, 1, 1, "Authors", page=1),
        blk("heading", 0, 0, 1, 1, "Abstract", page=1, level=2),
    ]
    blank = [blk("footer", 0, 0, 1, 1, "2", page=2)]
    later = [blk("heading", 0, 0, 1, 1, "Methods", page=3, level=2)]
    later.append(blk("text", 0, 0, 1, 1, "We", page=3))
    pages = [cover, first, blank, later]
    assert document_markdown(pages) == (
        "![figure](#page-1-figure-1)\n\n# A Paper\n\nAuthors\n\n## Abstract\n\n## Methods\n\nWe"
    )
    assert document_markdown(pages, include_furniture=True).startswith("Running head\n\n![fig")


# --- chunks -------------------------------------------------------------------------------


def para(n: int, size: int, page: int = 0, kind: str = "text") -> Block:
    """A block of exactly ``size`` characters of prose, told apart by ``n``."""
    head = f"{kind}{n} "
    body = ("word " * size)[: size - len(head)].rstrip().ljust(size - len(head), "x")
    return blk(kind, n, n, n + 10, n + 10, head + body, page=page)


def block_markdowns(pages: list[list[Block]]) -> list[str]:
    return [p for page in pages for p in page_markdown(page).split("\n\n")]


def test_chunks_keep_blocks_whole_and_within_size():
    first = [para(i, 300 + 37 * i) for i in range(6)]
    pages = [first, [para(10 + i, 250, page=1) for i in range(5)]]
    chunks = chunk_blocks(pages, 800)
    assert all(len(c.text) <= 800 for c in chunks)
    pieces = [p for c in chunks for p in c.text.split("\n\n")]
    assert pieces == block_markdowns(pages)
    # Greedy: a chunk ends only when the next block would not fit.
    flat = [b for page in pages for b in page]
    start = 0
    for chunk in chunks[:-1]:
        n = len(chunk.text.split("\n\n"))
        assert len(chunk.text) + 2 + len(flat[start + n].text) > 800
        start += n


def test_chunk_pages_and_bboxes():
    pages = [[para(1, 100), para(2, 100)], [para(3, 100, page=1)], [para(4, 2000, page=2)]]
    chunks = chunk_blocks(pages, 1500)
    first = chunks[0]
    assert first.pages == [0, 1]
    assert first.bboxes == [(0, (1, 1, 11, 11)), (0, (2, 2, 12, 12)), (1, (3, 3, 13, 13))]
    assert chunk_fields(first)["bboxes"][2] == {"page": 1, "bbox": [3.0, 3.0, 13.0, 13.0]}
    assert chunk_fields(first)["pages"] == [0, 1]
    assert [c.pages for c in chunks[1:]] == [[2], [2]]
    assert all(c.bboxes == [(2, (4, 4, 14, 14))] for c in chunks[1:])


def test_heading_starts_a_chunk_once_half_full():
    page = [para(1, 500), para(2, 200, kind="title"), para(3, 200)]
    chunks = chunk_blocks([page], 1000)
    assert [c.text.split("\n\n")[0][:7] for c in chunks] == ["text1 w", "# title"]
    small = [para(1, 300), para(2, 200, kind="title"), para(3, 200)]
    assert len(chunk_blocks([small], 1000)) == 1  # under half: the heading stays


def test_heading_is_carried_to_the_next_chunk():
    page = [para(1, 200), para(2, 60, kind="title"), para(3, 60, kind="heading"), para(4, 250)]
    chunks = chunk_blocks([page], 400)
    assert [len(c.text.split("\n\n")) for c in chunks] == [1, 3]
    assert chunks[1].text.startswith("# title2 ") and "\n\n## heading3 " in chunks[1].text
    # Under half full, a heading joins; when the next block then does not fit, it moves on.
    page = [para(1, 150), para(2, 30, kind="title"), para(3, 250)]
    chunks = chunk_blocks([page], 400)
    assert [c.bboxes[0][1][0] for c in chunks] == [1, 2]
    assert not any(c.text.split("\n\n")[-1].startswith("#") for c in chunks[:-1])
    # A heading may end the last chunk: nothing follows it.
    last = chunk_blocks([[para(1, 300), para(2, 50, kind="title")]], 400)[-1]
    assert last.text.split("\n\n")[-1].startswith("# title2")


def test_heading_that_cannot_share_a_chunk_stands_alone():
    page = [para(1, 100), para(2, 50, kind="title"), para(3, 390)]
    chunks = chunk_blocks([page], 400)
    assert [c.text[:6] for c in chunks] == ["text1 ", "# titl", "text3 "]
    assert all(len(c.text) <= 400 for c in chunks)


def test_oversize_block_is_split_inside_itself():
    sentences = " ".join(f"Sentence number {i} is here." for i in range(60))
    big = blk("text", 5, 6, 7, 8, sentences, page=2)
    chunks = chunk_blocks([[], [], [para(1, 100, page=2), big, para(2, 100, page=2)]], 300)
    assert chunks[0].text == para(1, 100, page=2).text
    parts = chunks[1:-1]
    assert len(parts) > 1 and all(len(c.text) <= 300 for c in parts)
    assert all(c.text.endswith(".") for c in parts)  # cut at sentence ends
    assert " ".join(c.text for c in parts) == sentences
    assert all(c.pages == [2] and c.bboxes == [(2, (5, 6, 7, 8))] for c in parts)
    assert chunks[-1].text == para(2, 100, page=2).text


def test_oversize_without_spaces_is_cut_hard_and_heading_rides_along():
    page = [para(1, 20, kind="title"), blk("text", 0, 0, 1, 1, "y" * 250)]
    chunks = chunk_blocks([page], 100)
    assert chunks[0].text.startswith("# title1") and chunks[0].text.endswith("\n\n" + "y" * 76)
    assert [len(c.text) for c in chunks] == [100, 100, 74]
    assert "".join(c.text for c in chunks[1:]) == "y" * 174
    assert len(chunks[0].bboxes) == 2


def test_furniture_and_empty_blocks_are_not_chunked():
    page = [blk("header", 0, 0, 1, 1, "Head"), blk("text", 0, 0, 1, 1, " "), para(1, 50)]
    assert [c.text for c in chunk_blocks([page], 100)] == [para(1, 50).text]
    with_furniture = chunk_blocks([page], 100, include_furniture=True)
    assert with_furniture[0].text.startswith("Head\n\n")


def test_chunk_chars_must_be_positive():
    with pytest.raises(ValueError, match="chunk_chars"):
        chunk_blocks([[para(1, 10)]], 0)
    assert [c.text for c in chunk_blocks([[blk("text", 0, 0, 1, 1, "ab cd")]], 1)] == list("abcd")


def test_chunks_recover_the_document_in_order():
    ordered = reading_order(shuffled(two_column_page(), 9), W, H)
    for b in ordered:
        b.text = b.text * 20 if b.type != "figure" else b.text
    other = [para(i, 120 + 40 * i, page=1) for i in range(8)]
    other.insert(3, para(99, 30, page=1, kind="title"))
    pages = [ordered, other]
    for size in (400, 500, 900, 5000):
        chunks = chunk_blocks(pages, size)
        assert all(isinstance(c, Chunk) and len(c.text) <= size for c in chunks)
        assert [p for c in chunks for p in c.text.split("\n\n")] == block_markdowns(pages)
        assert sum(len(c.bboxes) for c in chunks) == len(block_markdowns(pages))


def test_chunks_carry_their_heading_path():
    def h(text: str, level: int) -> Block:
        return blk("heading", 0, 0, 1, 1, text, level=level)

    title = blk("title", 0, 0, 1, 1, "A Paper", level=1)
    pages = [
        [title, para(1, 300), h("2 Methods", 2), para(2, 300), h("2.1 Data", 3), para(3, 300)],
        [para(4, 300, page=1), h("3 Results", 2), para(5, 300, page=1), h("3.0.1 Deep", 4)],
        [para(6, 300, page=2)],
    ]
    chunks = chunk_blocks(pages, 400)
    by_start = {c.text.split("\n\n")[0][:12]: c.headings for c in chunks}
    assert by_start["# A Paper"[:12]] == []
    assert by_start["## 2 Methods"] == ["2 Methods"]
    assert by_start["### 2.1 Data"] == ["2 Methods", "2.1 Data"]
    assert by_start["text4 word w"] == ["2 Methods", "2.1 Data"]
    assert by_start["## 3 Results"] == ["3 Results"]
    assert by_start["#### 3.0.1 D"] == ["3 Results", "3.0.1 Deep"]
    assert chunk_fields(chunks[-1])["headings"] == ["3 Results", "3.0.1 Deep"]


def test_columns_start_again_under_a_table_set_between_them():
    """A table that spans two columns but is no wider than one (a browser's ``column-span:
    all``): the columns above are balanced, the table comes after both, and the text under
    it is a new pair of columns, read left then right."""
    page = [
        blk("text", 50, 100, 480, 600, "left-top"),
        blk("table", 50, 640, 500, 760, "table"),
        blk("text", 520, 100, 950, 520, "right-top"),
        blk("text", 50, 790, 480, 1000, "left-bottom"),
        blk("text", 520, 790, 950, 1000, "right-bottom"),
    ]
    ordered = reading_order(shuffled(page, 4), W, H)
    assert texts(ordered) == ["left-top", "right-top", "table", "left-bottom", "right-bottom"]
