"""DocLayout-YOLO backend: real loading code, random weights of the real architecture.

The published DocStructBench weights cannot be downloaded in CI, so the checkpoint here is a
randomly initialised YOLOv10 built from the package's own ``yolov10m-doclayout.yaml`` with the
DocStructBench classes, saved in the layout the package's trainer writes and loaded through
``DocLayoutYoloModel(path)`` exactly as the real ``.pt`` is. Random weights give arbitrary boxes
with tiny scores, so the tests use ``conf`` near 0 and check structure and invariants.

The batch tests run at ``imgsz=320`` (about a tenth of the FLOPs of 1024) to stay fast on a small
CPU; one test runs the default 1024 on a single page.
"""

from __future__ import annotations

import copy
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the DocLayout-YOLO backend needs torch (extra 'yolo')")
pytest.importorskip("doclayout_yolo", reason="the DocLayout-YOLO backend needs doclayout-yolo")

import torch

from ragws.models.base import Detections, LayoutInput
from ragws.models.doclayout_yolo import (
    HF_FILENAME,
    HF_REPO_ID,
    WEIGHTS_SPEC,
    DocLayoutYoloModel,
    Letterbox,
    WeightsUnavailableError,
    letterbox,
)

from .conftest import render_rgb

DOCSTRUCTBENCH = (
    "title",
    "plain text",
    "abandon",
    "figure",
    "figure_caption",
    "table",
    "table_caption",
    "table_footnote",
    "isolate_formula",
    "formula_caption",
)
TEST_IMGSZ = 320


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight DocLayout-YOLO checkpoint, in the format real ones have.

    ``Model.save`` cannot be used: for a model built from a YAML its ``ckpt`` is empty, so it would
    write a file without a ``"model"`` entry. The dict below is what the package's trainer writes
    after ``strip_optimizer``: the network in fp16 under ``"model"``, ``"ema"`` cleared, and the
    training arguments the loader merges into ``model.args`` (``task`` among them).
    """
    import doclayout_yolo
    from doclayout_yolo.nn.tasks import YOLOv10DetectionModel

    cfg = (
        Path(doclayout_yolo.__file__).parent / "cfg" / "models" / "v10" / "yolov10m-doclayout.yaml"
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = YOLOv10DetectionModel(str(cfg), nc=len(DOCSTRUCTBENCH), verbose=False)
    net.names = dict(enumerate(DOCSTRUCTBENCH))
    ckpt = {
        "model": copy.deepcopy(net).half(),
        "ema": None,
        "train_args": {"task": "detect", "imgsz": 1024},
        "date": datetime.now().isoformat(),
        "version": doclayout_yolo.__version__,
    }
    path = tmp_path_factory.mktemp("doclayout") / "random-docstructbench.pt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> DocLayoutYoloModel:
    return DocLayoutYoloModel(str(checkpoint), imgsz=TEST_IMGSZ)


@pytest.fixture(scope="module")
def pages(paper_pdf: bytes) -> list[np.ndarray]:
    """Three pages of different shapes: two renders of the paper and a synthetic landscape."""
    landscape = np.full((300, 520, 3), 255, np.uint8)
    landscape[40:80, 60:460] = 0  # a "title" bar
    landscape[120:260, 60:250] = (30, 90, 200)  # a "figure"
    return [render_rgb(paper_pdf, 0, 0.5), render_rgb(paper_pdf, 3, 0.8), landscape]


def check_detections(det: Detections, item: LayoutInput, classes: tuple[str, ...]) -> None:
    n = len(det)
    assert det.boxes.shape == (n, 4) and det.boxes.dtype == np.float32
    assert det.scores.shape == (n,) and det.scores.dtype == np.float32
    assert set(det.labels) <= set(classes)
    assert np.all(det.scores > item.conf)
    assert np.all(np.diff(det.scores) <= 0), "not sorted by score, best first"
    x0, y0, x1, y1 = det.boxes.T
    assert np.all((x0 >= 0) & (y0 >= 0) & (x1 <= item.width) & (y1 <= item.height))
    assert np.all((x1 > x0) & (y1 > y0))


def test_loads_checkpoint(model: DocLayoutYoloModel, checkpoint: Path) -> None:
    assert model.classes == DOCSTRUCTBENCH
    assert model.name == checkpoint.name
    assert (model.default_conf, model.default_iou) == (0.25, 0.45)
    assert model.device == "cpu"


def test_mixed_batch(model: DocLayoutYoloModel, pages: list[np.ndarray]) -> None:
    items = [model.prepare(page, conf=0.0, iou=0.45) for page in pages]
    for item, page in zip(items, pages, strict=True):
        assert item.tensor.shape == (3, TEST_IMGSZ, TEST_IMGSZ) and item.tensor.dtype == np.uint8
        assert (item.width, item.height) == (page.shape[1], page.shape[0])
    results = model.predict(items)
    assert len(results) == len(pages)
    for det, item in zip(results, items, strict=True):
        check_detections(det, item, model.classes)
    assert all(len(det) for det in results), "conf=0 should keep some boxes even at random weights"
    assert model.predict([]) == []


def test_batch_independence(model: DocLayoutYoloModel, pages: list[np.ndarray]) -> None:
    """A page's result is the same alone as in a mixed batch with other thresholds.

    On CPU this holds exactly, not only within tolerance: every page is letterboxed to the same
    square whatever the batch, and oneDNN computes each image of a batch with the same kernels
    and summation order, so the network's outputs are bitwise equal (the tolerance is there for
    other builds; on CUDA, cuDNN may pick other algorithms per batch size and differ in the last
    bits). Post-processing (top-k, threshold, NMS) is per page.
    """
    thresholds = [(0.0, 0.45), (0.0, 0.7), (1e-4, 0.3)]
    items = [model.prepare(p, c, i) for p, (c, i) in zip(pages, thresholds, strict=True)]
    together = model.predict(items)
    for item, det in zip(items, together, strict=True):
        (alone,) = model.predict([item])
        check_detections(alone, item, model.classes)
        assert alone.labels == det.labels
        np.testing.assert_allclose(alone.boxes, det.boxes, rtol=0, atol=1e-4)
        np.testing.assert_allclose(alone.scores, det.scores, rtol=0, atol=1e-6)


def test_matches_package_predictor(model: DocLayoutYoloModel, checkpoint: Path) -> None:
    """Same boxes as ``YOLOv10.predict`` (plus the seed's class-agnostic NMS) on a square page.

    A page already ``imgsz`` square makes both letterboxes no-ops, so any difference would come
    from the network call or the post-processing; there is none, to the bit.
    """
    from doclayout_yolo import YOLOv10

    from ragws.models.nms import nms

    page = np.random.default_rng(0).integers(0, 256, (TEST_IMGSZ, TEST_IMGSZ, 3), dtype=np.uint8)
    (ours,) = model.predict([model.prepare(page, conf=0.0, iou=0.45)])
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:  # the package's select_device writes CUDA_VISIBLE_DEVICES=-1 for device="cpu"
        bgr = np.ascontiguousarray(page[..., ::-1])  # its predictor takes OpenCV (BGR) order
        (res,) = YOLOv10(str(checkpoint)).predict(
            bgr, imgsz=TEST_IMGSZ, conf=0.0, device="cpu", verbose=False
        )
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    boxes, scores = res.boxes.xyxy.numpy(), res.boxes.conf.numpy()
    keep = nms(boxes, scores, 0.45)
    assert len(ours) == len(keep) > 0
    np.testing.assert_array_equal(ours.boxes, boxes[keep])
    np.testing.assert_array_equal(ours.scores, scores[keep])
    assert ours.labels == [model.classes[int(c)] for c in res.boxes.cls.numpy()[keep]]


def test_default_imgsz_single_page(checkpoint: Path, pages: list[np.ndarray]) -> None:
    """The production input size (1024) runs, on one small page to keep CPU time down."""
    full = DocLayoutYoloModel(str(checkpoint))
    assert full.imgsz == 1024
    item = full.prepare(pages[0], conf=0.0, iou=0.45)
    assert item.tensor.shape == (3, 1024, 1024)
    (det,) = full.predict([item])
    check_detections(det, item, full.classes)
    assert len(det)


def test_hub_spec_without_hub_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(HF_REPO_ID, HF_FILENAME), str):
        pytest.skip("the real DocStructBench weights are in the local hub cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail at once instead of retrying the network
    with pytest.raises(WeightsUnavailableError) as info:
        DocLayoutYoloModel(WEIGHTS_SPEC)
    message = str(info.value)
    assert HF_REPO_ID in message and HF_FILENAME in message
    assert "local path" in message and ".pt" in message


def test_bad_local_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        DocLayoutYoloModel(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError):
        DocLayoutYoloModel(str(tmp_path / "model.onnx"))


@pytest.mark.parametrize("shape", [(300, 520), (792, 612), (1000, 1000), (37, 801), (2000, 90)])
def test_letterbox_matches_package(shape: tuple[int, int]) -> None:
    """Pixel-identical to the package's ``LetterBox(auto=False)``, what its predictor does."""
    from doclayout_yolo.data.augment import LetterBox

    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours, _ = letterbox(image, TEST_IMGSZ)
    theirs = LetterBox((TEST_IMGSZ, TEST_IMGSZ), auto=False)(image=image)
    assert ours.shape == (TEST_IMGSZ, TEST_IMGSZ, 3)
    np.testing.assert_array_equal(ours, theirs)


def test_letterbox_maps_back() -> None:
    """The recorded placement inverts the letterbox: known points land where they started."""
    height, width, size = 300, 600, 320
    image = np.zeros((height, width, 3), np.uint8)
    image[100:200, 150:450] = 255  # a white block, x 150..450, y 100..200
    square, box = letterbox(image, size)
    assert (box.scale_x, box.scale_y) == (320 / 600, 160 / 300)
    assert (box.pad_x, box.pad_y) == (0, 80)  # 160 grey rows, 80 above and 80 below
    assert np.all(square[:80] == 114) and np.all(square[240:] == 114)

    # The white block in the square, found from its pixels, maps back to the block on the page.
    ys, xs = np.nonzero(square[..., 0] == 255)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    np.testing.assert_allclose(box.to_page(found, width, height), [[150, 100, 450, 200]], atol=2)

    # The page's own frame maps to the whole page exactly; boxes in the padding clip away.
    frame = np.array([[0, 80, 320, 240], [-10, 0, 330, 80]], np.float32)
    back = box.to_page(frame, width, height)
    np.testing.assert_allclose(back[0], [0, 0, 600, 300])
    assert back[1, 3] - back[1, 1] == 0  # wholly in the grey band: zero height after clipping

    # A hand-made placement, to pin the formula: page = (square - pad) / scale, then clip.
    manual = Letterbox(scale_x=0.5, scale_y=0.25, pad_x=10, pad_y=20)
    np.testing.assert_allclose(
        manual.to_page(np.array([[20, 30, 60, 70]], np.float32), 1000, 1000), [[20, 40, 100, 200]]
    )


async def test_server_serves_a_doclayout_yolo_checkpoint(
    checkpoint: Path, start_server, connect, paper_pdf: bytes
) -> None:
    """`--layout-model path.pt` through the server's own loader; two clients share one batch."""
    from .conftest import render_png

    server = await start_server(
        load_model=True,
        layout_model=str(checkpoint),
        layout_batch_size=2,
        layout_preferred_batch_size="2",
        max_wait_ms=2000,
    )
    (a, hello), (b, _) = await connect(server), await connect(server)
    assert hello["models"]["layout"] == checkpoint.name
    png = render_png(paper_pdf, 0, scale=0.5)
    await a.send({"type": "layout", "id": 1, "image": png, "conf": 0.0})
    await b.send({"type": "layout", "id": 2, "image": png, "conf": 0.0})
    frames = [await a.until(1, "layout", "error"), await b.until(2, "layout", "error")]
    for frame in frames:
        assert frame["type"] == "layout", frame
        assert (frame["width"], frame["height"]) == (306, 396)
        assert set(frame["classes"]) <= set(DOCSTRUCTBENCH)
    assert frames[0]["boxes"] == frames[1]["boxes"]  # same page, same batch, same answer
    assert await server.metric("ragws_layout_batch_size_count") == 1
    assert await server.metric("ragws_layout_batch_size_sum") == 2
