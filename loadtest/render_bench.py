"""Render throughput: a PDF's pages rendered in the server's document workers, 1 vs N of them.

What it measures
----------------
The pages of one PDF (default: the 16-page fixture paper, else a 16-page paper written here
with pymupdf) are rendered at ``--scale`` (2, the layout and parse scale) to RGB arrays, as the
server renders them for ``pdf``, ``parse`` and ``/doc_layout`` requests:

* **in process** — ``PdfDocument.render`` page after page in this process: what the server did
  on its one PDF thread before the workers (rendering held the GIL, so a second thread would
  not have helped);
* **workers: K** — ``DocumentPool(K)``, the pages of ``--passes`` passes over the document
  submitted as a ``pdf`` request's are: up to its window of 32 pages in flight, each dropped
  once rendered. They render on all K workers at once, each of which opened the document from
  the spool once, and travel back as the server gets them (a mapped file, one copy).

``vs 1 worker`` is a run's pages/s over the 1-worker run's; ``vs in process`` over the loop in
this process. Ratios carry across machines; absolute pages/s are only this machine's. With
``--workers 1,N`` on an N-core machine the N-worker ratio is what rendering on every core buys.

Example::

    python loadtest/render_bench.py                          # 1 and one-per-core workers
    python loadtest/render_bench.py --workers 1,2,4 --passes 4 --json /tmp/render.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pymupdf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PAPER, cpu_name, log

from ragws.config import Settings
from ragws.pipeline.document_pool import DocumentPool
from ragws.pipeline.documents import PdfDocument, PdfFile, PdfLimits

DEFAULTS = Settings()
LIMITS = PdfLimits(DEFAULTS.max_pdf_bytes, DEFAULTS.max_pages, DEFAULTS.max_image_pixels)
#: Pages of a document between render and reader in the server (2 × layout_batch_size).
WINDOW = max(8, 2 * DEFAULTS.layout_batch_size)


def written_paper(pages: int = 16) -> bytes:
    """A stand-in for the fixture paper: two columns of text, a ruled table, a drawn chart."""
    doc = pymupdf.open()
    words = ["blockwise", "ring", "attention", "scales", "the", "context", "of", "transformers"]
    for number in range(pages):
        page = doc.new_page(width=612, height=792)
        page.insert_text((54, 60), f"{number + 1} Section heading", fontsize=16)
        for column, left in enumerate((54, 318)):
            text = " ".join(words[(i + column) % len(words)] for i in range(420))
            page.insert_textbox(pymupdf.Rect(left, 80, left + 240, 560), text, fontsize=9)
        for row in range(6):
            page.draw_line((54, 580 + 20 * row), (558, 580 + 20 * row))
        for bar in range(12):
            page.draw_rect(pymupdf.Rect(70 + 40 * bar, 760 - 8 * bar, 95 + 40 * bar, 760))
    data = doc.tobytes(deflate=True)
    doc.close()
    return data


def cpu_seconds(pids: Sequence[int] = ()) -> float:
    """CPU time of this process and of the processes ``pids`` (the workers), all threads."""
    total = time.process_time()
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def in_process(pdf: bytes, pages: int, scale: float, passes: int) -> tuple[float, float]:
    """Pages/s, and CPU seconds per page."""
    doc = PdfDocument.open(pdf, LIMITS)
    for page in range(pages):  # warm-up: fonts and images
        doc.render(page, scale)
    cpu, started = cpu_seconds(), time.perf_counter()
    for _ in range(passes):
        for page in range(pages):
            doc.render(page, scale)
    elapsed = time.perf_counter() - started
    doc.close()
    return passes * pages / elapsed, (cpu_seconds() - cpu) / (passes * pages)


async def in_workers(pdf: bytes, workers: int, scale: float, passes: int) -> tuple[float, float]:
    pool = DocumentPool(workers, DEFAULTS.document_worker_memory_mb, DEFAULTS.document_timeout_s)
    await pool.start()
    try:
        path = await pool.store(pdf)
        unopened = PdfFile(path, 0, LIMITS)
        count = await pool.run(PdfDocument.count_pages, doc=unopened, what="opening")
        doc = PdfFile(path, count, LIMITS)

        window = asyncio.Semaphore(WINDOW)

        async def render(page: int) -> None:
            async with window:  # a page is dropped once rendered, as the server's reader takes it
                await pool.run(PdfDocument.render, page, scale, doc=doc, what=f"page {page}")

        async def render_all(times: int) -> None:
            await asyncio.gather(*(render(page) for _ in range(times) for page in range(count)))

        await render_all(workers)  # warm-up: every worker opens the document, loads its fonts
        cpu, started = cpu_seconds(pool.pids()), time.perf_counter()
        await render_all(passes)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(pool.pids()) - cpu
        pool.discard(path)
    finally:
        await pool.stop()
    return passes * count / elapsed, cpu / (passes * count)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "run              pages  pages/s  vs 1 worker  vs in process  CPU ms/page",
        "---------------  -----  -------  -----------  -------------  -----------",
    ]
    for row in rows:
        one = f"{row['ratio_vs_1_worker']:.2f}" if row["ratio_vs_1_worker"] else "-"
        lines.append(
            f"{row['run']:<15}  {row['pages']:>5}  {row['pages_per_s']:>7.2f}  {one:>11}  "
            f"{row['ratio_vs_in_process']:>13.2f}  {row['cpu_ms_per_page']:>11.1f}"
        )
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Render throughput, {result['document']} ({result['pages']} pages) at scale "
        f"{result['scale']}, {result['passes']} passes; {result['machine']}.",
        "",
        "| run | pages/s | vs 1 worker | vs in process | CPU ms/page |",
        "|---|---|---|---|---|",
    ]
    for row in result["results"]:
        one = f"{row['ratio_vs_1_worker']:.2f}" if row["ratio_vs_1_worker"] else "–"
        rate, vs_in_process = row["pages_per_s"], row["ratio_vs_in_process"]
        cpu = row["cpu_ms_per_page"]
        lines.append(f"| {row['run']} | {rate:.2f} | {one} | {vs_in_process:.2f} | {cpu:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--pdf", type=Path, default=None, help=f"document to render (default: {PAPER}, if there)"
    )
    parser.add_argument("--scale", type=float, default=2.0, help="render scale")
    parser.add_argument(
        "--workers",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[1, os.cpu_count() or 2],
        help="worker counts to run, e.g. 1,2,4 (default: 1 and one per core)",
    )
    parser.add_argument("--passes", type=int, default=6, help="passes over the document per run")
    parser.add_argument("--json", type=Path, help="also write the results here (and a .md)")
    args = parser.parse_args(argv)
    if args.pdf is not None:
        pdf, name = args.pdf.read_bytes(), args.pdf.name
    elif PAPER.is_file():
        pdf, name = PAPER.read_bytes(), PAPER.name
    else:
        pdf, name = written_paper(), "a 16-page paper written with pymupdf"
    with pymupdf.open(stream=pdf, filetype="pdf") as doc:
        pages = doc.page_count
    log(f"render_bench: {name}, {pages} pages at scale {args.scale}; {cpu_name()}")
    reference, cpu = in_process(pdf, pages, args.scale, args.passes)
    log(f"in process: {reference:.2f} pages/s")
    rows = [
        {
            "run": "in process",
            "workers": 0,
            "pages": pages * args.passes,
            "pages_per_s": reference,
            "ratio_vs_1_worker": None,
            "ratio_vs_in_process": 1.0,
            "cpu_ms_per_page": 1000 * cpu,
        }
    ]
    one = None
    for workers in args.workers:
        rate, cpu = asyncio.run(in_workers(pdf, workers, args.scale, args.passes))
        one = rate if workers == 1 else one
        log(f"{workers} worker(s): {rate:.2f} pages/s")
        rows.append(
            {
                "run": f"workers: {workers}",
                "workers": workers,
                "pages": pages * args.passes,
                "pages_per_s": rate,
                "ratio_vs_1_worker": rate / one if one else None,
                "ratio_vs_in_process": rate / reference,
                "cpu_ms_per_page": 1000 * cpu,
            }
        )
    print(table(rows))
    result = {
        "document": name,
        "pages": pages,
        "scale": args.scale,
        "passes": args.passes,
        "machine": cpu_name(),
        "results": rows,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(markdown(result))
        log(f"results written to {args.json} and {args.json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
