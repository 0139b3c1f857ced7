"""Line OCR service: the embedded PP-OCR backend, batched across every client.

An image goes through two shared batchers:

1. **detection** — the page, prepared on the worker pool, joins the detection batcher (pages of
   every request; equal shapes share a model call);
2. **recognition** — each detected line, cut out and normalised on the worker pool, joins the
   recognition batcher, where lines of all requests fill one batch and the model runs one call
   per width bucket (see :mod:`ragws.models.ppocr`).

Lines come back in reading order (top to bottom, then left to right) as soon as each one and
all lines before it are recognised. Cancelling the consuming task cancels its lines' futures,
and the recognition batcher drops them before they reach the model.

The service speaks the same stream as the GOT-OCR2 service
(:class:`~ragws.engine.sequence.TokenEvent` deltas whose concatenation is the text), with each
line's ``box`` and ``score`` attached, so a client need not know which backend answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from ragws.config import Settings
from ragws.engine.detokenizer import StopStrings
from ragws.engine.sequence import FinishReason, TokenEvent
from ragws.errors import ErrorCode, RequestError, bad_request
from ragws.metrics import Metrics
from ragws.models.ppocr import TEXT_SCORE, DetInput, LineInput, PpOcrModels, TextLine, quad_bounds
from ragws.pipeline.geometry import BBox, area
from ragws.pipeline.ocr.backend import OcrOptions, image_region
from ragws.runtime.batcher import Batched, DynamicBatcher
from ragws.runtime.tasks import cancel_all, in_pool

if TYPE_CHECKING:
    from ragws.pipeline.document_service import DocumentService

log = logging.getLogger(__name__)
T = TypeVar("T")


class LineOcrService:
    """Detection and recognition batchers over :class:`PpOcrModels`; see the module docstring."""

    #: Both modes give the same text here: the backend has no markup.
    modes: tuple[str, ...] = ("format", "plain")
    markup = False
    architecture = "PP-OCR"  # detection, line orientation and recognition models
    page_mode = None  # it finds and reads a page's lines itself

    def __init__(
        self,
        models: PpOcrModels,
        settings: Settings,
        metrics: Metrics,
        pool: ThreadPoolExecutor,
        documents: DocumentService,
    ) -> None:
        """``documents`` decodes sent images (in a document worker)."""
        self.models = models
        self.settings = settings
        self.metrics = metrics
        self._pool = pool
        self._documents = documents
        self._det: DynamicBatcher[DetInput, np.ndarray] | None = None
        self._rec: DynamicBatcher[LineInput, tuple[str, float]] | None = None

    @property
    def name(self) -> str:
        return self.models.name

    @property
    def healthy(self) -> bool:
        return all(b is not None and b.healthy for b in (self._det, self._rec))

    def queue_depths(self) -> dict[str, int]:
        """Work waiting for a model: images for text detection, lines for recognition."""
        return {
            "ocr_detect": self._det.queue_depth() if self._det is not None else 0,
            "ocr_recognize": self._rec.queue_depth() if self._rec is not None else 0,
        }

    async def start(self) -> None:
        delay = self.settings.max_wait_ms / 1000
        limit = self.settings.max_concurrent * 1024  # bounds lines, as admission bounds requests
        self._det = DynamicBatcher(
            self.models.detect,
            max_batch_size=self.settings.layout_batch_size,
            max_queue_delay_s=delay,
            max_queue_size=limit,
            name="ocr-det",
            on_batch=self.metrics.observe_ocr_det_batch,
        )
        self._rec = DynamicBatcher(
            self.models.recognize,
            max_batch_size=self.settings.ocr_line_batch_size,
            max_queue_delay_s=delay,
            max_queue_size=limit,
            name="ocr-rec",
            on_batch=self.metrics.observe_ocr_rec_batch,
        )
        self._det.start()
        self._rec.start()
        log.info(
            "OCR %s on cpu: detection batch ≤ %d pages, recognition batch ≤ %d lines",
            self.models.description,
            self.settings.layout_batch_size,
            self.settings.ocr_line_batch_size,
        )

    async def stop(self) -> None:
        for batcher in (self._det, self._rec):
            if batcher is not None:
                await batcher.stop()
        self._det = self._rec = None

    # --- requests ---------------------------------------------------------------------------

    async def generate(
        self, image: bytes | np.ndarray, options: OcrOptions
    ) -> AsyncIterator[TokenEvent]:
        """One event per recognised line (text delta, box, score), then one with the finish.

        A line's ``text`` is prefixed with a newline after the first, so the deltas concatenate
        to the full text exactly as GOT-OCR2's do. ``stop`` strings end the text there (and
        the lines after it are not read). ``max_tokens``, ``crop``, ``ignore_eos``, the prompt
        and the sampling settings concern token generation and do not apply to line OCR.
        """
        arrived = time.monotonic()
        rgb, offset = await image_region(self._documents, image, options.box)
        count = 0
        first_at: float | None = None
        timing: dict[str, float] = {}
        stops = StopStrings(options.stop) if options.stop else None
        lines = self.read_lines(rgb, timing=timing)
        try:
            async for line in lines:
                now = time.monotonic()
                first_at = first_at or now
                x0, y0, x1, y1 = line.box
                box = (x0 + offset[0], y0 + offset[1], x1 + offset[0], y1 + offset[1])
                text = ("\n" if count else "") + line.text
                count += 1
                if stops is not None:
                    text = stops.release(text)
                yield TokenEvent(text, box=box, score=line.score)
                if stops is not None and stops.stopped:
                    break
        finally:
            await lines.aclose()
        yield TokenEvent(
            stops.release("", final=True) if stops is not None else "",
            finish_reason=FinishReason.STOP,
            completion_tokens=count,
            first_token_at=first_at,
            scheduled_at=timing.get("detect_at", arrived),
        )

    async def read_lines(
        self,
        rgb: np.ndarray,
        regions: Sequence[BBox] | None = None,
        timing: dict[str, float] | None = None,
    ) -> AsyncIterator[TextLine]:
        """The text lines of an image in reading order, each as soon as it is readable.

        With ``regions``, only lines inside them are recognised, each tagged with its region
        (see :func:`split_by_regions`). Lines whose recognition is empty or below the score
        threshold are left out, as rapidocr does. ``timing["detect_at"]`` gets the moment the
        image's detection started (the end of its queueing).
        """
        try:
            prepared = await in_pool(self._pool, self.models.prepare_det, rgb)
        except Exception as exc:  # geometry detection cannot take: 1×100000, 2×60000, ...
            height, width = rgb.shape[:2]
            raise bad_request(
                f"text detection cannot read an image of {width}×{height} pixels "
                f"({type(exc).__name__}); send an image of more ordinary proportions"
            ) from None
        submitted = time.monotonic()
        detected = await self._submit(self._det, prepared, "text detection")
        if timing is not None:
            timing["detect_at"] = submitted + detected.queue_s
        quads = await in_pool(self._pool, self.models.det_lines, prepared, detected.output)
        owners: list[int | None] = [None] * len(quads)
        if regions is not None:
            quads, owners = split_by_regions(quads, regions)  # type: ignore[assignment]
        if not len(quads):
            return
        inputs = await in_pool(self._pool, _prepare_lines, self.models, rgb, quads)
        tasks = [
            asyncio.ensure_future(self._submit(self._rec, line, "text recognition"))
            for line in inputs
        ]
        try:
            for task, quad, owner in zip(tasks, quads, owners, strict=True):
                text, score = (await task).output
                if text.strip() and score >= TEXT_SCORE:
                    corners = tuple((float(x), float(y)) for x, y in quad)
                    yield TextLine(text, score, quad_bounds(quad), corners, owner)
        finally:
            await cancel_all(tasks)

    async def read_page_lines(self, rgb: np.ndarray) -> list[tuple[str, BBox]]:
        """Every line of the page with its box, in the detector's reading order."""
        found: list[tuple[str, BBox]] = []
        lines = self.read_lines(rgb)
        try:
            async for line in lines:
                found.append((line.text, line.box))
        finally:
            await lines.aclose()
        return found

    def mode_for(self, kind: str) -> str:
        """Lines are lines, whatever the region: one task."""
        return "plain"

    async def read_regions(
        self, rgb: np.ndarray, regions: Sequence[BBox], modes: Sequence[str] = ()
    ) -> list[str]:
        """The text of each region, its lines joined by newlines. Detection runs once on the
        whole image; lines outside every region are never recognised. ``modes`` changes nothing
        here (no markup)."""
        texts: list[list[str]] = [[] for _ in regions]
        lines = self.read_lines(rgb, regions)
        try:
            async for line in lines:
                texts[line.region].append(line.text)  # type: ignore[index]
        finally:
            await lines.aclose()
        return ["\n".join(t) for t in texts]

    # --- internals ------------------------------------------------------------------------

    async def _submit(self, batcher: DynamicBatcher | None, item: object, what: str) -> Batched:
        if batcher is None:
            raise RequestError(ErrorCode.UNAVAILABLE, "the OCR service is not running")
        return await batcher.submit_request(item, what)


def _prepare_lines(models: PpOcrModels, rgb: np.ndarray, quads: np.ndarray) -> list[LineInput]:
    return [models.prepare_line(crop) for crop in models.crop_lines(rgb, quads)]


def split_by_regions(
    quads: np.ndarray, regions: Sequence[BBox]
) -> tuple[np.ndarray, list[int | None]]:
    """Give each detected line to a region, cutting lines that run across regions.

    On a full page the detector can join two lines that face each other across a narrow gap
    (a text column and a figure caption beside it). A line overlapping one region (by at least
    half its height in both directions) goes to it whole; a line overlapping several is cut at
    the regions' edges into one piece per region, unless one region holds nine tenths of its
    width. Lines outside every region are dropped.
    """
    pieces: list[np.ndarray] = []
    owners: list[int | None] = []
    for quad in quads:
        x0, y0, x1, y1 = quad_bounds(quad)
        height, width = y1 - y0, x1 - x0
        hits = []
        for i, (rx0, ry0, rx1, ry1) in enumerate(regions):
            dx = min(x1, rx1) - max(x0, rx0)
            dy = min(y1, ry1) - max(y0, ry0)
            if dy >= 0.5 * height and dx >= 0.5 * height:
                hits.append((dx, i))
        if not hits:
            continue
        widest, owner = max(hits, key=lambda h: (h[0], -area(regions[h[1]])))
        if len(hits) == 1 or widest >= 0.9 * width:
            pieces.append(quad)
            owners.append(owner)
            continue
        for _, i in sorted(hits, key=lambda h: regions[h[1]][0]):
            left, right = max(x0, regions[i][0]), min(x1, regions[i][2])
            rect = [[left, y0], [right, y0], [right, y1], [left, y1]]
            pieces.append(np.array(rect, dtype=np.float32))
            owners.append(i)
    if not pieces:
        return np.zeros((0, 4, 2), np.float32), []
    return np.stack(pieces).astype(np.float32), owners
