"""Command line: ``ragws serve`` starts the server, ``ragws parse`` sends documents to one.

``serve`` flags are generated from :class:`ragws.config.Settings`, so ``--help`` always lists
every setting with its default and environment variable. ``parse`` is a client
(:mod:`ragws.client`): it writes markdown and JSON per document, several documents at a time
over one WebSocket. Both work as ``python -m ragws COMMAND`` too.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import glob
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragws import __version__
from ragws.config import ConfigError, env_name, flag_name, load_settings, setting_fields
from ragws.logs import configure_logging
from ragws.pipeline.mupdf_setup import keep_layout_analyzer_out

if TYPE_CHECKING:  # imported late at run time: keeps --help fast
    from tqdm import tqdm

    from ragws.client import AsyncClient, Document

#: What ``ragws parse DIR`` picks up from a directory.
DOCUMENT_SUFFIXES = (".pdf", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")
DEFAULT_SERVER = "ws://127.0.0.1:7088/ws"
# A document refused as overloaded is sent again after 1, 2, 4 s before it counts as failed.
OVERLOADED_RETRIES = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragws",
        description="WebSocket inference server for document layout, OCR and parsing, "
        "and a client that parses documents with it.",
    )
    parser.add_argument("--version", action="version", version=f"ragws {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="start the server",
        description="Start the server. Precedence: flags > RAGWS_* environment > config file "
        "> defaults.",
    )
    serve.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="TOML file with settings (keys as the flags, with underscores); "
        "default: ./config.toml when present",
    )
    for f in setting_fields():
        choices = f.metadata["choices"]
        serve.add_argument(
            flag_name(f.name),
            dest=f.name,
            type=str,  # coerced and validated by load_settings, which names the setting
            default=None,
            metavar=("{" + ",".join(choices) + "}") if choices else f.name.upper(),
            help=f"{f.metadata['help']} (default: {f.default}; env {env_name(f.name)})",
        )
    _add_parse_command(commands)
    return parser


def _add_parse_command(commands: Any) -> None:
    parse = commands.add_parser(
        "parse",
        help="parse documents to markdown and JSON with a running server",
        description="Send PDFs and images to a ragws server and write, for each document, "
        "OUT/NAME.md (its markdown) and OUT/NAME.json (pages with blocks, markdown, chunks, "
        "timing; figure crops as base64). A progress bar over pages is shown on a terminal. "
        "Exit status: 0 when every document was parsed, 1 when some failed (each failure is "
        "printed to stderr), 2 for usage errors and an unreachable server.",
    )
    parse.add_argument(
        "inputs",
        nargs="+",
        metavar="FILE|DIR|GLOB",
        help="documents: files, directories (their " + " ".join(DOCUMENT_SUFFIXES) + " files), "
        "or glob patterns (quoted; ** recurses)",
    )
    parse.add_argument(
        "--server",
        metavar="URL",
        default=os.environ.get("RAGWS_SERVER", DEFAULT_SERVER),
        help=f"the server's WebSocket URL (default: {DEFAULT_SERVER}; env RAGWS_SERVER)",
    )
    parse.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        type=Path,
        default=Path("."),
        help="directory for NAME.md and NAME.json (default: the current directory)",
    )
    parse.add_argument(
        "--concurrency",
        metavar="N",
        type=_positive_int,
        default=4,
        help="documents in flight at once, over one connection (default: 4)",
    )
    parse.add_argument(
        "--connections",
        metavar="K",
        type=_positive_int,
        default=1,
        help="sockets per document: a PDF goes as page ranges over K connections (through a "
        "load balancer, to several replicas), results put back in page order (default: 1)",
    )
    parse.add_argument(
        "--pages-per-request",
        metavar="N",
        type=_positive_int,
        default=None,
        help="pages per range when a PDF is split (default: an even share of --connections; "
        "a PDF over the server's max_pages is split into ranges of max_pages by itself)",
    )
    parse.add_argument(
        "--text",
        choices=("auto", "ocr", "pdf"),
        default="auto",
        help="where text comes from: auto = the PDF's text layer, OCR where there is none; "
        "pdf = the text layer only; ocr = OCR only (default: auto)",
    )
    parse.add_argument(
        "--pages",
        metavar="LIST",
        type=_page_list,
        default=None,
        help="0-based pages of each PDF, e.g. 0,1,5 or 0-3,7 (default: all; images are one page)",
    )
    parse.add_argument(
        "--chunk-chars",
        metavar="N",
        type=_positive_int,
        default=1500,
        help="target characters per RAG chunk (default: 1500)",
    )
    parse.add_argument(
        "--scale",
        metavar="S",
        type=float,
        default=2.0,
        help="PDF render scale; bboxes are in these pixels (default: 2.0)",
    )
    parse.add_argument(
        "--figures", action="store_true", help="include figure crops (JPEG) in the JSON"
    )
    parse.add_argument(
        "--furniture",
        action="store_true",
        help="keep page headers and footers in the markdown and chunks",
    )
    parse.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("RAGWS_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default: env RAGWS_API_KEY)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _page_list(text: str) -> list[int]:
    """``0,1,5`` or ``0-3,7`` → [0, 1, 5] / [0, 1, 2, 3, 7]; each page once, in given order."""
    pages: list[int] = []
    try:
        for part in text.split(","):
            first, dash, last = part.strip().partition("-")
            start = int(first)
            stop = int(last) if dash else start
            if start < 0 or stop < start:
                raise ValueError
            pages.extend(p for p in range(start, stop + 1) if p not in pages)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 0-based pages such as 0,1,5 or 0-3,7, got {text!r}"
        ) from None
    return pages


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "parse":
        return _parse_main(args)
    if args.command == "serve":
        cli = {f.name: getattr(args, f.name) for f in setting_fields()}
        try:
            settings = load_settings(cli, config_path=args.config)
        except ConfigError as exc:
            parser.exit(2, f"ragws: invalid setting: {exc}\n")
        configure_logging(settings.log_level, settings.log_format)
        keep_layout_analyzer_out()
        from ragws.bootstrap import serve_forever  # imported late: keeps --help fast

        try:
            asyncio.run(serve_forever(settings))
        except Exception as exc:  # start-up failures: model missing, port taken, ...
            logging.getLogger("ragws").error("cannot start: %s", exc)
            return 1
    return 0


# --- ragws parse ----------------------------------------------------------------------------


class UsageError(Exception):
    """The command line names no work that can be done: exit status 2."""


@dataclasses.dataclass(frozen=True, slots=True)
class ParseJob:
    """One input document and where its results go."""

    path: Path
    pages: int  # pages the progress bar expects from it


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files named, documents of directories named (sorted), and files matching globs.

    Each file once, in the order given. A path that is neither a file, a directory nor a
    pattern is a :class:`UsageError`; so is finding no file at all.
    """
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            children = sorted(p for p in path.iterdir() if p.suffix.lower() in DOCUMENT_SUFFIXES)
            found.update((p, None) for p in children if p.is_file())
        elif path.is_file():
            found[path] = None
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            found.update((Path(m), None) for m in matches if Path(m).is_file())
        else:
            raise UsageError(f"no such file or directory: {item}")
    if not found:
        raise UsageError("no input files: " + " ".join(inputs))
    return list(found)


def output_names(paths: Sequence[Path]) -> dict[Path, str]:
    """NAME of each input's OUT/NAME.md: its file name without suffix, which must be unique."""
    names: dict[str, Path] = {}
    for path in paths:
        if (other := names.get(path.stem)) is not None:
            raise UsageError(f"{other} and {path} would both be written as {path.stem}.md")
        names[path.stem] = path
    return {path: name for name, path in names.items()}


def count_pages(path: Path, pages: Sequence[int] | None) -> int:
    """Pages a document will stream: a PDF's (selected) pages, 1 for an image.

    A PDF pymupdf cannot open counts 0 pages here; the server says what is wrong with it.
    """
    with path.open("rb") as f:
        head = f.read(5)
    if head != b"%PDF-":
        return 1
    import pymupdf

    try:
        with pymupdf.open(path, filetype="pdf") as doc:
            total = doc.page_count
    except Exception:  # pymupdf raises several types for damaged files
        return 0
    return total if pages is None else sum(1 for p in pages if p < total)


def document_json(path: Path, doc: Document) -> str:
    """OUT/NAME.json: the document's pages, markdown, chunks and timing; bytes as base64."""
    record = {
        "file": path.name,
        "page_count": doc.page_count,
        "pages": [dataclasses.asdict(page) for page in doc.pages],
        "markdown": doc.markdown,
        "chunks": [dataclasses.asdict(chunk) for chunk in doc.chunks],
        "timing": doc.timing,
    }
    return json.dumps(record, ensure_ascii=False, indent=1, default=_base64)


def _base64(value: Any) -> str:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _parse_main(args: argparse.Namespace) -> int:
    import pymupdf

    # A damaged PDF is reported once, by the server, not also by MuPDF while counting pages.
    pymupdf.TOOLS.mupdf_display_errors(False)
    try:
        paths = expand_inputs(args.inputs)
        names = output_names(paths)
    except UsageError as exc:
        print(f"ragws parse: {exc}", file=sys.stderr)
        return 2
    jobs = [ParseJob(path, count_pages(path, args.pages)) for path in paths]
    try:
        return asyncio.run(_parse_all(args, jobs, names))
    except KeyboardInterrupt:
        return 130


async def _parse_all(args: argparse.Namespace, jobs: list[ParseJob], names: dict[Path, str]) -> int:
    from tqdm import tqdm

    from ragws.client import AsyncClient, RagwsError

    try:
        client = await AsyncClient.connect(args.server, api_key=args.api_key)
    except RagwsError as exc:
        print(f"ragws parse: cannot reach the server: {exc.message}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    queue: asyncio.Queue[ParseJob] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    failed: list[Path] = []
    bar = tqdm(
        total=sum(job.pages for job in jobs),
        unit="page",
        desc="parse",
        file=sys.stderr,
        disable=None,  # only on a terminal
    )

    async def worker() -> None:
        while not queue.empty():
            job = queue.get_nowait()
            if not await _parse_one(client, args, job, names[job.path], bar):
                failed.append(job.path)

    async with client:
        with bar:
            await asyncio.gather(*(worker() for _ in range(min(args.concurrency, len(jobs)))))
    done = len(jobs) - len(failed)
    print(
        f"ragws parse: {done} of {len(jobs)} documents parsed into {args.output}",
        file=sys.stderr,
    )
    return 1 if failed else 0


async def _parse_one(
    client: AsyncClient, args: argparse.Namespace, job: ParseJob, name: str, bar: tqdm
) -> bool:
    """Parse one document and write its files; on failure, say why on stderr."""
    from ragws.client import RagwsError, is_pdf

    received = 0

    def arrived(_page: object) -> None:
        nonlocal received
        received += 1
        bar.update(1)

    try:
        data = await asyncio.to_thread(job.path.read_bytes)
        for attempt in range(OVERLOADED_RETRIES + 1):
            try:
                doc = await client.parse_document(
                    data,
                    pages=args.pages if is_pdf(data) else None,  # an image is one page
                    text=args.text,
                    chunk_chars=args.chunk_chars,
                    scale=args.scale,
                    figures=args.figures,
                    furniture=args.furniture,
                    connections=args.connections,
                    pages_per_request=args.pages_per_request,
                    on_page=arrived,
                )
                break
            except RagwsError as exc:
                # Refused before any work: wait for room on the server, then try again.
                if exc.code != "overloaded" or received or attempt == OVERLOADED_RETRIES:
                    raise
                await asyncio.sleep(2.0**attempt)
        markdown, record = args.output / f"{name}.md", args.output / f"{name}.json"
        await asyncio.to_thread(markdown.write_text, doc.markdown, "utf-8")
        await asyncio.to_thread(record.write_text, document_json(job.path, doc), "utf-8")
    except (RagwsError, OSError) as exc:
        message = f"{exc.message} ({exc.code})" if isinstance(exc, RagwsError) else str(exc)
        bar.write(f"ragws parse: {job.path}: {message}", file=sys.stderr)
        if job.pages > received:  # pages that will not come no longer count
            bar.total -= job.pages - received
            bar.refresh()
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
