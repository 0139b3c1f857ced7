"""The Python client (ragws.client) and ``ragws parse``, against a real server on loopback.

The server runs in the test's event loop, so blocking code (the sync client, the command line)
runs in a thread or a subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import json
import socket
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pymupdf
import pytest
from aiohttp import web
from PIL import Image

from ragws.cli import (
    UsageError,
    build_parser,
    count_pages,
    document_json,
    expand_inputs,
    output_names,
)
from ragws.client import (
    AsyncClient,
    Block,
    Cell,
    Chunk,
    ChunkBox,
    Client,
    Document,
    ListItem,
    ParsedPage,
    RagwsError,
)

from . import documents
from .conftest import Server, render_png
from .documents import PAGES

TITLE = f"# {documents.TITLE}"
#: How the OCR of ``table_png`` (Table 1 and its caption) begins.
TABLE_START = "Table 1: Memory per device"
#: The lines of ``table_png``: its caption and each cell of its seven rows of four.
TABLE_LINES = 1 + 7 * 4


@pytest.fixture(scope="module")
def two_page_pdf(paper_pdf: bytes) -> bytes:
    """The first two pages of the paper, as a PDF of their own."""
    with pymupdf.open(stream=paper_pdf, filetype="pdf") as src, pymupdf.open() as dst:
        dst.insert_pdf(src, from_page=0, to_page=1)
        return dst.tobytes()


async def metric_reaches(
    server: Server, name: str, labels: dict[str, str] | None, value: float, timeout: float = 60
) -> float:
    """Wait until a metric is at least ``value``; fail the test when it does not get there."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await server.metric(name, labels)
        if got >= value:
            return got
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{name}{labels or ''} stayed at {got}, expected {value}")
        await asyncio.sleep(0.1)


async def parsed_pages_total(server: Server) -> float:
    return sum(
        [await server.metric("ragws_parse_pages_total", {"source": s}) for s in ("pdf", "none")]
    )


# --- the async client -----------------------------------------------------------------------


async def test_hello_and_layout(start_server, paper_pdf):
    server = await start_server(max_pages=50)
    png = render_png(paper_pdf, 0, scale=2.0)
    async with AsyncClient.connect(server.ws_url) as client:
        hello = client.hello
        layout = await client.layout(png)
        strict = await client.layout(png, conf=0.9)
    assert hello.version == 1
    assert hello.models == {"layout": "embedded", "ocr": "embedded"}
    assert hello.ocr_modes == ("format", "plain") and hello.ocr_markup is False
    assert hello.ocr_architecture == "PP-OCR" and hello.ocr_page_mode is None
    assert hello.limits["max_pages"] == 50
    assert (layout.width, layout.height) == Image.open(io.BytesIO(png)).size
    assert "title" in layout.classes and layout.classes.count("text") >= 3
    assert len(layout.boxes) == len(layout.classes) == len(layout.scores)
    assert layout.scores == sorted(layout.scores, reverse=True)
    assert layout.timing["total_ms"] >= layout.timing["queue_ms"] >= 0
    # conf reaches the server: a higher threshold keeps only the surest regions.
    assert 0 < len(strict.scores) < len(layout.scores) and min(strict.scores) >= 0.9


async def test_pdf_pages_stream_then_summary(start_server, paper_pdf):
    server = await start_server()
    async with AsyncClient.connect(server.ws_url) as client:
        stream = client.pdf(paper_pdf, pages=[2, 0], scale=1.0, images=True)
        with pytest.raises(RuntimeError, match="has not ended"):
            stream.result  # noqa: B018 (the property raises)
        pages = {page.page: page async for page in stream}
    assert sorted(pages) == [0, 2]
    first = pages[0]
    assert "title" in first.classes and abs(first.width - 612) <= 1
    jpeg = Image.open(io.BytesIO(first.image or b""))
    assert jpeg.format == "JPEG" and jpeg.size == (first.width, first.height)
    summary = stream.result
    assert (summary.finish_reason, summary.pages, summary.page_count) == ("stop", 2, PAGES)
    assert summary.timing["pages_per_s"] > 0


async def test_ocr_tokens_add_up_to_the_result(start_server, table_png):
    server = await start_server()
    async with AsyncClient.connect(server.ws_url) as client:
        stream = client.ocr(table_png)
        tokens = [token async for token in stream]
        text = await client.ocr_text(table_png, mode="plain")
    result = stream.result
    assert len(tokens) >= 10
    assert "".join(token.text for token in tokens) == result.text
    assert result.text.startswith(TABLE_START)
    assert result.finish_reason == "stop"
    assert result.usage["completion_tokens"] == len(tokens)
    assert result.timing["total_ms"] >= result.timing["ttft_ms"] > 0
    width, height = Image.open(io.BytesIO(table_png)).size
    for token in tokens:  # line OCR: every line has its box and score
        assert token.box is not None and 0 <= token.box[0] < token.box[2] <= width + 1
        assert token.box[3] <= height + 1 and token.score is not None and 0.5 <= token.score <= 1
    assert text == result.text  # line OCR reads both modes the same


async def test_parse_streams_pages_then_the_document(start_server, paper_pdf):
    server = await start_server()
    async with AsyncClient.connect(server.ws_url) as client:
        stream = client.parse(paper_pdf, pages=[1, 0], text="pdf", chunk_chars=800)
        pages = [page async for page in stream]
        again = await client.parse_document(paper_pdf, pages=[0, 1], text="pdf", chunk_chars=800)
        # An image goes out as an image: the server answers that it has no text layer.
        with pytest.raises(RagwsError) as image_error:
            await client.parse_document(render_png(paper_pdf, 0), text="pdf")
    doc = stream.result
    assert sorted(page.page for page in pages) == [0, 1]
    assert [page.page for page in doc.pages] == [0, 1]
    assert doc.finish_reason == "stop" and doc.page_count == PAGES
    assert TITLE in doc.markdown
    for page in doc.pages:
        assert page.source == "pdf" and page.markdown and page.markdown in doc.markdown
        assert [block.order for block in page.blocks] == list(range(len(page.blocks)))
        for block in page.blocks:
            x0, y0, x1, y1 = block.bbox
            assert 0 <= x0 < x1 <= page.width + 1 and 0 <= y0 < y1 <= page.height + 1
    assert len(doc.chunks) >= 3 and documents.TITLE in doc.chunks[0].text
    assert all(set(chunk.pages) <= {0, 1} and chunk.bboxes for chunk in doc.chunks)
    assert again.markdown == doc.markdown and again.chunks == doc.chunks
    assert image_error.value.code == "bad_request" and "image" in image_error.value.message


async def test_server_errors_raise_and_the_socket_stays_usable(
    start_server, paper_pdf, two_page_pdf
):
    # A frame limit between the two documents' sizes: the whole paper is over it.
    limit = (len(two_page_pdf) + len(paper_pdf)) // 2
    server = await start_server(max_frame_bytes=limit)
    assert len(two_page_pdf) < limit < len(paper_pdf)
    async with AsyncClient.connect(server.ws_url) as client:
        with pytest.raises(RagwsError) as bad_image:
            await client.layout(b"this is not an image")
        with pytest.raises(RagwsError) as bad_page:
            async for _ in client.pdf(two_page_pdf, pages=[99]):
                pass
        # Too big for one frame: refused before sending, as the server would close the socket.
        with pytest.raises(RagwsError) as too_big:
            async for _ in client.pdf(paper_pdf):
                pass
        layout = await client.layout(render_png(paper_pdf, 0))
        assert await server.metric("ragws_websocket_connections") == 1
    assert bad_image.value.code == "bad_request" and bad_image.value.request_id is not None
    assert bad_image.value.message and str(bad_image.value).startswith("bad_request: ")
    assert bad_page.value.code == "bad_request" and "99" in bad_page.value.message
    assert too_big.value.code == "too_large" and "max_frame_bytes" in too_big.value.message
    assert "title" in layout.classes
    assert await server.metric("ragws_requests_total", {"type": "layout", "outcome": "ok"}) == 1
    assert await server.metric("ragws_requests_total", {"type": "pdf", "outcome": "ok"}) == 0


async def test_leaving_an_ocr_stream_early_cancels_it(start_server, table_png):
    # Small recognition batches: the table's lines take several, so there is work to stop.
    server = await start_server(ocr_line_batch_size=4)
    async with AsyncClient.connect(server.ws_url) as client:
        async for token in client.ocr(table_png):
            assert token.text
            break  # the dropped stream sends a cancel
        labels = {"type": "ocr", "outcome": "cancelled"}
        assert await metric_reaches(server, "ragws_requests_total", labels, 1) == 1
        assert await server.metric("ragws_inflight_requests") == 0
        await asyncio.sleep(1.0)  # a batch already in the model finishes there
        lines = await server.metric("ragws_ocr_lines_total")
        await asyncio.sleep(1.0)
        assert await server.metric("ragws_ocr_lines_total") == lines < TABLE_LINES  # no more
        assert client.connected  # cancelled by a frame, not by closing the socket


async def test_closing_a_parse_stream_cancels_its_pages(start_server, paper_pdf):
    server = await start_server()
    async with AsyncClient.connect(server.ws_url) as client:
        stream = client.parse(paper_pdf, text="pdf")
        async with stream:
            async for page in stream:
                assert page.blocks
                break
        labels = {"type": "parse", "outcome": "cancelled"}
        assert await metric_reaches(server, "ragws_requests_total", labels, 1) == 1
        assert await server.metric("ragws_inflight_requests") == 0
        parsed = await parsed_pages_total(server)
        await asyncio.sleep(1.0)
        assert parsed == await parsed_pages_total(server) < PAGES
        with pytest.raises(RuntimeError):
            stream.result  # noqa: B018 (closed before its end: no result)


async def test_cancel_by_id_ends_the_stream_as_cancelled(start_server, paper_pdf):
    server = await start_server()
    async with AsyncClient.connect(server.ws_url) as client:
        stream = client.pdf(paper_pdf, scale=2.0)
        pages = []
        async for page in stream:
            pages.append(page)
            if len(pages) == 1:
                assert await client.cancel(stream.id) is True
        assert await client.cancel(stream.id) is False  # no longer in flight
    assert stream.result.finish_reason == "cancelled"
    assert len(pages) < PAGES
    labels = {"type": "pdf", "outcome": "cancelled"}
    assert await server.metric("ragws_requests_total", labels) == 1


async def test_concurrent_requests_share_one_socket(start_server, paper_pdf, table_png):
    server = await start_server()
    pngs = [render_png(paper_pdf, 0, scale) for scale in (1.0, 1.5, 2.0)]
    async with AsyncClient.connect(server.ws_url) as client:

        async def pdf_pages() -> list[int]:
            return sorted([page.page async for page in client.pdf(paper_pdf, pages=[3, 4, 5])])

        layouts, pages, doc, text = await asyncio.gather(
            asyncio.gather(*(client.layout(png) for png in pngs)),
            pdf_pages(),
            client.parse_document(paper_pdf, pages=[0], text="pdf"),
            client.ocr_text(table_png),
        )
        assert await server.metric("ragws_websocket_connections") == 1
    # Every answer reached the request that asked for it.
    assert [layout.width for layout in layouts] == [612, 918, 1224]
    assert pages == [3, 4, 5]
    assert TITLE in doc.markdown
    assert text.startswith(TABLE_START)


async def test_reconnects_after_the_server_closes_the_socket(start_server, paper_pdf):
    # Room for the paper's frame and little more: the frame over the limit is small enough
    # to be written whole before the server, reading its header, closes the socket (a larger
    # one can still be on its way, its write failing with the connection, code 1006).
    limit = len(paper_pdf) + 64 * 1024
    server = await start_server(max_frame_bytes=limit)
    png = render_png(paper_pdf, 0, scale=1.0)
    async with AsyncClient.connect(server.ws_url, backoff=0.05) as client:
        stream = client.pdf(paper_pdf, scale=2.0)
        assert (await stream.__anext__()).classes
        # A frame over max_frame_bytes makes the server close the socket (1009).
        await client._conn.ws.send_bytes(b"\0" * (limit + 1))
        with pytest.raises(RagwsError) as dropped:
            async for _ in stream:
                pass
        assert dropped.value.code == "disconnected" and dropped.value.request_id == stream.id
        assert "1009" in dropped.value.message
        assert not client.connected
        layout = await client.layout(png)  # the next request opens a new socket
        assert client.connected and "title" in layout.classes
        assert await server.metric("ragws_websocket_connections") == 1
    labels = {"type": "pdf", "outcome": "cancelled"}
    assert await metric_reaches(server, "ragws_requests_total", labels, 1) == 1


@contextlib.asynccontextmanager
async def stub_server(handler: Any) -> AsyncIterator[str]:
    """A one-route server on loopback, for what the real one does not do (refuse handshakes)."""
    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"ws://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/ws"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def test_connect_retries_with_backoff_then_fails():
    attempts: list[float] = []
    loop = asyncio.get_running_loop()

    async def unavailable(request: web.Request) -> web.StreamResponse:
        attempts.append(loop.time())
        raise web.HTTPServiceUnavailable()

    async with stub_server(unavailable) as url:
        with pytest.raises(RagwsError) as failure:
            await AsyncClient.connect(url, retries=3, backoff=0.2, max_backoff=0.3)
    assert failure.value.code == "disconnected" and "4 attempts" in failure.value.message
    assert len(attempts) == 4
    waits = [b - a for a, b in itertools.pairwise(attempts)]
    # Doubling from 0.2 s, capped at 0.3 s (uncapped, the last wait would be 0.8 s).
    assert waits[0] >= 0.2 and waits[1] >= 0.3 and 0.3 <= waits[2] < 0.7


async def test_api_key_is_sent_and_a_refused_handshake_is_not_retried():
    seen: list[str | None] = []

    async def hello_only(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != "Bearer s3cret":
            raise web.HTTPUnauthorized()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        hello = {"type": "hello", "version": 1, "models": {}, "ocr": {}, "limits": {}}
        await ws.send_bytes(msgpack.packb(hello))
        async for _ in ws:
            pass
        return ws

    async with stub_server(hello_only) as url:
        async with AsyncClient.connect(url, api_key="s3cret") as client:
            assert client.hello.version == 1
        with pytest.raises(RagwsError) as refused:
            await AsyncClient.connect(url, api_key="wrong", retries=3)
    assert seen == ["Bearer s3cret", "Bearer wrong"]  # one attempt only for the refusal
    assert refused.value.code == "unauthorized"


# --- the sync client ------------------------------------------------------------------------


async def test_sync_client(start_server, paper_pdf, table_png):
    server = await start_server()
    loop = asyncio.get_running_loop()
    png = render_png(paper_pdf, 0, scale=1.0)

    def metric(name: str, labels: dict[str, str]) -> float:  # read on the server's loop
        return asyncio.run_coroutine_threadsafe(server.metric(name, labels), loop).result()

    def use() -> dict[str, Any]:
        with Client.connect(server.ws_url) as client:
            out: dict[str, Any] = {"hello": client.hello, "layout": client.layout(png)}
            stream = client.pdf(paper_pdf, pages=[0, 1], scale=1.0)
            out["pages"] = sorted(page.page for page in stream)
            out["summary"] = stream.result
            ocr = client.ocr(table_png)
            out["tokens"] = list(ocr)
            out["ocr"] = ocr.result
            out["doc"] = client.parse_document(paper_pdf, pages=[0], text="pdf")
            with pytest.raises(RagwsError) as bad:
                client.layout(b"junk")
            out["error"] = bad.value
            for _ in client.pdf(paper_pdf, scale=2.0):
                break  # leaving the loop drops the stream: a cancel goes out
            labels = {"type": "pdf", "outcome": "cancelled"}
            for _ in range(300):  # the socket is still open: only the cancel frame can do it
                if metric("ragws_requests_total", labels) >= 1:
                    break
                threading.Event().wait(0.1)
            out["cancelled"] = metric("ragws_requests_total", labels)
        return out

    out = await asyncio.to_thread(use)
    assert out["hello"].models["layout"] == "embedded"
    assert "title" in out["layout"].classes
    assert out["pages"] == [0, 1] and out["summary"].page_count == PAGES
    assert "".join(t.text for t in out["tokens"]) == out["ocr"].text
    assert out["ocr"].text.startswith("Table 1")
    assert TITLE in out["doc"].markdown
    assert out["error"].code == "bad_request"
    assert out["cancelled"] == 1
    assert not any(t.name == "ragws-client" for t in threading.enumerate())


# --- ragws parse ----------------------------------------------------------------------------


async def run_cli(*args: str, timeout: float = 180) -> tuple[int, str]:
    """Run ``python -m ragws ARGS`` without blocking the loop the server runs on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ragws",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, stderr.decode()


async def test_cli_parse_writes_results_and_reports_failures(start_server, two_page_pdf, tmp_path):
    server = await start_server()
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "paper.pdf").write_bytes(two_page_pdf)
    (docs / "broken.pdf").write_bytes(b"%PDF-1.7\n" + b"\0 not really a pdf " * 50)
    (docs / "notes.txt").write_text("not a document: a directory input skips it")
    out = tmp_path / "out"
    code, stderr = await run_cli(
        "parse", str(docs), "--server", server.ws_url, "-o", str(out), "--text", "pdf"
    )
    assert code == 1, stderr
    failures = [line for line in stderr.splitlines() if "(bad_request)" in line]
    assert len(failures) == 1 and str(docs / "broken.pdf") in failures[0], stderr
    assert "1 of 2 documents" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["paper.json", "paper.md"]
    markdown = (out / "paper.md").read_text()
    assert TITLE in markdown
    record = json.loads((out / "paper.json").read_text())
    assert record["file"] == "paper.pdf" and record["page_count"] == 2
    assert record["markdown"] == markdown
    assert [page["page"] for page in record["pages"]] == [0, 1]
    assert all(page["blocks"] and page["markdown"] for page in record["pages"])
    assert {"type", "bbox", "text", "order", "source"} <= set(record["pages"][0]["blocks"][0])
    assert record["chunks"] and documents.TITLE in record["chunks"][0]["text"]
    assert record["timing"]["total_ms"] > 0


async def test_cli_pages_and_globs(start_server, two_page_pdf, tmp_path):
    server = await start_server()
    (tmp_path / "a.pdf").write_bytes(two_page_pdf)
    (tmp_path / "b.pdf").write_bytes(two_page_pdf)
    out = tmp_path / "out"
    code, stderr = await run_cli(
        "parse",
        str(tmp_path / "*.pdf"),
        "--server",
        server.ws_url,
        "-o",
        str(out),
        "--text",
        "pdf",
        "--pages",
        "1",
        "--concurrency",
        "2",
    )
    assert code == 0, stderr
    for name in ("a", "b"):
        record = json.loads((out / f"{name}.json").read_text())
        assert [page["page"] for page in record["pages"]] == [1]
        assert TITLE not in record["markdown"]  # the title is on page 0
    assert await server.metric("ragws_requests_total", {"type": "parse", "outcome": "ok"}) == 2


async def test_cli_usage_errors_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, stderr = await run_cli("parse", str(empty))
    assert code == 2 and "no input files" in stderr
    code, stderr = await run_cli("parse", str(tmp_path / "missing.pdf"))
    assert code == 2 and "missing.pdf" in stderr
    code, stderr = await run_cli("parse", str(tmp_path), "--pages", "two")
    assert code == 2 and "--pages" in stderr
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.7\n")
    code, stderr = await run_cli("parse", str(tmp_path / "doc.pdf"), "--server", unused_url())
    assert code == 2 and "cannot reach the server" in stderr


def unused_url() -> str:
    """A loopback WebSocket URL on which nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"ws://127.0.0.1:{port}/ws"


def test_help_describes_both_commands():
    parser = build_parser()
    top = parser.format_help()
    assert "serve" in top and "parse" in top
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["parse", "--help"])
    assert exited.value.code == 0
    args = parser.parse_args(["parse", "x.pdf", "--pages", "0-2,5,1", "--concurrency", "3"])
    assert args.pages == [0, 1, 2, 5] and args.concurrency == 3
    assert args.server == "ws://127.0.0.1:7088/ws" and args.output == Path(".")
    assert parser.parse_args(["serve", "--port", "9000"]).port == "9000"


def test_inputs_expand_and_pages_are_counted(tmp_path, two_page_pdf, table_png):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.PDF").write_bytes(two_page_pdf)
    (tmp_path / "one.pdf").write_bytes(two_page_pdf)
    (tmp_path / "scan.png").write_bytes(table_png)
    (tmp_path / "readme.txt").write_text("skipped")
    found = expand_inputs(
        [str(tmp_path), str(tmp_path / "**" / "*.PDF"), str(tmp_path / "one.pdf")]
    )
    assert found == [tmp_path / "one.pdf", tmp_path / "scan.png", tmp_path / "sub" / "deep.PDF"]
    assert count_pages(tmp_path / "one.pdf", None) == 2
    assert count_pages(tmp_path / "one.pdf", [1, 5]) == 1  # page 5 is past the end
    assert count_pages(tmp_path / "scan.png", [0, 1]) == 1  # an image is one page
    with pytest.raises(UsageError, match="would both be written"):
        output_names([tmp_path / "one.pdf", tmp_path / "x" / "one.png"])


def test_document_json_writes_figures_as_base64():
    figure = Block("figure", [1.0, 2.0, 3.0, 4.0], "", 0, "none", 0.9, image=b"\xff\xd8jpeg")
    page = ParsedPage(0, 10, 20, "none", [figure], "![figure](#page-0-figure-0)", {})
    chunk = Chunk("text", [0], [ChunkBox(0, [1.0, 2.0, 3.0, 4.0])])
    doc = Document("stop", "md", [chunk], [page], 1, {"total_ms": 1.0})
    record = json.loads(document_json(Path("x/fig.png"), doc))
    assert record["file"] == "fig.png"
    assert base64.b64decode(record["pages"][0]["blocks"][0]["image"]) == b"\xff\xd8jpeg"
    assert record["chunks"] == [
        {
            "text": "text",
            "pages": [0],
            "bboxes": [{"page": 0, "bbox": [1.0, 2.0, 3.0, 4.0]}],
            "headings": [],
        }
    ]


# A parse `page` frame and a chunk as the server sends them (docs/protocol.md): a heading, a
# nested list, code, and a table with a merged cell; and a block from a server before them.
NEW_PAGE_FRAME = {
    "type": "page",
    "id": 3,
    "page": 1,
    "pages": 2,
    "page_count": 2,
    "width": 1224,
    "height": 1584,
    "source": "pdf",
    "blocks": [
        {
            "type": "heading",
            "bbox": [100.0, 90.0, 600.0, 120.0],
            "text": "2.1 Data",
            "markdown": "### 2.1 Data",
            "order": 0,
            "source": "pdf",
            "score": 0.91,
            "level": 3,
        },
        {
            "type": "list",
            "bbox": [100.0, 130.0, 900.0, 220.0],
            "text": "First\nNested\nSecond",
            "markdown": "1. First\n   - Nested\n2. Second",
            "order": 1,
            "source": "pdf",
            "score": 0.88,
            "items": [
                {"text": "First", "level": 0, "marker": "1."},
                {"text": "Nested", "level": 1, "marker": "-"},
                {"text": "Second", "level": 0, "marker": "2."},
            ],
        },
        {
            "type": "code",
            "bbox": [100.0, 230.0, 900.0, 300.0],
            "text": "def f():\n    return 1",
            "markdown": "```\ndef f():\n    return 1\n```",
            "order": 2,
            "source": "pdf",
            "score": 0.8,
        },
        {
            "type": "table",
            "bbox": [100.0, 310.0, 900.0, 500.0],
            "text": "Name | Score\nA | 1 | 2",
            "markdown": '<table><tr><td rowspan="2">Name</td><td colspan="2">Score</td></tr>'
            "<tr><td>1</td><td>2</td></tr></table>",
            "order": 3,
            "source": "pdf",
            "score": 0.95,
            "html": '<table><tr><td rowspan="2">Name</td><td colspan="2">Score</td></tr>'
            "<tr><td>1</td><td>2</td></tr></table>",
            "cells": [
                {
                    "row": 0,
                    "col": 0,
                    "row_span": 2,
                    "col_span": 1,
                    "text": "Name",
                    "bbox": [100.0, 310.0, 300.0, 400.0],
                },
                {"row": 0, "col": 1, "row_span": 1, "col_span": 2, "text": "Score", "bbox": None},
                {"row": 1, "col": 1, "row_span": 1, "col_span": 1, "text": "1", "bbox": None},
                {"row": 1, "col": 2, "row_span": 1, "col_span": 1, "text": "2", "bbox": None},
            ],
        },
        # From a server before the structured fields: they stay empty.
        {
            "type": "figure_caption",
            "bbox": [100.0, 510.0, 900.0, 540.0],
            "text": "Figure 1: old",
            "order": 4,
            "source": "ocr",
            "score": 0.7,
        },
    ],
    "markdown": "### 2.1 Data\n\n...",
    "timing": {"layout_ms": 10.0, "total_ms": 20.0},
}


def test_parse_results_carry_the_blocks_structure_and_chunk_headings():
    page = ParsedPage.from_frame(NEW_PAGE_FRAME)
    heading, items, code, table, old = page.blocks
    assert (heading.type, heading.level, heading.markdown) == ("heading", 3, "### 2.1 Data")
    assert heading.items == [] and heading.cells == [] and heading.html is None

    assert items.items == [
        ListItem("First", 0, "1."),
        ListItem("Nested", 1, "-"),
        ListItem("Second", 0, "2."),
    ]
    assert items.level is None
    assert code.text == "def f():\n    return 1" and code.markdown.startswith("```\n")

    assert table.html is not None and table.html.startswith("<table>")
    assert table.cells[0] == Cell(0, 0, 2, 1, "Name", [100.0, 310.0, 300.0, 400.0])
    assert table.cells[1] == Cell(0, 1, 1, 2, "Score", None)
    assert [(c.row, c.col, c.text) for c in table.cells[2:]] == [(1, 1, "1"), (1, 2, "2")]

    assert (old.type, old.text, old.markdown, old.level, old.html) == (
        "figure_caption",
        "Figure 1: old",
        "",
        None,
        None,
    )
    assert old.items == [] and old.cells == []

    chunk = Chunk.from_dict(
        {
            "text": "### 2.1 Data\n\n1. First",
            "pages": [1],
            "bboxes": [{"page": 1, "bbox": [100.0, 90.0, 600.0, 120.0]}],
            "headings": ["2 Methods", "2.1 Data"],
        }
    )
    assert chunk.headings == ["2 Methods", "2.1 Data"]
    assert Chunk.from_dict({"text": "x", "pages": [0], "bboxes": []}).headings == []

    # The JSON of `ragws parse` keeps them, as the server sent them.
    doc = Document("stop", page.markdown, [chunk], [page], 2, {"total_ms": 1.0})
    record = json.loads(document_json(Path("paper.pdf"), doc))
    blocks = record["pages"][0]["blocks"]
    assert blocks[3]["cells"][0] == NEW_PAGE_FRAME["blocks"][3]["cells"][0]
    assert blocks[1]["items"] == NEW_PAGE_FRAME["blocks"][1]["items"]
    assert blocks[0]["level"] == 3
    assert record["chunks"][0]["headings"] == ["2 Methods", "2.1 Data"]
