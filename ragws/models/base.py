"""The interface every layout backend implements.

A layout backend splits inference in two so that the server can overlap work:

* ``prepare`` turns one decoded page (RGB ``uint8`` array, ``H×W×3``) into the model's input.
  It runs in a worker pool, many pages at once, while the model is busy with another batch.
* ``predict`` runs one batch of prepared pages in a single model call and returns one
  :class:`Detections` per page, in the page's own pixel coordinates.

A page's result must not depend on which other pages share its batch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort


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


def wheel_models(package: str, files: Sequence[str], missing: str) -> list[Path]:
    """The ONNX ``files`` shipped in the ``models/`` folder of an installed wheel's
    ``package``; FileNotFoundError with ``missing`` (what to install) when any is absent."""
    spec = importlib.util.find_spec(package)
    for location in list(spec.submodule_search_locations or []) if spec else []:
        paths = [Path(location) / "models" / name for name in files]
        if all(p.is_file() for p in paths):
            return paths
    raise FileNotFoundError(missing)


def cpu_session(path: Path, threads: int, *, quiet: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU as every embedded model wants it: full graph
    optimisation, the memory arena on (rapidocr turns it off; with inputs of varying width
    that is ~10% slower), and idle workers that sleep instead of spinning, so the models, PDF
    rendering and preprocessing threads share the cores instead of fighting for them.
    ``threads``: intra-op threads, 0 for the runtime's default; ``quiet`` hides warnings."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if quiet:
        options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
