"""The parse-quality benchmark: its metrics on inputs whose scores are known by hand, its
corpus (PDFs whose text layer holds the ground truth's words), and a short run against a
spawned server."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

LOADTEST = Path(__file__).resolve().parents[1] / "loadtest"
sys.path.insert(0, str(LOADTEST))

import _corpus  # noqa: E402
import _quality_metrics as qm  # noqa: E402

DOC = """# Title

First paragraph of the report.

## 1 Methods

Second paragraph here.

| Item | Value |
|---|---|
| alpha | 1.5 |

### 1.1 Data

- one
  - nested
"""


def needs_chromium() -> None:
    """Skip where no Chromium is installed, except on CI, where its absence is a failure."""
    if _corpus.chromium_available():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{_corpus.CHROMIUM} is missing on CI")
    pytest.skip(f"{_corpus.CHROMIUM} is missing (apt-get install chromium)")


# --- metrics ------------------------------------------------------------------------------------


def test_identical_documents_score_one():
    s = qm.score(DOC, DOC)
    assert (s.overall, s.nid, s.nid_s, s.teds, s.teds_s, s.mhs, s.mhs_s) == (1.0,) * 7
    assert s.word_recall == 1.0
    assert s.furniture_leak is None  # nothing printed as furniture


def test_nid_is_normalized_indel_similarity_and_nid_s_ignores_tables():
    assert qm.nid("abcd", "abce") == (0.75, 0.75)  # 2 indels over 8 characters
    assert qm.nid("a  b\n\nc", "a b c") == (1.0, 1.0)  # whitespace runs collapse
    gt = "Some text.\n\n<table><tr><td>x</td></tr></table>\n"
    full, stripped = qm.nid(gt, "Some text.\n")
    assert stripped == 1.0 and full < 0.5
    assert qm.nid("", "anything") == (None, None)


def test_dropped_heading_lowers_mhs_by_the_tree_edit_distance():
    gt = "# A\n\npara1\n\n## B\n\npara2\n"
    pred = "# A\n\npara1\n\nB\n\npara2\n"  # the heading B came out as a paragraph
    # gt: document → [A → [para1], B → [para2]] (5 nodes); pred: document → [A → ["para1 B
    # para2"]] (3 nodes). Cheapest edit: delete B and para2 (2) and rename para1 into
    # "para1 B para2" (8 insertions over 13 characters).
    mhs, mhs_s = qm.mhs(gt, pred)
    assert mhs == pytest.approx(1 - (2 + 8 / 13) / 5)
    assert mhs_s == pytest.approx(1 - 2 / 5)
    assert qm.mhs(gt, gt.replace("## B", "### B")) == (1.0, 1.0)  # levels are not compared
    assert qm.mhs(gt, "para1 para2") == (0.0, 0.0)
    assert qm.mhs("no heading", "# x") == (None, None)


def test_heading_levels_counts_headings_kept_at_their_level():
    pred = DOC.replace("### 1.1 Data", "## 1.1 Data").replace("## 1 Methods", "1 Methods")
    assert qm.heading_levels(DOC, pred) == pytest.approx(1 / 3)  # only the title is right
    assert qm.heading_levels(DOC, DOC.upper()) == 1.0
    assert qm.heading_levels("## 1 Methods", "## **1  Methods**") == 1.0
    assert qm.heading_levels("no heading", DOC) is None


def test_wrong_span_lowers_teds_but_not_to_zero():
    gt = '<table><tr><td colspan="2">Head</td></tr><tr><td>a</td><td>b</td></tr></table>'
    pred = "<table><tr><td>Head</td></tr><tr><td>a</td><td>b</td></tr></table>"
    # Below the wrapper that holds a document's tables: the table, 2 rows, 3 cells (6 nodes)
    # on each side; one cell renamed (its span differs) costs 1.
    assert qm.teds(gt, pred) == pytest.approx((1 - 1 / 6, 1 - 1 / 6))
    wrong_text = gt.replace(">b<", ">c<")
    teds, teds_s = qm.teds(gt, wrong_text)
    assert teds == pytest.approx(1 - 1 / 6) and teds_s == 1.0  # 1 edit over 1 character


def test_pipe_tables_match_their_html_and_missing_tables_score_zero():
    pipe = "| Item | Value |\n|---|---|\n| alpha | 1.5 |\n"
    html = "<table><tr><th>Item</th><th>Value</th></tr><tr><td>alpha</td><td>1.5</td></tr></table>"
    assert qm.teds(pipe, html) == (1.0, 1.0)
    assert qm.teds(pipe, "Item Value alpha 1.5") == (0.0, 0.0)
    assert qm.teds("no table", pipe) == (None, None)
    assert qm.extract_tables(DOC) == [
        "<table><tr><th>Item</th><th>Value</th></tr><tr><td>alpha</td><td>1.5</td></tr></table>"
    ]


def test_overall_skips_what_the_ground_truth_lacks():
    gt = "# Title\n\nbody text\n"
    s = qm.score(gt, "# Title\n\nbody text\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert s.teds is None and s.mhs is not None
    assert s.overall == pytest.approx((s.nid + s.mhs) / 2)


def test_word_recall_and_furniture_leak_count_multiplicity():
    assert qm.word_recall("the cat the dog", "The dog, cat") == 0.75
    assert qm.word_recall("<table><tr><td>x1</td></tr></table> - item", "x1 item") == 1.0
    furniture = ["Acme Notes", "Page 1 of 2", "Acme Notes", "Page 2 of 2"]
    assert qm.furniture_leak(furniture, "acme  notes\n\nbody\n\npage 2 of 2") == 0.5
    assert qm.furniture_leak(furniture, "body") == 0.0
    assert qm.furniture_leak([], "body") is None


# --- corpus -------------------------------------------------------------------------------------


def test_corpus_markdown_has_the_structure_it_promises():
    docs = _corpus.documents(9)
    assert len(docs) == 9 and len({d.name for d in docs}) == 9
    text = "\n".join(d.markdown for d in docs)
    assert "\n### " in text and "\n```\n" in text and "\n  - " in text and "\n1. " in text
    assert sum(d.markdown.count("<table>") for d in docs) >= 5  # merged cells, as HTML
    assert 'rowspan="' in text and 'colspan="' in text
    for doc in docs:
        assert doc.running_header not in doc.markdown
        assert not any(line.startswith("# ") for line in doc.markdown.splitlines()[1:])


def test_corpus_pdfs_carry_the_ground_truth_words(tmp_path):
    needs_chromium()
    import pymupdf

    doc = _corpus.documents(2)[1]
    pdfs = _corpus.build(tmp_path, [doc], ["one-column", "two-column", "scans"])
    assert [p.layout for p in pdfs] == ["one-column", "two-column", "scans"]
    for pdf in pdfs:
        assert 2 <= pdf.pages <= 4
        with pymupdf.open(pdf.path) as opened:
            text = "\n".join(page.get_text() for page in opened)
        if pdf.layout == "scans":
            assert text.strip() == ""  # image only
            assert pdf.furniture[:2] == (doc.running_header, f"Page 1 of {pdf.pages}")
            assert len(pdf.furniture) == 2 * pdf.pages
            continue
        assert pdf.furniture == ()
        assert qm.word_recall(doc.markdown, text) >= 0.995
    with pymupdf.open(tmp_path / "headers-footers" / f"{doc.name}.pdf") as opened:
        last = opened[-1].get_text()
    assert doc.running_header in last and f"Page {pdf.pages} of {pdf.pages}" in last


# --- a short run --------------------------------------------------------------------------------


def test_benchmark_run_writes_scores_for_ragws(tmp_path):
    needs_chromium()
    import importlib.util

    spec = importlib.util.spec_from_file_location("_pq_script", LOADTEST / "parse_quality.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up here
    spec.loader.exec_module(script)  # type: ignore[union-attr]
    argv = ["--docs", "1", "--layouts", "one-column", "--engines", "ragws", "--out", str(tmp_path)]
    assert script.main(argv) == 0
    result = json.loads((tmp_path / "parse_quality.json").read_text())
    assert result["engines"]["ragws"]["version"]
    row = result["layouts"]["one-column"]["ragws"]
    metrics = ("overall", "nid", "nid_s", "teds", "teds_s", "mhs", "mhs_s", "heading_levels")
    for key in (*metrics, "word_recall"):
        assert 0.0 <= row[key] <= 1.0, key
    assert row["furniture_leak"] is None  # no furniture in this layout
    assert row["word_recall"] > 0.9 and row["nid"] > 0.8  # the text layer was read
    assert row["s_per_page"] > 0 and row["pages"] == result["corpus"]["pages"]["one-column"]
    assert [d["document"] for d in row["documents"]] == [_corpus.documents(1)[0].name]
    assert "| ragws |" in (tmp_path / "parse_quality.md").read_text()
