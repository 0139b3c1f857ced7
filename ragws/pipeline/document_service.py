"""Clients' documents, opened and read in the document workers: the pipeline's one way in to a
PDF or an image.

Every call that reads a client's bytes runs in a :class:`~ragws.pipeline.document_pool.DocumentPool`
worker (a process with a memory and a time limit); this service is what the layout, parse and
OCR services ask: decode an image, open a PDF (validated, its page selection checked), render a
page, read its words, run any function on the open document, close it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ragws.config import Settings
from ragws.metrics import Metrics
from ragws.pipeline.document_pool import DocumentPool
from ragws.pipeline.documents import PdfDocument, PdfFile, PdfLimits

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PdfPlan:
    """An opened PDF and the pages a request will get."""

    doc: PdfFile
    pages: list[int]


class DocumentService:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.pdf_limits = PdfLimits(
            settings.max_pdf_bytes, settings.max_pages, settings.max_image_pixels
        )
        self.metrics = metrics
        self.pool = DocumentPool(
            settings.document_workers or os.cpu_count() or 2,
            settings.document_worker_memory_mb,
            settings.document_timeout_s,
            on_replaced=lambda reason: metrics.document_workers_replaced_total.labels(reason).inc(),
        )

    async def start(self) -> None:
        await self.pool.start()
        self.metrics.document_tasks_waiting.set_function(self.pool.waiting)

    async def stop(self) -> None:
        await self.pool.stop()

    @property
    def workers(self) -> int:
        """Workers serving now (a killed one is being replaced)."""
        return self.pool.workers

    def waiting(self) -> int:
        """Tasks waiting for a worker."""
        return self.pool.waiting()

    async def decode_image(self, data: bytes) -> np.ndarray:
        """Decode a client's image in a document worker, under ``max_image_pixels``."""
        return await self.pool.decode_image(data, self.pdf_limits.max_pixels)

    async def render_page(
        self, plan: PdfPlan, page: int, scale: float, scale_y: float | None = None
    ) -> np.ndarray:
        """Render one page of an open plan (in a document worker)."""
        return await self.in_worker(
            plan, PdfDocument.render, page, scale, scale_y, what=f"rendering page {page}"
        )

    async def page_words(
        self, plan: PdfPlan, page: int
    ) -> list[tuple[float, float, float, float, str, int, int, int]]:
        """The page's text-layer words, in PDF points (in a document worker)."""
        return await self.in_worker(
            plan, PdfDocument.words, page, what=f"reading the words of page {page}"
        )

    async def in_worker(self, plan: PdfPlan, fn: Callable[..., T], *args: object, what: str) -> T:
        """``fn(document, *args)`` in a document worker, ``document`` being the plan's PDF
        opened there (a :class:`PdfDocument`): any call into an open document goes this way.
        ``fn`` is pickled by name (a method of PdfDocument, a module's function), and
        ``what`` names the work in the error a time or memory limit ends it with."""
        return await self.pool.run(fn, *args, doc=plan.doc, what=what)

    async def open_pdf(self, data: bytes, pages: tuple[int, ...] | None) -> PdfPlan:
        """Open and validate a PDF; errors surface here, before any page frame is sent.

        The caller must :meth:`close_pdf` the plan when done with it.
        """
        self.pdf_limits.check_size(len(data))
        path = await self.pool.store(data)
        try:
            stored = PdfFile(path, 0, self.pdf_limits)  # opening it tells its page count
            count = await self.pool.run(PdfDocument.count_pages, doc=stored, what="opening the pdf")
            doc = PdfFile(path, count, self.pdf_limits)
            return PdfPlan(doc, doc.select(pages))
        except BaseException:
            self.pool.discard(path)
            raise

    async def close_pdf(self, plan: PdfPlan) -> None:
        self.pool.discard(plan.doc.path)
