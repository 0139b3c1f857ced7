"""Every frame the server sends, and the JSON bodies of the HTTP routes that mirror them.

:mod:`ragws.serving.protocol` reads frames in; this module writes them out: the one place that
knows the field names of results (layout pages, token streams, parsed pages, blocks, chunks,
``done`` summaries) and how their numbers are rounded. The pipeline hands over plain
dataclasses; nothing below the serving layer builds a wire dict. docs/protocol.md is the
specification these functions follow.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import Any

import msgpack

from ragws import __version__
from ragws.engine.sequence import TokenEvent
from ragws.errors import ErrorCode, RequestId
from ragws.pipeline.blocks import Block
from ragws.pipeline.chunks import Chunk
from ragws.pipeline.geometry import round_bbox
from ragws.pipeline.layout import PageLayout
from ragws.pipeline.parse import ParsedDocument, ParsedPage
from ragws.pipeline.tables import Cell
from ragws.serving.protocol import PROTOCOL_VERSION

Frame = dict[str, Any]


def encode(frame: Mapping[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


# --- connection -----------------------------------------------------------------------------


def hello_frame(
    models: Mapping[str, str | None],
    limits: Mapping[str, Any],
    *,
    ocr_modes: tuple[str, ...] = (),
    ocr_markup: bool = False,
    ocr_architecture: str | None = None,
    ocr_page_mode: str | None = None,
) -> Frame:
    """``ocr.modes``: the ``mode`` values the OCR backend takes; ``ocr.markup``: whether
    ``"format"`` yields markup (the VLMs) or the same plain text (line OCR);
    ``ocr.architecture``: the model's architecture (null without an OCR model);
    ``ocr.page_mode``: a page-level model's mode for a whole page, which ``parse`` reads pages
    without a text layer with (null: the model reads regions, or lines)."""
    return {
        "type": "hello",
        "version": PROTOCOL_VERSION,
        "server": f"ragws/{__version__}",
        "models": dict(models),
        "ocr": {
            "modes": list(ocr_modes),
            "markup": ocr_markup,
            "architecture": ocr_architecture,
            "page_mode": ocr_page_mode,
        },
        "limits": dict(limits),
    }


def goaway_frame(reason: str) -> Frame:
    """The server is going away: requests in flight on this socket go on to their end; new
    ones belong on another connection (which a load balancer sends to another replica)."""
    return {"type": "goaway", "reason": reason}


def error_frame(request_id: RequestId | None, code: ErrorCode, message: str) -> Frame:
    return {"type": "error", "id": request_id, "code": code.value, "message": message}


def done_frame(request_id: RequestId, finish_reason: str, **fields: Any) -> Frame:
    return {"type": "done", "id": request_id, "finish_reason": finish_reason, **fields}


# --- layout -----------------------------------------------------------------------------------


def layout_fields(page: PageLayout) -> Frame:
    """The result fields shared by ``layout`` and ``page`` frames."""
    det = page.detections
    return {
        "width": page.width,
        "height": page.height,
        "boxes": [[round(float(v), 2) for v in box] for box in det.boxes],
        "classes": list(det.labels),
        "scores": [round(float(s), 4) for s in det.scores],
    }


def layout_frame(request_id: RequestId, page: PageLayout) -> Frame:
    return {
        "type": "layout",
        "id": request_id,
        **layout_fields(page),
        "timing": {"queue_ms": round(page.queue_ms, 3), "total_ms": round(page.total_ms, 3)},
    }


def layout_page_frame(
    request_id: RequestId, page: PageLayout, pages: int, page_count: int
) -> Frame:
    """One page of a ``pdf`` request. The page counts ride on every page, so a client can lay
    out placeholders and show progress before ``done``."""
    frame = {"type": "page", "id": request_id, "page": page.page, **layout_fields(page)}
    frame["pages"], frame["page_count"] = pages, page_count
    if page.jpeg is not None:
        frame["image"] = page.jpeg
    return frame


def pages_done_frame(
    request_id: RequestId, pages: int, page_count: int, started: float, **fields: Any
) -> Frame:
    """The ``done`` frame of a document request (``pdf`` and ``parse``)."""
    return done_frame(
        request_id,
        "stop",
        pages=pages,
        page_count=page_count,
        **fields,
        timing=pages_timing(pages, started),
    )


def pages_timing(pages: int, started: float) -> dict[str, float]:
    elapsed = time.monotonic() - started
    return {
        "total_ms": round(elapsed * 1000, 3),
        "pages_per_s": round(pages / max(elapsed, 1e-9), 3),
    }


def seed_layout_body(pages: list[PageLayout], started: float) -> Frame:
    """The seed's ``POST /doc_layout`` answer: pages in order, with its unrounded stats."""
    elapsed = time.monotonic() - started
    return {
        "result": [seed_layout_page(p) for p in sorted(pages, key=lambda p: p.page or 0)],
        "stats": {
            "total_page": len(pages),
            "time_taken": elapsed,
            "page_per_second": len(pages) / max(elapsed, 1e-9),
        },
    }


def seed_layout_page(page: PageLayout) -> Frame:
    """One page of the seed's ``POST /doc_layout``: regions sorted top-down, integer pixel
    corners, the rendered page as base64 JPEG."""
    det = page.detections
    order = sorted(range(len(det)), key=lambda i: (float(det.boxes[i][1]), float(det.boxes[i][0])))
    corners = ("x_min", "y_min", "x_max", "y_max")
    return {
        "classes": [det.labels[i] for i in order],
        "coordinates": [
            dict(zip(corners, (int(v) for v in det.boxes[i]), strict=True)) for i in order
        ],
        "scores": [round(float(det.scores[i]), 4) for i in order],
        "img": base64.b64encode(page.jpeg or b"").decode("ascii"),
    }


# --- OCR ----------------------------------------------------------------------------------------


def token_fields(event: TokenEvent) -> Frame:
    """A text delta, with the line's box and confidence when line OCR read it."""
    fields: Frame = {"text": event.text}
    if event.box is not None:
        fields["box"] = [round(v, 2) for v in event.box]
        fields["score"] = round(event.score or 0.0, 4)
    return fields


def token_frame(request_id: RequestId, event: TokenEvent) -> Frame:
    return {"type": "token", "id": request_id, **token_fields(event)}


def usage(last: TokenEvent) -> dict[str, int]:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens}


def ocr_timing(started: float, last: TokenEvent) -> dict[str, float]:
    """queue: arrival → admitted into the running batch; ttft: arrival → first token."""

    def since(moment: float | None) -> float:
        return round(((moment or time.monotonic()) - started) * 1000, 3)

    return {
        "queue_ms": since(last.scheduled_at),
        "ttft_ms": since(last.first_token_at),
        "total_ms": since(None),
    }


def ocr_done_frame(request_id: RequestId, text: str, last: TokenEvent, started: float) -> Frame:
    assert last.finish_reason is not None
    return done_frame(
        request_id,
        last.finish_reason.value,
        text=text,
        usage=usage(last),
        timing=ocr_timing(started, last),
    )


# --- parse --------------------------------------------------------------------------------------


def parsed_page_fields(page: ParsedPage) -> Frame:
    """A parsed page: a ``page`` frame's fields, and one entry of ``POST /parse``'s pages."""
    return {
        "page": page.page,
        "pages": page.pages,
        "page_count": page.page_count,
        "width": page.width,
        "height": page.height,
        "blocks": [block_fields(block) for block in page.blocks],
        "markdown": page.markdown,
        "source": page.source,
        "timing": {"layout_ms": round(page.layout_ms, 3), "total_ms": round(page.total_ms, 3)},
    }


def block_fields(block: Block) -> Frame:
    """A block as a parsed page carries it (the page carries its number)."""
    out: Frame = {
        "type": block.type,
        "bbox": round_bbox(block.bbox),
        "text": block.text,
        "markdown": block.markdown,
        "order": block.order,
        "source": block.source,
        "score": round(float(block.score), 4),
    }
    if block.level is not None:
        out["level"] = block.level
    if block.items is not None:
        out["items"] = [dict(item) for item in block.items]
    if block.table is not None:
        out["html"] = block.table.to_html()
        out["cells"] = [cell_fields(cell) for cell in block.table.cells]
    if block.image is not None:
        out["image"] = block.image
    return out


def cell_fields(cell: Cell) -> Frame:
    return {
        "row": cell.row,
        "col": cell.col,
        "row_span": cell.row_span,
        "col_span": cell.col_span,
        "text": cell.text,
        "bbox": list(cell.bbox) if cell.bbox is not None else None,
    }


def chunk_fields(chunk: Chunk) -> Frame:
    return {
        "text": chunk.text,
        "pages": list(chunk.pages),
        "bboxes": [{"page": p, "bbox": round_bbox(b)} for p, b in chunk.bboxes],
        "headings": list(chunk.headings),
    }


def parsed_page_frame(request_id: RequestId | None, page: ParsedPage) -> Frame:
    return {"type": "page", "id": request_id, **parsed_page_fields(page)}


def parse_done_frame(request_id: RequestId, doc: ParsedDocument, started: float) -> Frame:
    """The ``done`` frame of a parse request (its fields are also ``POST /parse``'s body)."""
    return pages_done_frame(
        request_id,
        len(doc.pages),
        doc.page_count,
        started,
        markdown=doc.markdown,
        chunks=[chunk_fields(chunk) for chunk in doc.chunks],
    )
