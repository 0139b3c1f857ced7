"""The blocks of a page: a heading, a paragraph, a list, a table, a figure …

The parse pipeline makes them from lines and layout regions (:mod:`ragws.pipeline.structure`),
orders them (:mod:`ragws.pipeline.reading_order`), renders them
(:mod:`ragws.pipeline.markdown`) and cuts the document into chunks over them
(:mod:`ragws.pipeline.chunks`). Geometry is in the pixels of the rendered page the layout
model saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ragws.pipeline.geometry import BBox

if TYPE_CHECKING:
    from ragws.pipeline.tables import Table

#: Block types, whatever layout model found the regions (see ragws.pipeline.structure).
BLOCK_TYPES: tuple[str, ...] = (
    "title",
    "heading",
    "text",
    "list",
    "code",
    "table",
    "equation",
    "figure",
    "caption",
    "footnote",
    "header",
    "footer",
)
#: Page furniture: repeated on every page and noise to a reader, so left out of markdown by default.
FURNITURE: frozenset[str] = frozenset({"header", "footer"})
HEADINGS: frozenset[str] = frozenset({"title", "heading"})


@dataclass(slots=True)
class Block:
    """One block of a page: a heading, a paragraph, a list, a table, a figure …

    Mutable on purpose: :func:`ragws.pipeline.reading_order.reading_order` writes ``order``,
    :func:`ragws.pipeline.markdown.set_markdown` writes ``markdown`` and the parse pipeline
    adds ``image``. Functions that need to tell blocks apart use their identity, not their
    value.
    """

    type: str  # one of BLOCK_TYPES
    bbox: BBox  # in the rendered page's pixels
    page: int  # 0-based
    text: str = ""
    source: str = "none"  # "pdf" (text layer) | "ocr" | "none"
    score: float = 1.0  # layout confidence
    order: int = -1  # position in reading order on its page, set by reading_order
    image: bytes | None = None  # JPEG crop of a figure, when the client asked for it
    level: int | None = None  # headings: 1 for the title, 2.. for sections
    items: list[dict[str, Any]] | None = None  # lists: {"text", "level", "marker"} per item
    table: Table | None = None  # tables: the cells, when a grid could be read
    markdown: str = ""  # set by set_markdown

    def __post_init__(self) -> None:
        if self.type not in BLOCK_TYPES:
            raise ValueError(f"unknown block type {self.type!r}; one of {BLOCK_TYPES}")
