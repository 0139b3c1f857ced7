"""Layout service: bytes in, per-page detections out, every page through one shared batcher.

A page's journey: decode (image) or render (PDF) in a document worker
(:mod:`ragws.pipeline.document_service`, processes with a memory and a time limit) →
``prepare`` on the preprocess pool → the dynamic batcher → ``predict`` on the inference thread.
Decoding and preprocessing of later pages overlap with inference of earlier ones, which is where
most of the gain on a CPU comes from; on a GPU larger batches pay as well. A document's pages
render on every worker at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ragws.config import Settings
from ragws.metrics import Metrics
from ragws.models.base import Detections, LayoutInput, LayoutModel
from ragws.pipeline.document_service import DocumentService, PdfPlan
from ragws.pipeline.documents import encode_jpeg
from ragws.runtime.batcher import Batched, DynamicBatcher
from ragws.runtime.tasks import in_pool
from ragws.runtime.window import windowed

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(slots=True)
class PageLayout:
    """The layout of one image or PDF page, in the pixels of the image that was analysed."""

    page: int | None  # 0-based PDF page; None for a sent image
    width: int
    height: int
    detections: Detections
    queue_ms: float
    total_ms: float
    jpeg: bytes | None = None  # the rendered page, when the client asked for it


class LayoutService:
    def __init__(
        self,
        model: LayoutModel,
        settings: Settings,
        metrics: Metrics,
        pool: ThreadPoolExecutor,
        documents: DocumentService,
    ) -> None:
        """``pool`` preprocesses pages (the server shares it with the OCR service);
        ``documents`` decodes images and renders PDF pages in its worker processes."""
        self.model = model
        self.settings = settings
        self.metrics = metrics
        # A document keeps at most this many pages between render and result, so a long PDF
        # cannot hold hundreds of rendered pages in memory while still filling whole batches.
        self.pages_in_flight = max(8, 2 * settings.layout_batch_size)
        self._pool = pool
        self.documents = documents
        self.batcher: DynamicBatcher[LayoutInput, Detections] | None = None
        self.preferred_batch_size: int | None = None  # configured or measured at start()

    async def start(self) -> None:
        preferred = self.settings.preferred_batch_size
        if preferred is None:
            preferred = await in_pool(
                self._pool, choose_batch_size, self.model, self.settings.layout_batch_size
            )
        self.batcher = DynamicBatcher(
            self.model.predict,
            max_batch_size=self.settings.layout_batch_size,
            preferred_batch_size=preferred,
            max_queue_delay_s=self.settings.max_wait_ms / 1000,
            # Admission control bounds requests; this bounds pages (requests × window).
            max_queue_size=self.settings.max_concurrent * self.pages_in_flight,
            name="layout",
            on_batch=self.metrics.observe_layout_batch,
        )
        self.batcher.start()
        self.preferred_batch_size = preferred
        self.metrics.layout_queue_depth.set_function(self.batcher.queue_depth)
        log.info(
            "layout model %s on %s: max batch %d, preferred batch %d, window %.1f ms",
            self.model.name,
            self.model.device,
            self.settings.layout_batch_size,
            preferred,
            self.settings.max_wait_ms,
        )

    @property
    def healthy(self) -> bool:
        return self.batcher is not None and self.batcher.healthy

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()

    # --- requests -------------------------------------------------------------------------

    async def detect_image(
        self, data: bytes, conf: float | None = None, iou: float | None = None
    ) -> PageLayout:
        started = time.monotonic()
        rgb = await self.documents.decode_image(data)
        return await self._detect(rgb, None, conf, iou, started, with_jpeg=False)

    async def detect_array(
        self, rgb: np.ndarray, page: int | None = None, started: float | None = None
    ) -> PageLayout:
        """The layout of an already decoded or rendered RGB page (the parse pipeline's way in)."""
        started = time.monotonic() if started is None else started
        return await self._detect(rgb, page, None, None, started, with_jpeg=False)

    def detect_pdf(
        self,
        plan: PdfPlan,
        *,
        scale: float | tuple[float, float] = 2.0,
        conf: float | None = None,
        iou: float | None = None,
        images: bool = False,
    ) -> AsyncIterator[PageLayout]:
        """Yield each selected page's layout as soon as it is ready (completion order).

        All pages are queued at once (up to the in-flight window, which a page leaves when the
        caller has taken it) so they batch with each other and with other clients' pages.
        Closing the iterator early cancels the remaining pages.
        """
        scale_x, scale_y = scale if isinstance(scale, tuple) else (scale, scale)

        async def one_page(page: int) -> PageLayout:
            started = time.monotonic()
            rgb = await self.documents.render_page(plan, page, scale_x, scale_y)
            return await self._detect(rgb, page, conf, iou, started, with_jpeg=images)

        return windowed(plan.pages, one_page, self.pages_in_flight)

    # --- internals ------------------------------------------------------------------------

    async def _detect(
        self,
        rgb: np.ndarray,
        page: int | None,
        conf: float | None,
        iou: float | None,
        started: float,
        *,
        with_jpeg: bool,
    ) -> PageLayout:
        conf = self.model.default_conf if conf is None else conf
        iou = self.model.default_iou if iou is None else iou
        prepared = await in_pool(self._pool, self.model.prepare, rgb, conf, iou)
        jpeg_task = (
            asyncio.ensure_future(in_pool(self._pool, encode_jpeg, rgb)) if with_jpeg else None
        )
        try:
            result = await self._submit(prepared)
            jpeg = await jpeg_task if jpeg_task is not None else None
        except BaseException:
            if jpeg_task is not None:
                jpeg_task.cancel()
            raise
        height, width = rgb.shape[:2]
        return PageLayout(
            page=page,
            width=width,
            height=height,
            detections=result.output,
            queue_ms=result.queue_s * 1000,
            total_ms=(time.monotonic() - started) * 1000,
            jpeg=jpeg,
        )

    async def _submit(self, prepared: LayoutInput) -> Batched[Detections]:
        assert self.batcher is not None, "LayoutService.start() was not awaited"
        return await self.batcher.submit_request(prepared, "layout model")


def choose_batch_size(
    model: LayoutModel, max_batch_size: int, budget_s: float = 8.0, repeats: int = 3
) -> int:
    """Measure pages/s per batch size on a synthetic page and pick the best.

    On a GPU the largest batch wins and is taken without measuring. On a CPU, threads inside one
    model call already use every core and a larger batch is often slower per page. Each size is
    timed ``repeats`` times and its fastest run counts (other processes only ever slow a run
    down), and a larger batch is chosen only if it beats every smaller one by more than 10%:
    a noisy start-up must not pin the server to a batch size that is slower in steady state.
    """
    if model.device != "cpu":
        return max_batch_size
    page = synthetic_page()
    prepared = model.prepare(page, model.default_conf, model.default_iou)
    model.predict([prepared])  # warm-up: first call allocates
    rates: dict[int, float] = {}
    deadline = time.monotonic() + budget_s
    size = 1
    while size <= max_batch_size and time.monotonic() < deadline:
        batch = [prepared] * size
        fastest = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.predict(batch)
            fastest = min(fastest, time.perf_counter() - t0)
        rates[size] = size / fastest
        size *= 2
    chosen = 1
    for size, rate in sorted(rates.items()):
        if rate > 1.10 * rates[chosen]:
            chosen = size
    log.info(
        "layout batch size measured: %s pages/s → preferred %d",
        ", ".join(f"{s}: {r:.1f}" for s, r in rates.items()),
        chosen,
    )
    return chosen


def synthetic_page(width: int = 1224, height: int = 1584) -> np.ndarray:
    """A white page with text-like bars, for warm-up and measurement."""
    page = np.full((height, width, 3), 255, dtype=np.uint8)
    for top in range(150, height - 150, 40):
        page[top : top + 14, 120 : width - 120] = 30
    return page
