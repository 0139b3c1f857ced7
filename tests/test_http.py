"""HTTP endpoints: health, metrics, and the seed-compatible POST /doc_layout."""

from __future__ import annotations

import asyncio
import base64
import io

import aiohttp
from PIL import Image

from .documents import PAGES


def _form(pdf: bytes, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", pdf, filename="doc.pdf", content_type="application/pdf")
    for name, value in fields.items():
        form.add_field(name, value)
    return form


async def test_health_and_metrics(start_server):
    server = await start_server()
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/health") as resp:
            assert resp.status == 200
            health = await resp.json()
        async with http.get(server.url + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    assert health["status"] == "ok"
    assert health["models"] == {"layout": "embedded", "ocr": "embedded"}
    assert health["ocr"] == {
        "model": "embedded",
        "architecture": "PP-OCR",
        "modes": ["format", "plain"],
        "page_mode": None,
        "healthy": True,
    }
    assert health["device"] == "cpu" and health["inflight"] == 0
    assert health["layout_batch"] == {"max": 16, "preferred": 1}
    for name in (
        "ragws_requests_total",
        "ragws_layout_batch_size",
        "ragws_layout_queue_seconds",
        "ragws_inflight_requests",
        "process_resident_memory_bytes",
    ):
        assert f"# TYPE {name}" in text, name


async def test_doc_layout_is_seed_compatible(start_server, paper_pdf):
    server = await start_server()
    async with aiohttp.ClientSession() as http:
        form = _form(paper_pdf, iou_threshold="0.45", ratio_x="1.0", ratio_y="1.5")
        async with http.post(server.url + "/doc_layout", data=form) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
    assert body["stats"]["total_page"] == PAGES and body["stats"]["page_per_second"] > 0
    assert len(body["result"]) == PAGES
    first = body["result"][0]
    assert set(first) >= {"classes", "coordinates", "img"}
    assert "title" in first["classes"]
    image = Image.open(io.BytesIO(base64.b64decode(first["img"])))
    assert image.size == (612, 792 * 1.5)  # ratio_x and ratio_y scale the render separately
    ys = [(c["y_min"], c["x_min"]) for c in first["coordinates"]]
    assert ys == sorted(ys)  # the seed's order: top to bottom, then left to right
    for c in first["coordinates"]:
        assert all(isinstance(c[k], int) for k in ("x_min", "y_min", "x_max", "y_max"))
        assert 0 <= c["x_min"] < c["x_max"] <= 612 and 0 <= c["y_min"] < c["y_max"] <= 1188


async def test_doc_layout_bad_input(start_server, paper_pdf):
    cap = len(paper_pdf) // 2
    server = await start_server(max_pdf_bytes=cap)
    async with aiohttp.ClientSession() as http:
        cases = [
            (_form(b"not a pdf at all"), 400, "pdf"),
            (_form(b""), 400, "empty"),
            (aiohttp.FormData({"other": "x"}), 400, "'file'"),
            (_form(paper_pdf), 413, "bytes"),  # twice the cap
            (_form(b"%PDF-1.4", ratio_x="-2"), 400, "ratio_x"),
        ]
        for form, status, needle in cases:
            async with http.post(server.url + "/doc_layout", data=form) as resp:
                body = await resp.json()
                assert resp.status == status, body
                assert needle in body["message"], body
        async with http.post(server.url + "/doc_layout", json={"file": "x"}) as resp:
            assert resp.status == 400 and "multipart" in (await resp.json())["message"]


async def test_doc_layout_over_capacity_gets_429(start_server, paper_pdf):
    server = await start_server(max_concurrent=1)
    async with aiohttp.ClientSession() as http:

        async def post():
            async with http.post(server.url + "/doc_layout", data=_form(paper_pdf)) as resp:
                return resp.status, resp.headers.get("Retry-After"), await resp.json()

        first = asyncio.ensure_future(post())
        while await server.metric("ragws_inflight_requests") < 1:
            await asyncio.sleep(0.02)
        status, retry_after, body = await post()
        assert status == 429 and retry_after == "1" and body["error"] == "overloaded"
        assert (await first)[0] == 200


async def test_viewer_page_and_its_script_are_served(start_server):
    server = await start_server()
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/") as resp:
            assert resp.status == 200
            page = await resp.text()
        # Relative paths, so the viewer also works behind a proxy under a prefix.
        assert 'src="static/vendor/msgpack.min.js"' in page
        assert 'src="static/viewer.js"' in page
        async with http.get(server.url + "/static/vendor/msgpack.min.js") as resp:
            assert resp.status == 200 and "MessagePack" in await resp.text()
        modules = {
            "viewer.js": "import",
            "ragws.js": "export function connect",
            "markdown.js": "export",
        }
        for script, needle in modules.items():
            async with http.get(server.url + "/static/" + script) as resp:
                assert resp.status == 200, script
                assert "javascript" in resp.headers["Content-Type"], script
                assert needle in await resp.text(), script
