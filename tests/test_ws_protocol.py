"""Protocol v1 against a real server on a loopback port, with the real embedded layout model."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib

import aiohttp
import msgpack
import numpy as np
import pymupdf
import pytest
from PIL import Image

from .conftest import render_png, render_rgb
from .documents import PAGES, TITLE


async def test_hello_names_models_and_limits(start_server, connect):
    server = await start_server(max_pages=50)
    _, hello = await connect(server)
    assert hello["version"] == 1
    assert hello["models"] == {"layout": "embedded", "ocr": "embedded"}
    # Line OCR accepts both modes and has no markup: clients learn it here.
    assert hello["ocr"] == {
        "modes": ["format", "plain"],
        "markup": False,
        "architecture": "PP-OCR",
        "page_mode": None,
    }
    assert hello["limits"]["max_pages"] == 50
    for key in ("max_concurrent", "max_frame_bytes", "max_image_pixels", "max_pdf_bytes"):
        assert key in hello["limits"]


async def test_layout_of_title_page(start_server, connect, paper_pdf, embedded_model):
    server = await start_server()
    client, _ = await connect(server)
    png = render_png(paper_pdf, 0, scale=2.0)
    await client.send({"type": "layout", "id": "p1", "image": png})
    frame = await client.until("p1", "layout", "error")
    assert frame["type"] == "layout", frame
    width, height = Image.open(io.BytesIO(png)).size
    assert (frame["width"], frame["height"]) == (width, height)
    assert "title" in frame["classes"] and frame["classes"].count("text") >= 3
    boxes = np.array(frame["boxes"])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height).all()
    assert frame["scores"] == sorted(frame["scores"], reverse=True)
    assert frame["timing"]["total_ms"] >= frame["timing"]["queue_ms"] >= 0

    # The server's answer is the model's own answer on the same decoded page.
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    direct = embedded_model.predict(
        [embedded_model.prepare(rgb, embedded_model.default_conf, embedded_model.default_iou)]
    )[0]
    assert frame["classes"] == direct.labels
    np.testing.assert_allclose(boxes, direct.boxes, atol=0.01)


async def test_pdf_pages_stream_then_done(start_server, connect, paper_pdf):
    server = await start_server()
    client, _ = await connect(server)
    await client.send(
        {"type": "pdf", "id": 7, "pdf": paper_pdf, "pages": [2, 0, 5], "scale": 1.5, "images": True}
    )
    pages = {}
    while True:
        frame = await client.recv()
        assert frame["id"] == 7
        if frame["type"] == "done":
            break
        assert frame["type"] == "page", frame
        pages[frame["page"]] = frame
    assert sorted(pages) == [0, 2, 5]
    assert frame["finish_reason"] == "stop" and frame["pages"] == 3 and frame["page_count"] == PAGES
    first = pages[0]
    image = Image.open(io.BytesIO(first["image"]))
    assert image.format == "JPEG" and image.size == (first["width"], first["height"])
    assert abs(first["width"] - 612 * 1.5) <= 1  # US letter at scale 1.5
    assert "title" in first["classes"]


async def test_requests_multiplex_on_one_socket(start_server, connect, paper_pdf):
    server = await start_server()
    client, _ = await connect(server)
    png = render_png(paper_pdf, 1)
    await client.send({"type": "pdf", "id": "doc", "pdf": paper_pdf})
    await client.send({"type": "layout", "id": "img", "image": png})
    seen: list[tuple[str, str]] = []
    done = set()
    while done != {"doc", "img"}:
        frame = await client.recv()
        seen.append((frame["id"], frame["type"]))
        if frame["type"] in ("done", "layout"):
            done.add(frame["id"])
    assert ("img", "layout") in seen
    assert sum(1 for s in seen if s == ("doc", "page")) == PAGES
    # The single image was not held back until the whole document finished.
    assert seen.index(("img", "layout")) < seen.index(("doc", "done"))


def _encrypted_pdf() -> bytes:
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), "secret")
    out = io.BytesIO()
    doc.save(out, encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="u", owner_pw="o")
    return out.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size, with a few bytes of pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def _big_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, format="PNG")  # compresses to a few KB
    return out.getvalue()


BAD_FRAMES = [
    ("malformed msgpack", b"\xc1\x00\xff", None, "bad_request", "msgpack"),
    ("non-map frame", msgpack.packb([1, 2, 3]), None, "bad_request", "map"),
    ("unknown type", {"type": "dance", "id": 1}, 1, "bad_request", "unknown type"),
    ("missing type", {"id": 2}, 2, "bad_request", "type"),
    ("missing id", {"type": "layout", "image": b"x"}, None, "bad_request", "'id'"),
    ("ill-typed id", {"type": "layout", "id": [1], "image": b"x"}, None, "bad_request", "'id'"),
    ("missing image", {"type": "layout", "id": 3}, 3, "bad_request", "'image'"),
    ("image as str", {"type": "layout", "id": 4, "image": "abc"}, 4, "bad_request", "binary"),
    ("zero-byte image", {"type": "layout", "id": 5, "image": b""}, 5, "bad_request", "empty"),
    (
        "not an image",
        {"type": "layout", "id": 6, "image": b"hello" * 50},
        6,
        "bad_request",
        "decoded",
    ),
    (
        "bomb header",
        {"type": "layout", "id": 8, "image": _png_header_only(100_000, 100_000)},
        8,
        "too_large",
        "pixels",
    ),
    (
        "over pixel cap",
        {"type": "layout", "id": 9, "image": _big_png(3000, 3000)},
        9,
        "too_large",
        "limit",
    ),
    (
        "conf out of range",
        {"type": "layout", "id": 10, "image": b"x", "conf": 1.5},
        10,
        "bad_request",
        "'conf'",
    ),
    (
        "iou ill-typed",
        {"type": "layout", "id": 11, "image": b"x", "iou": "high"},
        11,
        "bad_request",
        "'iou'",
    ),
    ("zero-byte pdf", {"type": "pdf", "id": 12, "pdf": b""}, 12, "bad_request", "empty"),
    (
        "corrupt pdf",
        {"type": "pdf", "id": 13, "pdf": b"%PDF-1.7\n garbage \x00\x01"},
        13,
        "bad_request",
        "pdf",
    ),
    (
        "encrypted pdf",
        {"type": "pdf", "id": 14, "pdf": _encrypted_pdf()},
        14,
        "bad_request",
        "encrypted",
    ),
    (
        "scale out of range",
        {"type": "pdf", "id": 15, "pdf": b"%PDF", "scale": 50},
        15,
        "bad_request",
        "'scale'",
    ),
    (
        "negative page",
        {"type": "pdf", "id": 16, "pdf": b"%PDF", "pages": [-1]},
        16,
        "bad_request",
        "'pages'",
    ),
    (
        "pages not a list",
        {"type": "pdf", "id": 17, "pdf": b"%PDF", "pages": 3},
        17,
        "bad_request",
        "'pages'",
    ),
    ("ocr of a non-image", {"type": "ocr", "id": 18, "image": b"x"}, 18, "bad_request", "image"),
    (
        "parse with pdf and image",
        {"type": "parse", "id": 19, "pdf": b"%PDF", "image": b"x"},
        19,
        "bad_request",
        "exactly one",
    ),
    (
        "parse of an image from its text layer",
        {"type": "parse", "id": 20, "image": b"x", "text": "pdf"},
        20,
        "bad_request",
        "no text layer",
    ),
    (
        "parse text source unknown",
        {"type": "parse", "id": 21, "pdf": b"%PDF", "text": "magic"},
        21,
        "bad_request",
        "'text'",
    ),
    (
        "parse chunk_chars zero",
        {"type": "parse", "id": 22, "pdf": b"%PDF", "chunk_chars": 0},
        22,
        "bad_request",
        "'chunk_chars'",
    ),
    (
        "parse corrupt pdf",
        {"type": "parse", "id": 23, "pdf": b"%PDF-1.7 junk"},
        23,
        "bad_request",
        "pdf",
    ),
    (
        "parse corrupt image",
        {"type": "parse", "id": 24, "image": b"GIF89a"},
        24,
        "bad_request",
        "image",
    ),
    ("cancel of unknown id", {"type": "cancel", "id": "nope"}, "nope", "bad_request", "in flight"),
    (
        "deadline not a number",
        {"type": "layout", "id": 25, "image": b"x", "deadline_ms": "soon"},
        25,
        "bad_request",
        "'deadline_ms'",
    ),
    (
        "deadline not positive",
        {"type": "ocr", "id": 26, "image": b"x", "deadline_ms": 0},
        26,
        "bad_request",
        "'deadline_ms'",
    ),
    (
        "deadline beyond a day",
        {"type": "pdf", "id": 27, "pdf": b"%PDF", "deadline_ms": 1e12},
        27,
        "bad_request",
        "'deadline_ms'",
    ),
]


@pytest.mark.parametrize(
    ("frame", "want_id", "code", "needle"),
    [case[1:] for case in BAD_FRAMES],
    ids=[case[0] for case in BAD_FRAMES],
)
async def test_bad_input_gets_error_and_socket_keeps_serving(
    start_server, connect, paper_pdf, frame, want_id, code, needle
):
    server = await start_server(max_image_pixels=4_000_000)
    client, _ = await connect(server)
    await client.ws.send_bytes(frame if isinstance(frame, bytes) else msgpack.packb(frame))
    error = await client.recv()
    assert error["type"] == "error", error
    assert error["id"] == want_id
    assert error["code"] == code
    assert needle.lower() in error["message"].lower(), error["message"]
    # The same socket serves its next request.
    await client.send({"type": "layout", "id": "next", "image": render_png(paper_pdf, 0)})
    assert (await client.until("next", "layout", "error"))["type"] == "layout"


async def test_ocr_and_parse_without_ocr_model(start_server, connect, paper_pdf):
    server = await start_server(ocr_model="none")
    client, hello = await connect(server)
    assert hello["models"]["ocr"] is None and hello["ocr"]["modes"] == []
    await client.send({"type": "ocr", "id": 1, "image": render_png(paper_pdf, 0)})
    error = await client.until(1, "error", "done")
    assert error["code"] == "unsupported" and "ocr" in error["message"]
    await client.send({"type": "parse", "id": 2, "pdf": paper_pdf, "pages": [0], "text": "ocr"})
    error = await client.until(2, "error", "done")
    assert error["code"] == "unsupported"
    # From the text layer, parsing needs no OCR model.
    await client.send({"type": "parse", "id": 3, "pdf": paper_pdf, "pages": [0], "text": "pdf"})
    done = await client.until(3, "error", "done")
    assert done["type"] == "done" and TITLE in done["markdown"]


async def test_pdf_page_out_of_range_and_page_cap(start_server, connect, paper_pdf):
    server = await start_server(max_pages=4)
    client, _ = await connect(server)
    await client.send({"type": "pdf", "id": "a", "pdf": paper_pdf, "pages": [PAGES]})
    error = await client.recv()
    assert error["code"] == "bad_request" and "out of range" in error["message"]
    await client.send({"type": "pdf", "id": "b", "pdf": paper_pdf})
    error = await client.recv()
    assert error["code"] == "too_large" and "at most 4" in error["message"]
    await client.send({"type": "pdf", "id": "c", "pdf": paper_pdf, "pages": [0, 1, 2, 3]})
    assert (await client.until("c", "done", "error"))["type"] == "done"


async def test_text_frame_gets_error(start_server, connect):
    server = await start_server()
    client, _ = await connect(server)
    await client.ws.send_str('{"type": "layout"}')
    error = await client.recv()
    assert error["type"] == "error" and error["code"] == "bad_request"
    assert "text frames" in error["message"]


async def test_duplicate_inflight_id_is_refused(start_server, connect, paper_pdf):
    server = await start_server()
    client, _ = await connect(server)
    await client.send({"type": "pdf", "id": "dup", "pdf": paper_pdf})
    await client.send({"type": "pdf", "id": "dup", "pdf": paper_pdf})
    error = await client.until("dup", "error")
    assert "already in flight" in error["message"]
    # The first request is unharmed and completes.
    done = await client.until("dup", "done")
    assert done["pages"] == PAGES


async def test_oversize_frame_closes_socket_1009(start_server, connect):
    server = await start_server(max_frame_bytes=64 * 1024)
    client, _ = await connect(server)
    await client.send({"type": "layout", "id": 1, "image": b"\0" * (128 * 1024)})
    msg = await client.ws.receive(timeout=10)
    assert msg.type in (
        aiohttp.WSMsgType.CLOSE,
        aiohttp.WSMsgType.CLOSED,
        aiohttp.WSMsgType.CLOSING,
    )
    assert client.ws.close_code == 1009
    # Other clients are unaffected.
    _other, hello = await connect(server)
    assert hello["type"] == "hello"


async def test_cancel_ends_request_and_stops_its_frames(start_server, connect, paper_pdf):
    server = await start_server()
    client, _ = await connect(server)
    await client.send({"type": "pdf", "id": "long", "pdf": paper_pdf})
    first = await client.until("long", "page")
    assert first["type"] == "page"
    await client.send({"type": "cancel", "id": "long"})
    done = await client.until("long", "done")
    assert done["finish_reason"] == "cancelled"
    # Nothing more about it arrives; the socket still serves.
    await client.send({"type": "layout", "id": "after", "image": render_png(paper_pdf, 0)})
    while True:
        frame = await client.recv()
        assert frame["id"] != "long", frame
        if frame["id"] == "after":
            break
    assert await server.metric("ragws_requests_total", {"type": "pdf", "outcome": "cancelled"}) == 1
    assert await server.metric("ragws_layout_pages_total") < PAGES


async def test_socket_close_drops_queued_pages(start_server, connect, paper_pdf):
    # A long window keeps the pages queued, so closing must withdraw them before they run.
    server = await start_server(
        layout_batch_size=32, layout_preferred_batch_size="32", max_wait_ms=1500
    )
    client, _ = await connect(server)
    await client.send({"type": "pdf", "id": 1, "pdf": paper_pdf})
    for _ in range(50):
        if await server.metric("ragws_layout_queue_depth") >= 8:
            break
        await asyncio.sleep(0.05)
    await client.ws.close()
    for _ in range(100):
        if await server.metric("ragws_inflight_requests") == 0:
            break
        await asyncio.sleep(0.05)
    assert await server.metric("ragws_inflight_requests") == 0
    await asyncio.sleep(1.8)  # past the window: a withdrawn page would have run by now
    assert await server.metric("ragws_layout_pages_total") == 0
    assert await server.metric("ragws_requests_total", {"type": "pdf", "outcome": "cancelled"}) == 1


async def test_max_concurrent_rejects_at_once(start_server, connect, paper_pdf):
    server = await start_server(max_concurrent=2)
    client, _ = await connect(server)
    for rid in ("a", "b", "c"):
        await client.send({"type": "pdf", "id": rid, "pdf": paper_pdf})
    frames = await client.finish("a", "b", "c")
    assert frames["c"][-1]["code"] == "overloaded"
    for rid in ("a", "b"):
        assert frames[rid][-1]["finish_reason"] == "stop"
    # Capacity is back once they finish.
    await client.send({"type": "layout", "id": "d", "image": render_png(paper_pdf, 0)})
    assert (await client.until("d", "layout", "error"))["type"] == "layout"
    assert await server.metric("ragws_rejected_total") == 1


async def test_pages_batch_across_clients_and_match_single_results(
    start_server, connect, paper_pdf, embedded_model
):
    pngs = [render_png(paper_pdf, page) for page in range(8)]
    server = await start_server(
        layout_batch_size=8, layout_preferred_batch_size="8", max_wait_ms=300
    )
    clients = [(await connect(server))[0] for _ in range(8)]

    async def one(client, i):
        await client.send({"type": "layout", "id": i, "image": pngs[i]})
        return await client.until(i, "layout", "error")

    frames = await asyncio.gather(*(one(c, i) for i, c in enumerate(clients)))
    batches = await server.metric("ragws_layout_batch_size_count")
    pages = await server.metric("ragws_layout_batch_size_sum")
    assert pages == 8 and batches < 8, (batches, pages)  # at least one batch held > 1 page
    for i, frame in enumerate(frames):
        rgb = np.asarray(Image.open(io.BytesIO(pngs[i])).convert("RGB"))
        alone = embedded_model.predict([embedded_model.prepare(rgb, 0.5, 0.5)])[0]
        assert frame["classes"] == alone.labels, i
        np.testing.assert_allclose(np.array(frame["boxes"]).reshape(-1, 4), alone.boxes, atol=0.01)


class _FaultyModel:
    """The real model, except that batches holding a page of a given width raise."""

    def __init__(self, model, poison_width: int) -> None:
        self.model = model
        self.poison_width = poison_width
        for attr in ("name", "classes", "device", "default_conf", "default_iou"):
            setattr(self, attr, getattr(model, attr))

    def prepare(self, image, conf, iou):
        return self.model.prepare(image, conf, iou)

    def predict(self, batch):
        if any(item.width == self.poison_width for item in batch):
            raise RuntimeError("injected fault")
        return self.model.predict(batch)


async def test_model_error_fails_only_its_batch(start_server, connect, paper_pdf, embedded_model):
    poisoned = render_rgb(paper_pdf, 0, scale=0.5)
    server = await start_server(model=_FaultyModel(embedded_model, poisoned.shape[1]))
    client, _ = await connect(server)
    await client.send({"type": "layout", "id": "bad", "image": render_png(paper_pdf, 0, 0.5)})
    error = await client.until("bad", "error", "layout")
    assert error["type"] == "error" and error["code"] == "internal"
    assert "injected fault" in error["message"]
    await client.send({"type": "layout", "id": "good", "image": render_png(paper_pdf, 0)})
    assert (await client.until("good", "layout", "error"))["type"] == "layout"
    assert await server.metric("ragws_layout_batch_failures_total") == 1


async def test_request_cancelled_or_abandoned_before_it_starts(start_server, connect, paper_pdf):
    """A cancel right behind its request (often handled before the request's task first runs)
    still ends it with a done frame; sockets closed right after a request return every
    admission slot."""
    server = await start_server(max_concurrent=4)
    page = render_png(paper_pdf, 0)
    client, _ = await connect(server)
    for rid in range(6):
        request = msgpack.packb({"type": "layout", "id": rid, "image": page})
        cancel = msgpack.packb({"type": "cancel", "id": rid})
        await client.ws.send_bytes(request)
        await client.ws.send_bytes(cancel)
        frame = await client.until(rid, "done", "layout", "error")
        assert frame["type"] in ("done", "layout"), frame
        if frame["type"] == "done":
            assert frame["finish_reason"] == "cancelled"
    for rid in range(12):  # three times max_concurrent: a leak would exhaust admission
        other, _ = await connect(server)
        await other.ws.send_bytes(msgpack.packb({"type": "layout", "id": rid, "image": page}))
        await other.ws.close()
    for _ in range(100):
        if await server.metric("ragws_inflight_requests") == 0:
            break
        await asyncio.sleep(0.05)
    assert await server.metric("ragws_inflight_requests") == 0
    await client.send({"type": "layout", "id": "after", "image": page})
    assert (await client.until("after", "layout", "error"))["type"] == "layout"


async def test_late_cancel_is_ignored_and_pdf_frames_carry_totals(start_server, connect, paper_pdf):
    server = await start_server()
    client, _ = await connect(server)
    await client.send({"type": "pdf", "id": "d", "pdf": paper_pdf, "pages": [0, 3]})
    frames = (await client.finish("d"))["d"]
    pages = [f for f in frames if f["type"] == "page"]
    assert [(f["pages"], f["page_count"]) for f in pages] == [(2, PAGES), (2, PAGES)]
    # The request has ended: a cancel for it is ignored; the next request is answered first.
    await client.send({"type": "cancel", "id": "d"})
    await client.send({"type": "layout", "id": "n", "image": render_png(paper_pdf, 0)})
    assert (await client.recv())["id"] == "n"
    await client.send({"type": "cancel", "id": "never-sent"})
    assert (await client.recv())["code"] == "bad_request"


async def test_cancel_crossing_a_refusal_is_ignored(start_server, connect, paper_pdf):
    server = await start_server(max_concurrent=1)
    client, _ = await connect(server)
    await client.send({"type": "pdf", "id": "busy", "pdf": paper_pdf})
    await client.until("busy", "page")  # admitted: the only slot is taken
    # Refused (overloaded; a missing image), then cancelled by a client that had not yet
    # seen the refusal: the cancels get no answer. A cancel of an id never sent does.
    for rid, frame in (("x", {"type": "layout", "image": b"x"}), ("y", {"type": "layout"})):
        await client.send({**frame, "id": rid})
        await client.send({"type": "cancel", "id": rid})
    await client.send({"type": "cancel", "id": "never-sent"})
    answers = []
    while not answers or answers[-1]["id"] != "never-sent":
        if (frame := await client.recv())["id"] != "busy":
            answers.append(frame)
    assert [(a["id"], a["code"]) for a in answers] == [
        ("x", "overloaded"),
        ("y", "bad_request"),
        ("never-sent", "bad_request"),
    ]
    await client.send({"type": "cancel", "id": "busy"})
    frames = (await client.finish("busy"))["busy"]
    assert not [f for f in frames if f["type"] == "error"]


async def test_per_socket_inflight_cap_and_idle_timeout(start_server, connect, paper_pdf):
    server = await start_server(max_inflight_per_socket=2, idle_timeout_s=1.0)
    client, hello = await connect(server)
    assert hello["limits"]["max_inflight_per_socket"] == 2
    assert hello["limits"]["idle_timeout_s"] == 1.0
    page = render_png(paper_pdf, 0)
    for rid in ("a", "b", "c"):
        await client.ws.send_bytes(msgpack.packb({"type": "layout", "id": rid, "image": page}))
    frames = await client.finish("a", "b", "c")
    assert frames["c"][-1]["code"] == "overloaded" and "socket" in frames["c"][-1]["message"]
    assert [frames[rid][-1]["type"] for rid in "ab"] == ["layout", "layout"]
    # Another socket has its own allowance.
    other, _ = await connect(server)
    await other.send({"type": "layout", "id": "x", "image": page})
    assert (await other.until("x", "layout", "error"))["type"] == "layout"
    # Idle (nothing in flight, no frames): closed by the server after ~1 s.
    message = await asyncio.wait_for(client.ws.receive(), 5)
    assert message.type == aiohttp.WSMsgType.CLOSE
    assert client.ws.close_code == 1000


async def test_idle_timeout_spares_a_socket_with_work_in_flight(start_server, connect, paper_pdf):
    # One line per recognition call: this page's OCR takes several seconds, silent on the
    # client's side, longer than the idle timeout.
    server = await start_server(idle_timeout_s=0.5, ocr_line_batch_size=1)
    client, _ = await connect(server)
    await client.send({"type": "ocr", "id": "long", "image": render_png(paper_pdf, 1, 2.0)})
    frames = (await client.finish("long"))["long"]
    assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "stop"
    assert len(frames) > 20 and not client.ws.closed
