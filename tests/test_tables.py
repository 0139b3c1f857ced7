"""Tables: pymupdf's table finder on generated PDFs, SLANet-plus on their rendered images, and
the structure service batching crops of concurrent requests. Real models, no mocks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pymupdf
import pytest

from ragws.models.table_structure import TableStructureModel, parse_structure
from ragws.pipeline.table_service import TableStructureService
from ragws.pipeline.tables import Cell, Table, table_from_pymupdf, table_from_structure
from ragws.runtime.batcher import BatchStats
from ragws.serving.frames import cell_fields

FRUIT = [
    ["Name", "Qty", "Price"],
    ["apple", "3", "1.20"],
    ["pear", "5", "0.80"],
    ["plum", "7", "2.10"],
]
CITIES = [["City", "Country"], ["Paris", "France"], ["Rome", "Italy"], ["Oslo", "Norway"], ["Lima", "Peru"], ["Kyiv", "Ukraine"]]  # fmt: skip  # noqa: E501
#: Region spans two rows, Sales two columns, North two rows.
MERGED = [["Region", "Sales", None], [None, "Q1", "Q2"], ["North", "10", "20"], [None, "11", "21"]]
MERGES = [(0, 0, 2, 1), (0, 1, 1, 2), (2, 0, 2, 1)]


def ruled_table(page, x0, y0, rows, col_w=90.0, row_h=20.0, merges=()) -> pymupdf.Rect:
    """Draw a table with a border around each cell (merged cells as one rectangle)."""
    n_rows, n_cols = len(rows), len(rows[0])
    xs = [x0 + j * col_w for j in range(n_cols + 1)]
    ys = [y0 + i * row_h for i in range(n_rows + 1)]
    spans = {(r, c): (rs, cs) for r, c, rs, cs in merges}
    covered = {
        (r + i, c + j) for r, c, rs, cs in merges for i in range(rs) for j in range(cs) if i or j
    }
    for i in range(n_rows):
        for j in range(n_cols):
            if (i, j) in covered:
                continue
            rs, cs = spans.get((i, j), (1, 1))
            rect = pymupdf.Rect(xs[j], ys[i], xs[j + cs], ys[i + rs])
            page.draw_rect(rect, color=(0, 0, 0), width=0.8)
            if rows[i][j]:
                page.insert_text((rect.x0 + 4, rect.y0 + 14), rows[i][j], fontsize=10)
    return pymupdf.Rect(xs[0], ys[0], xs[-1], ys[-1])


def grow(rect: pymupdf.Rect, d: float) -> pymupdf.Rect:
    return pymupdf.Rect(rect.x0 - d, rect.y0 - d, rect.x1 + d, rect.y1 + d)


def cells_of(table: Table) -> list[tuple[int, int, int, int, str]]:
    return [(c.row, c.col, c.row_span, c.col_span, c.text) for c in table.cells]


def grid_cells(rows) -> list[tuple[int, int, int, int, str]]:
    return [(i, j, 1, 1, text) for i, row in enumerate(rows) for j, text in enumerate(row)]


def test_ruled_table():
    page = pymupdf.open().new_page()
    rect = ruled_table(page, 72, 72, FRUIT)
    table = table_from_pymupdf(page, grow(rect, 5))
    assert table is not None and (table.n_rows, table.n_cols) == (4, 3)
    assert cells_of(table) == grid_cells(FRUIT)
    assert not table.has_spans()
    first = table.cells[0].bbox
    assert first == pytest.approx((72, 72, 162, 92), abs=1)
    assert table.to_markdown() == (
        "| Name | Qty | Price |\n|---|---|---|\n"
        "| apple | 3 | 1.20 |\n| pear | 5 | 0.80 |\n| plum | 7 | 2.10 |"
    )
    assert table.text() == "Name | Qty | Price\napple | 3 | 1.20\npear | 5 | 0.80\nplum | 7 | 2.10"
    assert cell_fields(table.cells[4]) == {
        "row": 1,
        "col": 1,
        "row_span": 1,
        "col_span": 1,
        "text": "3",
        "bbox": list(table.cells[4].bbox),
    }


def test_unruled_table():
    page = pymupdf.open().new_page()
    for i, row in enumerate(FRUIT):
        for j, text in enumerate(row):
            page.insert_text((72 + 100 * j, 100 + 18 * i), text, fontsize=10)
    table = table_from_pymupdf(page, (60, 80, 400, 180))
    assert table is not None
    assert cells_of(table) == grid_cells(FRUIT)


def test_merged_cells():
    page = pymupdf.open().new_page()
    rect = ruled_table(page, 72, 72, MERGED, merges=MERGES)
    table = table_from_pymupdf(page, grow(rect, 5))
    assert table is not None and (table.n_rows, table.n_cols) == (4, 3)
    assert cells_of(table) == [
        (0, 0, 2, 1, "Region"),
        (0, 1, 1, 2, "Sales"),
        (1, 1, 1, 1, "Q1"),
        (1, 2, 1, 1, "Q2"),
        (2, 0, 2, 1, "North"),
        (2, 1, 1, 1, "10"),
        (2, 2, 1, 1, "20"),
        (3, 1, 1, 1, "11"),
        (3, 2, 1, 1, "21"),
    ]
    html = (
        '<table><tr><td rowspan="2">Region</td><td colspan="2">Sales</td></tr>'
        "<tr><td>Q1</td><td>Q2</td></tr>"
        '<tr><td rowspan="2">North</td><td>10</td><td>20</td></tr>'
        "<tr><td>11</td><td>21</td></tr></table>"
    )
    assert table.has_spans() and table.to_html() == html and table.to_markdown() == html
    assert table.text().splitlines() == ["Region | Sales", "Q1 | Q2", "North | 10 | 20", "11 | 21"]


def test_no_table_in_plain_text():
    page = pymupdf.open().new_page()
    page.insert_text((72, 100), "Just one line of prose, no table here.", fontsize=11)
    assert table_from_pymupdf(page, (60, 80, 500, 120)) is None


def test_escaping():
    table = Table(
        [Cell(0, 0, text="a|b"), Cell(0, 1, text="<x> & y"), Cell(1, 0), Cell(1, 1)], 2, 2
    )
    assert table.to_markdown().splitlines()[0] == "| a\\|b | <x> & y |"
    assert "<td>&lt;x&gt; &amp; y</td>" in table.to_html()


def test_parse_structure_spans():
    tokens = ["<tr>", "<td", ' rowspan="2"', ">", "</td>", "<td", ' colspan="2"', ">", "</td>",
              "</tr>", "<tr>", "<td></td>", "<td></td>", "</tr>"]  # fmt: skip
    structure = parse_structure(tokens, np.zeros((4, 8)))
    got = [(c.row, c.col, c.row_span, c.col_span) for c in structure.cells]
    assert got == [(0, 0, 2, 1), (0, 1, 1, 2), (1, 1, 1, 1), (1, 2, 1, 1)]
    assert (structure.n_rows, structure.n_cols) == (2, 3)


# --- SLANet-plus on rendered tables ---------------------------------------------------------

ZOOM = 2.0


def rendered(rows) -> tuple[np.ndarray, list]:
    """A ruled table rendered at 2×, cropped, with its text-layer words in crop pixels."""
    page = pymupdf.open().new_page()
    rect = grow(ruled_table(page, 72, 72, rows), 6)
    pix = page.get_pixmap(matrix=pymupdf.Matrix(ZOOM, ZOOM), clip=rect)
    rgb = np.frombuffer(pix.samples, np.uint8).reshape(pix.h, pix.w, pix.n)[:, :, :3].copy()
    words = [
        ((w[0] - rect.x0) * ZOOM, (w[1] - rect.y0) * ZOOM, (w[2] - rect.x0) * ZOOM,
         (w[3] - rect.y0) * ZOOM, w[4])
        for w in page.get_text("words", clip=rect)
    ]  # fmt: skip
    return rgb, words


@pytest.fixture(scope="module")
def slanet() -> TableStructureModel:
    return TableStructureModel(threads=2)


@pytest.mark.parametrize("rows", [FRUIT, CITIES], ids=["fruit", "cities"])
def test_slanet_reads_a_rendered_table(slanet, rows):
    rgb, words = rendered(rows)
    (structure,) = slanet.predict([rgb])
    assert (structure.n_rows, structure.n_cols) == (len(rows), len(rows[0]))
    assert all(c.bbox is not None for c in structure.cells)
    table = table_from_structure(structure, words)
    assert cells_of(table) == grid_cells(rows)


def test_slanet_batch_matches_single(slanet):
    (a, _), (b, _) = rendered(FRUIT), rendered(CITIES)
    together = slanet.predict([a, b])
    alone = [slanet.predict([a])[0], slanet.predict([b])[0]]
    for x, y in zip(together, alone, strict=True):
        assert x.tokens == y.tokens
        assert [(c.row, c.col, c.row_span, c.col_span) for c in x.cells] == [
            (c.row, c.col, c.row_span, c.col_span) for c in y.cells
        ]
        assert np.allclose([c.bbox for c in x.cells], [c.bbox for c in y.cells], atol=0.5)


async def test_service_batches_concurrent_requests(slanet):
    batches: list[BatchStats] = []
    with ThreadPoolExecutor(2) as pool:
        service = TableStructureService(
            slanet, pool, max_batch_size=8, max_queue_delay_s=0.5, on_batch=batches.append
        )
        await service.start()
        try:
            (a, wa), (b, wb) = rendered(FRUIT), rendered(CITIES)
            ta, tb = await asyncio.gather(service.recognize(a, wa), service.recognize(b, wb))
        finally:
            await service.stop()
    assert [s.size for s in batches] == [2]
    assert cells_of(ta) == grid_cells(FRUIT) and cells_of(tb) == grid_cells(CITIES)


def test_server_processes_never_load_the_pymupdf_layout_analyzer():
    """``ragws serve`` refuses pymupdf-layout (non-commercial) even where it is installed, and
    the table finder runs without it: a table is found inside the clip it is given."""
    script = (
        "from ragws.pipeline.mupdf_setup import keep_layout_analyzer_out\n"
        "keep_layout_analyzer_out()\n"
        "import pymupdf\n"
        "assert pymupdf._get_layout is None\n"
        "try:\n"
        "    import pymupdf.layout\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('pymupdf.layout was imported')\n"
        "doc = pymupdf.open()\n"
        "page = doc.new_page()\n"
        "for i in range(4):\n"
        "    page.draw_line((50, 50 + 20 * i), (250, 50 + 20 * i))\n"
        "for x in (50, 150, 250):\n"
        "    page.draw_line((x, 50), (x, 110))\n"
        "for r in range(3):\n"
        "    for c in range(2):\n"
        "        page.insert_text((55 + 100 * c, 65 + 20 * r), f'r{r}c{c}')\n"
        "from ragws.pipeline.tables import table_from_pymupdf\n"
        "t = table_from_pymupdf(page, (40, 40, 260, 120))\n"
        "print(t.n_rows, t.n_cols, t.cells[0].text)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "2", "r0c0"]


def test_booktabs_table_keeps_its_rows():
    """Rules above, under the header and below, none between rows or columns (LaTeX's
    booktabs): the rows are found from the text, one table row per text row."""
    page = pymupdf.open().new_page()
    for i, row in enumerate(FRUIT):
        for j, text in enumerate(row):
            page.insert_text((72 + 100 * j, 100 + 18 * i), text, fontsize=10)
    page.draw_line((68, 86), (330, 86), width=1.2)
    page.draw_line((68, 105), (330, 105), width=0.6)
    page.draw_line((68, 160), (330, 160), width=1.2)
    table = table_from_pymupdf(page, (60, 80, 340, 170))
    assert table is not None
    assert cells_of(table) == grid_cells(FRUIT)
