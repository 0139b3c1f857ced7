"""The document workers on their own: real worker processes, real documents, real limits.

Results must be exactly what the same calls give in the test's own process; a task over its
time or memory must be answered ``timeout`` / ``too_large`` and its worker replaced, while the
other workers and the event loop go on. A Hypothesis round sends generated PDFs (random object
graphs, filters, nested form XObjects, image dictionaries) and image headers through a pool and
checks that every one is answered with a result or a client error, and that the event loop
never stalls.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import numpy as np
import pymupdf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ragws.errors import ErrorCode, RequestError
from ragws.pipeline.document_pool import DocumentPool
from ragws.pipeline.documents import PdfDocument, PdfFile, PdfLimits, decode_image
from ragws.runtime import fairness

from .hostile_documents import (
    chunky_png,
    declared_image_pdf,
    huge_page_pdf,
    nested_forms_pdf,
    page_pdf,
    raw_pdf,
    stream,
)

MIB = 2**20
LIMITS = PdfLimits(64 * MIB, 300, 40_000_000)
T = TypeVar("T")


def sample_pdf(pages: int = 3) -> bytes:
    """Pages with text, and on the first a ruled 3 × 3 table."""
    doc = pymupdf.open()
    for number in range(pages):
        page = doc.new_page(width=400, height=300)
        page.insert_text((40, 40), f"Section {number + 1}", fontsize=18)
        page.insert_text((40, 70), "Workers render what the server must not.", fontsize=11)
    table = doc[0]
    for row in range(4):
        table.draw_line((40, 100 + 30 * row), (340, 100 + 30 * row))
    for col in range(4):
        table.draw_line((40 + 100 * col, 100), (40 + 100 * col, 190))
    for row in range(3):
        for col in range(3):
            table.insert_text((50 + 100 * col, 120 + 30 * row), f"r{row}c{col}", fontsize=10)
    data = doc.tobytes()
    doc.close()
    return data


def png_of(pdf: bytes) -> bytes:
    with pymupdf.open(stream=pdf, filetype="pdf") as doc:
        return doc[0].get_pixmap().tobytes("png")


@pytest.fixture
async def make_pool() -> AsyncIterator[Callable[..., Coroutine[Any, Any, DocumentPool]]]:
    pools: list[DocumentPool] = []

    async def make(workers: int = 2, memory_mb: int = 512, timeout_s: float = 10.0) -> DocumentPool:
        pool = DocumentPool(workers, memory_mb, timeout_s)
        await pool.start()
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.stop()


async def open_pdf(pool: DocumentPool, data: bytes) -> PdfFile:
    path = await pool.store(data)
    unopened = PdfFile(path, 0, LIMITS)
    count = await pool.run(PdfDocument.count_pages, doc=unopened, what="opening the pdf")
    return PdfFile(path, count, LIMITS)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def refused(call: Coroutine[Any, Any, Any]) -> RequestError:
    with pytest.raises(RequestError) as error:
        await call
    return error.value


# --- results ------------------------------------------------------------------------------


async def test_results_are_those_of_the_same_calls_in_process(make_pool):
    pool = await make_pool()
    pdf = sample_pdf(3)
    doc = await open_pdf(pool, pdf)
    assert doc.page_count == 3
    local = PdfDocument.open(pdf, LIMITS)
    # The pages of one document on both workers at once.
    pages = await asyncio.gather(
        *(pool.run(PdfDocument.render, p, 2.0, doc=doc, what=f"page {p}") for p in range(3))
    )
    for number, rgb in enumerate(pages):
        assert rgb.shape == (600, 800, 3) and np.array_equal(rgb, local.render(number, 2.0))
    text = await pool.run(PdfDocument.text, 0, doc=doc, what="text")
    assert text == local.text(0)
    assert any(line.text == "Section 1" for line in text[0])
    words = await pool.run(PdfDocument.words, 2, doc=doc, what="words")
    assert words == local.words(2) and words[0][4] == "Section"
    table = await pool.run(PdfDocument.table, 0, (30, 90, 350, 200), doc=doc, what="table")
    assert table is not None and table == local.table(0, (30, 90, 350, 200))
    assert {cell.text for cell in table.cells} >= {"r0c0", "r2c2"}
    png = png_of(pdf)
    assert np.array_equal(await pool.decode_image(png, 10**7), decode_image(png, 10**7))
    big = np.asarray(Image.new("RGB", (3000, 2000), (200, 30, 30)))  # over a file's worth
    out = io.BytesIO()
    Image.fromarray(big).save(out, format="PNG", compress_level=0)
    assert np.array_equal(await pool.decode_image(out.getvalue(), 10**7), big)
    pool.discard(doc.path)
    assert not os.path.exists(doc.path)
    local.close()


async def test_client_errors_are_those_of_the_same_calls_in_process(make_pool):
    pool = await make_pool(workers=1)
    encrypted = pymupdf.open(stream=sample_pdf(1), filetype="pdf").tobytes(
        encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw="o", user_pw="u"
    )
    for data, says in (
        (b"%PDF-1.7\n" + os.urandom(300), "pdf cannot be opened"),
        (encrypted, "needs a password"),
        (
            raw_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] >>"]),
            "no pages",
        ),
    ):
        error = await refused(open_pdf(pool, data))
        assert error.code is ErrorCode.BAD_REQUEST and says in error.message, error.message
    # A GIF header declaring 64×64, then bytes that are no GIF block. (Random bytes there can
    # declare a frame over the pixel cap, which is answered too_large instead.)
    garbage = b"GIF89a" + (64).to_bytes(2, "little") * 2 + b"\x00\x00\x00" + b"\xff" * 33
    error = await refused(pool.decode_image(garbage, 10**7))
    assert error.code is ErrorCode.BAD_REQUEST, error.message
    error = await refused(pool.decode_image(png_of(sample_pdf(1)), 1000))
    assert error.code is ErrorCode.TOO_LARGE and "400×300" in error.message
    assert pool.workers == 1  # client errors cost no worker


# --- limits ---------------------------------------------------------------------------------


async def test_a_task_over_its_time_is_answered_timeout_and_its_worker_replaced(make_pool):
    pool = await make_pool(workers=2, timeout_s=1.0)
    before = set(pool.pids())
    doc = await open_pdf(pool, nested_forms_pdf())  # a line drawn 10^8 times: ~30 s
    started = time.monotonic()
    error = await refused(pool.run(PdfDocument.render, 0, 1.0, doc=doc, what="rendering page 0"))
    assert error.code is ErrorCode.TIMEOUT
    assert "rendering page 0 took longer than 1 s (document_timeout_s)" in error.message
    assert time.monotonic() - started < 5.0
    await until(lambda: pool.workers == 2)
    after = set(pool.pids())
    assert len(after - before) == 1 and len(before - after) == 1
    (killed,) = before - after
    assert not os.path.exists(f"/proc/{killed}")  # killed and reaped
    again = await open_pdf(pool, sample_pdf(1))
    assert (await pool.run(PdfDocument.render, 0, 1.0, doc=again, what="x")).shape == (300, 400, 3)


async def test_a_task_over_its_memory_is_answered_too_large_and_its_worker_replaced(make_pool):
    pool = await make_pool(workers=1, memory_mb=128)
    (first,) = pool.pids()
    # 6000 × 6000 points at scale 1 is under the pixel cap, and 108 MB of pixels twice over.
    doc = await open_pdf(pool, huge_page_pdf())
    error = await refused(pool.run(PdfDocument.render, 0, 1.0, doc=doc, what="rendering page 0"))
    assert error.code is ErrorCode.TOO_LARGE
    assert error.message == "rendering page 0 needs more than 128 MiB (document_worker_memory_mb)"
    await until(lambda: pool.workers == 1 and pool.pids() != [first])
    error = await refused(pool.run(bytearray, 512 * MIB, what="allocating"))
    assert error.code is ErrorCode.TOO_LARGE
    small = await open_pdf(pool, sample_pdf(1))
    assert (await pool.run(PdfDocument.render, 0, 1.0, doc=small, what="x")).shape == (300, 400, 3)


async def test_images_over_the_pixel_cap_are_refused_before_they_decode(make_pool):
    pool = await make_pool(workers=1)
    for name in (b"JBIG2Decode", b"FlateDecode", b"DCTDecode"):
        doc = await open_pdf(pool, declared_image_pdf(130_000, name))
        started = time.monotonic()
        error = await refused(pool.run(PdfDocument.render, 0, 2.0, doc=doc, what="rendering"))
        assert error.code is ErrorCode.TOO_LARGE and time.monotonic() - started < 2.0
        assert "page 0 draws an image of 130000×130000" in error.message, error.message
    # Drawn through a form XObject, the same.
    image = stream(
        b"/Type /XObject /Subtype /Image /Width 90000 /Height 90000 /BitsPerComponent 8 "
        b"/ColorSpace /DeviceGray",
        b"\x00" * 16,
    )
    form = stream(
        b"/Type /XObject /Subtype /Form /BBox [0 0 400 300] "
        b"/Resources << /XObject << /I 6 0 R >> >>",
        b"q 400 0 0 300 0 0 cm /I Do Q",
    )
    doc = await open_pdf(pool, page_pdf(b"/F Do", b"<< /XObject << /F 5 0 R >> >>", [form, image]))
    error = await refused(pool.run(PdfDocument.render, 0, 1.0, doc=doc, what="rendering"))
    assert error.code is ErrorCode.TOO_LARGE and "90000×90000" in error.message


async def test_image_headers_are_walked_within_a_bound(make_pool):
    pool = await make_pool(workers=1)
    started = time.monotonic()
    error = await refused(pool.decode_image(chunky_png(200_000), 10**7))  # Pillow: ~1.6 s
    assert error.code is ErrorCode.TOO_LARGE and "65536 chunks" in error.message
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(jpeg, format="JPEG")
    stray = jpeg.getvalue()[:2] + b"\x00" * 200_000 + jpeg.getvalue()[2:]  # read a byte a time
    error = await refused(pool.decode_image(stray, 10**7))
    assert error.code is ErrorCode.TOO_LARGE
    gif = io.BytesIO()
    Image.new("P", (32, 32)).save(gif, format="GIF")
    comments = b"!\xfe" + b"\x01x" * 100_000 + b"\x00"  # a comment of 100 000 sub-blocks
    padded = gif.getvalue()[:-1].replace(b",", comments + b",", 1) + b";"
    error = await refused(pool.decode_image(padded, 10**7))
    assert error.code is ErrorCode.TOO_LARGE
    assert time.monotonic() - started < 5.0
    # Images with a usual handful of chunks and markers decode as before.
    for image in (chunky_png(20), jpeg.getvalue(), gif.getvalue()):
        assert (await pool.decode_image(image, 10**7)).shape[:2] in ((64, 64), (32, 32))


async def test_a_crash_or_a_kill_fails_only_its_task(make_pool):
    pool = await make_pool(workers=2)
    error = await refused(pool.run(os.abort, what="decoding the image"))
    assert error.code is ErrorCode.TOO_LARGE
    assert error.message == (
        "decoding the image ended its document worker (signal SIGABRT), most likely out of "
        "its 512 MiB (document_worker_memory_mb)"
    )
    await until(lambda: pool.workers == 2)
    # Killed from outside, as the kernel's out-of-memory killer does: too_large.
    sleeping = asyncio.ensure_future(pool.run(time.sleep, 30, what="rendering page 4"))
    other = asyncio.ensure_future(pool.run(time.sleep, 0.5, what="rendering page 5"))
    await asyncio.sleep(0.2)
    os.kill(pool.pids()[0], signal.SIGKILL)
    await asyncio.wait([sleeping, other], return_when=asyncio.FIRST_EXCEPTION)
    failed = [task for task in (sleeping, other) if task.done() and task.exception()]
    assert len(failed) == 1, failed
    error = failed[0].exception()
    assert isinstance(error, RequestError) and error.code is ErrorCode.TOO_LARGE, error
    sleeping.cancel()
    await until(lambda: pool.workers == 2)


async def test_cancelling_a_running_task_frees_its_worker(make_pool):
    pool = await make_pool(workers=1)
    (first,) = pool.pids()
    stuck = asyncio.ensure_future(pool.run(time.sleep, 60, what="rendering page 0"))
    await asyncio.sleep(0.2)
    stuck.cancel()
    started = time.monotonic()
    assert await pool.run(os.getpid, what="next") != first  # a new worker, at once
    assert time.monotonic() - started < 5.0


async def test_stop_kills_a_stuck_render_without_waiting(make_pool):
    pool = await make_pool(workers=2)
    doc = await open_pdf(pool, nested_forms_pdf())
    stuck = asyncio.ensure_future(pool.run(PdfDocument.render, 0, 1.0, doc=doc, what="render"))
    waiting = [asyncio.ensure_future(pool.run(time.sleep, 30, what="w")) for _ in range(3)]
    await asyncio.sleep(0.3)
    pids = pool.pids()
    started = time.monotonic()
    await pool.stop()
    assert time.monotonic() - started < 5.0
    for task in (stuck, *waiting):
        error = await refused(task)
        assert error.code is ErrorCode.UNAVAILABLE
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    assert not os.path.exists(os.path.dirname(doc.path))  # the spool is gone


async def test_clients_are_served_in_turn(make_pool):
    pool = await make_pool(workers=1)
    finished: list[str] = []

    async def task(client: str, name: str, seconds: float) -> None:
        with fairness.client_scope(client):
            await pool.run(time.sleep, seconds, what=name)
        finished.append(name)

    burst = [asyncio.ensure_future(task("a", f"a{n}", 0.2)) for n in range(5)]
    await asyncio.sleep(0.05)
    single = asyncio.ensure_future(task("b", "b0", 0.0))
    await asyncio.gather(*burst, single)
    # One of a's tasks runs, one more took the next turn; then b's, not after all of a's.
    assert finished.index("b0") <= 2, finished


async def test_a_worker_more_serves_others_while_every_worker_is_held(make_pool):
    pool = await make_pool(workers=1, timeout_s=10.0)
    (first,) = pool.pids()
    with fairness.client_scope("a"):
        held = asyncio.ensure_future(pool.run(time.sleep, 4, what="rendering page 0"))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    with fairness.client_scope("b"):
        other = await pool.run(os.getpid, what="decoding the image")
    assert time.monotonic() - started < 3.0  # not after the 4 s the first one holds its worker
    assert other != first and not held.done()
    await held
    await until(lambda: pool.pids() == [first])  # the extra worker goes once idle


async def test_workers_run_tasks_at_once(make_pool):
    pool = await make_pool(workers=2)
    started = time.monotonic()
    await asyncio.gather(*(pool.run(time.sleep, 1.5, what="w") for _ in range(4)))
    assert time.monotonic() - started < 5.0  # 6 s one after another


# --- generated documents (Hypothesis) -----------------------------------------------------------


class LoopThread:
    """An event loop in a thread with a pool on it, and a probe that records how late the
    loop runs a 10 ms timer: the loop must never stall whatever the workers are given."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pool = DocumentPool(2, 256, 2.0)
        self.call(self.pool.start())
        self.worst_lag = 0.0
        self.probe = asyncio.run_coroutine_threadsafe(self._probe(), self.loop)

    async def _probe(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(0.01)
            self.worst_lag = max(self.worst_lag, time.monotonic() - started - 0.01)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.probe.cancel()
        self.call(self.pool.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


FILTERS = [
    b"",
    b"/Filter /FlateDecode",
    b"/Filter /ASCIIHexDecode",
    b"/Filter /ASCII85Decode",
    b"/Filter /LZWDecode",
    b"/Filter /RunLengthDecode",
    b"/Filter /DCTDecode",
    b"/Filter /JPXDecode",
    b"/Filter /JBIG2Decode",
    b"/Filter /CCITTFaxDecode /DecodeParms << /K -1 /Columns 64 >>",
    b"/Filter [/FlateDecode /ASCIIHexDecode]",
    b"/Filter /FlateDecode /DecodeParms << /Predictor 15 /Columns 9999999 >>",
]
OPERATORS = [
    b"0 0 m 300 200 l S",
    b"q 2 0 0 2 0 0 cm",
    b"Q",
    b"BT /F1 12 Tf 20 20 Td (hostile) Tj ET",
    b"10 10 200 100 re f",
    b"BI /W 4 /H 4 /BPC 8 /CS /G ID " + bytes(range(16)) + b" EI",  # an inline image
    b"1 0 0 RG 0 0 1 rg",
    b"[ 1 2 ] 0 d",
]
SIDES = [0, 1, 7, 300, 5000, 70_000, -4, 2**31]


def encoded(data: bytes, filters: bytes) -> bytes:
    """The data as its filter says, for the filters that can be written here; garbage else."""
    if filters == b"/Filter /FlateDecode":
        return zlib.compress(data)
    if filters == b"/Filter /ASCIIHexDecode":
        return data.hex().encode() + b">"
    return data


@st.composite
def generated_pdfs(draw: st.DrawFn) -> bytes:
    forms = draw(st.integers(0, 6))
    images = draw(st.integers(0, 3))
    first_form, first_image = 5, 5 + forms
    names = [b"/X%d" % n for n in range(forms)] + [b"/I%d" % n for n in range(images)]
    xobjects = b" ".join(b"/X%d %d 0 R" % (n, first_form + n) for n in range(forms)) + b" ".join(
        b" /I%d %d 0 R" % (n, first_image + n) for n in range(images)
    )
    resources = b"<< /XObject << %s >> /Font << /F1 << /Type /Font /Subtype /Type1 " % xobjects
    resources += b"/BaseFont /Helvetica >> >> >>"

    def content() -> bytes:
        ops = draw(st.lists(st.sampled_from(OPERATORS), max_size=6))
        draws = draw(st.lists(st.sampled_from(names), min_size=1, max_size=6)) if names else []
        noise = draw(st.binary(max_size=24))
        return b"\n".join([*ops, *(name + b" Do" for name in draws), noise])

    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        draw(
            st.sampled_from(
                [
                    b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                    b"<< /Type /Pages /Kids [3 0 R 2 0 R] /Count 2 >>",  # a cycle
                    b"<< /Type /Pages /Kids [3 0 R] /Count 99 >>",
                ]
            )
        ),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Contents 4 0 R /Resources %s >>"
        % (draw(st.sampled_from([400, 0, 20000])), 300, resources),
    ]
    # Forms draw forms, themselves included (nesting and cycles), and the page the first and
    # each form the next ``repeat`` times: up to 12^6 draws of the last.
    repeat = draw(st.sampled_from([0, 1, 3, 12]))
    filters = draw(st.sampled_from(FILTERS))
    first = b"\n/X0 Do" * repeat if forms else b""
    objects.append(stream(filters, encoded(content() + first, filters)))
    for form in range(forms):
        filters = draw(st.sampled_from(FILTERS[:3]))
        nested = b"\n/X%d Do" % (form + 1) * repeat
        objects.append(
            stream(
                b"/Type /XObject /Subtype /Form /BBox [0 0 400 300] /Resources %s %s"
                % (resources, filters),
                encoded(content() + (nested if form + 1 < forms else b""), filters),
            )
        )
    for _ in range(images):
        filters = draw(st.sampled_from(FILTERS))
        objects.append(
            stream(
                b"/Type /XObject /Subtype /Image /Width %d /Height %d /BitsPerComponent %d "
                b"/ColorSpace %s %s"
                % (
                    draw(st.sampled_from(SIDES)),
                    draw(st.sampled_from(SIDES)),
                    draw(st.sampled_from([1, 2, 8, 16, 3])),
                    draw(
                        st.sampled_from([b"/DeviceGray", b"/DeviceRGB", b"/DeviceCMYK", b"/Nope"])
                    ),
                    filters,
                ),
                encoded(draw(st.binary(max_size=300)), filters),
            )
        )
    pdf = raw_pdf(objects)
    cut = draw(st.sampled_from([None, None, None, len(pdf) // 2, len(pdf) - 40]))
    return pdf if cut is None else pdf[:cut]


@st.composite
def generated_images(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["png", "jpeg", "gif"]))
    out = io.BytesIO()
    Image.new("RGB", (draw(st.integers(1, 40)), draw(st.integers(1, 40))), "white").save(
        out, format=kind.upper()
    )
    data = out.getvalue()
    head = {"png": 33, "jpeg": 2, "gif": 13}[kind]
    junk = draw(st.binary(max_size=200))
    repeats = draw(st.sampled_from([1, 10, 1000, 70_000]))
    at = draw(st.sampled_from([head, len(data) // 2, len(data)]))
    return data[:at] + junk * repeats + data[at:]


ANSWERS = {ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE, ErrorCode.TIMEOUT}


async def answer(pool: DocumentPool, pdf: bytes) -> list[str]:
    """Open the PDF, render its first page and read its text: what each step came to."""
    outcomes = []
    try:
        doc = await open_pdf(pool, pdf)
    except RequestError as error:
        assert error.code in ANSWERS, error.message
        return [error.code.value]
    try:
        for fn, args in ((PdfDocument.render, (0, 1.0)), (PdfDocument.text, (0,))):
            try:
                await pool.run(fn, *args, doc=doc, what=fn.__name__)
                outcomes.append("ok")
            except RequestError as error:
                assert error.code in ANSWERS, error.message
                outcomes.append(error.code.value)
    finally:
        pool.discard(doc.path)
    return outcomes


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(pdf=generated_pdfs(), image=generated_images())
def test_generated_documents_are_all_answered_and_the_loop_never_stalls(
    loop_thread: LoopThread, pdf: bytes, image: bytes
):
    assert loop_thread.call(answer(loop_thread.pool, pdf))
    try:
        loop_thread.call(loop_thread.pool.decode_image(image, 10**6))
    except RequestError as error:
        assert error.code in ANSWERS, error.message
    loop_thread.call(until(lambda: loop_thread.pool.workers == 2))  # a killed one is replaced
    # A render on the loop would stall it for the whole timeout (2 s) and more; a loaded
    # machine delays a 10 ms timer by a tenth of that at most.
    assert loop_thread.worst_lag < 1.0, f"the event loop stalled {loop_thread.worst_lag:.2f} s"
