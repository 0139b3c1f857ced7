"""Parse throughput: the ragws parse pipeline vs. RapidOCR's own pipeline plus the layout model.

What it measures
----------------
The pages of a PDF (default: the 16-page fixture paper), rendered at ``--scale`` 2, become
layout regions and OCR text two ways, in one run on one machine:

* **baseline** — one process, page after page, what a script would do with the same models:
  render the page with pymupdf, run the embedded layout model (``OnnxLayoutModel``) on it, run
  ``rapidocr.RapidOCR()`` (its default configuration: PP-OCRv6 detection, orientation
  classifier, recognition) on it;
* **ragws** — the server on loopback with its defaults, and ``--clients`` WebSocket clients
  that each send ``parse`` requests with ``text: "ocr"`` for the whole document, one at a time,
  ``--docs`` documents in all (default: one client, one document).

Pages/s counts pages over wall time (rendering included on both sides). The server does more
than the baseline per page (reading order, markdown, chunks, frames); the baseline reads more
(figure interiors, text outside any region). ``vs baseline`` is ragws's pages/s over the
baseline's in the same run: comparable across machines; absolute figures are this machine's.

Example::

    python loadtest/parse_bench.py                       # 16 pages, 1 client
    python loadtest/parse_bench.py --clients 2 --docs 2 --json /tmp/parse.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import msgpack
import numpy as np
import pymupdf
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FIXTURES, cpu_name, log

from ragws.bootstrap import create_app
from ragws.config import Settings


def render(doc: pymupdf.Document, page: int, scale: float) -> np.ndarray:
    pix = doc[page].get_pixmap(matrix=pymupdf.Matrix(scale, scale), alpha=False)
    return np.frombuffer(pix.samples, np.uint8).reshape(pix.height, pix.width, 3)


def baseline(pdf: Path, pages: int, scale: float) -> dict[str, float]:
    """Render → layout → RapidOCR, page after page, in this process."""
    from rapidocr import RapidOCR
    from rapidocr.utils.log import logger

    from ragws.models.layout_onnx import OnnxLayoutModel

    logger.setLevel(logging.WARNING)
    layout = OnnxLayoutModel()
    engine = RapidOCR()
    with pymupdf.open(pdf) as doc:
        warm = render(doc, 0, scale)
        engine(warm)
        layout.predict([layout.prepare(warm, layout.default_conf, layout.default_iou)])
        lines = 0
        started = time.perf_counter()
        for page in range(pages):
            rgb = render(doc, page, scale)
            layout.predict([layout.prepare(rgb, layout.default_conf, layout.default_iou)])
            result = engine(rgb)
            lines += len(result.txts or ())
        elapsed = time.perf_counter() - started
    log(f"baseline: {pages / elapsed:.3f} pages/s ({lines} lines)")
    return {"pages_per_s": pages / elapsed, "seconds": elapsed, "lines": lines}


async def served(
    pdf: Path, pages: int, scale: float, clients: int, docs: int, det_max_side: int
) -> dict:
    app = create_app(Settings(port=0, ocr_det_max_side=det_max_side))
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"ws://127.0.0.1:{port}/ws"
    data = pdf.read_bytes()
    frame = {"type": "parse", "pdf": data, "pages": list(range(pages)), "text": "ocr"}
    frame["scale"] = scale
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(docs):
        queue.put_nowait(i)
    first_page_s: list[float] = []

    async def client(http: aiohttp.ClientSession) -> None:
        async with http.ws_connect(url, max_msg_size=0) as ws:
            await ws.receive()  # hello
            while not queue.empty():
                i = queue.get_nowait()
                sent = time.perf_counter()
                await ws.send_bytes(msgpack.packb({**frame, "id": i}))
                first = True
                while True:
                    reply = msgpack.unpackb((await ws.receive()).data)
                    if reply["type"] == "page" and first:
                        first_page_s.append(time.perf_counter() - sent)
                        first = False
                    elif reply["type"] == "done":
                        break
                    elif reply["type"] == "error":
                        raise RuntimeError(reply["message"])

    try:
        async with aiohttp.ClientSession() as http:
            started = time.perf_counter()
            await asyncio.gather(*(client(http) for _ in range(clients)))
            elapsed = time.perf_counter() - started
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                metrics = await resp.text()
    finally:
        await runner.cleanup()
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith(("ragws_ocr_rec_batch_size_", "ragws_ocr_lines_total "))
    }
    batches = samples.get("ragws_ocr_rec_batch_size_count", 0.0)
    result = {
        "clients": clients,
        "docs": docs,
        "pages_per_s": pages * docs / elapsed,
        "seconds": elapsed,
        "first_page_s": min(first_page_s),
        "lines": samples.get("ragws_ocr_lines_total", 0.0),
        "mean_rec_batch": samples.get("ragws_ocr_rec_batch_size_sum", 0.0) / max(batches, 1.0),
    }
    log(f"ragws, {clients} client(s): {result['pages_per_s']:.3f} pages/s")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdf", type=Path, default=FIXTURES / "2310.01889v4.pdf")
    parser.add_argument("--pages", type=int, default=0, help="first N pages (0: all)")
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--docs", type=int, default=1, help="documents parsed by ragws in all")
    parser.add_argument(
        "--det-max-side",
        type=int,
        default=Settings.ocr_det_max_side,
        help="the server's --ocr-det-max-side (0: rapidocr's rule, as the baseline)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if not args.pdf.is_file():
        parser.error(f"{args.pdf} not found (the shared fixtures folder sits beside the repo)")
    with pymupdf.open(args.pdf) as doc:
        pages = min(args.pages or doc.page_count, doc.page_count)

    base = baseline(args.pdf, pages, args.scale)
    ours = asyncio.run(
        served(args.pdf, pages, args.scale, args.clients, args.docs, args.det_max_side)
    )
    ratio = ours["pages_per_s"] / base["pages_per_s"]
    print(f"\nparse, text=ocr, {pages} pages at scale {args.scale}, {cpu_name()}")
    print(f"{'run':<40}{'pages/s':>9}{'vs baseline':>13}{'lines':>8}")
    print(f"{'RapidOCR + layout, page by page':<40}{base['pages_per_s']:>9.3f}{1.0:>13.2f}", end="")
    print(f"{base['lines']:>8}")
    label = f"ragws parse, {args.clients} client(s), det {args.det_max_side or 'rapidocr'}"
    print(f"{label:<40}{ours['pages_per_s']:>9.3f}{ratio:>13.2f}{ours['lines']:>8.0f}")
    print(
        f"ragws: first page after {ours['first_page_s']:.2f} s; "
        f"mean recognition batch {ours['mean_rec_batch']:.1f} lines"
    )
    if args.json:
        payload = {"device": cpu_name(), "pages": pages, "baseline": base, "ragws": ours}
        args.json.write_text(json.dumps({**payload, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
