"""A page-level VLM's markdown as blocks: every top-level block one Block carrying the model's
own source, the front matter apart, nothing the model said lost."""

from __future__ import annotations

from ragws.pipeline.chunks import chunk_blocks
from ragws.pipeline.markdown import page_markdown
from ragws.pipeline.vlm_pages import page_blocks, strip_front_matter

# What olmOCR-2 answers for a page: front matter, then markdown with HTML tables and LaTeX.
OLMOCR_PAGE = """---
primary_language: en
is_rotation_valid: True
rotation_correction: 0
is_table: False
is_diagram: False
---
# 3 Results

We measured **three** things, see Table 1.
The second line of the paragraph.

## 3.1 Throughput

- first item
- second item
  1. nested one
  2. nested two

<table><tr><th>model</th><th>tok/s</th></tr><tr><td>a</td><td>1.5</td></tr></table>

| x | y |
|---|---|
| 1 | 2 |

$$
E = mc^2
$$

![A chart of revenue by year](page_10_20_300_200.png)

```
code stays verbatim
```

---

> a closing quote
"""

# Nanonets-OCR2 tags page furniture.
NANONETS_PAGE = """Body text of the page.

<watermark>CONFIDENTIAL</watermark>

<page_number>5</page_number>
"""


def test_front_matter_is_read_apart():
    body, values = strip_front_matter(OLMOCR_PAGE)
    assert body.startswith("# 3 Results")
    assert values["primary_language"] == "en" and values["rotation_correction"] == "0"
    # A thematic break later in the page, or text without front matter, stays text.
    assert strip_front_matter("plain text\n---\n") == ("plain text\n---\n", {})


def test_each_markdown_block_becomes_a_typed_block():
    blocks = page_blocks(OLMOCR_PAGE, page=2, width=800, height=1000)
    kinds = [(b.type, b.level) for b in blocks]
    assert kinds == [
        ("heading", 1),
        ("text", None),
        ("heading", 2),
        ("list", None),
        ("table", None),
        ("table", None),
        ("equation", None),
        ("figure", None),
        ("code", None),
        ("text", None),
    ]
    assert all(b.page == 2 and b.bbox == (0.0, 0.0, 800.0, 1000.0) for b in blocks)
    assert all(b.source == "ocr" for b in blocks)
    assert [b.order for b in blocks] == list(range(len(blocks)))
    heading, paragraph, _, listing, html, pipe, equation, figure, code, quote = blocks
    assert heading.text == "3 Results" and heading.markdown == "# 3 Results"
    assert paragraph.markdown == (
        "We measured **three** things, see Table 1.\nThe second line of the paragraph."
    )
    assert listing.items == [
        {"text": "first item", "level": 0, "marker": "-"},
        {"text": "second item", "level": 0, "marker": "-"},
        {"text": "nested one", "level": 1, "marker": "1."},
        {"text": "nested two", "level": 1, "marker": "2."},
    ]
    assert html.text.startswith("<table>") and pipe.markdown.startswith("| x | y |")
    assert equation.text == "$$\nE = mc^2\n$$"
    assert figure.text == "A chart of revenue by year"
    assert code.text == "code stays verbatim" and code.markdown.startswith("```")
    assert quote.markdown == "> a closing quote"


def test_nothing_the_model_wrote_is_lost():
    """Every non-blank line of the page (less the front matter and the thematic break) is in
    the page's markdown, in the order written."""
    blocks = page_blocks(OLMOCR_PAGE, 0, 800, 1000)
    markdown = page_markdown(blocks)
    body, _ = strip_front_matter(OLMOCR_PAGE)
    wanted = [line.rstrip() for line in body.splitlines() if line.strip() and line != "---"]
    at = 0
    for line in wanted:
        found = markdown.find(line, at)
        assert found >= 0, line
        at = found + len(line)


def test_furniture_tags_are_headers_and_footers():
    blocks = page_blocks(NANONETS_PAGE, 0, 100, 100)
    assert [b.type for b in blocks] == ["text", "header", "footer"]
    # Left out of the page's markdown unless asked for, as the pipeline's other furniture.
    assert page_markdown(blocks) == "Body text of the page."
    assert "<page_number>5</page_number>" in page_markdown(blocks, include_furniture=True)


def test_chunks_carry_the_heading_path():
    blocks = page_blocks(OLMOCR_PAGE, 0, 800, 1000)
    chunks = chunk_blocks([blocks], chunk_chars=120)
    assert len(chunks) >= 3
    under = [c for c in chunks if "E = mc^2" in c.text]
    assert under and under[0].headings == ["3 Results", "3.1 Throughput"]
