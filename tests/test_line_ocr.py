"""The embedded OCR backend (PP-OCRv6 from the rapidocr wheel): the models, then the server.

No mocks: the real detection, orientation and recognition models run on real images.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging

import aiohttp
import numpy as np
import pytest
from PIL import Image
from rapidfuzz.distance import Levenshtein

from ragws.models.ppocr import PpOcrModels
from ragws.pipeline.ocr.lines import split_by_regions

from .conftest import render_png, render_rgb

#: How the OCR of ``table_png`` (Table 1 under its caption) begins.
TABLE_START = "Table 1: Memory per device"


def lines_of(models: PpOcrModels, rgb: np.ndarray):
    prepared = models.prepare_det(rgb)
    (pred,) = models.detect([prepared])
    quads = models.det_lines(prepared, pred)
    return quads, [models.prepare_line(crop) for crop in models.crop_lines(rgb, quads)]


def test_text_matches_rapidocrs_own_pipeline(embedded_ocr: PpOcrModels, table_png):
    from rapidocr import RapidOCR
    from rapidocr.utils.log import logger

    logger.setLevel(logging.WARNING)
    rgb = np.asarray(Image.open(io.BytesIO(table_png)).convert("RGB"))
    _, lines = lines_of(embedded_ocr, rgb)
    ours = [text for text, score in embedded_ocr.recognize(lines) if score >= 0.5]
    theirs = list(RapidOCR()(rgb).txts)
    a, b = " ".join(ours), " ".join(theirs)
    assert Levenshtein.normalized_distance(a, b) < 0.05, (ours, theirs)
    assert ours[0].startswith(TABLE_START)


def test_results_do_not_depend_on_batch_mates(embedded_ocr: PpOcrModels, paper_pdf):
    page = render_rgb(paper_pdf, 1, scale=2.0)
    crop = np.ascontiguousarray(page[:600, :900])
    # Detection: a page alone, and beside another page of the same and of another shape.
    alone = [embedded_ocr.detect([embedded_ocr.prepare_det(x)])[0] for x in (page, crop)]
    batched = embedded_ocr.detect([embedded_ocr.prepare_det(x) for x in (page, crop, page)])
    for got, want in zip(batched, [alone[0], alone[1], alone[0]], strict=True):
        assert np.array_equal(got, want)
    # Recognition: each line alone and among every other line of the page.
    _, lines = lines_of(embedded_ocr, page)
    assert len(lines) > 40
    together = embedded_ocr.recognize(lines)
    for line, (text, score) in zip(lines[::7], together[::7], strict=True):
        assert embedded_ocr.recognize([line]) == [(text, score)]


def test_lines_across_regions_are_cut_at_their_edges():
    regions = [(0.0, 0.0, 100.0, 200.0), (110.0, 0.0, 300.0, 200.0)]
    across = [[10, 10], [290, 10], [290, 30], [10, 30]]  # spans both regions
    inside = [[120, 50], [280, 50], [280, 70], [120, 70]]  # in the second
    mostly = [[5, 90], [111, 90], [111, 110], [5, 110]]  # 1 px into the second: whole
    outside = [[10, 300], [90, 300], [90, 320], [10, 320]]  # below both
    quads = np.array([across, inside, mostly, outside], np.float32)
    pieces, owners = split_by_regions(quads, regions)
    assert owners == [0, 1, 1, 0]
    assert pieces[0][:, 0].min() == 10 and pieces[0][:, 0].max() == 100
    assert pieces[1][:, 0].min() == 110 and pieces[1][:, 0].max() == 290
    assert np.array_equal(pieces[2], quads[1]) and np.array_equal(pieces[3], quads[2])


async def read(client, request_id):
    frames = (await client.finish(request_id))[request_id]
    return [f for f in frames if f["type"] == "token"], frames[-1]


async def test_ws_ocr_streams_lines_with_boxes(start_server, connect, table_png):
    server = await start_server()
    client, hello = await connect(server)
    assert hello["ocr"] == {
        "modes": ["format", "plain"],
        "markup": False,
        "architecture": "PP-OCR",
        "page_mode": None,
    }
    await client.send({"type": "ocr", "id": "t", "image": table_png})
    tokens, done = await read(client, "t")
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert "".join(t["text"] for t in tokens) == done["text"]
    assert done["text"].splitlines()[0].startswith(TABLE_START)
    assert done["usage"]["completion_tokens"] == len(tokens) > 10
    width, height = Image.open(io.BytesIO(table_png)).size
    for token in tokens:
        x0, y0, x1, y1 = token["box"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert 0.5 <= token["score"] <= 1.0
    tops = [t["box"][1] for t in tokens]
    assert tops[0] == min(tops)  # reading order starts at the top
    # "plain" reads the same: this backend has no markup.
    await client.send({"type": "ocr", "id": "p", "image": table_png, "mode": "plain"})
    _, plain = await read(client, "p")
    assert plain["text"] == done["text"]
    # A box crops first; line boxes stay in the whole image's pixels.
    first = tokens[0]["box"]
    box = [first[0] - 4, first[1] - 4, first[2] + 4, first[3] + 4]
    await client.send({"type": "ocr", "id": "b", "image": table_png, "box": box})
    cropped, only = await read(client, "b")
    assert only["text"].startswith(TABLE_START)
    assert abs(cropped[0]["box"][0] - first[0]) < 6 and abs(cropped[0]["box"][1] - first[1]) < 6


async def test_lines_of_concurrent_clients_share_recognition_batches(
    start_server, connect, table_png
):
    # A window long enough that both clients' lines arrive within it.
    server = await start_server(max_wait_ms=400.0, ocr_line_batch_size=256)
    clients = [(await connect(server))[0] for _ in range(2)]
    for i, client in enumerate(clients):
        await client.send({"type": "ocr", "id": i, "image": table_png})
    results = await asyncio.gather(*(read(c, i) for i, c in enumerate(clients)))
    lines = sum(done["usage"]["completion_tokens"] for _, done in results)
    assert results[0][1]["text"] == results[1][1]["text"]
    # Every line of both requests went through one recognition call.
    assert await server.metric("ragws_ocr_rec_batch_size_count") == 1
    assert await server.metric("ragws_ocr_rec_batch_size_sum") >= lines
    assert await server.metric("ragws_ocr_det_batch_size_sum") == 2


async def test_cancel_and_close_drop_pending_lines(start_server, connect, paper_pdf):
    server = await start_server(ocr_line_batch_size=4)
    page = render_png(paper_pdf, 1, scale=2.0)  # ~100 lines: ~25 batches of 4
    client, _ = await connect(server)
    await client.send({"type": "ocr", "id": "c", "image": page})
    await client.until("c", "token")
    await client.send({"type": "cancel", "id": "c"})
    done = await client.until("c", "done")
    assert done["finish_reason"] == "cancelled"
    # A socket that closes mid-request drops its lines the same way.
    other, _ = await connect(server)
    await other.send({"type": "ocr", "id": "d", "image": page})
    await other.until("d", "token")
    await other.ws.close()
    await asyncio.sleep(1.0)  # the batch running at the time may finish
    settled = await server.metric("ragws_ocr_lines_total")
    await asyncio.sleep(1.5)
    assert await server.metric("ragws_ocr_lines_total") == settled
    assert settled < 100  # well short of the two pages' lines
    assert await server.metric("ragws_inflight_requests") == 0


async def test_http_ocr_sse_carries_line_boxes(start_server, table_png):
    server = await start_server()
    async with aiohttp.ClientSession() as http:
        form = aiohttp.FormData()
        form.add_field("image", table_png, filename="t.png")
        async with http.post(server.url + "/ocr", data=form) as resp:
            result = (await resp.json())["result"]
        form = aiohttp.FormData()
        form.add_field("image", table_png, filename="t.png")
        form.add_field("stream", "true")
        async with http.post(server.url + "/ocr", data=form) as resp:
            body = await resp.text()
    events = [
        json.loads(line.removeprefix("data: "))
        for line in body.splitlines()
        if line.startswith("data: ") and '"token"' in line
    ]
    assert "".join(e["token"] for e in events) == result
    assert all(len(e["box"]) == 4 and e["score"] >= 0.5 for e in events)


SPACED = "Partial extended narrow coastal patient calibrated adjusted, rejected"


def _spaced_line(turn: bool) -> np.ndarray:
    """One justified line with wide word gaps, as the last full line before a paragraph's
    end often is, rendered at 150 dpi (optionally upside down)."""
    import pymupdf

    page = pymupdf.open().new_page(width=520, height=40)
    words = SPACED.split(" ")
    x = 10.0
    for word in words:
        page.insert_text((x, 26), word, fontsize=11, fontname="tiro")
        x += pymupdf.get_text_length(word, fontname="tiro", fontsize=11) + 14.0
    pix = page.get_pixmap(dpi=150)
    rgb = np.frombuffer(pix.samples, np.uint8).reshape(pix.height, pix.width, 3)
    return np.ascontiguousarray(rgb[::-1, ::-1] if turn else rgb)


@pytest.mark.parametrize("turn", [False, True], ids=["upright", "upside-down"])
def test_a_line_is_read_the_way_round_it_reads_best(embedded_ocr: PpOcrModels, turn):
    """The line-orientation classifier alone calls wide-spaced upright lines upside down; the
    more confident of both readings wins, so upright and turned lines both read right."""
    _, prepared = lines_of(embedded_ocr, _spaced_line(turn))
    texts = [text for text, _ in embedded_ocr.recognize(prepared)]
    # Upside down, the detector finds the words one by one, in its own order: compare words.
    read = sorted(" ".join(texts).split())
    expected = sorted(SPACED.split(" "))
    assert Levenshtein.normalized_distance(read, expected) <= 0.15, texts
