"""Hardening on real loopback servers: deadlines, backpressure, stalled and dead peers,
overload, injected model faults and limits.

Slow or faulty models are the real models with a delay or a fault injected around their
calls, so that "queued", "busy" and "failed" are states the test controls rather than races.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import os
import socket
import struct
import threading
import time
from typing import Any

import aiohttp
import msgpack
import pymupdf
import pytest
from PIL import Image

from ragws.serving.services import SERVICES

from .conftest import render_png
from .documents import PAGES, repeated


class SlowModel:
    """The real layout model; every call first waits ``delay`` seconds, and the pages that
    reached it are counted."""

    def __init__(self, model: Any, delay: float) -> None:
        self.model = model
        self.delay = delay
        self.pages = 0
        self.busy = threading.Event()  # a call is running
        for attr in ("name", "classes", "device", "default_conf", "default_iou"):
            setattr(self, attr, getattr(model, attr))

    def prepare(self, image, conf, iou):
        return self.model.prepare(image, conf, iou)

    def predict(self, batch):
        self.busy.set()
        self.pages += len(batch)
        time.sleep(self.delay)
        try:
            return self.model.predict(batch)
        finally:
            self.busy.clear()


class Crash(BaseException):
    """Not an Exception: what no model error handler catches (a thread or loop dying)."""


async def until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    """Wait until ``predicate()`` (a bool, or an awaitable of one) holds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def gauge_is(server, name: str, value: float) -> bool:
    return await server.metric(name) == value


def one_page_pdf() -> bytes:
    doc = pymupdf.open()
    doc.new_page(width=300, height=200).insert_text((30, 60), "A one-page document")
    return doc.tobytes()


class RawWebSocket:
    """A WebSocket client on a bare socket that reads only when asked to.

    Library clients read the network in the background into buffers of their own (aiohttp's
    holds hundreds of kilobytes), so "a client that stops reading" needs one that does not.
    Its receive buffer is tiny, and the server's side of the connection gets a tiny send
    buffer too, so the server's own send queue fills after kilobytes rather than megabytes.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, server) -> RawWebSocket:
        host, port = server.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        for session in server.app[SERVICES].sessions:
            session.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 8192
            )
        ws = cls(reader, writer)
        opcode, hello = await ws.recv_frame()
        assert opcode == 2 and msgpack.unpackb(hello)["type"] == "hello"
        return ws

    async def send(self, frame: dict[str, Any]) -> None:
        payload = msgpack.packb(frame, use_bin_type=True)
        mask = os.urandom(4)
        size = len(payload)
        header = bytes([0x82])  # FIN, binary
        if size < 126:
            header += bytes([0x80 | size])
        elif size < 65536:
            header += bytes([0x80 | 126]) + struct.pack(">H", size)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)
        await self.writer.drain()

    async def recv_frame(self, timeout: float = 30.0) -> tuple[int, bytes]:
        """The next frame's opcode and payload (server frames are unmasked and unfragmented)."""
        first, second = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        size = second & 0x7F
        if size == 126:
            size = struct.unpack(">H", await self.reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack(">Q", await self.reader.readexactly(8))[0]
        return first & 0x0F, await asyncio.wait_for(self.reader.readexactly(size), timeout)

    async def frames_until(self, request_id: Any) -> list[dict[str, Any]]:
        """Every frame about ``request_id`` until its end (pings are skipped)."""
        frames = []
        while True:
            opcode, payload = await self.recv_frame()
            assert opcode in (2, 9), f"opcode {opcode}: {payload!r}"
            if opcode == 2 and (frame := msgpack.unpackb(payload))["id"] == request_id:
                frames.append(frame)
                if frame["type"] in ("done", "error"):
                    return frames

    def close(self) -> None:
        self.writer.transport.abort()


async def pause(server, seconds: float) -> list[float]:
    """Read nothing for ``seconds``; meanwhile sample the server's send-queue gauge."""
    queued = []
    for _ in range(round(seconds / 0.1)):
        await asyncio.sleep(0.1)
        queued.append(await server.metric("ragws_websocket_send_queue_bytes"))
    return queued


# --- deadlines ------------------------------------------------------------------------------


async def test_deadline_ends_a_queued_request_and_spares_started_work(
    start_server, connect, paper_pdf, embedded_model
):
    model = SlowModel(embedded_model, delay=0.6)
    server = await start_server(model=model, layout_batch_size=1)
    client, _ = await connect(server)
    page = render_png(paper_pdf, 0, 0.5)
    await client.send({"type": "layout", "id": "busy", "image": page})
    await until(model.busy.is_set, what="the model to be busy")
    # Queued behind the busy page past its deadline: it ends, and never reaches the model.
    await client.send({"type": "layout", "id": "late", "image": page, "deadline_ms": 150})
    frames = await client.finish("busy", "late")
    assert frames["late"] == [{"type": "done", "id": "late", "finish_reason": "timeout"}]
    assert frames["busy"][-1]["type"] == "layout"
    assert model.pages == 1
    # Work the model has started runs to its end, however long past the deadline.
    await client.send({"type": "layout", "id": "started", "image": page, "deadline_ms": 300})
    frame = await client.until("started", "layout", "done", "error")
    assert frame["type"] == "layout" and frame["timing"]["total_ms"] > 300
    assert (
        await server.metric("ragws_requests_total", {"type": "layout", "outcome": "timeout"}) == 1
    )
    assert await server.metric("ragws_inflight_requests") == 0


async def test_client_deadline_ends_queued_requests_with_timeout(
    start_server, paper_pdf, embedded_model
):
    from ragws.client import AsyncClient, RagwsError

    model = SlowModel(embedded_model, delay=1.5)
    server = await start_server(model=model, layout_batch_size=1)
    page = render_png(paper_pdf, 0, 0.5)
    async with (
        AsyncClient.connect(server.ws_url) as patient,
        AsyncClient.connect(server.ws_url, deadline_ms=150) as hurried,
    ):
        first = asyncio.ensure_future(patient.layout(page))
        await until(model.busy.is_set, what="the model to be busy")
        with pytest.raises(RagwsError) as refused:
            await hurried.layout(page)  # a one-frame request: the reason is the error's code
        assert refused.value.code == "timeout"
        stream = hurried.pdf(one_page_pdf())
        async with stream:
            pages = [p async for p in stream]
        assert pages == [] and stream.result.finish_reason == "timeout"
        assert (await first).width > 0


async def test_http_deadline_is_504(start_server, connect, paper_pdf, embedded_model):
    model = SlowModel(embedded_model, delay=0.8)
    server = await start_server(model=model, layout_batch_size=1)
    client, _ = await connect(server)
    await client.send({"type": "layout", "id": "busy", "image": render_png(paper_pdf, 0, 0.5)})
    await until(model.busy.is_set, what="the model to be busy")
    async with aiohttp.ClientSession() as http:
        form = aiohttp.FormData()
        form.add_field("file", one_page_pdf(), filename="a.pdf")
        form.add_field("deadline_ms", "100")
        async with http.post(server.url + "/doc_layout", data=form) as resp:
            assert resp.status == 504
            body = await resp.json()
            assert body["error"] == "timeout" and "deadline" in body["message"]
        form = aiohttp.FormData()
        form.add_field("file", one_page_pdf(), filename="a.pdf")
        form.add_field("deadline_ms", "soon")
        async with http.post(server.url + "/doc_layout", data=form) as resp:
            assert resp.status == 400 and "deadline_ms" in (await resp.json())["message"]
    assert (await client.until("busy", "layout", "error"))["type"] == "layout"


# --- backpressure ---------------------------------------------------------------------------


async def test_paused_reader_pauses_the_document_and_then_gets_every_page(start_server, paper_pdf):
    # layout_batch_size 1: a document keeps at most 8 pages between render and reader, a few
    # more wait in the socket's queue: the paper twice over has pages well past them.
    pdf, total = repeated(paper_pdf, 2), 2 * PAGES
    server = await start_server(ocr_model="none", layout_batch_size=1, send_queue_bytes=65536)
    ws = await RawWebSocket.connect(server)
    try:
        await ws.send({"type": "pdf", "id": "doc", "pdf": pdf, "images": True})
        queued = await pause(server, 3.0)
        assert max(queued) > 65536  # the socket's queue filled up...
        assert await server.metric("ragws_layout_pages_total") < total  # ...and the work waited
        frames = await ws.frames_until("doc")
        pages = [f for f in frames if f["type"] == "page"]
        assert sorted(f["page"] for f in pages) == list(range(total))
        assert all(f["image"][:2] == b"\xff\xd8" for f in pages)  # every page's JPEG
        assert frames[-1]["type"] == "done" and frames[-1]["pages"] == total
        assert await server.metric("ragws_websocket_stalls_total") == 0
    finally:
        ws.close()


async def test_paused_token_stream_loses_nothing(start_server, got_tiny_dir):
    pytest.importorskip("torch")
    server = await start_server(
        ocr_model=str(got_tiny_dir), max_model_len=1536, send_queue_bytes=4096
    )
    ws = await RawWebSocket.connect(server)
    try:
        rid = "t" * 128  # a long id: each token frame is ~180 bytes, 1000 of them ~180 kB
        await ws.send(ocr_frame(rid, 1000))
        assert max(await pause(server, 2.0)) > 4096  # the stream had to wait for the reader
        *tokens, done = await ws.frames_until(rid)
        assert done["type"] == "done" and done["finish_reason"] == "length"
        assert done["usage"]["completion_tokens"] == 1000
        assert "".join(f["text"] for f in tokens) == done["text"]
        # What piled up while the client did not read went out merged, none of it lost.
        assert len(tokens) < 1000
    finally:
        ws.close()


async def test_stalled_reader_is_closed_1008_and_its_work_cancelled(start_server, paper_pdf):
    server = await start_server(
        ocr_model="none", layout_batch_size=1, send_queue_bytes=65536, send_stall_timeout_s=1.0
    )
    pdf, total = repeated(paper_pdf, 2), 2 * PAGES  # more pages than are let ahead of a reader
    ws = await RawWebSocket.connect(server)
    try:
        await ws.send({"type": "pdf", "id": "doc", "pdf": pdf, "images": True})
        await until(lambda: gauge_is(server, "ragws_websocket_stalls_total", 1), what="stall")
        await until(lambda: gauge_is(server, "ragws_inflight_requests", 0), what="the cancel")
        cancelled = {"type": "pdf", "outcome": "cancelled"}
        assert await server.metric("ragws_requests_total", cancelled) == 1
        assert await server.metric("ragws_layout_pages_total") < total
        # A client that reads again finds what was already on its way, then the close frame.
        pages = 0
        while (frame := await ws.recv_frame())[0] == 2:
            pages += msgpack.unpackb(frame[1])["type"] == "page"
        opcode, payload = frame
        assert opcode == 8 and struct.unpack(">H", payload[:2])[0] == 1008
        assert b"stopped reading" in payload and pages < total
    finally:
        ws.close()


# --- dead peers -----------------------------------------------------------------------------


async def test_heartbeat_drops_a_dead_peer_and_cancels_its_work(start_server, paper_pdf):
    # One line per recognition call: this page's OCR runs for seconds.
    server = await start_server(heartbeat_s=0.4, ocr_line_batch_size=1)
    async with aiohttp.ClientSession() as http:
        # autoping off and no reads: pings are never answered, like a peer that vanished.
        ws = await http.ws_connect(server.ws_url, max_msg_size=0, autoping=False)
        hello = msgpack.unpackb((await ws.receive()).data)
        assert hello["limits"]["heartbeat_s"] == 0.4
        request = {"type": "ocr", "id": "long", "image": render_png(paper_pdf, 1, 2.0)}
        await ws.send_bytes(msgpack.packb(request))
        await until(lambda: gauge_is(server, "ragws_websocket_connections", 0), what="the drop")
        await until(lambda: gauge_is(server, "ragws_inflight_requests", 0), what="the cancel")
        cancelled = {"type": "ocr", "outcome": "cancelled"}
        assert await server.metric("ragws_requests_total", cancelled) == 1


# --- overload -------------------------------------------------------------------------------


async def test_ten_times_max_concurrent_gets_answers_and_only_the_cap_runs(
    start_server, connect, paper_pdf, embedded_model
):
    model = SlowModel(embedded_model, delay=0.3)
    server = await start_server(model=model, layout_batch_size=1, max_concurrent=4)
    clients = [(await connect(server))[0] for _ in range(40)]
    page = render_png(paper_pdf, 0, 0.5)
    await asyncio.gather(
        *(c.send({"type": "layout", "id": i, "image": page}) for i, c in enumerate(clients))
    )
    answers = await asyncio.gather(
        *(c.until(i, "layout", "error", "done") for i, c in enumerate(clients))
    )
    served = [a for a in answers if a["type"] == "layout"]
    refused = [a for a in answers if a["type"] == "error"]
    # The first four are admitted and take ≥ 0.3 s each; the other 36 arrive meanwhile.
    assert len(served) == 4 and len(refused) == 36
    assert all(a["code"] == "overloaded" and "capacity" in a["message"] for a in refused)
    assert model.pages == 4
    assert await server.metric("ragws_rejected_total") == 36
    assert await server.metric("ragws_inflight_requests") == 0
    # Capacity is back: the next request is served.
    await clients[0].send({"type": "layout", "id": "after", "image": page})
    assert (await clients[0].until("after", "layout", "error"))["type"] == "layout"


# --- injected model faults ------------------------------------------------------------------


@pytest.fixture
def got_runner(got_tiny_dir):
    """A GOT-OCR2 runner on the tiny checkpoint whose steps can be made to fail."""
    torch = pytest.importorskip("torch")
    from ragws.models import load_ocr_runner

    runner = load_ocr_runner(str(got_tiny_dir), "cpu", num_slots=4, max_model_len=1024)
    real_step = runner.step
    runner.fault = None  # raised by the next step that admits a sequence, then cleared

    def step(prefill, decode):
        if runner.fault is not None and prefill:
            fault, runner.fault = runner.fault, None
            raise fault
        return real_step(prefill, decode)

    runner.step = step
    runner.oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return runner


def ocr_frame(rid: Any, max_tokens: int) -> dict[str, Any]:
    image = Image.new("RGB", (160, 96), "white")
    out = io.BytesIO()
    image.save(out, format="PNG")
    frame = {"type": "ocr", "id": rid, "image": out.getvalue(), "max_tokens": max_tokens}
    return {**frame, "ignore_eos": True, "mode": "plain"}


async def test_out_of_memory_in_a_step_fails_only_the_newcomer(start_server, connect, got_runner):
    server = await start_server(ocr_runner=got_runner, max_model_len=1024)
    client, _ = await connect(server)
    await client.send(ocr_frame("alone", 300))
    reference = (await client.finish("alone"))["alone"][-1]
    await client.send(ocr_frame("a", 300))
    await client.until("a", "token")  # a is decoding
    got_runner.fault = got_runner.oom
    await client.send(ocr_frame("b", 50))
    frames = await client.finish("a", "b")
    error = frames["b"][-1]
    assert error["type"] == "error" and error["code"] == "internal"
    assert "OutOfMemoryError" in error["message"]
    # The running stream went on as if nothing had happened, token for token.
    done = frames["a"][-1]
    assert done["finish_reason"] == "length" and done["text"] == reference["text"]
    await until(lambda: gauge_is(server, "ragws_kv_slots_used", 0), what="slots to be free")
    await client.send(ocr_frame("c", 5))
    assert (await client.finish("c"))["c"][-1]["type"] == "done"


async def test_dead_ocr_engine_turns_unhealthy_and_fails_fast(
    start_server, connect, got_runner, paper_pdf
):
    server = await start_server(ocr_runner=got_runner, max_model_len=1024)
    client, _ = await connect(server)
    got_runner.fault = Crash("the engine thread dies")
    await client.send(ocr_frame("a", 50))
    error = (await client.finish("a"))["a"][-1]
    assert error["type"] == "error" and error["code"] == "internal"
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/health") as resp:
            health = await resp.json()
            assert resp.status == 503 and health["status"] == "unhealthy"
            assert health["ocr"]["healthy"] is False and health["layout_healthy"] is True
        form = aiohttp.FormData()
        form.add_field("image", ocr_frame(0, 1)["image"], filename="a.png")
        async with http.post(server.url + "/ocr", data=form) as resp:
            assert resp.status == 503 and (await resp.json())["error"] == "unavailable"
    started = time.monotonic()
    await client.send(ocr_frame("b", 50))
    error = (await client.finish("b"))["b"][-1]
    assert error["code"] == "unavailable" and time.monotonic() - started < 5
    # Layout is another service, and still serves.
    await client.send({"type": "layout", "id": "l", "image": render_png(paper_pdf, 0, 0.5)})
    assert (await client.until("l", "layout", "error"))["type"] == "layout"


class _CrashingModel(SlowModel):
    def predict(self, batch):
        raise Crash("the inference thread dies")


async def test_dead_layout_batcher_turns_unhealthy_and_fails_fast(
    start_server, connect, paper_pdf, embedded_model
):
    server = await start_server(model=_CrashingModel(embedded_model, 0.0))
    client, _ = await connect(server)
    page = render_png(paper_pdf, 0, 0.5)
    for rid in ("first", "second"):  # in the dying batch, then refused at once
        await client.send({"type": "layout", "id": rid, "image": page})
        error = await client.until(rid, "layout", "error")
        assert error["code"] == "unavailable" and "layout" in error["message"]
    async with aiohttp.ClientSession() as http, http.get(server.url + "/health") as resp:
        assert resp.status == 503 and (await resp.json())["layout_healthy"] is False


# --- limits ---------------------------------------------------------------------------------


async def test_limits_pdf_bytes_token_cap_formats_and_hello(start_server, connect, paper_pdf):
    server = await start_server(max_pdf_bytes=100_000)
    client, hello = await connect(server)
    limits = hello["limits"]
    assert limits["heartbeat_s"] == 30.0 and limits["send_queue_bytes"] == 4 * 1024 * 1024
    assert limits["send_stall_timeout_s"] == 60.0
    await client.send({"type": "pdf", "id": "big", "pdf": paper_pdf})
    error = await client.until("big", "error", "done")
    assert error["code"] == "too_large" and "100000" in error["message"]
    # Formats outside the six documented are refused, unread (EPS would go to Ghostscript).
    eps = io.BytesIO()
    Image.new("RGB", (40, 20), "white").save(eps, format="EPS")
    await client.send({"type": "layout", "id": "eps", "image": eps.getvalue()})
    error = await client.until("eps", "error", "layout")
    assert error["code"] == "bad_request" and "format" in error["message"]


async def test_max_tokens_above_the_cap_is_capped(start_server, connect, got_tiny_dir):
    pytest.importorskip("torch")
    server = await start_server(ocr_model=str(got_tiny_dir), ocr_max_tokens=12)
    client, _ = await connect(server)
    await client.send(ocr_frame("o", 500))
    done = (await client.finish("o"))["o"][-1]
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 12
