"""Box arithmetic on ``(x0, y0, x1, y1)`` boxes, in whatever pixels or points they come in.

The one place the parse pipeline intersects, measures, joins, scales and rounds boxes: layout
regions, lines, blocks and table cells all go through these functions. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence

BBox = tuple[float, float, float, float]  # x0, y0, x1, y1


def overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Area of the intersection of two ``[x0, y0, x1, y1]`` boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def area(box: Sequence[float]) -> float:
    """Area of an ``[x0, y0, x1, y1]`` box (0 when empty)."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def union(box: BBox, *others: BBox) -> BBox:
    """The smallest box holding ``box`` and every one of ``others``."""
    x0, y0, x1, y1 = box
    for o in others:
        x0, y0, x1, y1 = min(x0, o[0]), min(y0, o[1]), max(x1, o[2]), max(y1, o[3])
    return x0, y0, x1, y1


def sorted_bbox(bbox: BBox) -> BBox:
    """The box with its corners in order (``x0 <= x1``, ``y0 <= y1``), as floats."""
    x0, y0, x1, y1 = (float(v) for v in bbox)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def scale(box: BBox, sx: float, sy: float) -> BBox:
    """The box with x multiplied by ``sx`` and y by ``sy`` (PDF points → rendered pixels)."""
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def round_bbox(bbox: BBox) -> list[float]:
    """The box as a frame carries it: a list, to a hundredth of a pixel."""
    return [round(float(v), 2) for v in bbox]
