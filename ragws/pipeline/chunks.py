"""RAG chunks: the document's markdown cut on block boundaries, each piece traced to its source.

A :class:`Chunk` knows the pages and boxes it came from and the section headings it falls
under, so an answer can be traced back; :func:`chunk_blocks` makes them. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ragws.pipeline.blocks import HEADINGS, Block
from ragws.pipeline.geometry import BBox
from ragws.pipeline.markdown import one_line, rendered_blocks


@dataclass(slots=True)
class Chunk:
    """A piece of the document's markdown for a vector store, with where it came from."""

    text: str
    pages: list[int]  # sorted, unique, 0-based
    bboxes: list[tuple[int, BBox]]  # (page, bbox) of each block in it, in order
    headings: list[str] = field(default_factory=list)  # the section path at its first block


@dataclass(frozen=True, slots=True)
class _Piece:
    text: str
    page: int
    bbox: BBox
    heading: bool
    path: tuple[str, ...] = ()  # headings in force at this block, outermost first


def _joined_len(pieces: Sequence[_Piece]) -> int:
    return sum(len(p.text) for p in pieces) + 2 * max(0, len(pieces) - 1)


def _trailing_headings(pieces: list[_Piece]) -> tuple[list[_Piece], list[_Piece]]:
    """``pieces`` split before the headings it ends with."""
    k = len(pieces)
    while k and pieces[k - 1].heading:
        k -= 1
    return pieces[:k], pieces[k:]


_SENTENCE_END = re.compile(r"[.!?](?=\s)")


def _take(text: str, limit: int) -> tuple[str, str]:
    """The longest head of ``text`` of at most ``limit`` characters, cut at a sentence end in
    its second half if there is one, else at whitespace, else anywhere; and the rest."""
    if len(text) <= limit:
        return text, ""
    window = text[: limit + 1]  # the character after the cut tells a sentence end or a space
    ends = [m.end() for m in _SENTENCE_END.finditer(window) if m.end() * 2 >= limit]
    cut = ends[-1] if ends else max(window.rfind(" "), window.rfind("\n"))
    head = text[:cut].rstrip() if cut > 0 else ""
    if not head:
        head, cut = text[:limit], limit
    return head, text[cut:].lstrip()


def _split(text: str, limit: int) -> list[str]:
    parts: list[str] = []
    while text:
        head, text = _take(text, limit)
        parts.append(head)
    return parts


def _chunk(pieces: Sequence[_Piece]) -> Chunk:
    return Chunk(
        text="\n\n".join(p.text for p in pieces),
        pages=sorted({p.page for p in pieces}),
        bboxes=[(p.page, p.bbox) for p in pieces],
        headings=list(pieces[0].path),
    )


class _HeadingPath:
    """The section headings in force while walking a document's blocks in order."""

    def __init__(self) -> None:
        self._open: list[tuple[int, str]] = []

    def see(self, block: Block) -> tuple[str, ...]:
        if block.type == "heading" and block.text.strip():
            level = block.level or 2
            self._open = [(lv, text) for lv, text in self._open if lv < level]
            self._open.append((level, one_line(block.text)))
        return tuple(text for _, text in self._open)


def chunk_blocks(
    pages: Sequence[Sequence[Block]],
    chunk_chars: int = 1500,
    *,
    include_furniture: bool = False,
) -> list[Chunk]:
    """Chunks of at most ``chunk_chars`` characters over the document's blocks, page by page.

    Each block contributes its markdown as :func:`ragws.pipeline.markdown.page_markdown`
    renders it; a chunk is its blocks' markdown joined by a blank line. Chunks are cut on
    block boundaries only: a block joins the current chunk while the chunk stays within
    ``chunk_chars``. So that sections
    start chunks, a heading starts a new chunk once the current one is half full, and a
    heading never ends a chunk that more blocks follow: it moves to the next chunk with them.
    The one exception is a heading that cannot share a chunk with the block after it; it then
    makes a chunk of its own rather than overfill one.

    A block longer than ``chunk_chars`` is the only one ever cut: at sentence ends where it
    can be, else at whitespace, each piece a chunk with the block's page and box (a heading
    that precedes it rides with the first piece when there is room).
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be ≥ 1, got {chunk_chars}")
    path = _HeadingPath()
    chunks: list[Chunk] = []
    current: list[_Piece] = []

    def emit(pieces: Sequence[_Piece]) -> None:
        if pieces:
            chunks.append(_chunk(pieces))

    for blocks in pages:
        for block, markdown in rendered_blocks(blocks, include_furniture):
            piece = _Piece(
                markdown, block.page, block.bbox, block.type in HEADINGS, path.see(block)
            )
            if len(markdown) > chunk_chars:
                body, headings = _trailing_headings(current)
                emit(body)
                current = []
                rest = markdown
                if headings:
                    room = chunk_chars - _joined_len(headings) - 2
                    if room >= max(1, chunk_chars // 4):
                        head, rest = _take(rest, room)
                        emit([*headings, _Piece(head, piece.page, piece.bbox, False, piece.path)])
                    else:
                        emit(headings)
                for part in _split(rest, chunk_chars):
                    emit([_Piece(part, piece.page, piece.bbox, False, piece.path)])
                continue
            if piece.heading and 2 * _joined_len(current) >= chunk_chars:
                body, headings = _trailing_headings(current)
                if body:
                    emit(body)
                    current = headings
            if current and _joined_len(current) + 2 + len(markdown) > chunk_chars:
                body, headings = _trailing_headings(current)
                emit(body)
                current = headings
                if current and _joined_len(current) + 2 + len(markdown) > chunk_chars:
                    emit(current)
                    current = []
            current.append(piece)
    emit(current)
    return chunks
