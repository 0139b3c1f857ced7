"""The viewer (static/index.html) and the JS client (static/ragws.js) in headless Chromium.

A real server with the real embedded models, a real browser (the system's Chromium, driven by
Playwright), real clicks. Screenshots of each state go to test-output/browser/. Without
/usr/bin/chromium the tests skip, except under CI, where a missing browser is a failure.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pymupdf
import pytest

from . import documents
from .conftest import render_png

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "test-output" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
TIMEOUT_MS = 60_000
TITLE_START = " ".join(documents.TITLE.split()[:2])  # on the title's first line


def _require_browser() -> None:
    missing = None
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing = "playwright is not installed (pip install -e '.[test]')"
    if missing is None and not CHROMIUM.is_file():
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    if missing is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"the browser tests must run under CI: {missing}")
    pytest.skip(missing)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    _require_browser()
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=TIMEOUT_MS)
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


class Viewer:
    """A browser page on the server's viewer, with what tests need from it."""

    def __init__(self, page: Any, name: str) -> None:
        self.page = page
        self.name = name
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on(
            "console",
            lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None,
        )
        page.set_default_timeout(TIMEOUT_MS)

    def get(self, testid: str) -> Any:
        return self.page.get_by_test_id(testid)

    async def shot(self, step: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(SHOTS / f"{self.name}-{step}.png"), full_page=False)

    async def open(self, url: str) -> None:
        from playwright.async_api import expect

        await self.page.goto(url + "/")
        await expect(self.get("conn-state")).to_have_attribute("data-state", "open")
        await expect(self.get("conn-state")).to_contain_text("layout: embedded")

    async def region_index(self, page: int | None, klass: str, pick: str) -> tuple[int, int]:
        """(page, data-index) of a region of ``klass``, on ``page`` or on any page when None:
        the topmost one, or the largest."""
        return tuple(
            await self.page.evaluate(
                """([page, klass, pick]) => {
                const within = page === null ? ".page" : `.page[data-page="${page}"]`;
                const regions = [...document.querySelectorAll(
                    `${within} .region[data-class="${klass}"]`)];
                const box = (r) => r.dataset.box.split(",").map(Number);
                const key = pick === "top"
                    ? (r) => box(r)[1]
                    : (r) => -(box(r)[2] - box(r)[0]) * (box(r)[3] - box(r)[1]);
                regions.sort((a, b) => key(a) - key(b));
                const found = regions[0];
                return [Number(found.closest(".page").dataset.page), Number(found.dataset.index)];
            }""",
                [page, klass, pick],
            )
        )

    def region(self, page: int, index: int) -> Any:
        return self.page.locator(f'.page[data-page="{page}"] .region[data-index="{index}"]')

    async def horizontal_overflow(self) -> int:
        return await self.page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )


def pdf_pages(pdf: bytes, count: int) -> bytes:
    """The first ``count`` pages of a PDF, as a new PDF."""
    with pymupdf.open(stream=pdf, filetype="pdf") as src, pymupdf.open() as out:
        out.insert_pdf(src, from_page=0, to_page=count - 1)
        return out.tobytes()


async def wait_metric(server: Any, name: str, labels: dict[str, str], value: float) -> float:
    got = 0.0
    for _ in range(100):
        got = await server.metric(name, labels)
        if got == value:
            break
        await asyncio.sleep(0.05)
    return got


async def test_viewer_pages_regions_ocr_stop_parse(start_server, browser, documents_dir):
    from playwright.async_api import expect

    server = await start_server(ocr_line_batch_size=1)  # a region's lines stream one by one
    viewer = Viewer(await browser.new_page(viewport={"width": 1440, "height": 1000}), "desktop")
    await viewer.open(server.url)
    await expect(viewer.get("parse-button")).to_be_disabled()
    await viewer.shot("01-connected")

    # Open the paper: pages appear as they are rendered, with their regions.
    await viewer.page.set_input_files("#file-input", str(documents_dir / "paper.pdf"))
    first = viewer.page.locator('.page[data-page="0"] .region')
    await expect(first.first).to_be_attached()
    assert await first.count() > 5
    pages = documents.PAGES
    await expect(viewer.get("message")).to_contain_text(f"{pages} of {pages} pages analysed")
    await expect(viewer.get("page")).to_have_count(pages)
    assert await viewer.page.eval_on_selector_all(
        ".page", "pages => pages.map(p => Number(p.dataset.page))"
    ) == list(range(pages))
    legend = viewer.get("legend-item")
    classes = await legend.evaluate_all("items => items.map(i => i.dataset.class)")
    assert {"title", "text", "figure"} <= set(classes), classes
    await viewer.shot("02-pages")

    # Hiding a class hides its regions; showing it brings them back.
    titles = viewer.page.locator('.region[data-class="title"]')
    await legend.filter(has_text="title").get_by_role("checkbox").uncheck()
    await expect(titles.first).to_be_hidden()
    await legend.filter(has_text="title").get_by_role("checkbox").check()
    await expect(titles.first).to_be_visible()

    # The title region: its text streams into the side panel.
    await viewer.region(*await viewer.region_index(0, "title", "top")).click()
    await expect(viewer.get("ocr-text")).to_contain_text(TITLE_START)
    await expect(viewer.get("ocr-status")).to_have_attribute("data-state", "done")
    await expect(viewer.get("ocr-region")).to_have_text("title on page 1")
    await viewer.shot("03-ocr-title")

    # A large body-text region, stopped while its lines stream.
    cancelled = {"type": "ocr", "outcome": "cancelled"}
    assert await server.metric("ragws_requests_total", cancelled) == 0
    await viewer.region(*await viewer.region_index(None, "text", "largest")).click()
    await expect(viewer.get("ocr-text")).not_to_be_empty()
    await expect(viewer.get("ocr-stop")).to_be_visible()
    await viewer.get("ocr-stop").click()
    await expect(viewer.get("ocr-status")).to_have_attribute("data-state", "stopped")
    await expect(viewer.get("ocr-status")).to_contain_text("Stopped after")
    await expect(viewer.get("ocr-stop")).to_be_hidden()
    assert await wait_metric(server, "ragws_requests_total", cancelled, 1) == 1
    await viewer.shot("04-ocr-stopped")

    # Parse the first two pages: progress per page, then the markdown.
    await viewer.get("parse-pages").fill("1-2")
    await viewer.get("parse-button").click()
    await expect(viewer.get("tab-parse")).to_have_attribute("aria-selected", "true")
    await expect(viewer.get("parse-page-list").locator("li")).to_have_count(2)
    await expect(viewer.get("parse-status")).to_have_attribute(
        "data-state", "done", timeout=120_000
    )
    await expect(viewer.page.locator('#parse-page-list li[data-state="done"]')).to_have_count(2)
    heading = viewer.get("markdown-rendered").locator("h1")
    await expect(heading).to_contain_text(TITLE_START)
    assert await viewer.get("markdown-rendered").locator("p").count() > 3
    await expect(viewer.get("parse-summary")).to_contain_text("chunk")
    await viewer.shot("05-parsed")

    await viewer.get("view-raw").click()
    await expect(viewer.get("markdown-raw")).to_be_visible()
    await expect(viewer.get("markdown-raw")).to_contain_text(f"# {TITLE_START}")
    await expect(viewer.get("markdown-rendered")).to_be_hidden()
    await viewer.shot("06-parsed-raw")

    async with viewer.page.expect_download() as download_md:
        await viewer.get("download-md").click()
    download = await download_md.value
    assert download.suggested_filename == "paper.md"
    assert f"\n# {TITLE_START}" in "\n" + Path(await download.path()).read_text()
    async with viewer.page.expect_download() as download_json:
        await viewer.get("download-json").click()
    download = await download_json.value
    assert download.suggested_filename == "paper.json"
    import json

    body_json = json.loads(Path(await download.path()).read_text())
    assert [p["page"] for p in body_json["pages"]] == [0, 1]
    assert body_json["chunks"] and body_json["markdown"].startswith(f"# {TITLE_START}")

    # A page range past the end is caught before anything is sent.
    await viewer.get("parse-pages").fill(f"{pages - 1}-{pages + 1}")
    await viewer.get("parse-button").click()
    await expect(viewer.get("parse-status")).to_have_attribute("data-state", "error")
    await expect(viewer.get("parse-status")).to_contain_text(f"{pages} pages")
    assert viewer.errors == []


async def test_viewer_image_by_drop_and_errors(start_server, browser, tmp_path, table_png):
    """An image dropped on the page: shown, its layout drawn, a region read; a file the
    server cannot read: its error in plain words."""
    from playwright.async_api import expect

    server = await start_server()
    viewer = Viewer(await browser.new_page(viewport={"width": 1200, "height": 800}), "image")
    await viewer.open(server.url)

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    await viewer.page.set_input_files("#file-input", str(broken))
    await expect(viewer.get("error")).to_be_visible()
    await expect(viewer.get("error")).to_contain_text("Could not analyse broken.png")
    await expect(viewer.get("error")).to_contain_text("the server could not use this input")
    await expect(viewer.get("dropzone")).to_be_visible()
    await expect(viewer.get("parse-button")).to_be_disabled()
    await viewer.shot("01-bad-image")

    # Drag and drop, as a person would from a file manager.
    data = base64.b64encode(table_png).decode()
    transfer = await viewer.page.evaluate_handle(
        """(data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "table1.png", { type: "image/png" }));
            return transfer;
        }""",
        data,
    )
    await viewer.get("pages").dispatch_event("dragenter", {"dataTransfer": transfer})
    await expect(viewer.page.locator("#drop-overlay")).to_be_visible()
    await viewer.get("pages").dispatch_event("drop", {"dataTransfer": transfer})
    await expect(viewer.page.locator("#drop-overlay")).to_be_hidden()
    await expect(viewer.get("message")).to_contain_text("table1.png: analysed in")
    await expect(viewer.get("error")).to_be_hidden()
    await expect(viewer.get("page")).to_have_count(1)
    classes = await viewer.get("region").evaluate_all("rs => rs.map(r => r.dataset.class)")
    assert "table" in classes, classes
    await expect(viewer.get("parse-pages")).to_be_disabled()  # an image is one page

    await viewer.region(*await viewer.region_index(0, "table", "largest")).click()
    await expect(viewer.get("ocr-status")).to_have_attribute("data-state", "done")
    await expect(viewer.get("ocr-text")).to_contain_text("Memory (GB)")
    await viewer.shot("02-image-ocr")

    await viewer.get("parse-button").click()
    await expect(viewer.get("parse-status")).to_have_attribute("data-state", "done")
    await expect(viewer.get("markdown-raw")).to_contain_text("Memory (GB)")
    await viewer.shot("03-image-parsed")
    assert viewer.errors == []


PANEL_HITS = """() => {
  // What a tap at points across the docked results panel would reach.
  const panel = document.getElementById("panel");
  const r = panel.getBoundingClientRect();
  const points = [
    [r.left + r.width / 2, r.top + r.height / 2],
    [r.left + r.width / 4, r.top + 20],
    [r.left + (3 * r.width) / 4, r.top + 20],
    [r.left + 20, r.bottom - 20],
  ];
  return points.map(([x, y]) => {
    const hit = document.elementFromPoint(x, y);
    return panel.contains(hit) ? "panel" : `${hit?.tagName}.${hit?.className}`;
  });
}"""


async def touch_drag(page: Any, start: tuple[float, float], end: tuple[float, float]) -> float:
    """A one-finger drag, as the touchscreen sends it (Playwright's own API only taps).
    Returns how far the page scrolled while the finger was down."""
    cdp = await page.context.new_cdp_session(page)
    send = cdp.send
    before = await page.evaluate("scrollY")
    await send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [point(start)]})
    for step in range(1, 9):
        at = (start[0] + (end[0] - start[0]) * step / 8, start[1] + (end[1] - start[1]) * step / 8)
        await send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point(at)]})
    scrolled = await page.evaluate("scrollY") - before
    await send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    await cdp.detach()
    return scrolled


def point(at: tuple[float, float]) -> dict[str, float]:
    return {"x": at[0], "y": at[1]}


async def test_viewer_at_phone_width(start_server, browser, paper_pdf):
    from playwright.async_api import expect

    server = await start_server()
    viewer = Viewer(
        await browser.new_page(
            viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
        ),
        "phone",
    )
    await viewer.open(server.url)
    for testid in ("conn-state", "parse-button", "parse-pages", "dropzone"):
        await expect(viewer.get(testid)).to_be_in_viewport()
    await expect(viewer.page.locator("#file-label")).to_be_in_viewport()
    assert await viewer.horizontal_overflow() == 0
    await viewer.shot("01-empty")

    two_pages = {"name": "paper-2p.pdf", "mimeType": "application/pdf"}
    two_pages["buffer"] = pdf_pages(paper_pdf, 2)
    await viewer.page.set_input_files("#file-input", two_pages)
    await expect(viewer.get("message")).to_contain_text("2 of 2 pages analysed")
    assert await viewer.page.locator('.page[data-page="0"] .region').count() > 5
    assert await viewer.horizontal_overflow() == 0
    await expect(viewer.get("legend")).to_be_visible()
    await viewer.shot("02-pages")

    await viewer.region(*await viewer.region_index(0, "title", "top")).click()
    await expect(viewer.get("ocr-text")).to_contain_text(TITLE_START)
    await expect(viewer.get("ocr-text")).to_be_in_viewport()
    assert await viewer.horizontal_overflow() == 0
    await viewer.shot("03-ocr")

    # A large region selected, its lines marked, scrolled under the docked panel: the panel
    # stays on top of it, to the eye and to the finger.
    body = viewer.region(*await viewer.region_index(0, "text", "largest"))
    await body.click()
    await expect(viewer.get("ocr-status")).to_have_attribute("data-state", "done")
    await expect(body).to_have_attribute("aria-pressed", "true")
    panel_box = await viewer.page.locator("#panel").bounding_box()
    region_box = await body.bounding_box()
    middle = region_box["y"] + region_box["height"] / 2
    await viewer.page.evaluate("(dy) => window.scrollBy(0, dy)", middle - panel_box["y"])
    await viewer.page.wait_for_function(
        """(id) => {
            const region = document.querySelector(id).getBoundingClientRect();
            const panel = document.getElementById("panel").getBoundingClientRect();
            return region.top < panel.top && region.bottom > panel.top + 40;
        }""",
        arg=f'.page[data-page="0"] .region[data-index="{await body.get_attribute("data-index")}"]',
    )
    assert await viewer.page.locator(".ocr-line").count() > 0
    assert await viewer.page.evaluate(PANEL_HITS) == ["panel"] * 4
    await viewer.shot("04-region-under-panel")
    await viewer.get("tab-parse").click(timeout=5_000)  # fails if anything intercepts it
    await expect(viewer.get("tab-parse")).to_have_attribute("aria-selected", "true")
    await viewer.get("tab-ocr").click(timeout=5_000)
    await expect(viewer.get("ocr-text")).to_be_visible()

    # Draw mode on page 2, then a finger drags a rectangle over its top: the page does not
    # scroll, and the drawn region is read.
    second = viewer.page.locator('.page[data-page="1"]')
    await second.get_by_test_id("draw-toggle").tap()
    await expect(second.get_by_test_id("draw-toggle")).to_have_attribute("aria-pressed", "true")
    await second.locator("img").evaluate("img => img.scrollIntoView({block: 'start'})")
    sheet = await second.locator("img").bounding_box()
    scrolled = await touch_drag(
        viewer.page,
        (sheet["x"] + 0.1 * sheet["width"], sheet["y"] + 0.08 * sheet["height"]),
        (sheet["x"] + 0.9 * sheet["width"], sheet["y"] + 0.3 * sheet["height"]),
    )
    assert scrolled == 0  # the finger drew; it did not pan the page
    drawn = second.locator('.region[data-class="drawn"]')
    await expect(drawn).to_have_count(1)
    await expect(drawn).to_have_attribute("aria-pressed", "true")
    await expect(viewer.get("ocr-region")).to_have_text("drawn region on page 2")
    await expect(viewer.get("ocr-status")).to_have_attribute("data-state", "done")
    assert len((await viewer.get("ocr-text").text_content()).split()) > 10
    assert await viewer.page.evaluate(PANEL_HITS) == ["panel"] * 4
    await viewer.shot("05-drawn-by-touch")
    await viewer.page.keyboard.press("Escape")
    await expect(second.get_by_test_id("draw-toggle")).to_have_attribute("aria-pressed", "false")

    await viewer.get("parse-button").click()
    await expect(viewer.get("parse-status")).to_have_attribute(
        "data-state", "done", timeout=120_000
    )
    await expect(viewer.get("markdown-rendered").locator("h1")).to_contain_text(TITLE_START)
    assert await viewer.horizontal_overflow() == 0
    await viewer.shot("06-parsed")
    assert viewer.errors == []


async def test_viewer_keyboard(start_server, browser, paper_pdf):
    """Tab reaches the file picker and a page's regions; arrows move; Enter reads a region."""
    from playwright.async_api import expect

    server = await start_server()
    viewer = Viewer(await browser.new_page(viewport={"width": 1200, "height": 900}), "keyboard")
    await viewer.open(server.url)
    await viewer.page.keyboard.press("Tab")
    assert await viewer.page.evaluate("document.activeElement.id") == "file-input"

    one_page = {"name": "page1.pdf", "mimeType": "application/pdf"}
    one_page["buffer"] = pdf_pages(paper_pdf, 1)
    await viewer.page.set_input_files("#file-input", one_page)
    await expect(viewer.get("message")).to_contain_text("1 of 1 pages analysed")
    # One tab stop per page: the first region in reading order (the title, at the top).
    focusable = viewer.page.locator('.page[data-page="0"] .region[tabindex="0"]')
    await expect(focusable).to_have_count(1)
    start = await focusable.get_attribute("data-index")
    await focusable.focus()
    await viewer.page.keyboard.press("Enter")
    await expect(viewer.get("ocr-text")).to_contain_text(TITLE_START)
    await viewer.page.keyboard.press("ArrowDown")
    moved = await viewer.page.evaluate("document.activeElement.dataset.index")
    assert moved is not None and moved != start
    await expect(focusable).to_have_attribute("data-index", moved)
    await viewer.shot("01-focus")
    assert viewer.errors == []


LINE = "Harbour lanterns glow amber over quiet water"
BELOW = "Distant mountains remain silent"


def words_pdf() -> tuple[bytes, dict[str, pymupdf.Rect]]:
    """Two pages; the second holds LINE and, well below it, BELOW. Returns the PDF and where
    each word of them is on page 2, in PDF points."""
    with pymupdf.open() as doc:
        doc.new_page(width=595, height=842).insert_text((72, 100), "A first page", fontsize=20)
        page = doc.new_page(width=595, height=842)
        page.insert_text((72, 360), LINE, fontsize=16)
        page.insert_text((72, 440), BELOW, fontsize=16)
        words = {w[4]: pymupdf.Rect(w[:4]) for w in page.get_text("words")}
        return doc.tobytes(), words


class Frames:
    """The msgpack frames of a page's WebSockets, both ways."""

    def __init__(self, page: Any) -> None:
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        page.on("websocket", self._socket)

    def _socket(self, ws: Any) -> None:
        ws.on("framesent", lambda data: self._keep(self.sent, data))
        ws.on("framereceived", lambda data: self._keep(self.received, data))

    @staticmethod
    def _keep(into: list[dict[str, Any]], data: bytes | str) -> None:
        if isinstance(data, bytes):
            into.append(msgpack.unpackb(data))

    def ocr(self) -> list[dict[str, Any]]:
        return [f for f in self.sent if f.get("type") == "ocr"]

    def page(self, number: int) -> dict[str, Any]:
        return next(f for f in self.received if f.get("type") == "page" and f["page"] == number)


async def test_viewer_draw_a_region_to_read_it(start_server, browser):
    """Draw mode on a page: a mouse drag draws a rectangle, sent as `ocr` with that page's
    image and the box in its pixels; the words under it are read, and the rectangle stays a
    region that can be read again. A tiny drag and a drag cancelled with Escape send nothing;
    a drag past the page's edge is held to it; Shift+drag draws without the mode."""
    from playwright.async_api import expect

    pdf, words = words_pdf()
    server = await start_server()
    viewer = Viewer(await browser.new_page(viewport={"width": 1200, "height": 900}), "draw")
    frames = Frames(viewer.page)
    await viewer.open(server.url)
    await viewer.page.set_input_files(
        "#file-input", {"name": "words.pdf", "mimeType": "application/pdf", "buffer": pdf}
    )
    await expect(viewer.get("message")).to_contain_text("2 of 2 pages analysed")
    second = viewer.page.locator('.page[data-page="1"]')
    toggle = second.get_by_test_id("draw-toggle")
    await expect(toggle).to_have_attribute("aria-label", re.compile(r"^Draw region on page 2"))

    # The toggle works from the keyboard.
    await toggle.focus()
    await viewer.page.keyboard.press("Space")
    await expect(toggle).to_have_attribute("aria-pressed", "true")
    await expect(second).to_have_class(re.compile(r"\bdrawing\b"))
    await expect(viewer.page.locator('.page[data-page="0"]')).not_to_have_class(
        re.compile(r"\bdrawing\b")
    )
    img = second.locator("img")
    await img.scroll_into_view_if_needed()
    rendered = frames.page(1)
    sheet = await img.bounding_box()
    per_pixel = sheet["width"] / rendered["width"]

    def screen(x: float, y: float) -> tuple[float, float]:
        """A point of the rendered page (pixels) on the screen."""
        return sheet["x"] + x * per_pixel, sheet["y"] + y * per_pixel

    async def drag(start: tuple[float, float], end: tuple[float, float]) -> None:
        await viewer.page.mouse.move(*start)
        await viewer.page.mouse.down()
        await viewer.page.mouse.move(*end, steps=6)
        await viewer.page.mouse.up()

    # From the gap before "lanterns" to the gap after "amber", in the rendered page's pixels.
    scale = rendered["width"] / 595
    x0 = (words["Harbour"].x1 + words["lanterns"].x0) / 2 * scale
    x1 = (words["amber"].x1 + words["over"].x0) / 2 * scale
    y0 = (words["lanterns"].y0 - 6) * scale
    y1 = (words["lanterns"].y1 + 6) * scale

    # A slip of the hand, and a drag called off: nothing drawn, nothing sent.
    await drag(screen(x0, y0), screen(x0 + 2 / per_pixel, y0 + 2 / per_pixel))
    await viewer.page.mouse.move(*screen(x0, y0))
    await viewer.page.mouse.down()
    await viewer.page.mouse.move(*screen(x1, y1), steps=4)
    await expect(viewer.get("draw-box")).to_be_visible()
    await viewer.page.keyboard.press("Escape")
    await expect(viewer.get("draw-box")).to_have_count(0)
    await viewer.page.mouse.up()
    await expect(toggle).to_have_attribute("aria-pressed", "true")  # Escape ended the drag only
    drawn = second.locator('.region[data-class="drawn"]')
    assert await drawn.count() == 0 and frames.ocr() == []

    await drag(screen(x0, y0), screen(x1, y1))
    await expect(drawn).to_have_count(1)
    await expect(drawn).to_have_attribute("aria-pressed", "true")
    await expect(viewer.get("ocr-region")).to_have_text("drawn region on page 2")
    await expect(viewer.get("ocr-status")).to_have_attribute("data-state", "done")
    text = await viewer.get("ocr-text").text_content()
    assert "lanterns glow amber" in text, text
    assert not {"Harbour", "water", "mountains"} & set(text.split()), text
    await viewer.shot("01-drawn")

    # The request: page 2's own image, and the box as drawn, in that image's pixels.
    (sent,) = frames.ocr()
    assert sent["image"] == rendered["image"]
    assert sent["box"] == pytest.approx([x0, y0, x1, y1], abs=3), (sent["box"], [x0, y0, x1, y1])
    legend = viewer.get("legend-item").filter(has_text="drawn")
    await expect(legend.locator(".count")).to_have_text("1")

    # Out of draw mode, Shift+drag still draws (here over BELOW, from its far corner), and
    # only the drawn region is read, not one the drag began on.
    await viewer.page.keyboard.press("Escape")
    await expect(toggle).to_have_attribute("aria-pressed", "false")
    await expect(second).not_to_have_class(re.compile(r"\bdrawing\b"))
    below = words["Distant"] | words["silent"]
    await viewer.page.keyboard.down("Shift")
    await drag(
        screen((below.x1 + 8) * scale, (below.y1 + 6) * scale),
        screen((below.x0 - 8) * scale, (below.y0 - 6) * scale),
    )
    await viewer.page.keyboard.up("Shift")
    await expect(drawn).to_have_count(2)
    await expect(viewer.get("ocr-status")).to_have_attribute("data-state", "done")
    await expect(viewer.get("ocr-text")).to_contain_text(BELOW)
    await expect(viewer.get("ocr-region")).to_have_text("drawn region on page 2")
    assert len(frames.ocr()) == 2
    await expect(drawn.first).to_have_attribute("aria-pressed", "false")

    # The first drawn rectangle stays a region like the others: select it, it is read again.
    await drawn.first.click()
    await expect(drawn.first).to_have_attribute("aria-pressed", "true")
    await expect(viewer.get("ocr-status")).to_have_attribute("data-state", "done")
    await expect(viewer.get("ocr-text")).to_contain_text("lanterns glow amber")
    assert [f["box"] for f in frames.ocr()][2:] == [sent["box"]]

    # A drag past the bottom-right corner: the box stops at the page's edge.
    await toggle.click()
    await img.evaluate("img => img.scrollIntoView({block: 'end'})")
    sheet = await img.bounding_box()
    await drag(
        screen(rendered["width"] - 200, rendered["height"] - 150),
        (sheet["x"] + sheet["width"] + 60, sheet["y"] + sheet["height"] + 12),
    )
    await expect(drawn).to_have_count(3)
    await expect(viewer.get("ocr-status")).to_have_attribute("data-state", "done")
    corner = frames.ocr()[-1]["box"]
    assert corner[2:] == [rendered["width"], rendered["height"]], corner
    assert viewer.errors == []


JS_CLIENT_ERRORS = """
async ([pdfBase64, smallServer, pngBase64]) => {
  const { connect, RagwsError, STATES } = await import("/static/ragws.js");
  const states = [];
  const client = connect(undefined, { apiKey: "k 1", onstate: (s) => states.push(s.state) });
  const hello = await client.opened();
  const failure = async (promise) => {
    try { await promise; return { ok: true }; }
    catch (e) {
      return { ragws: e instanceof RagwsError, code: e.code, message: e.message, id: e.id };
    }
  };
  const drain = async (stream) => {
    const out = [];
    for await (const frame of stream) out.push(frame);
    return out;
  };

  const layout = await failure(client.layout(new Uint8Array([1, 2, 3, 4])));
  const notPdf = client.pdf(new TextEncoder().encode("not a pdf"));
  const pdfIter = await failure(drain(notPdf));
  const pdfResult = await failure(notPdf.result);
  const scale = await failure(client.layout(new Uint8Array([1]), { conf: 7 }));

  // Leaving a for-await loop early cancels the request; its result says so.
  const pdf = Uint8Array.from(atob(pdfBase64), (c) => c.charCodeAt(0));
  const pages = client.pdf(pdf, { images: false });
  let firstPage = null;
  for await (const page of pages) { firstPage = page; break; }
  const left = await pages.result;

  // Cancelling a layout rejects it with code "cancelled".
  const layoutCancel = client.layout(pdf.subarray(0, 10));
  layoutCancel.cancel();
  const cancelled = await failure(layoutCancel);

  // A client-wide deadline goes with every request: 1 ms is over before a page is decoded,
  // so the layout ends "timeout" and rejects with that code.
  const hurried = connect(undefined, { deadlineMs: 1 });
  await hurried.opened();
  const png = Uint8Array.from(atob(pngBase64), (c) => c.charCodeAt(0));
  const timedOut = await failure(hurried.layout(png));
  hurried.close();

  // A frame over the server's limit fails locally; the socket stays open.
  const small = connect(smallServer);
  await small.opened();
  const tooLarge = await failure(small.layout(new Uint8Array(64 * 1024)));
  const smallState = small.state;
  small.close();

  client.close();
  const afterClose = await failure(client.layout(new Uint8Array([1])));
  return {
    STATES, states, url: client.url, hello: hello.type, layout, pdfIter, pdfResult, scale,
    firstPage: firstPage && { page: firstPage.page, type: firstPage.type },
    left: left.finish_reason, cancelled, timedOut, tooLarge, smallState, afterClose,
  };
}
"""


async def test_js_client_errors_and_cancel(start_server, browser, paper_pdf):
    server = await start_server()
    # A second server on another port: another origin, which it must allow for the page.
    small = await start_server(max_frame_bytes=4096, allowed_origins=server.url)
    viewer = Viewer(await browser.new_page(), "client")
    await viewer.open(server.url)
    pdf = base64.b64encode(pdf_pages(paper_pdf, 4)).decode()
    png = base64.b64encode(render_png(paper_pdf, 0, 2.0)).decode()
    got = await viewer.page.evaluate(JS_CLIENT_ERRORS, [pdf, small.ws_url, png])

    assert got["STATES"] == ["connecting", "open", "reconnecting", "closed"]
    assert got["states"] == ["connecting", "open", "closed"]
    assert got["url"].endswith("/ws?api_key=k+1")
    assert got["hello"] == "hello"
    assert got["layout"]["ragws"] is True
    assert got["layout"]["code"] == "bad_request"
    assert got["layout"]["message"]
    assert got["pdfIter"]["code"] == "bad_request"
    assert got["pdfResult"]["code"] == "bad_request"
    assert got["pdfIter"]["id"] == got["pdfResult"]["id"]
    assert got["scale"]["code"] == "bad_request"
    assert "conf" in got["scale"]["message"]
    assert got["firstPage"] == {"page": got["firstPage"]["page"], "type": "page"}
    assert got["left"] == "cancelled"
    assert got["cancelled"]["code"] == "cancelled"
    assert got["timedOut"]["code"] == "timeout" and got["timedOut"]["ragws"] is True
    assert got["tooLarge"]["code"] == "too_large"
    assert got["smallState"] == "open"
    assert got["afterClose"]["code"] == "closed"
    labels = {"type": "pdf", "outcome": "cancelled"}
    assert await wait_metric(server, "ragws_requests_total", labels, 1) == 1
    assert viewer.errors == []


JS_CLIENT_DROP = """
async (pdfBase64) => {
  const { connect } = await import("/static/ragws.js");
  const pdf = Uint8Array.from(atob(pdfBase64), (c) => c.charCodeAt(0));
  const t = (window.dropTest = { states: [], pages: 0 });
  t.client = connect(undefined, {
    backoff: { initialMs: 200, jitter: 0 },
    onstate: (s) => t.states.push(s.state),
  });
  await t.client.opened();
  const stream = t.client.pdf(pdf, { scale: 1 });
  t.outcome = (async () => {
    try { for await (const page of stream) t.pages += 1; return { ok: true }; }
    catch (e) { return { code: e.code, message: e.message }; }
  })();
}
"""

JS_CLIENT_AFTER_DROP = """
async () => {
  const t = window.dropTest;
  const outcome = await t.outcome;
  await t.client.opened();
  let code = null;
  try { await t.client.layout(new Uint8Array([1, 2, 3])); } catch (e) { code = e.code; }
  return { outcome, states: t.states, after: code, state: t.client.state };
}
"""


async def test_js_client_reconnects_after_a_drop(start_server, browser, paper_pdf):
    """The socket drops mid-request: the request fails with "disconnected", the client
    reconnects with backoff, and the new socket serves requests."""
    server = await start_server()
    page = await browser.new_page()
    viewer = Viewer(page, "drop")
    routes: list[Any] = []

    def route(ws: Any) -> None:
        ws.connect_to_server()
        routes.append(ws)

    await viewer.open(server.url)  # the viewer's own socket is not routed
    await page.route_web_socket(re.compile(r"/ws(\?|$)"), route)
    pdf = base64.b64encode(paper_pdf).decode()
    await page.evaluate(JS_CLIENT_DROP, pdf)
    await page.wait_for_function("window.dropTest.pages >= 1")
    await routes[0].close(code=4000, reason="dropped by the test")
    got = await page.evaluate(JS_CLIENT_AFTER_DROP)

    assert got["outcome"]["code"] == "disconnected"
    assert "dropped by the test" in got["outcome"]["message"]
    assert got["states"] == ["connecting", "open", "reconnecting", "open"]
    assert got["state"] == "open"
    assert got["after"] == "bad_request"  # the new socket answers
    assert len(routes) == 2
    assert viewer.errors == []


MARKDOWN = r"""# Title <img src=x onerror="window.pwned=1">

A paragraph with <b>tags</b> &amp; entities.
Second line.

<script>window.pwned = 1</script>

$$
x^2 < y
$$

![figure](#page-2-figure-1)

- one
- two <i>x</i>

| a | b |
|---|---|
| 1 | <u>2</u> |

## Next"""

RENDER_MARKDOWN = """
async (markdown) => {
  const { renderMarkdown } = await import("/static/markdown.js");
  const root = document.createElement("article");
  root.append(renderMarkdown(markdown));
  document.body.append(root);
  await new Promise((resolve) => setTimeout(resolve, 100)); // an injected onerror would run
  return {
    tags: [...root.children].map((el) => el.tagName.toLowerCase()),
    injected: root.querySelectorAll("img, script, b, i, u").length,
    pwned: window.pwned ?? null,
    h1: root.querySelector("h1").textContent,
    p: root.querySelector("p").innerText,
    math: root.querySelector("pre.md-math").textContent,
    figure: root.querySelector(".md-figure").getAttribute("aria-label"),
    items: [...root.querySelectorAll("li")].map((li) => li.textContent),
    cells: [...root.querySelectorAll("td")].map((td) => td.textContent),
  };
}
"""


async def test_markdown_renderer_keeps_text_as_text(start_server, browser):
    server = await start_server()
    viewer = Viewer(await browser.new_page(), "markdown")
    await viewer.open(server.url)
    got = await viewer.page.evaluate(RENDER_MARKDOWN, MARKDOWN)
    assert got["tags"] == ["h1", "p", "pre", "pre", "div", "ul", "div", "h2"]
    assert got["injected"] == 0 and got["pwned"] is None
    assert got["h1"] == 'Title <img src=x onerror="window.pwned=1">'
    assert got["p"] == "A paragraph with <b>tags</b> &amp; entities.\nSecond line."
    assert got["math"] == "x^2 < y"
    assert got["figure"] == "Figure 1 on page 2"
    assert got["items"] == ["one", "two <i>x</i>"]
    assert got["cells"] == ["1", "<u>2</u>"]
    assert viewer.errors == []


STRUCTURED = r"""# Report

## 2 Methods

### 2.1 Data

- fruit
  - apple
  - pear
    1. green
    2. red
- vegetables

3. third
4. fourth

| Name | Score \| max |
|:-----|------:|
| a | 1 |
| b |

HTML_TABLE

```
def f(x):
    return x < 1  # <b>not bold</b>

print(f(0))
```

$$
E = mc^2 \tag{1}
$$""".replace(
    "HTML_TABLE",  # on one line, as the server writes it
    '<table><tr><td rowspan="2">Name</td><td colspan="2">Score</td></tr>'
    "<tr><td>x</td><td>y</td></tr><tr><td>a</td><td>1</td><td>2</td></tr></table>",
)

HOSTILE_TABLE = (
    '<table class="x" style="color:red" onclick="window.pwned=1" background="javascript:1">'
    '<thead><tr><th onmouseover="window.pwned=2" id="h">H<img src=x onerror="window.pwned=3">'
    '</th><th colspan="2" rowspan="javascript:1">G</th></tr></thead>'
    '<tbody><tr><td colspan="2" data-x="1"><a href="javascript:window.pwned=4">link</a>'
    "<script>window.pwned=5</script><style>td{}</style></td>"
    '<td rowspan="99999999"><iframe src="javascript:window.pwned=6"></iframe>'
    '<svg onload="window.pwned=7"></svg>z</td></tr></tbody></table>'
)

RENDER_STRUCTURE = """
async ([markdown, hostile, blocks]) => {
  const { renderMarkdown, renderBlock } = await import("/static/markdown.js");
  const root = document.createElement("article");
  root.append(renderMarkdown(markdown));
  const evil = document.createElement("article");
  evil.append(renderMarkdown(hostile));
  const block = document.createElement("article");
  block.append(renderBlock({ type: "table", text: "", html: hostile, cells: [] }));
  document.body.append(root, evil, block);
  await new Promise((resolve) => setTimeout(resolve, 200)); // an injected handler would run
  const shape = (el) => ({
    tag: el.tagName.toLowerCase(),
    text: el.children.length ? null : el.textContent,
    rowspan: el.getAttribute("rowspan"),
    colspan: el.getAttribute("colspan"),
    children: [...el.children].map(shape),
  });
  const lists = (el) => [...el.children].map((child) => child.tagName === "LI"
      ? [child.firstChild.textContent, ...[...child.querySelectorAll(":scope > ul, :scope > ol")]
          .map((sub) => ({ [sub.tagName.toLowerCase()]: lists(sub) }))]
      : null);
  const attributes = (el) => [...el.querySelectorAll("*")].flatMap((node) =>
      [...node.attributes].map((a) => `${node.tagName.toLowerCase()}[${a.name}]`));
  const tables = root.querySelectorAll("table");
  return {
    tags: [...root.children].map((el) => el.tagName.toLowerCase()),
    headings: [...root.querySelectorAll("h1, h2, h3")].map((h) => [h.tagName, h.textContent]),
    lists: [...root.children].filter((el) => /^[UO]L$/.test(el.tagName))
      .map((el) => ({ [el.tagName.toLowerCase()]: lists(el), start: el.start ?? null })),
    pipe: shape(tables[0]),
    pipeAlign: [...tables[0].rows[1].cells].map((cell) => cell.style.textAlign),
    html: shape(tables[1]),
    code: [...root.querySelectorAll("pre.md-code > code")].map((c) => c.textContent),
    math: root.querySelector("pre.md-math").textContent,
    evil: shape(evil.querySelector("table")),
    evilAttributes: attributes(evil),
    blockAttributes: attributes(block),
    evilText: evil.textContent,
    blockTags: [...block.querySelectorAll("*")].map((el) => el.tagName.toLowerCase()),
    pwned: window.pwned ?? null,
    blocks: blocks.map((data) => {
      const node = document.createElement("div");
      node.append(renderBlock(data));
      return [...node.children].map(shape);
    }),
  };
}
"""

# Blocks of a parse `page` frame, as docs/protocol.md describes them, and one from an older
# server (no structured fields).
BLOCKS = [
    {"type": "heading", "level": 3, "text": "2.1 Data"},
    {
        "type": "list",
        "text": "First\nNested\nSecond",
        "items": [
            {"text": "First", "level": 0, "marker": "1."},
            {"text": "Nested", "level": 1, "marker": "-"},
            {"text": "Second", "level": 0, "marker": "2."},
        ],
    },
    {"type": "code", "text": "if x:\n    y()"},
    {
        "type": "table",
        "text": "Name | Score\nx | y\na | 1 | 2",
        "html": "<table><tr><td>ignored: the cells come first</td></tr></table>",
        "cells": [
            {"row": 0, "col": 0, "row_span": 2, "col_span": 1, "text": "Name", "bbox": None},
            {"row": 0, "col": 1, "row_span": 1, "col_span": 2, "text": "Score", "bbox": None},
            {"row": 1, "col": 1, "row_span": 1, "col_span": 1, "text": "x", "bbox": None},
            {"row": 1, "col": 2, "row_span": 1, "col_span": 1, "text": "y", "bbox": None},
            {"row": 2, "col": 0, "row_span": 1, "col_span": 1, "text": "a", "bbox": None},
            {"row": 2, "col": 1, "row_span": 1, "col_span": 1, "text": "1", "bbox": None},
            {"row": 2, "col": 2, "row_span": 1, "col_span": 1, "text": "2", "bbox": None},
        ],
    },
    {"type": "equation", "text": "E = mc^2 (1)"},
    {"type": "table_caption", "text": "Table 1: <b>old</b>"},
]


def cell(
    tag: str, text: str | None, rowspan: str | None = None, colspan: str | None = None
) -> dict:
    return {"tag": tag, "text": text, "rowspan": rowspan, "colspan": colspan, "children": []}


def rows(section: str, *cells: list[dict]) -> dict:
    trs = [
        {"tag": "tr", "text": None, "rowspan": None, "colspan": None, "children": list(c)}
        for c in cells
    ]
    return {"tag": section, "text": None, "rowspan": None, "colspan": None, "children": trs}


def table(*sections: dict) -> dict:
    return {
        "tag": "table",
        "text": None,
        "rowspan": None,
        "colspan": None,
        "children": list(sections),
    }


async def test_markdown_renders_tables_code_lists_and_only_safe_table_markup(start_server, browser):
    """Pipe and HTML tables, fenced code, nested lists and headings become their elements; an
    HTML table is rebuilt from its cells' text and integer spans, and nothing else of it."""
    server = await start_server()
    viewer = Viewer(await browser.new_page(), "markdown-structure")
    await viewer.open(server.url)
    got = await viewer.page.evaluate(RENDER_STRUCTURE, [STRUCTURED, HOSTILE_TABLE, BLOCKS])

    assert got["tags"] == ["h1", "h2", "h3", "ul", "ol", "div", "div", "pre", "pre"]
    assert got["headings"] == [["H1", "Report"], ["H2", "2 Methods"], ["H3", "2.1 Data"]]
    assert got["lists"] == [
        {
            "ul": [
                ["fruit", {"ul": [["apple"], ["pear", {"ol": [["green"], ["red"]]}]]}],
                ["vegetables"],
            ],
            "start": None,
        },
        {"ol": [["third"], ["fourth"]], "start": 3},
    ]
    assert got["pipe"] == table(
        rows("thead", [cell("th", "Name"), cell("th", "Score | max")]),
        rows("tbody", [cell("td", "a"), cell("td", "1")], [cell("td", "b"), cell("td", "")]),
    )
    assert got["pipeAlign"] == ["left", "right"]
    assert got["html"] == table(
        rows(
            "tbody",
            [cell("td", "Name", rowspan="2"), cell("td", "Score", colspan="2")],
            [cell("td", "x"), cell("td", "y")],
            [cell("td", "a"), cell("td", "1"), cell("td", "2")],
        )
    )
    assert got["code"] == ["def f(x):\n    return x < 1  # <b>not bold</b>\n\nprint(f(0))"]
    assert got["math"] == "E = mc^2 \\tag{1}"

    # The hostile table: its cells' text and spans (clamped to HTML's limit), nothing else.
    assert got["evil"] == table(
        rows("thead", [cell("th", "H"), cell("th", "G", colspan="2")]),
        rows("tbody", [cell("td", "link", colspan="2"), cell("td", "z", rowspan="65534")]),
    )
    allowed = {"div[class]", "table[class]", "td[colspan]", "td[rowspan]", "th[colspan]"}
    assert set(got["evilAttributes"]) <= allowed, got["evilAttributes"]
    assert set(got["blockAttributes"]) <= allowed, got["blockAttributes"]
    assert "pwned" not in got["evilText"]
    assert set(got["blockTags"]) == {"div", "table", "thead", "tbody", "tr", "th", "td"}
    assert got["pwned"] is None

    # A parse block's body, by its type.
    heading, items, code, cells, equation, old = got["blocks"]
    assert heading == [cell("h3", "2.1 Data")]
    assert [b["tag"] for b in items] == ["ol"]
    first, second = items[0]["children"]
    assert [first["tag"], first["children"][0]["tag"], second["text"]] == ["li", "ul", "Second"]
    assert first["children"][0]["children"] == [cell("li", "Nested")]
    assert code == [{**cell("pre", None), "children": [cell("code", "if x:\n    y()")]}]
    assert cells == [
        {
            **cell("div", None),
            "children": [
                table(
                    rows(
                        "thead",
                        [cell("th", "Name", rowspan="2"), cell("th", "Score", colspan="2")],
                        [cell("th", "x"), cell("th", "y")],
                    ),
                    rows("tbody", [cell("td", "a"), cell("td", "1"), cell("td", "2")]),
                )
            ],
        }
    ]
    assert equation == [cell("pre", "E = mc^2 (1)")]
    assert old == [cell("p", "Table 1: <b>old</b>")]
    assert viewer.errors == []


async def test_viewer_shows_parsed_blocks_by_type(start_server, browser, paper_pdf):
    """The Blocks view: a card per block in reading order, coloured and counted per type in its
    legend; a table block drawn as a table from its cells; a card's head outlines the block on
    its page."""
    from playwright.async_api import expect

    with pymupdf.open(stream=paper_pdf, filetype="pdf") as src, pymupdf.open() as out:
        page = documents.TABLES_PAGE  # two tables
        out.insert_pdf(src, from_page=page, to_page=page)
        tables_page = out.tobytes()
    server = await start_server()
    viewer = Viewer(await browser.new_page(viewport={"width": 1440, "height": 1000}), "blocks")
    await viewer.open(server.url)
    await viewer.page.set_input_files(
        "#file-input", {"name": "tables.pdf", "mimeType": "application/pdf", "buffer": tables_page}
    )
    await expect(viewer.get("message")).to_contain_text("1 of 1 pages analysed")
    await viewer.get("parse-button").click()
    await expect(viewer.get("parse-status")).to_have_attribute(
        "data-state", "done", timeout=120_000
    )
    await viewer.get("view-blocks").click()
    await expect(viewer.get("blocks-view")).to_be_visible()
    await expect(viewer.get("markdown-rendered")).to_be_hidden()
    await expect(viewer.get("view-blocks")).to_have_attribute("aria-pressed", "true")

    cards = viewer.get("block")
    types = await cards.evaluate_all("cards => cards.map((c) => c.dataset.type)")
    assert len(types) > 5 and "text" in types, types
    legend = viewer.get("block-legend-item")
    counts = await legend.evaluate_all(
        "items => items.map((i) => [i.dataset.class, Number(i.querySelector('.count')"
        ".textContent)])"
    )
    assert dict(counts) == {t: types.count(t) for t in set(types)}

    tables = viewer.page.locator('[data-testid="block"][data-type="table"]')
    assert await tables.count() >= 1
    rows = await tables.first.locator("table tr").count()
    assert rows >= 3  # drawn from the block's cells, not as lines of text
    await viewer.shot("01-blocks")

    # Hiding a type hides its cards; a card's head outlines its block on the page.
    await legend.filter(has_text="table").get_by_role("checkbox").uncheck()
    await expect(tables.first).to_be_hidden()
    await legend.filter(has_text="table").get_by_role("checkbox").check()
    await cards.first.locator(".block-head").click()
    await expect(viewer.page.locator('.page[data-page="0"] .block-mark')).to_have_count(1)
    await viewer.shot("02-block-marked")
    assert viewer.errors == []
