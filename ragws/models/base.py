"""The interface every layout backend implements.

A layout backend splits inference in two so that the server can overlap work:

* ``prepare`` turns one decoded page (RGB ``uint8`` array, ``H×W×3``) into the model's input.
  It runs in a worker pool, many pages at once, while the model is busy with another batch.
* ``predict`` runs one batch of prepared pages in a single model call and returns one
  :class:`Detections` per page, in the page's own pixel coordinates.

A page's result must not depend on which other pages share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(slots=True)
class LayoutInput:
    """One page, ready for :meth:`LayoutModel.predict`."""

    tensor: Any  # backend-specific (a normalised CHW array, a letterboxed image, ...)
    width: int  # size of the page as sent, which is the frame results are reported in
    height: int
    conf: float  # per-page thresholds: pages of one batch may ask for different ones
    iou: float
    meta: dict[str, Any] = field(default_factory=dict)  # backend-specific (scale, padding, ...)


@dataclass(slots=True)
class Detections:
    """Layout regions of one page."""

    boxes: np.ndarray  # (N, 4) float32, x0 y0 x1 y1 in page pixels
    scores: np.ndarray  # (N,) float32
    labels: list[str]  # N class names

    def __len__(self) -> int:
        return len(self.labels)


class LayoutModel(Protocol):
    """A document-layout detector that predicts on batches of pages."""

    name: str  # what ``hello`` and ``/health`` report
    classes: tuple[str, ...]
    device: str  # "cpu" or "cuda"
    default_conf: float
    default_iou: float

    def prepare(self, image: np.ndarray, conf: float, iou: float) -> LayoutInput:
        """Preprocess one RGB page; thread-safe, called from a worker pool."""
        ...

    def predict(self, batch: Sequence[LayoutInput]) -> list[Detections]:
        """Run one batch in one model call; called from the single inference thread."""
        ...
