"""One document over several connections (``parse_document(connections=, pages_per_request=)``,
``ragws parse --connections --pages-per-request``), against real servers on loopback.

The server runs in the test's event loop; the command line runs as a subprocess. The same
over three replicas behind HAProxy, with one of them killed, is in tests/test_replicas.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import sys
from pathlib import Path

import pymupdf
import pytest
from PIL import Image, ImageDraw, ImageFont

from ragws.client import AsyncClient, Client, Document, RagwsError, split

from . import documents


def same_pages(a: Document, b: Document) -> bool:
    """Equal but for the timings, which no two runs share."""
    return [dataclasses.replace(p, timing={}) for p in a.pages] == [
        dataclasses.replace(p, timing={}) for p in b.pages
    ]


async def parse_requests(server) -> float:
    return sum(
        [
            await server.metric("ragws_requests_total", {"type": "parse", "outcome": outcome})
            for outcome in ("ok", "cancelled", "overloaded", "shutdown")
        ]
    )


def test_page_ranges_and_their_size():
    assert split.page_ranges([0, 1, 2, 3, 4], 2) == [(0, 1), (2, 3), (4,)]
    assert split.page_ranges([7, 3, 5], 5) == [(7, 3, 5)]
    assert split.pages_per_request(10, 3, None, 300) == 4
    assert split.pages_per_request(10, 1, None, 4) == 4  # the server's max_pages caps it
    assert split.pages_per_request(10, 2, 3, 300) == 3
    with pytest.raises(ValueError, match="pages_per_request"):
        split.page_ranges([0], 0)


async def test_ranges_over_three_connections_give_the_document_of_one(start_server, paper_pdf):
    server = await start_server()
    arrived: list[int] = []
    async with AsyncClient.connect(server.ws_url) as client:
        whole = await client.parse_document(paper_pdf, text="pdf", chunk_chars=600)
        before = await parse_requests(server)
        ranged = await client.parse_document(
            paper_pdf,
            text="pdf",
            chunk_chars=600,
            connections=3,
            pages_per_request=2,
            on_page=lambda page: arrived.append(page.page),
        )
        sockets = await server.metric("ragws_websocket_connections")
    assert await parse_requests(server) - before == 5  # 10 pages in ranges of 2
    assert sockets == 3  # the client's own and two more, kept for the next document
    assert sorted(arrived) == list(range(documents.PAGES))
    assert ranged.markdown == whole.markdown
    assert ranged.chunks == whole.chunks and len(whole.chunks) > documents.PAGES
    assert same_pages(ranged, whole)
    assert ranged.page_count == documents.PAGES and ranged.finish_reason == "stop"
    assert ranged.timing["pages_per_s"] > 0
    # Without the document's style, the first range cannot tell the running header of its
    # second page from text (the first page has none): its pages differ from the whole's.
    async with AsyncClient.connect(server.ws_url) as client:
        naive = client.parse(paper_pdf, pages=[0, 1], text="pdf")
        async with naive:
            pages = [page async for page in naive]
    assert documents.RUNNING_HEADER in "".join(page.markdown for page in pages)
    assert documents.RUNNING_HEADER not in whole.markdown


async def test_a_selection_in_ranges_is_the_selection_parsed_whole(start_server, paper_pdf):
    server = await start_server()
    selection = [9, 0, 4, 5, 1]
    async with AsyncClient.connect(server.ws_url) as client:
        whole = await client.parse_document(paper_pdf, pages=selection, text="pdf")
        ranged = await client.parse_document(
            paper_pdf, pages=selection, text="pdf", connections=2, pages_per_request=2
        )
        with pytest.raises(RagwsError, match=r"out of range|past the end") as caught:
            await client.parse_document(paper_pdf, pages=[0, 99], text="pdf", connections=2)
    assert caught.value.code == "bad_request"
    assert (ranged.markdown, ranged.chunks) == (whole.markdown, whole.chunks)
    assert same_pages(ranged, whole)


async def test_over_max_pages_is_split_instead_of_refused(start_server, paper_pdf):
    small = await start_server(max_pages=4)
    large = await start_server()
    async with AsyncClient.connect(large.ws_url) as client:
        reference = await client.parse_document(paper_pdf, text="pdf")
    async with AsyncClient.connect(small.ws_url) as client:
        with pytest.raises(RagwsError) as refused:  # one request of every page: too large
            async for _ in client.parse(paper_pdf, text="pdf"):
                pass
        assert refused.value.code == "too_large"
        doc = await client.parse_document(paper_pdf, text="pdf")
    assert await small.metric("ragws_requests_total", {"type": "parse", "outcome": "ok"}) == 3
    assert (doc.markdown, doc.chunks) == (reference.markdown, reference.chunks)
    assert [page.page for page in doc.pages] == list(range(documents.PAGES))


class Cuttable:
    """A TCP relay to a server that can drop every connection through it at once."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.links: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.links |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for writer in self.links:
            writer.transport.abort()
        self.links.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_after_a_drop_only_the_unfinished_ranges_are_sent_again(start_server, paper_pdf):
    server = await start_server()
    relay = Cuttable(int(server.url.rsplit(":", 1)[1]))
    port = await relay.start()
    url = f"ws://127.0.0.1:{port}/ws"
    try:
        async with AsyncClient.connect(server.ws_url) as client:
            whole = await client.parse_document(paper_pdf, text="pdf")
        before = await parse_requests(server)
        async with AsyncClient.connect(url, backoff=0.05) as client:
            ranged = asyncio.create_task(
                client.parse_document(paper_pdf, text="pdf", connections=2, pages_per_request=2)
            )
            for _ in range(3000):  # one range done, and others in flight: cut them
                done = await server.metric(
                    "ragws_requests_total", {"type": "parse", "outcome": "ok"}
                )
                if done >= 1 and await server.metric("ragws_inflight_requests") >= 1:
                    break
                await asyncio.sleep(0.01)
            relay.cut()
            doc = await asyncio.wait_for(ranged, 120)
    finally:
        await relay.close()
    sent = await parse_requests(server) - before
    # Five ranges, each sent once, and those cut off (one per connection at most) once more.
    assert 5 < sent <= 5 + 2, sent
    assert await server.metric("ragws_requests_total", {"type": "parse", "outcome": "ok"}) >= 5
    assert (doc.markdown, doc.chunks) == (whole.markdown, whole.chunks)
    assert [page.page for page in doc.pages] == list(range(documents.PAGES))


def scanned_report(pages: int = 3) -> bytes:
    """A scan: pages that are pictures only, each with the same running header."""
    font = ImageFont.load_default(size=28)
    pdf = pymupdf.open()
    for number in range(pages):
        image = Image.new("RGB", (1224, 1584), "white")
        draw = ImageDraw.Draw(image)
        draw.text((110, 60), "Northfield Quarterly Review", fill="black", font=font)
        body = [f"Section {number + 1} reports on the harvest of the northern fields."] + [
            "The crops were sown late and the rain came early this year." for _ in range(3)
        ]
        for line, text in enumerate(body):
            draw.text((110, 400 + 48 * line), text, fill="black", font=font)
        png = io.BytesIO()
        image.save(png, "PNG")
        page = pdf.new_page(width=612, height=792)
        page.insert_image(page.rect, stream=png.getvalue())
    return pdf.tobytes()


async def test_put_together_as_the_server_does_running_headers_of_scans(start_server):
    # What a parse computes over all its pages at the end (running headers of OCR'd pages,
    # markdown, chunks) is computed again by the client from the pages alone.
    server = await start_server()
    async with AsyncClient.connect(server.ws_url) as client:
        stream = client.parse(scanned_report(), chunk_chars=300)
        async with stream:
            async for _ in stream:
                pass
    frames, doc = stream._frames, stream.result
    header = [
        b
        for frame in frames
        for b in frame["blocks"]
        if "Quarterly" in b["text"] and b["type"] != "header"
    ]
    assert len(header) == 3  # each page alone takes the header for text ...
    assert "Quarterly" not in doc.markdown  # ... the document knows it is furniture
    markdown, chunks = split.assemble(frames, chunk_chars=300, furniture=False)
    assert markdown == doc.markdown
    assert chunks == [dataclasses.asdict(chunk) for chunk in doc.chunks]


async def test_blocking_client_and_the_command_line(start_server, paper_pdf, tmp_path):
    server = await start_server()

    def blocking() -> tuple[Document, Document]:
        with Client.connect(server.ws_url) as client:
            whole = client.parse_document(paper_pdf, pages=[0, 1, 2], text="pdf")
            ranged = client.parse_document(
                paper_pdf, pages=[0, 1, 2], text="pdf", connections=3, pages_per_request=1
            )
        return whole, ranged

    whole, ranged = await asyncio.to_thread(blocking)
    assert (ranged.markdown, ranged.chunks) == (whole.markdown, whole.chunks)

    (tmp_path / "paper.pdf").write_bytes(paper_pdf)
    outputs = {}
    for name, flags in (("one", ()), ("split", ("--connections", "2", "--pages-per-request", "3"))):
        out = tmp_path / name
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ragws", "parse", str(tmp_path / "paper.pdf"),
            "--server", server.ws_url, "-o", str(out), "--text", "pdf", *flags,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(proc.communicate(), 180)
        assert proc.returncode == 0, stderr.decode()
        outputs[name] = out
    assert (outputs["split"] / "paper.md").read_text() == (outputs["one"] / "paper.md").read_text()
    one, ranged_record = (
        json.loads(Path(outputs[name] / "paper.json").read_text()) for name in ("one", "split")
    )
    assert ranged_record["chunks"] == one["chunks"]
    assert [p["page"] for p in ranged_record["pages"]] == list(range(documents.PAGES))
