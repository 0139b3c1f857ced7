"""A page read whole by a page-level VLM (olmOCR-2, Nanonets-OCR2, RolmOCR): its markdown as blocks.

A page-level model answers a page image with the page's markdown: headings, paragraphs, lists,
pipe or HTML tables, LaTeX display equations, images as ``![alt](…)``, and, olmOCR's, a YAML front
matter with the page's language and rotation. It says nothing of where each block is, so every
block's box is the page's.

The markdown is parsed with markdown-it (CommonMark and GFM tables), and each top-level block
becomes one :class:`~ragws.pipeline.blocks.Block` whose ``markdown`` is the model's own source
lines for it: the page's markdown is what the model wrote, less the front matter, and nothing
the model said is dropped. The front matter is dropped from the text and returned apart.
"""

from __future__ import annotations

import re
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.token import Token

from ragws.pipeline.blocks import Block

_FRONT_MATTER = re.compile(r"\A---[ \t]*\n((?:[A-Za-z_][\w-]*:[^\n]*\n)*)---[ \t]*(?:\n|\Z)")
_DISPLAY_MATH = re.compile(r"\A(\$\$|\\\[|\\begin\{)")
_IMAGE_ONLY = re.compile(r"\A!\[([^\]]*)\]\([^)]*\)\s*\Z")
# Nanonets-OCR2's page furniture: <page_number>5</page_number>, <watermark>…</watermark>.
_FURNITURE_TAG = re.compile(r"\A<(page_number|watermark)>", re.IGNORECASE)

_PARSER = MarkdownIt("commonmark").enable("table")


def strip_front_matter(text: str) -> tuple[str, dict[str, str]]:
    """The text without a leading YAML front matter of ``key: value`` lines (olmOCR's
    ``primary_language``, ``is_rotation_valid``, …), and those values."""
    match = _FRONT_MATTER.match(text.lstrip("\ufeff"))
    if match is None:
        return text, {}
    values = {}
    for line in match.group(1).splitlines():
        key, _, value = line.partition(":")
        values[key.strip()] = value.strip()
    return text.lstrip("\ufeff")[match.end() :], values


def page_blocks(markdown: str, page: int, width: int, height: int) -> list[Block]:
    """The blocks of one page's markdown, in the order written, each carrying its own source
    markdown; boxes are the whole page. The front matter, if any, is left out."""
    body, _ = strip_front_matter(markdown)
    lines = body.splitlines()
    tokens = _PARSER.parse(body)
    box = (0.0, 0.0, float(width), float(height))
    blocks: list[Block] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        end = _close(tokens, i)
        if token.level == 0 and token.map is not None:
            source = "\n".join(line.rstrip() for line in lines[token.map[0] : token.map[1]])
            source = source.strip("\n")
            block = _block(token, tokens[i : end + 1], source, page, box)
            if block is not None:
                block.markdown = source
                block.order = len(blocks)
                blocks.append(block)
        i = end + 1
    return blocks


def _close(tokens: list[Token], start: int) -> int:
    """The index of the token that closes ``tokens[start]`` (itself when it is not an
    opening token)."""
    if tokens[start].nesting != 1:
        return start
    depth = 0
    for j in range(start, len(tokens)):
        depth += tokens[j].nesting
        if depth == 0:
            return j
    return len(tokens) - 1


def _inline(tokens: list[Token]) -> str:
    return "\n".join(t.content for t in tokens if t.type == "inline").strip()


def _block(
    token: Token, tokens: list[Token], source: str, page: int, box: tuple[float, ...]
) -> Block | None:
    """One top-level markdown block as a Block (None for a thematic break)."""
    kind = token.type
    make = dict(bbox=box, page=page, source="ocr")
    if kind == "heading_open":
        level = int(token.tag[1:]) if token.tag[1:].isdigit() else 2
        return Block("heading", text=_inline(tokens), level=level, **make)  # type: ignore[arg-type]
    if kind in ("bullet_list_open", "ordered_list_open"):
        return Block("list", text=_inline(tokens), items=_items(tokens), **make)  # type: ignore[arg-type]
    if kind == "table_open":
        return Block("table", text=source, **make)  # type: ignore[arg-type]
    if kind in ("fence", "code_block"):
        return Block("code", text=token.content.rstrip("\n"), **make)  # type: ignore[arg-type]
    if kind == "html_block":
        content = token.content.strip()
        if "<table" in content.lower():
            return Block("table", text=content, **make)  # type: ignore[arg-type]
        return Block(_furniture(content) or "text", text=content, **make)  # type: ignore[arg-type]
    if kind == "paragraph_open":
        text = _inline(tokens)
        furniture = _furniture(text)
        if furniture is not None:
            return Block(furniture, text=text, **make)  # type: ignore[arg-type]
        if _DISPLAY_MATH.match(text):
            return Block("equation", text=text, **make)  # type: ignore[arg-type]
        image = _IMAGE_ONLY.match(text)
        if image is not None:
            return Block("figure", text=image.group(1), **make)  # type: ignore[arg-type]
        return Block("text", text=text, **make)  # type: ignore[arg-type]
    if kind == "hr":
        return None
    return Block("text", text=source, **make)  # type: ignore[arg-type]  # a quote, …


def _furniture(text: str) -> str | None:
    """ "footer" for a page number, "header" for a watermark, as Nanonets-OCR2 tags them."""
    tag = _FURNITURE_TAG.match(text)
    if tag is None:
        return None
    return "footer" if tag.group(1).lower() == "page_number" else "header"


def _items(tokens: list[Token]) -> list[dict[str, Any]]:
    """A list's items: their text, nesting level and marker (``-``, ``1.``)."""
    items: list[dict[str, Any]] = []
    depth = -1
    markers: list[str] = []
    for j, token in enumerate(tokens):
        if token.type in ("bullet_list_open", "ordered_list_open"):
            depth += 1
            markers.append("-" if token.type == "bullet_list_open" else ".")
        elif token.type in ("bullet_list_close", "ordered_list_close"):
            depth -= 1
            markers.pop()
        elif token.type == "list_item_open":
            marker = markers[-1]
            if marker == ".":
                marker = f"{token.info or len(items) + 1}{token.markup or '.'}"
            text = next((t.content for t in tokens[j:] if t.type == "inline"), "")
            items.append({"text": text, "level": depth, "marker": marker})
    return items
