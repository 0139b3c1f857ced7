"""Table structure and page orientation services, batched across every client.

Each wraps one embedded model in a :class:`~ragws.runtime.batcher.DynamicBatcher`, as the line OCR
service does: the caller's image is prepared on the shared worker pool, joins the model's queue
with the items of every other request, and the model runs one call per batch on the batcher's
thread. Both models take a fixed input size, so any items batch together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from ragws.errors import ErrorCode, RequestError
from ragws.models.orientation import OrientationModel, rotate
from ragws.models.table_structure import TableStructure, TableStructureModel
from ragws.pipeline.tables import Table, Word, table_from_structure
from ragws.runtime.batcher import (
    Batched,
    BatchStats,
    DynamicBatcher,
)
from ragws.runtime.tasks import in_pool

__all__ = ["OrientationService", "TableStructureService", "rotate"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class _BatchedModel:
    """A model's batcher and the worker pool that prepares its inputs. ``model`` has
    ``prepare(image)`` (run on the pool) and ``run(prepared_batch)`` (run on the batcher)."""

    what = "model"  # in error messages
    batcher_name = "model"

    def __init__(
        self,
        model: TableStructureModel | OrientationModel,
        pool: ThreadPoolExecutor,
        *,
        max_batch_size: int = 8,
        max_queue_delay_s: float = 0.005,
        max_queue_size: int = 1024,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.model = model
        self._pool = pool
        self._batcher: DynamicBatcher | None = None
        self._args = dict(
            max_batch_size=max_batch_size,
            max_queue_delay_s=max_queue_delay_s,
            max_queue_size=max_queue_size,
            name=self.batcher_name,
            on_batch=on_batch,
        )
        self._run_batch = model.run

    @property
    def healthy(self) -> bool:
        return self._batcher is not None and self._batcher.healthy

    def queue_depth(self) -> int:
        return self._batcher.queue_depth() if self._batcher is not None else 0

    async def start(self) -> None:
        self._batcher = DynamicBatcher(self._run_batch, **self._args)
        self._batcher.start()

    async def stop(self) -> None:
        if self._batcher is not None:
            await self._batcher.stop()
        self._batcher = None

    async def _submit(self, item: object) -> Batched:
        if self._batcher is None:
            raise RequestError(ErrorCode.UNAVAILABLE, f"the {self.what} service is not running")
        return await self._batcher.submit_request(item, self.what)


class TableStructureService(_BatchedModel):
    """Image tables: SLANet-plus's cell grid, filled with the caller's words."""

    what = "table structure"
    batcher_name = "table-structure"
    model: TableStructureModel

    async def structure(self, crop: np.ndarray) -> TableStructure:
        """The cell grid of an RGB table crop (cell boxes in the crop's pixels)."""
        prepared = await in_pool(self._pool, self.model.prepare, crop)
        return (await self._submit(prepared)).output

    async def recognize(self, crop: np.ndarray, words: Sequence[Word]) -> Table:
        """The table in an RGB crop, its cells filled with ``words`` ((x0, y0, x1, y1, text)
        in the crop's pixels: OCR lines or text-layer words)."""
        return table_from_structure(await self.structure(crop), words)


class OrientationService(_BatchedModel):
    """Scanned pages: how far each page's content is turned clockwise (0, 90, 180, 270)."""

    what = "page orientation"
    batcher_name = "orientation"
    model: OrientationModel

    async def angle(self, rgb: np.ndarray) -> int:
        """The page's clockwise turn; ``rotate(rgb, angle)`` rights it."""
        prepared = await in_pool(self._pool, self.model.prepare, rgb)
        return (await self._submit(prepared)).output
