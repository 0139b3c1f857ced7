"""What every OCR backend shares: the options of a request, the protocol the serving layer and
the parse pipeline call, and the small steps all backends take the same way (the image region
to read, a stream drained to its text).

Two backends implement :class:`OcrBackend`: :class:`~ragws.pipeline.ocr.vlm.OcrService` (a
causal VLM on the continuous-batching engine, token streams) and
:class:`~ragws.pipeline.ocr.lines.LineOcrService` (PP-OCR on the dynamic batchers, one event
per text line).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ragws.engine.sequence import Sampling, TokenEvent
from ragws.errors import ErrorCode, RequestError, bad_request
from ragws.pipeline.geometry import BBox

if TYPE_CHECKING:
    from ragws.pipeline.document_service import DocumentService


@dataclass(frozen=True, slots=True)
class OcrOptions:
    mode: str = "format"  # "format" or "plain", as GOT's prompts
    max_tokens: int | None = None  # None: the server's cap
    box: tuple[float, float, float, float] | None = None  # crop to this region first
    crop: bool = False  # GOT's multi-patch mode for large, dense pages
    ignore_eos: bool = False
    prompt: str | None = None  # the request's own instruction; None: the model's for ``mode``
    system: str | None = None  # a system message; None: the model's own
    sampling: Sampling | None = None  # None: greedy
    repetition_penalty: float | None = None  # None: the checkpoint's generation config's
    no_repeat_ngram_size: int | None = None  # None: the checkpoint's generation config's
    stop: tuple[str, ...] = ()  # strings that end the text (not included in it)
    skip_special_tokens: bool = True


class OcrBackend(Protocol):
    """What the session, the HTTP handlers and the parse pipeline need of an OCR backend.

    See the module docstring for the two implementations.
    """

    modes: tuple[str, ...]  # accepted ``mode`` values
    markup: bool  # whether ``mode="format"`` yields markup (LaTeX, markdown tables)
    architecture: str  # the model's architecture (a checkpoint's ``architectures`` entry)
    page_mode: str | None  # a page-level model's mode for a whole page; None: it reads regions

    @property
    def name(self) -> str: ...

    @property
    def healthy(self) -> bool: ...

    def queue_depths(self) -> dict[str, int]:
        """Work waiting for a model, by the name of what waits (``ragws_queue_depth``)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(
        self, image: bytes | np.ndarray, options: OcrOptions
    ) -> AsyncIterator[TokenEvent]: ...

    def mode_for(self, kind: str) -> str:
        """The task to read a layout region of ``kind`` with (``text``, ``table``,
        ``equation``, ...): one of :attr:`modes`."""
        ...

    async def read_regions(
        self,
        rgb: np.ndarray,
        regions: Seq[tuple[float, float, float, float]],
        modes: Seq[str],
    ) -> list[str]: ...

    async def read_page_lines(
        self, rgb: np.ndarray
    ) -> list[tuple[str, tuple[float, float, float, float]]] | None:
        """Every text line of a page with its box, or None for a backend that reads regions
        and cannot place lines (the parse pipeline then reads region by region)."""
        ...


def check_mode(backend: OcrBackend, mode: str) -> None:
    """Refuse a task the backend's model does not have (``bad_request``, naming those it has)."""
    if mode not in backend.modes:
        raise bad_request(
            f"field 'mode' must be one of {', '.join(backend.modes)} for {backend.name}, "
            f"got {mode!r}"
        )


async def image_region(
    documents: DocumentService, image: bytes | np.ndarray, box: BBox | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """The pixels to read: ``image`` decoded (in a document worker) when it is a file's bytes,
    cut to ``box``; and the origin of the cut in the image, to place what is read in it."""
    rgb = await documents.decode_image(image) if isinstance(image, bytes) else image
    if box is None:
        return rgb, (0, 0)
    return crop_box(rgb, box), clamp_box(rgb, box)[:2]


async def read_text(
    events: AsyncIterator[TokenEvent],
    on_event: Callable[[TokenEvent], Awaitable[None]] | None = None,
) -> tuple[str, TokenEvent]:
    """Drain an OCR stream (``generate()``) to its end: its whole text and its last event.

    ``on_event`` sees each event as it comes (to stream it on). The stream is closed however
    this ends, which aborts its sequence when it is cut short. RequestError (``internal``) when
    the model failed.
    """
    parts: list[str] = []
    last: TokenEvent | None = None
    try:
        async for event in events:
            parts.append(event.text)
            last = event
            if on_event is not None:
                await on_event(event)
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()
    assert last is not None and last.finish_reason is not None  # generate() ends on one
    if last.error is not None:
        raise RequestError(ErrorCode.INTERNAL, f"ocr model failed: {last.error}")
    return "".join(parts), last


def crop_box(rgb: np.ndarray, box: tuple[float, float, float, float] | None) -> np.ndarray:
    """Crop to ``[x0, y0, x1, y1]`` in the image's pixels; refuse boxes outside the image."""
    if box is None:
        return rgb
    x0, y0, x1, y1 = clamp_box(rgb, box)
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])


def clamp_box(rgb: np.ndarray, box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """``box`` rounded and clipped to the image: what :func:`crop_box` cuts, and so the
    origin of the crop's coordinates (a box may start left of or above the image)."""
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = (round(v) for v in box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise bad_request(f"box {list(box)} leaves no pixels of the {width}×{height} image")
    return x0, y0, x1, y1
