"""DocLayout-YOLO layout backend (YOLOv10 trained on DocStructBench, via ``doclayout_yolo``).

The server imports this module only when this backend is chosen, so ``torch``, ``cv2`` and
``doclayout_yolo`` (several seconds to import) are imported lazily, inside the functions that
need them; nothing else in ``ragws`` pulls them in.

Why the pipeline looks the way it does:

* **Batch independence.** ``doclayout_yolo``'s predictor letterboxes a batch of same-shape images
  with minimal (stride-multiple) padding but pads to the full square when shapes differ, so a
  page's detections would change with whatever else shares its batch. Here every page is
  letterboxed by :meth:`DocLayoutYoloModel.prepare` to a fixed ``imgsz × imgsz`` square, exactly
  like the package's ``LetterBox(auto=False)`` (aspect kept, ``cv2.INTER_LINEAR``, centred,
  grey 114), so the network sees the same pixels for a page whatever the batch.
* **One call per batch, no predictor.** :meth:`DocLayoutYoloModel.predict` stacks the squares into
  one tensor and runs the package's own network and its own YOLOv10 post-processing
  (``ops.v10postprocess``), the steps ``YOLOv10DetectionPredictor`` runs. The predictor object
  itself is bypassed: it would letterbox again, build ``Results`` objects, and its
  ``select_device`` writes ``CUDA_VISIBLE_DEVICES`` into the process environment.
* **Per-page thresholds.** Pages of one batch may ask for different ``conf``/``iou``; each page
  is filtered with its own ``conf`` and then class-agnostic NMS with its own ``iou`` (what the
  seed did post hoc with ``torchvision.ops.nms``), in page pixels after mapping back.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragws.config import truthy
from ragws.models.base import Detections, LayoutInput
from ragws.models.nms import nms

#: The spec that selects the published DocStructBench checkpoint from the Hugging Face hub.
WEIGHTS_SPEC = "doclayout-yolo"
HF_REPO_ID = "juliozhao/DocLayout-YOLO-DocStructBench"
HF_FILENAME = "doclayout_yolo_docstructbench_imgsz1024.pt"

#: Grey the package pads letterboxed images with (ultralytics' ``LetterBox``).
PAD_VALUE = 114
#: Candidates kept per page before thresholds, the package's ``max_det`` default.
MAX_DET = 300


class WeightsUnavailableError(RuntimeError):
    """The published weights could not be fetched (typically: no access to the hub)."""


@dataclass(frozen=True, slots=True)
class Letterbox:
    """Where a page sits inside the square model input, to map boxes back to page pixels.

    ``scale_x``/``scale_y`` are the factors actually applied by the resize (the rounded new size
    over the page size), not the nominal ratio, so the inverse is exact for the pixels drawn.
    """

    scale_x: float
    scale_y: float
    pad_x: int  # grey columns left of the page
    pad_y: int  # grey rows above the page

    def to_page(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """Map ``(N, 4)`` x0 y0 x1 y1 boxes from the square to the page, clipped to the page."""
        out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()  # f64: no drift at edges
        out[:, [0, 2]] = ((out[:, [0, 2]] - self.pad_x) / self.scale_x).clip(0, width)
        out[:, [1, 3]] = ((out[:, [1, 3]] - self.pad_y) / self.scale_y).clip(0, height)
        return out.astype(np.float32)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Fit an ``H×W×3`` image into a ``size × size`` square, centred, padded with grey 114.

    Pixel-identical to ``doclayout_yolo``'s ``LetterBox(new_shape=size, auto=False)`` (same
    rounding, same interpolation), the preprocessing the model sees in the package's own
    predictor when batch shapes differ, but independent of any other page.
    """
    import cv2

    height, width = image.shape[:2]
    ratio = min(size / height, size / width)
    new_w, new_h = round(width * ratio), round(height * ratio)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    left, top = round(dw - 0.1), round(dh - 0.1)
    if (width, height) != (new_w, new_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    out = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    out[top : top + new_h, left : left + new_w] = image
    return out, Letterbox(new_w / width, new_h / height, left, top)


def resolve_weights(weights: str) -> Path:
    """Turn ``weights`` (a local ``.pt`` path, or :data:`WEIGHTS_SPEC`) into a local file.

    A missing local file fails here rather than in the package, whose loader would otherwise
    try to download a file of that name from the ultralytics GitHub releases.
    """
    if weights == WEIGHTS_SPEC:
        from huggingface_hub import hf_hub_download

        # huggingface_hub reads HF_HUB_OFFLINE once, when it is imported (which doclayout_yolo
        # does); reading it again here honours a setting made later and fails fast instead of
        # retrying the network for ~20 s.
        offline = truthy(os.environ.get("HF_HUB_OFFLINE", ""))
        try:
            return Path(
                hf_hub_download(repo_id=HF_REPO_ID, filename=HF_FILENAME, local_files_only=offline)
            )
        except Exception as exc:  # network, offline mode, auth, missing file: all the same fix
            raise WeightsUnavailableError(
                f"could not get {HF_FILENAME!r} from the Hugging Face repo {HF_REPO_ID!r} "
                f"({type(exc).__name__}: {exc}). Without access to the hub, download that file "
                f"elsewhere and pass its local path (a .pt file) instead of {WEIGHTS_SPEC!r}."
            ) from exc
    path = Path(weights).expanduser()
    if path.suffix != ".pt":
        raise ValueError(f"weights must be {WEIGHTS_SPEC!r} or a local .pt file, got {weights!r}")
    if not path.is_file():
        raise FileNotFoundError(f"DocLayout-YOLO weights not found: {path}")
    return path


class DocLayoutYoloModel:
    """:class:`~ragws.models.base.LayoutModel` for DocLayout-YOLO checkpoints.

    Loads through ``doclayout_yolo.YOLOv10(path)``, the package's own checkpoint loader, so a
    published ``.pt`` and a locally trained one take the same path. Runs in fp32 unless
    ``half=True`` (CUDA only): the package supports fp16 by casting the whole network, but box
    corners at ``imgsz`` 1024 then carry about 0.5 px of fp16 rounding and the seed ran fp32.
    """

    default_conf: float = 0.25  # the seed's ``conf``
    default_iou: float = 0.45  # the seed's NMS ``iou_threshold``

    def __init__(
        self, weights: str, device: str = "cpu", imgsz: int = 1024, half: bool = False
    ) -> None:
        import torch
        from doclayout_yolo import YOLOv10

        if imgsz <= 0 or imgsz % 32:
            raise ValueError(f"imgsz must be a positive multiple of 32 (the max stride): {imgsz}")
        torch_device = torch.device(device)
        if torch_device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        if half and torch_device.type != "cuda":
            raise ValueError("half=True needs a CUDA device")

        path = resolve_weights(weights)
        yolo = YOLOv10(str(path))  # attempt_load_one_weight: fp32, eval mode, names attached
        names: dict[int, str] = yolo.names
        self.name = WEIGHTS_SPEC if weights == WEIGHTS_SPEC else path.name
        self.classes: tuple[str, ...] = tuple(names[i] for i in sorted(names))
        self.device = device
        self.imgsz = imgsz
        self.half = half
        self._torch_device = torch_device
        self._dtype = torch.float16 if half else torch.float32
        self._net = yolo.model.to(torch_device, self._dtype).eval()

    def prepare(self, image: np.ndarray, conf: float, iou: float) -> LayoutInput:
        """Letterbox one RGB page to ``imgsz × imgsz`` and lay it out CHW (still ``uint8``).

        Staying ``uint8`` keeps the batch 4× smaller for the copy to the device; the float
        conversion happens there, in :meth:`predict`.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an H×W×3 uint8 RGB page, got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        square, box = letterbox(image, self.imgsz)
        chw = np.ascontiguousarray(square.transpose(2, 0, 1))
        return LayoutInput(chw, width, height, conf, iou, {"letterbox": box})

    def predict(self, batch: Sequence[LayoutInput]) -> list[Detections]:
        """Run the batch in one network call, then threshold, NMS and map back per page."""
        if not batch:
            return []
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.stack([item.tensor for item in batch]))
            x = x.to(self._torch_device).to(self._dtype) / 255  # as the package's preprocess
            raw = self._postprocess(self._net(x))
        return [self._page(item, rows) for item, rows in zip(batch, raw, strict=True)]

    def _postprocess(self, preds: Any) -> np.ndarray:
        """The head's output to ``(B, MAX_DET, 6)`` x0 y0 x1 y1 score class, square pixels.

        The same steps as ``YOLOv10DetectionPredictor.postprocess``: take the one-to-one head,
        keep the top ``MAX_DET`` (box, class) pairs per image with ``v10postprocess``, then
        convert xywh to xyxy. Each image is handled on its own, so nothing crosses pages.
        """
        import torch
        from doclayout_yolo.utils import ops

        if isinstance(preds, dict):
            preds = preds["one2one"]
        if isinstance(preds, (list, tuple)):
            preds = preds[0]
        preds = preds.transpose(-1, -2)
        max_det = min(MAX_DET, preds.shape[1])
        boxes, scores, labels = ops.v10postprocess(preds, max_det, preds.shape[-1] - 4)
        out = torch.cat([ops.xywh2xyxy(boxes), scores.unsqueeze(-1), labels.unsqueeze(-1)], -1)
        return out.float().cpu().numpy()

    def _page(self, item: LayoutInput, rows: np.ndarray) -> Detections:
        """One page's candidates to :class:`Detections`, best score first.

        ``conf`` is strict (``score > conf``) as in the package. Boxes are mapped back and
        clipped before NMS, as the seed did; a box that lies wholly in the grey padding clips to
        zero area and is dropped, since it describes no part of the page.
        """
        rows = rows[rows[:, 4] > item.conf]
        box: Letterbox = item.meta["letterbox"]
        boxes = box.to_page(rows[:, :4], item.width, item.height)
        scores = rows[:, 4].astype(np.float32)
        class_ids = rows[:, 5].astype(np.int64)
        real = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, class_ids = boxes[real], scores[real], class_ids[real]
        keep = nms(boxes, scores, item.iou)  # class-agnostic, sorted by score descending
        return Detections(
            boxes=np.ascontiguousarray(boxes[keep], dtype=np.float32),
            scores=np.ascontiguousarray(scores[keep], dtype=np.float32),
            labels=[self.classes[c] for c in class_ids[keep]],
        )
