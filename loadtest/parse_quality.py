"""Parse quality: ragws and its peers against ground truth, on a corpus this script typesets.

Asks: how much of a document's text, reading order, tables and headings does a parser keep?
The corpus (``_corpus.py``) is markdown with nested headings, lists, code and tables (several
with merged cells), typeset by Chromium in three layouts (one column; two columns with
full-width headings; one column with a running header and page-number footers) plus
image-only copies of the last for OCR. On the same PDFs, in one run:

- **ragws**: a server of the script's own (``ragws serve``, defaults), each PDF sent through
  ``ragws.client.AsyncClient.parse`` with default options (``text: auto``); the ``done``
  frame's markdown;
- **pymupdf4llm**: PyMuPDF's ``pymupdf4llm.to_markdown`` with its defaults, with
  pymupdf-layout's model active (licensed for non-commercial use: a peer here, never a
  ragws dependency);
- **opendataloader**: ``opendataloader_pdf.convert(..., format="markdown")`` with its
  defaults (Java 17+), one call per layout for all of its documents.

Metrics (``_quality_metrics.py``): NID, NID-S, TEDS, TEDS-S, MHS, MHS-S and Overall as
opendataloader-bench defines them, heading levels, word recall and furniture leak. Each engine
gets one untimed warm-up document; s/page is wall time over pages.

Example::

    python loadtest/parse_quality.py                      # everything, a few minutes
    python loadtest/parse_quality.py --docs 2 --layouts one-column --engines ragws
    python loadtest/parse_quality.py --keep-corpus /tmp/pq    # keep PDFs, ground truth, outputs
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _corpus  # noqa: E402
import _quality_metrics as qm  # noqa: E402
from _common import cpu_name, log, spawn_server, split_server_args  # noqa: E402

ENGINES = ("ragws", "pymupdf4llm", "opendataloader")
COLUMNS = (
    ("overall", "Overall"),
    ("nid", "NID"),
    ("nid_s", "NID-S"),
    ("teds", "TEDS"),
    ("teds_s", "TEDS-S"),
    ("mhs", "MHS"),
    ("mhs_s", "MHS-S"),
    ("heading_levels", "heading levels"),
    ("word_recall", "word recall"),
    ("furniture_leak", "furniture leak"),
)
INSTALL_PEERS = "pip install pymupdf4llm pymupdf-layout opendataloader-pdf  (and a Java 17+ JRE)"


@dataclass
class Output:
    """What one engine made of one PDF."""

    markdown: str
    seconds: float  # wall time for this document (opendataloader: its share of the batch)
    error: str | None = None  # the engine failed on this document (scored as empty output)


class Skipped(Exception):
    """An engine that cannot run here; the message says how to make it run."""


# --- engines ---------------------------------------------------------------------------------


def warm_up_set(pdfs: Sequence[_corpus.CorpusPdf]) -> list[_corpus.CorpusPdf]:
    """One PDF with a text layer and one scan (where there are such), parsed untimed first so
    that no document is charged for loading models."""
    return list({pdf.layout == "scans": pdf for pdf in pdfs}.values())


def run_ragws(pdfs: Sequence[_corpus.CorpusPdf], work: Path, serve_flags: Sequence[str]) -> dict:
    """Every PDF through a spawned server, one request at a time."""
    from ragws.client import AsyncClient, RagwsError

    async def parse_all(url: str) -> dict:
        outputs = {}
        async with AsyncClient.connect(url) as client:
            for pdf in warm_up_set(pdfs):
                await client.parse_document(pdf.path.read_bytes())
            for pdf in pdfs:
                data = pdf.path.read_bytes()
                started = time.perf_counter()
                try:
                    doc = await client.parse_document(data)
                    out = Output(doc.markdown, time.perf_counter() - started)
                except RagwsError as exc:
                    out = Output("", time.perf_counter() - started, f"{exc.code}: {exc.message}")
                outputs[pdf.layout, pdf.doc.name] = out
                log(f"  ragws {pdf.layout} {pdf.doc.name}: {out.seconds:.1f} s {out.error or ''}")
        return outputs

    with spawn_server(serve_flags, work / "ragws-server.log") as server:
        return asyncio.run(parse_all(server.target.ws_url))


def pymupdf4llm_version() -> str:
    if importlib.util.find_spec("pymupdf4llm") is None:
        raise Skipped(f"pymupdf4llm is not installed: {INSTALL_PEERS}")
    if importlib.util.find_spec("pymupdf.layout") is None and (
        importlib.util.find_spec("pymupdf_layout") is None
    ):
        raise Skipped(
            "pymupdf-layout is not installed (pip install pymupdf-layout); without it "
            "pymupdf4llm runs its older heuristics, which is not the peer measured here"
        )
    import pymupdf4llm

    return getattr(pymupdf4llm, "__version__", "?")


def run_pymupdf4llm(pdfs: Sequence[_corpus.CorpusPdf], work: Path, _: Sequence[str]) -> dict:
    """``to_markdown`` with its defaults, in this process (layout model loaded on first use)."""
    pymupdf4llm_version()
    import pymupdf4llm

    for pdf in warm_up_set(pdfs):  # loads the layout model (and the OCR one)
        pymupdf4llm.to_markdown(str(pdf.path))
    outputs = {}
    for pdf in pdfs:
        started = time.perf_counter()
        try:
            out = Output(pymupdf4llm.to_markdown(str(pdf.path)), 0.0)
        except Exception as exc:  # a peer's failure on one document is a score, not a crash
            out = Output("", 0.0, f"{type(exc).__name__}: {exc}")
        out.seconds = time.perf_counter() - started
        outputs[pdf.layout, pdf.doc.name] = out
    return outputs


def opendataloader_version() -> str:
    if importlib.util.find_spec("opendataloader_pdf") is None:
        raise Skipped(f"opendataloader-pdf is not installed: {INSTALL_PEERS}")
    if shutil.which("java") is None:
        raise Skipped(
            "opendataloader-pdf needs Java 17+ (Debian: apt-get install default-jre-headless)"
        )
    from importlib.metadata import version

    return version("opendataloader-pdf")


def run_opendataloader(pdfs: Sequence[_corpus.CorpusPdf], work: Path, _: Sequence[str]) -> dict:
    """One ``convert`` call (one JVM) per layout, for all of that layout's PDFs; each document
    is charged the batch's time in proportion to its pages."""
    opendataloader_version()
    import opendataloader_pdf

    def convert(paths: list[Path], out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        opendataloader_pdf.convert(
            input_path=[str(p) for p in paths], output_dir=str(out), format="markdown", quiet=True
        )

    convert([pdfs[0].path], work / "odl-warmup")
    outputs = {}
    for layout in dict.fromkeys(pdf.layout for pdf in pdfs):
        batch = [pdf for pdf in pdfs if pdf.layout == layout]
        out = work / "opendataloader" / layout
        started = time.perf_counter()
        convert([pdf.path for pdf in batch], out)
        elapsed = time.perf_counter() - started
        pages = sum(pdf.pages for pdf in batch)
        for pdf in batch:
            md = out / f"{pdf.path.stem}.md"
            text = md.read_text(errors="replace") if md.exists() else ""
            error = None if md.exists() else "no markdown written"
            outputs[layout, pdf.doc.name] = Output(text, elapsed * pdf.pages / pages, error)
    return outputs


RUNNERS = {"ragws": run_ragws, "pymupdf4llm": run_pymupdf4llm, "opendataloader": run_opendataloader}
VERSIONS = {
    "ragws": lambda: __import__("ragws").__version__,
    "pymupdf4llm": pymupdf4llm_version,
    "opendataloader": opendataloader_version,
}


# --- scoring and reporting -------------------------------------------------------------------


def evaluate(pdfs: Sequence[_corpus.CorpusPdf], outputs: dict, engine: str, keep: Path | None):
    """Per layout: the engine's mean scores, s/page and each document's scores."""
    by_layout: dict[str, Any] = {}
    for layout in dict.fromkeys(pdf.layout for pdf in pdfs):
        docs, scores, seconds, pages = [], [], 0.0, 0
        for pdf in (p for p in pdfs if p.layout == layout):
            out: Output = outputs[layout, pdf.doc.name]
            if keep is not None:
                target = keep / "outputs" / engine / layout / f"{pdf.doc.name}.md"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(out.markdown)
            s = qm.score(pdf.ground_truth, out.markdown, pdf.furniture)
            scores.append(s)
            seconds += out.seconds
            pages += pdf.pages
            docs.append(
                {
                    "document": pdf.doc.name,
                    "pages": pdf.pages,
                    "seconds": out.seconds,
                    **s.as_dict(),
                    **({"error": out.error} if out.error else {}),
                }
            )
        by_layout[layout] = {
            **qm.mean_scores(scores),
            "s_per_page": seconds / pages if pages else None,
            "pages": pages,
            "documents": docs,
        }
    return by_layout


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_tables(result: dict) -> str:
    lines = [
        f"Machine: {result['machine']}. Corpus: {result['corpus']['documents']} documents; "
        "metrics as opendataloader-bench defines them (Overall = mean of NID, TEDS, MHS), "
        "heading levels, word recall and furniture leak (loadtest/README.md).",
        "",
    ]
    for layout, engines in result["layouts"].items():
        pages = result["corpus"]["pages"].get(layout)
        lines += [f"### {layout} ({pages} pages)", ""]
        head = ["engine", *(label for _, label in COLUMNS), "s/page"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for engine, row in engines.items():
            cells = [fmt(row.get(key)) for key, _ in COLUMNS] + [fmt(row.get("s_per_page"), 2)]
            lines.append(f"| {engine} | " + " | ".join(cells) + " |")
        lines.append("")
    for engine, info in result["engines"].items():
        if info.get("skipped") or info.get("failed"):
            why = (
                f"skipped: {info['skipped']}"
                if info.get("skipped")
                else f"failed: {info['failed']}"
            )
            lines.append(f"- {engine}: {why}")
        else:
            lines.append(f"- {engine} {info['version']}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Flags after -- go to the spawned `ragws serve`.",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="result folder")
    parser.add_argument(
        "--layouts",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(_corpus.LAYOUTS),
        help="comma-separated subset of " + ",".join(_corpus.LAYOUTS),
    )
    parser.add_argument(
        "--engines",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(ENGINES),
        help="comma-separated subset of " + ",".join(ENGINES),
    )
    parser.add_argument("--docs", type=int, default=8, help="documents (1-9)")
    parser.add_argument(
        "--keep-corpus", type=Path, help="build the corpus here and keep it, with every output"
    )
    own, serve_flags = split_server_args(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    for name, chosen, known in (
        ("--layouts", args.layouts, _corpus.LAYOUTS),
        ("--engines", args.engines, ENGINES),
    ):
        if unknown := set(chosen) - set(known):
            parser.error(f"{name}: unknown {', '.join(sorted(unknown))}")

    work = args.keep_corpus or Path(tempfile.mkdtemp(prefix="parse-quality-"))
    try:
        started = time.perf_counter()
        docs = _corpus.documents(args.docs)
        pdfs = _corpus.build(work, docs, args.layouts)
        log(f"corpus: {len(pdfs)} PDFs in {time.perf_counter() - started:.0f} s ({work})")
        result: dict[str, Any] = {
            "machine": cpu_name(),
            "corpus": {
                "documents": len(docs),
                "pages": {
                    layout: sum(p.pages for p in pdfs if p.layout == layout)
                    for layout in args.layouts
                },
            },
            "engines": {},
            "layouts": {layout: {} for layout in args.layouts},
        }
        for engine in args.engines:
            try:
                version = VERSIONS[engine]()
            except Skipped as exc:
                log(f"{engine}: skipped: {exc}")
                result["engines"][engine] = {"skipped": str(exc)}
                continue
            log(f"== {engine} {version}")
            began = time.perf_counter()
            try:
                outputs = RUNNERS[engine](pdfs, work, serve_flags)
            except (Exception, SystemExit) as exc:  # e.g. a server that does not start
                log(f"{engine}: failed: {exc}")
                result["engines"][engine] = {"version": version, "failed": str(exc)}
                continue
            log(f"== {engine} done in {time.perf_counter() - began:.0f} s")
            result["engines"][engine] = {"version": version}
            for layout, row in evaluate(pdfs, outputs, engine, args.keep_corpus).items():
                result["layouts"][layout][engine] = row
    finally:
        if args.keep_corpus is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_tables(result)
    (args.out / "parse_quality.json").write_text(json.dumps(result, indent=2))
    (args.out / "parse_quality.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
