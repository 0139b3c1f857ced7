"""One long document over several connections: page ranges out, one document back.

A WebSocket is routed once, at its upgrade, so a client that wants one document read by
several replicas sends its pages as ranges over several connections
(:meth:`ragws.client.AsyncClient.parse_document` with ``connections`` and
``pages_per_request``). Each range is a ``parse`` request with ``style: "document"``, so the
server decides the document's style (title, headings, running headers) from every page, and
each page comes back as it would from a parse of the whole document. Here the pages are put
back in order and what a parse of the whole computes at its end is computed again over all of
them, with the server's own functions: running headers and footers of OCR'd pages
(:func:`ragws.pipeline.structure.mark_repeated_furniture`), the document's markdown and its chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ragws.pipeline.blocks import Block
from ragws.pipeline.chunks import chunk_blocks
from ragws.pipeline.markdown import document_markdown, render
from ragws.pipeline.structure import mark_repeated_furniture
from ragws.serving.frames import chunk_fields

Frame = dict[str, Any]


def pdf_page_count(data: bytes) -> int | None:
    """Pages in a PDF, or None when pymupdf cannot open it (pymupdf is imported here only: the
    rest of the client does not need it)."""
    import pymupdf

    try:
        with pymupdf.open(stream=data, filetype="pdf") as doc:
            return doc.page_count
    except Exception:  # damaged or encrypted: the server's answer will say what is wrong
        return None


def page_ranges(pages: Sequence[int], per_request: int) -> list[tuple[int, ...]]:
    """``pages`` cut, in their order, into runs of at most ``per_request``."""
    if per_request < 1:
        raise ValueError(f"pages_per_request must be ≥ 1, got {per_request}")
    return [tuple(pages[i : i + per_request]) for i in range(0, len(pages), per_request)]


def pages_per_request(selected: int, connections: int, asked: int | None, max_pages: int) -> int:
    """Pages per range: as asked, else an even share of the connections; never over the
    server's ``max_pages``."""
    share = asked or math.ceil(selected / max(1, connections))
    return max(1, min(share, max_pages))


def _block(data: Frame, page: int) -> Block:
    return Block(
        type=data["type"],
        bbox=tuple(data["bbox"]),  # type: ignore[arg-type]
        page=page,
        text=data.get("text", ""),
        source=data.get("source", "none"),
        score=data.get("score", 0.0),
        order=data.get("order", -1),
        level=data.get("level"),
        items=data.get("items"),
        markdown=data.get("markdown") or "",
    )


def assemble(
    frames: Sequence[Frame], *, chunk_chars: int, furniture: bool
) -> tuple[str, list[Frame]]:
    """The document's markdown and its chunks (as ``done`` frames carry them) from its page
    frames, in any order, as the server makes them at the end of a parse of the whole."""
    ordered = sorted(frames, key=lambda frame: frame["page"])
    pages = [[_block(b, frame["page"]) for b in frame.get("blocks") or ()] for frame in ordered]
    before = [[block.type for block in blocks] for blocks in pages]
    if mark_repeated_furniture(
        [(frame["height"], blocks) for frame, blocks in zip(ordered, pages, strict=True)]
    ):
        # Only the retyped blocks are rendered again: a table's cells did not come back in a
        # form that renders, and the other blocks' markdown is what the server rendered.
        for blocks, types in zip(pages, before, strict=True):
            for block, was in zip(blocks, types, strict=True):
                if block.type != was:
                    block.markdown = render(block)
    markdown = document_markdown(pages, include_furniture=furniture)
    chunks = chunk_blocks(pages, chunk_chars, include_furniture=furniture)
    return markdown, [chunk_fields(chunk) for chunk in chunks]
