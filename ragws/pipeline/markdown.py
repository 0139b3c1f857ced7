"""Markdown of blocks, pages and documents.

:func:`render` writes one block's markdown (:func:`set_markdown` stores it on each block of a
page), :func:`page_markdown` and :func:`document_markdown` join them. Titles and headings
become ``#`` headings, lists nested lists, code fenced blocks, tables pipe tables or HTML,
equations ``$$`` blocks, figures placeholders. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from ragws.pipeline.blocks import FURNITURE, HEADINGS, Block

_TABLE_MARKUP = re.compile(r"^\s*\||<table|<tr|\\begin\{", re.IGNORECASE)
_DISPLAY_MATH = ("$$", "\\[", "\\begin")
_NUMBERED_MARKER = re.compile(r"^\(?(\d{1,3})[.)]\)?$")


def one_line(text: str) -> str:
    """The text on one line: every run of whitespace, line breaks included, one space."""
    return " ".join(text.split())


def _lines(text: str) -> str:
    """Line breaks kept, blank lines dropped: a blank line would end the block in markdown."""
    return "\n".join(line for line in (" ".join(raw.split()) for raw in text.splitlines()) if line)


def _verbatim(text: str) -> str:
    """Markup kept as written, less blank lines and trailing whitespace."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines() if line.strip())


def _equation(text: str) -> str:
    """One display block, number included; markup an OCR model wrote is kept as written."""
    text = text.strip()
    if any(mark in text for mark in _DISPLAY_MATH):
        return _verbatim(text)
    # Inline delimiters around a display formula would nest inside the $$ block.
    if len(text) > 2 and text.startswith("$") and text.endswith("$"):
        text = text[1:-1].strip()
    elif text.startswith("\\(") and text.endswith("\\)"):
        text = text[2:-2].strip()
    return f"$$\n{_lines(text)}\n$$"


def _list(items: Sequence[dict[str, Any]]) -> str:
    """Nested markdown list items: each nested item indented to its parent's text."""
    out: list[str] = []
    offsets: list[int] = []  # where the text of the open item at each level starts
    for item in items:
        offsets = offsets[: max(0, int(item.get("level", 0)))]
        indent = offsets[-1] if offsets else 0
        marker = str(item.get("marker") or "-")
        number = _NUMBERED_MARKER.match(marker)
        if number:
            prefix = f"{number.group(1)}. "
        elif marker in ("-", "*", "+"):
            prefix = "- "
        else:
            prefix = f"- {marker} "  # (a), i.: kept as written, in a bullet item
        offsets.append(indent + (len(prefix) if number or prefix == "- " else 2))
        out.append(" " * indent + prefix + one_line(str(item.get("text", ""))))
    return "\n".join(out)


def _code(text: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}\n{text.rstrip()}\n{fence}"


def render(block: Block, figure_k: int = 1) -> str:
    """One block's markdown; empty for an empty block. Blank lines occur only inside code, so
    a block is one markdown paragraph (or one fenced block)."""
    kind = block.type
    if kind == "figure":
        placeholder = f"![figure](#page-{block.page + 1}-figure-{figure_k})"
        text = _lines(block.text)
        return f"{placeholder}\n{text}" if text else placeholder
    if kind == "table" and block.table is not None and block.table.cells:
        return block.table.to_markdown()
    if not block.text.strip():
        return ""
    if kind in HEADINGS:
        level = block.level or (1 if kind == "title" else 2)
        return f"{'#' * min(6, max(1, level))} {one_line(block.text)}"
    if kind == "list":
        return _list(block.items) if block.items else _lines(block.text)
    if kind == "code":
        return _code(block.text)
    if kind == "table":
        return _verbatim(block.text) if _TABLE_MARKUP.search(block.text) else _lines(block.text)
    if kind == "equation":
        return _equation(block.text)
    return one_line(block.text)


def set_markdown(blocks: Sequence[Block]) -> None:
    """Write each block's own markdown into ``block.markdown`` (blocks of one page, in
    reading order: figures are numbered on their page in that order)."""
    figures = 0
    for block in blocks:
        if block.type == "figure":
            figures += 1
        block.markdown = render(block, figures)


def rendered_blocks(
    blocks: Sequence[Block], include_furniture: bool
) -> Iterator[tuple[Block, str]]:
    """Each kept block of one page with its markdown, in the order given (what
    :func:`page_markdown` joins, and what :mod:`ragws.pipeline.chunks` cuts)."""
    figures = 0
    for block in blocks:
        if block.type == "figure":
            figures += 1
        if block.type in FURNITURE and not include_furniture:
            continue
        markdown = block.markdown or render(block, figures)
        if markdown:
            yield block, markdown


def page_markdown(blocks: Sequence[Block], *, include_furniture: bool = False) -> str:
    """Markdown of one page's blocks, taken in the order given (normally reading order).

    Titles and headings become ``#`` headings at their level, prose becomes paragraphs, lists
    nested markdown lists, code fenced blocks, tables pipe tables (HTML where a cell spans
    rows or columns), equations ``$$`` blocks; a figure becomes a placeholder
    ``![figure](#page-P-figure-K)`` followed by the text it holds. Headers and footers are
    left out unless ``include_furniture``, as are empty blocks. Blocks are separated by one
    blank line.
    """
    return "\n\n".join(md for _, md in rendered_blocks(blocks, include_furniture))


def document_markdown(pages: Sequence[Sequence[Block]], *, include_furniture: bool = False) -> str:
    """Every page's markdown, one blank line apart; pages with nothing to show are skipped."""
    rendered = (page_markdown(blocks, include_furniture=include_furniture) for blocks in pages)
    return "\n\n".join(md for md in rendered if md)
