"""PP-OCR text detection, line orientation and line recognition on ONNX Runtime.

The models are the ones the ``rapidocr`` 3.x wheel ships (PP-OCRv6 small detection and
recognition, the PP-LCNet text-line orientation classifier), so the default OCR backend works
on a machine with no network. Pre- and post-processing are rapidocr's own where it exposes them:
:class:`DetPreProcess` (resize to a multiple of 32, normalise), :class:`DBPostProcess`
(binarise, contours, unclip), :func:`get_rotate_crop_image` (perspective crop of a quadrilateral),
:class:`ClsPostProcess` and :class:`CTCLabelDecode` (greedy CTC with the dictionary stored in the
model's metadata).

What differs from ``RapidOCR.__call__`` is how work is cut into model calls, because a server
batches lines from many requests together:

* :meth:`PpOcrModels.detect` takes prepared pages from any number of requests; pages of equal
  input shape run as one call (a PDF's pages usually share one), others in separate calls, so
  a page's result never depends on its batch mates.
* :meth:`PpOcrModels.recognize` takes prepared lines from any number of requests. A line is
  resized to the recogniser's height (48) and right-padded to a *width bucket* of its own, a
  multiple of :data:`REC_WIDTH_STEP` pixels; lines sharing a bucket run as one call. rapidocr
  instead pads every line of a batch of six to the widest (and to at least 320 px); the model
  cost is linear in width, so buckets save that padding, and a line's input, hence its text,
  does not depend on which other lines share its call.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# rapidocr's processing steps (its package import also loads its own engines; that is paid once).
from rapidocr.ch_ppocr_cls.utils import ClsPostProcess
from rapidocr.ch_ppocr_det import TextDetector
from rapidocr.ch_ppocr_det.utils import DBPostProcess, DetPreProcess
from rapidocr.ch_ppocr_rec.utils import CTCLabelDecode
from rapidocr.utils.process_img import (
    apply_vertical_padding,
    get_rotate_crop_image,
    map_boxes_to_original,
    resize_image_within_bounds,
)

from ragws.models.base import cpu_session, wheel_models

__all__ = [
    "REC_HEIGHT",
    "REC_WIDTH_STEP",
    "DetInput",
    "LineInput",
    "PpOcrModels",
    "TextLine",
    "embedded_ocr_paths",
]

_PACKAGE = "rapidocr"
_DET_FILE = "PP-OCRv6_det_small.onnx"
_REC_FILE = "PP-OCRv6_rec_small.onnx"
_CLS_FILE = "ch_ppocr_mobile_v2.0_cls_mobile.onnx"

# rapidocr's defaults (config.yaml), kept so that text matches its pipeline's closely.
MIN_SIDE, MAX_SIDE = 30, 2000  # Global.min_side_len / max_side_len
PAD_MIN_HEIGHT, PAD_WIDTH_RATIO = 30, 8  # Global.min_height / width_height_ratio
#: Longest side of the image the detector sees by default: PaddleOCR's own default (960,
#: limit type "max"). rapidocr instead makes the *shortest* side at least 736, which on a page
#: rendered at 2× runs detection at full size: 3× the cost, no better text (see the README).
DET_MAX_SIDE = 960
TEXT_SCORE = 0.5  # lines recognised with a lower mean probability are dropped
CLS_SHAPE = (3, 48, 192)
CLS_THRESH = 0.9
REC_HEIGHT = 48
REC_WIDTH_STEP = 32
REC_MAX_WIDTH = 4800  # a 100:1 line; wider crops are squeezed (they are never text lines)


@dataclass(slots=True)
class DetInput:
    """One page prepared for detection (worker pool), and what maps boxes back to it."""

    tensor: np.ndarray  # 1 × 3 × H × W, float32
    op_record: dict
    image_shape: tuple[int, int]  # (h, w) of the image given to prepare_det
    det_shape: tuple[int, int]  # (h, w) of the padded image the detector saw


@dataclass(slots=True)
class LineInput:
    """One text line prepared for the orientation classifier and the recogniser."""

    cls_tensor: np.ndarray  # 3 × 48 × 192
    rec_tensor: np.ndarray  # 3 × 48 × bucket width, content in the first ``rec_width`` columns
    rec_width: int


@dataclass(frozen=True, slots=True)
class TextLine:
    text: str
    score: float
    box: tuple[float, float, float, float]  # axis-aligned bounds of the quadrilateral
    quad: tuple[tuple[float, float], ...]  # the detector's four corners, clockwise from top-left
    region: int | None = None  # which of the caller's regions the line belongs to


def embedded_ocr_paths() -> tuple[Path, Path, Path]:
    """(detection, recognition, orientation) ONNX files inside the installed ``rapidocr`` wheel."""
    det, rec, cls = wheel_models(
        _PACKAGE,
        [_DET_FILE, _REC_FILE, _CLS_FILE],
        f"the embedded OCR models ({_DET_FILE}, {_REC_FILE}, {_CLS_FILE}) were not found: they "
        "ship in the 'rapidocr' 3.x package (pip install 'rapidocr>=3.10')",
    )
    return det, rec, cls


#: Most input pixels (all pages together) per detection call; see ``detect``.
DET_CALL_PIXELS = 1024 * 1024
#: Most line width (px, all lines together) per recognition call; see ``recognize``.
REC_CALL_WIDTH = 4096


class PpOcrModels:
    """The three PP-OCR models and their processing; see the module docstring.

    ``prepare_*``, :meth:`det_lines` and :meth:`crop_lines` are thread-safe and meant for a
    worker pool; :meth:`detect` and :meth:`recognize` call the models and belong to one thread
    each (ONNX Runtime sessions are thread-safe, but one caller per model keeps calls whole).
    """

    device = "cpu"

    def __init__(
        self,
        *,
        threads: int = 0,
        det_max_side: int = DET_MAX_SIDE,
        paths: Sequence[Path] | None = None,
    ) -> None:
        """``det_max_side``: images are scaled so that their longest side is at most this for
        detection (line crops are cut from the full-size image); 0 = rapidocr's rule."""
        det_path, rec_path, cls_path = paths or embedded_ocr_paths()
        self.name = "embedded"
        self.description = f"PP-OCRv6 ({Path(det_path).name}, {Path(rec_path).name})"
        self._det = cpu_session(Path(det_path), threads)
        self._rec = cpu_session(Path(rec_path), threads)
        self._cls = cpu_session(Path(cls_path), threads)
        limit = (det_max_side, "max") if det_max_side else (736, "min")
        self._det_pre = DetPreProcess(*limit, [0.5] * 3, [0.5] * 3)
        self._db = DBPostProcess(
            thresh=0.3,
            box_thresh=0.5,
            max_candidates=1000,
            unclip_ratio=1.6,
            use_dilation=True,
            score_mode="fast",
        )
        self._cls_post = ClsPostProcess(["0", "180"])
        meta = self._rec.get_modelmeta().custom_metadata_map
        if "character" not in meta:
            raise ValueError(f"{rec_path}: no 'character' metadata (the recogniser's dictionary)")
        self._ctc = CTCLabelDecode(character=meta["character"].splitlines())

    # --- detection --------------------------------------------------------------------------

    def prepare_det(self, rgb: np.ndarray) -> DetInput:
        """Bound the image's sides, pad very wide strips, resize and normalise (worker pool)."""
        img, ratio_h, ratio_w = resize_image_within_bounds(rgb, MIN_SIDE, MAX_SIDE)
        record: dict = {"preprocess": {"ratio_h": ratio_h, "ratio_w": ratio_w}}
        img, record = apply_vertical_padding(img, record, PAD_WIDTH_RATIO, PAD_MIN_HEIGHT)
        tensor = self._det_pre(img)
        if tensor is None:
            raise ValueError(f"image of {rgb.shape[1]}×{rgb.shape[0]} is too small to read")
        return DetInput(tensor, record, (rgb.shape[0], rgb.shape[1]), (img.shape[0], img.shape[1]))

    def detect(self, items: Sequence[DetInput]) -> list[np.ndarray]:
        """Probability maps for prepared pages: pages of one input shape share model calls of
        at most :data:`DET_CALL_PIXELS` (at least one page per call).

        On a CPU a page costs less alone than in a batch (0.09 s at batch 1, 0.21 at 16 for a
        960-px page), and the runtime's memory arena keeps the high-water mark of the largest
        call: 0.2 GB for one page, 2.7 GB and growing for sixteen.
        """
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[item.tensor.shape].append(i)
        maps: list[np.ndarray | None] = [None] * len(items)
        for shape, group in groups.items():
            per_call = max(1, DET_CALL_PIXELS // (shape[-1] * shape[-2]))
            for start in range(0, len(group), per_call):
                indices = group[start : start + per_call]
                batch = np.concatenate([items[i].tensor for i in indices])
                (pred,) = self._det.run(None, {self._det.get_inputs()[0].name: batch})
                for row, i in enumerate(indices):
                    maps[i] = pred[row : row + 1]
        return maps  # type: ignore[return-value]

    def det_lines(self, item: DetInput, pred: np.ndarray) -> np.ndarray:
        """Text-line quadrilaterals (N × 4 × 2, float32) in the original image's pixels,
        sorted top to bottom then left to right (worker pool)."""
        boxes, _ = self._db(pred, item.det_shape)
        if len(boxes) == 0:
            return np.zeros((0, 4, 2), np.float32)
        boxes = TextDetector.sorted_boxes(np.asarray(boxes, dtype=np.float32))
        height, width = item.image_shape
        return map_boxes_to_original(boxes, item.op_record, height, width)

    @staticmethod
    def crop_lines(rgb: np.ndarray, quads: np.ndarray) -> list[np.ndarray]:
        """Each quadrilateral cut out and straightened (rapidocr's crop; tall crops turn 90°)."""
        return [get_rotate_crop_image(rgb, copy.deepcopy(q).astype(np.float32)) for q in quads]

    # --- recognition ------------------------------------------------------------------------

    @staticmethod
    def prepare_line(crop: np.ndarray) -> LineInput:
        """Normalise one line crop for the classifier and the recogniser (worker pool).

        Both follow PaddleOCR's ``resize_norm_img``: keep the aspect ratio at the model's
        height, scale to [-1, 1], pad on the right with zeros.
        """
        _, cls_h, cls_w = CLS_SHAPE
        h, w = crop.shape[:2]
        cls_width = min(cls_w, math.ceil(cls_h * w / max(h, 1)))
        cls_tensor = np.zeros(CLS_SHAPE, np.float32)
        cls_tensor[:, :, :cls_width] = _normalise(crop, cls_width, cls_h)
        rec_width = max(1, min(REC_MAX_WIDTH, math.ceil(REC_HEIGHT * w / max(h, 1))))
        bucket = math.ceil(rec_width / REC_WIDTH_STEP) * REC_WIDTH_STEP
        rec_tensor = np.zeros((3, REC_HEIGHT, bucket), np.float32)
        rec_tensor[:, :, :rec_width] = _normalise(crop, rec_width, REC_HEIGHT)
        return LineInput(cls_tensor, rec_tensor, rec_width)

    def recognize(self, lines: Sequence[LineInput]) -> list[tuple[str, float]]:
        """(text, mean character probability) for each line: orientation, then recognition.

        Lines the classifier finds upside down (label "180" above 0.9, as rapidocr) are read
        both ways and the more confident reading is kept: the classifier sees a line squeezed
        to 192 px, and a justified line with wide word gaps often looks upside down to it (on
        scanned pages, one such line in eight came back as noise when turned on its word).
        Lines of one width bucket share calls of at most :data:`REC_CALL_WIDTH` px in all.
        """
        if not lines:
            return []
        cls_batch = np.stack([line.cls_tensor for line in lines])
        (probs,) = self._cls.run(None, {self._cls.get_inputs()[0].name: cls_batch})
        tensors = [line.rec_tensor for line in lines]
        turned: dict[int, int] = {}  # line → index of its turned copy in ``tensors``
        for i, (line, (label, score)) in enumerate(zip(lines, self._cls_post(probs), strict=True)):
            if label == "180" and score > CLS_THRESH:
                tensor = line.rec_tensor.copy()
                tensor[:, :, : line.rec_width] = line.rec_tensor[:, ::-1, line.rec_width - 1 :: -1]
                turned[i] = len(tensors)
                tensors.append(tensor)
        read = self._read_all(tensors)
        results = read[: len(lines)]
        for i, j in turned.items():
            if read[j][1] > results[i][1]:
                results[i] = read[j]
        return results

    def _read_all(self, tensors: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, tensor in enumerate(tensors):
            buckets[tensor.shape[-1]].append(i)
        results: list[tuple[str, float]] = [("", 0.0)] * len(tensors)
        for width, bucket in buckets.items():
            # A call's output is (lines × width/8 × 18k classes) float32: 22 MB for one line
            # 2400 px wide. Calls of at most REC_CALL_WIDTH px in all keep the runtime's memory
            # arena from growing with the rarest, largest batches (450 against 160 MB over
            # random batches of the fixture paper's lines), and are no slower on a CPU, where
            # a line costs the same alone as in a batch.
            per_call = max(1, REC_CALL_WIDTH // width)
            for start in range(0, len(bucket), per_call):
                indices = bucket[start : start + per_call]
                texts = self._read(np.stack([tensors[i] for i in indices]))
                for i, text in zip(indices, texts, strict=True):
                    results[i] = text
        return results

    def _read(self, batch: np.ndarray) -> list[tuple[str, float]]:
        """One recognition call: (text, mean character probability) per line of ``batch``."""
        (pred,) = self._rec.run(None, {self._rec.get_inputs()[0].name: batch})
        # One pass for the best class and a gather for its probability (CTCLabelDecode's
        # __call__ takes two passes over the T × 18k probabilities); decoding is its own.
        best = pred.argmax(axis=2)
        prob = np.take_along_axis(pred, best[..., None], axis=2)[..., 0]
        decoded, _ = self._ctc.decode(best, prob, remove_duplicate=True)
        return [(text, float(score)) for text, score in decoded]


def _normalise(crop: np.ndarray, width: int, height: int) -> np.ndarray:
    resized = cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR)
    return (resized.astype(np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5


def quad_bounds(quad: np.ndarray) -> tuple[float, float, float, float]:
    """Axis-aligned ``[x0, y0, x1, y1]`` of a quadrilateral."""
    xs, ys = quad[:, 0], quad[:, 1]
    return (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
