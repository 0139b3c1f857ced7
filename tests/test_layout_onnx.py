"""The PP-PicoDet layout backend on the real model and a paper's pages: no mocks."""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import onnxruntime as ort
import pymupdf
import pytest

from ragws.models.base import Detections
from ragws.models.layout_onnx import (
    INPUT_HEIGHT,
    INPUT_WIDTH,
    OnnxLayoutModel,
    embedded_model_path,
)


@pytest.fixture(scope="module")
def model() -> OnnxLayoutModel:
    return OnnxLayoutModel()


@pytest.fixture(scope="module")
def document(paper_pdf: bytes) -> Iterator[pymupdf.Document]:
    with pymupdf.open(stream=paper_pdf, filetype="pdf") as doc:
        yield doc


def render(doc: pymupdf.Document, index: int, scale: float = 2) -> np.ndarray:
    """One page as the server receives it: RGB ``uint8``, ``H×W×3``."""
    pix = doc[index].get_pixmap(matrix=pymupdf.Matrix(scale, scale), alpha=False)
    return np.frombuffer(pix.samples, np.uint8).reshape(pix.height, pix.width, 3)


def assert_same(a: Detections, b: Detections) -> None:
    assert a.labels == b.labels
    assert np.array_equal(a.boxes, b.boxes)
    assert np.array_equal(a.scores, b.scores)


def regions(found: Detections) -> set[tuple[str, float, float, float, float, float]]:
    return {
        (label, score, *box)
        for label, score, box in zip(
            found.labels, found.scores.tolist(), found.boxes.tolist(), strict=True
        )
    }


def test_model_description(model: OnnxLayoutModel) -> None:
    assert model.name == "embedded"
    assert model.device == "cpu"
    assert model.classes[:2] == ("text", "title")
    assert len(model.classes) == 10


def test_first_page_has_title_and_text(model: OnnxLayoutModel, document: pymupdf.Document) -> None:
    image = render(document, 0)
    height, width = image.shape[:2]
    [found] = model.predict([model.prepare(image, model.default_conf, model.default_iou)])

    assert found.labels.count("title") >= 1
    assert found.labels.count("text") >= 3
    assert found.boxes.dtype == np.float32 and found.boxes.shape == (len(found), 4)
    assert found.scores.dtype == np.float32
    assert np.all((found.scores > 0) & (found.scores <= 1))
    assert np.all(np.diff(found.scores) <= 0), "sorted by score, best first"
    x0, y0, x1, y1 = found.boxes.T
    assert np.all((x0 >= 0) & (x0 < x1) & (x1 <= width))
    assert np.all((y0 >= 0) & (y0 < y1) & (y1 <= height))
    # The paper's title, in the top fifth of the page, is one of them (with the headings).
    titles = found.boxes[[label == "title" for label in found.labels]]
    assert (titles[:, 3] < height / 5).any()


def test_real_paper_title_is_its_likeliest_title(model: OnnxLayoutModel, real_paper: bytes) -> None:
    """On the first page of arXiv 2310.01889v4, typeset by LaTeX, the surest title region is
    the paper's title, at the top."""
    with pymupdf.open(stream=real_paper, filetype="pdf") as doc:
        image = render(doc, 0)
    [found] = model.predict([model.prepare(image, model.default_conf, model.default_iou)])
    assert found.labels.count("text") >= 3
    best_title = found.boxes[found.labels.index("title")]
    assert best_title[3] < image.shape[0] / 5


def test_batch_equals_single_pages(model: OnnxLayoutModel, document: pymupdf.Document) -> None:
    pages = [model.prepare(render(document, i), 0.5, 0.5) for i in (0, 1, 5, 7)]

    batched = model.predict(pages)
    for page, result in zip(pages, batched, strict=True):
        assert_same(result, model.predict([page])[0])

    # The patched graph itself, not just the decoding, is independent of the batch.
    raw_batch = model.run(np.stack([page.tensor for page in pages]))
    for i, page in enumerate(pages):
        raw_single = model.run(page.tensor[None])
        for out_batch, out_single in zip(raw_batch, raw_single, strict=True):
            assert np.array_equal(out_batch[i], out_single[0])


def test_thresholds_are_per_page(model: OnnxLayoutModel, document: pymupdf.Document) -> None:
    image = render(document, 1)
    loose = model.prepare(image, 0.3, 0.5)
    strict = model.prepare(image, 0.8, 0.5)

    loose_batched, strict_batched = model.predict([loose, strict])
    assert_same(loose_batched, model.predict([loose])[0])
    assert_same(strict_batched, model.predict([strict])[0])

    assert 0 < len(strict_batched) < len(loose_batched)
    assert np.all(strict_batched.scores > 0.8)
    assert regions(strict_batched) <= regions(loose_batched)


def test_boxes_scale_with_the_page(model: OnnxLayoutModel, document: pymupdf.Document) -> None:
    """Boxes come back in the frame of the page as sent, whatever its size.

    A page exactly the model's input size, and the same page with every pixel repeated 3× across
    and 2× down, give the model identical tensors, so their boxes must differ by exactly that
    scale.
    """
    base = cv2.resize(
        render(document, 0, 1), (INPUT_WIDTH, INPUT_HEIGHT), interpolation=cv2.INTER_AREA
    )
    big = np.repeat(np.repeat(base, 2, axis=0), 3, axis=1)
    small_input = model.prepare(base, 0.5, 0.5)
    big_input = model.prepare(big, 0.5, 0.5)
    assert (big_input.width, big_input.height) == (3 * INPUT_WIDTH, 2 * INPUT_HEIGHT)
    assert np.array_equal(small_input.tensor, big_input.tensor)

    small, large = model.predict([small_input, big_input])
    assert len(small) >= 5
    assert large.labels == small.labels
    assert np.array_equal(large.boxes, small.boxes * np.float32([3, 2, 3, 2]))


def test_renders_at_two_scales_agree(model: OnnxLayoutModel, document: pymupdf.Document) -> None:
    """The same page rendered at scale 1 and 2 finds the same titles at proportional places.

    The two renders are not the same picture once shrunk to 608×800 (anti-aliasing differs), so
    the model may split or merge a few text blocks differently; titles are stable.
    """
    small = model.predict([model.prepare(render(document, 0, 1), 0.5, 0.5)])[0]
    large = model.predict([model.prepare(render(document, 0, 2), 0.5, 0.5)])[0]
    small_titles = small.boxes[[label == "title" for label in small.labels]]
    large_titles = large.boxes[[label == "title" for label in large.labels]]
    assert len(large_titles) >= 1
    for box in large_titles:
        assert np.abs(small_titles * 2 - box).max(axis=1).min() <= 4 * 2, box


def test_explicit_path_and_device_fallback() -> None:
    named = OnnxLayoutModel(embedded_model_path(), device="cuda", intra_op_threads=1)
    assert named.name == "layout_cdla.onnx"
    cuda_built = "CUDAExecutionProvider" in ort.get_available_providers()
    assert named.device == ("cuda" if cuda_built else "cpu")
    with pytest.raises(ValueError, match="device"):
        OnnxLayoutModel(device="tpu")
