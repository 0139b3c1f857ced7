"""Layout throughput: the ragws server under N concurrent WebSocket clients vs. a plain loop.

What it measures
----------------
The same pages (every page of a PDF, rendered once with pymupdf and encoded as PNG before any
clock starts) go through the same embedded layout model (``OnnxLayoutModel``) two ways:

* **sequential** — one process, page after page: decode the PNG exactly as the server does
  (``ragws.pipeline.documents.decode_image``), ``model.prepare``, ``model.predict([x])``. No server,
  no sockets, no threads of our own: what a script that just runs the model gets. It runs
  before the servers and again after them, so that a machine whose speed drifts during the
  benchmark shows it (the two rows disagree; a warning is printed above 10%).
* **server** — a ragws server on loopback and N clients, each with its own WebSocket and one
  request in flight (send a page, wait for its ``layout`` answer, send the next). Pages are
  handed out round-robin from the same set, so both sides see the same mix of pages. By
  default two server configurations run side by side: dynamic batching as configured
  (``--batch-size``, ``--preferred``, ``--max-wait-ms``) and batch size 1 (no batching).

Every run reports pages/s, the client-side latency per page (p50/p95, send → answer), and the
mean pages per model call, taken from the server's ``ragws_layout_batch_size`` histogram
(``/metrics``, difference over the timed part of the run).

How to read it
--------------
``vs seq`` is the run's pages/s divided by the sequential pages/s measured in the same
invocation on the same machine (both sequential runs together). Ratios are comparable across
machines; absolute pages/s are only this machine's. A ratio ≥ 1.0 means the server (WebSocket,
msgpack, its thread pools and the batcher) costs nothing and its overlap of decoding with
inference, or its batching, pays for more than its overhead.

Latency grows with the number of clients by design: with one request per client in flight,
p50 ≈ clients / (pages/s) once the model is saturated. ``mean batch`` is the average number of
pages per model call during the run, and ``model ms/call`` the mean wall time of one model call
(the server's ``ragws_layout_inference_seconds``; for the sequential rows, the time in
``predict``): when it is higher in the server than in the sequential loop at the same batch
size, the threads around the model are slowing it down. ``CPU ms/page`` is this process's CPU
time (every thread: server, clients, onnxruntime) and its server's document workers' (which
decode the pages) per page; above the sequential rows' it means extra work per page (thread
spinning, oversubscription, protocol overhead), not waiting.

The client side is deliberately light (pre-packed frames, answers only msgpack-unpacked), but
with an in-process server it shares the event loop, the GIL and the cores with the server; on a
small machine that is part of what is measured. ``--url`` targets a server started elsewhere
(loopback only) instead.

Example::

    python loadtest/layout_bench.py                      # both configs, 16 clients, 64 pages
    python loadtest/layout_bench.py --clients 1,4,16 --json /tmp/layout.json
    python loadtest/layout_bench.py --url ws://127.0.0.1:7088/ws --clients 8 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import onnxruntime
import pymupdf
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loopback_target

from ragws.bootstrap import create_app
from ragws.config import Settings
from ragws.models import resolve_device
from ragws.models.layout_onnx import OnnxLayoutModel
from ragws.pipeline.documents import decode_image
from ragws.serving.services import SERVICES

DEFAULT_PDF = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "2310.01889v4.pdf"
DEFAULT_PASSES = 4  # default --pages: this many passes over the document
RECEIVE_TIMEOUT_S = 300.0  # one answer; only a hung server gets near it
MAX_IMAGE_PIXELS = Settings().max_image_pixels


def log(message: str) -> None:
    """A progress line on stderr, with the 1-minute load average: on a shared machine a load
    well above this benchmark's own means other processes took cores and the run is noisy."""
    stamp = f"{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}"
    print(f"[layout_bench {stamp}] {message}", file=sys.stderr, flush=True)


# --- results --------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class RunResult:
    """One measured run: the sequential baseline or one (config, clients) pair."""

    config: str
    clients: int | None  # None: the sequential baseline
    pages: int
    seconds: float
    latencies_ms: list[float] = dataclasses.field(repr=False)
    mean_batch: float | None = None
    model_ms: float | None = None  # mean wall time of one model call (predict of one batch)
    cpu_s: float | None = None  # this process's CPU time (all threads) over the timed part
    ratio: float | None = None  # pages/s over the sequential pages/s

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms_per_page(self) -> float | None:
        return None if self.cpu_s is None or not self.pages else 1000 * self.cpu_s / self.pages

    def as_dict(self) -> dict[str, Any]:
        cpu = self.cpu_ms_per_page
        return {
            "config": self.config,
            "clients": self.clients,
            "pages": self.pages,
            "seconds": round(self.seconds, 3),
            "pages_per_s": round(self.pages_per_s, 3),
            "ratio_vs_sequential": None if self.ratio is None else round(self.ratio, 3),
            "p50_ms": round(percentile(self.latencies_ms, 50), 1),
            "p95_ms": round(percentile(self.latencies_ms, 95), 1),
            "mean_batch": None if self.mean_batch is None else round(self.mean_batch, 2),
            "model_ms_per_call": None if self.model_ms is None else round(self.model_ms, 1),
            "cpu_ms_per_page": None if cpu is None else round(cpu, 1),
        }


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil(n × pct / 100)
    return ordered[int(rank) - 1]


def format_table(results: Sequence[RunResult]) -> str:
    header = (
        "config",
        "clients",
        "pages",
        "pages/s",
        "vs seq",
        "p50 ms",
        "p95 ms",
        "mean batch",
        "model ms/call",
        "CPU ms/page",
    )
    rows = [header]
    for r in results:
        d = r.as_dict()
        rows.append(
            (
                r.config,
                "-" if r.clients is None else str(r.clients),
                str(r.pages),
                f"{r.pages_per_s:.2f}",
                "-" if r.ratio is None else f"{r.ratio:.2f}",
                f"{d['p50_ms']:.0f}",
                f"{d['p95_ms']:.0f}",
                "-" if r.mean_batch is None else f"{r.mean_batch:.2f}",
                "-" if r.model_ms is None else f"{r.model_ms:.0f}",
                "-" if d["cpu_ms_per_page"] is None else f"{d['cpu_ms_per_page']:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- inputs and the model -------------------------------------------------------------------


def render_pngs(pdf: Path, scale: float) -> list[bytes]:
    """Every page of ``pdf`` as PNG bytes at ``scale`` (done once, before any timing)."""
    with pymupdf.open(pdf) as doc:
        return [
            page.get_pixmap(matrix=pymupdf.Matrix(scale, scale), alpha=False).tobytes("png")
            for page in doc
        ]


class Models:
    """One loaded model per inference-thread count, shared by the baseline and the servers."""

    def __init__(self) -> None:
        self._loaded: dict[int, OnnxLayoutModel] = {}
        self.device = resolve_device("auto", torch_backend=False)

    def get(self, inference_threads: int) -> OnnxLayoutModel:
        if inference_threads not in self._loaded:
            self._loaded[inference_threads] = OnnxLayoutModel(
                device=self.device, intra_op_threads=inference_threads or None
            )
        return self._loaded[inference_threads]


def run_sequential(
    model: OnnxLayoutModel,
    pngs: Sequence[bytes],
    *,
    pages: int | None,
    duration: float | None,
    warmup: int,
    label: str = "sequential",
) -> RunResult:
    """Decode + prepare + predict, one page at a time, in this thread."""

    def one(png: bytes) -> float:
        """One page; returns the seconds spent in ``predict``."""
        rgb = decode_image(png, MAX_IMAGE_PIXELS)
        x = model.prepare(rgb, model.default_conf, model.default_iou)
        t0 = time.perf_counter()
        model.predict([x])
        return time.perf_counter() - t0

    for i in range(warmup):
        one(pngs[i % len(pngs)])
    latencies: list[float] = []
    predict_s = 0.0
    cpu0 = time.process_time()
    started = time.perf_counter()
    done = 0
    while (pages is not None and done < pages) or (
        duration is not None and time.perf_counter() - started < duration
    ):
        t0 = time.perf_counter()
        predict_s += one(pngs[done % len(pngs)])
        latencies.append((time.perf_counter() - t0) * 1000)
        done += 1
    return RunResult(
        label,
        None,
        done,
        time.perf_counter() - started,
        latencies,
        mean_batch=1.0,
        model_ms=1000 * predict_s / max(done, 1),
        cpu_s=time.process_time() - cpu0,
    )


# --- the server -----------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Target:
    """A server to load: its WebSocket URL and its /metrics URL."""

    ws_url: str
    metrics_url: str
    runner: web.AppRunner | None = None  # set when this benchmark started the server

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def urls_for(ws_url: str) -> Target:
    """Check that ``ws_url`` is a loopback WebSocket URL and derive its /metrics URL."""
    target = loopback_target(ws_url)
    return Target(target.ws_url, target.metrics_url)


async def start_server(settings: Settings, model: OnnxLayoutModel) -> tuple[Target, int]:
    """Start ragws in this process on a free loopback port; returns it and its preferred batch."""
    app = create_app(settings, layout_model=model)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()  # starts the layout service (and measures "auto" preferred batch)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    batcher = app[SERVICES].layout.batcher
    preferred = batcher.preferred_batch_size if batcher is not None else None
    target = Target(f"ws://127.0.0.1:{port}/ws", f"http://127.0.0.1:{port}/metrics", runner)
    return target, preferred or settings.layout_batch_size


def workers_cpu(target: Target) -> float:
    """CPU seconds of the server's document workers (they decode the pages), when this
    benchmark started the server: its CPU is this process's and theirs."""
    if target.runner is None:
        return 0.0
    total = 0.0
    for pid in target.runner.app[SERVICES].documents.pool.pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


HISTOGRAMS = ("ragws_layout_batch_size", "ragws_layout_inference_seconds")


async def read_histograms(http: aiohttp.ClientSession, metrics_url: str) -> dict[str, float]:
    """The ``_sum`` and ``_count`` samples of :data:`HISTOGRAMS` from /metrics."""
    async with http.get(metrics_url) as response:
        response.raise_for_status()
        text = await response.text()
    wanted = {f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_sum", "_count")}
    found = dict.fromkeys(wanted, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[name] = float(value)
    return found


def histogram_mean(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    """Mean of the observations a histogram received between two scrapes."""
    count = after[f"{name}_count"] - before[f"{name}_count"]
    return (after[f"{name}_sum"] - before[f"{name}_sum"]) / count if count > 0 else None


# --- the clients ----------------------------------------------------------------------------


class Tickets:
    """Hands out page indices round-robin until the page budget or the deadline is spent."""

    def __init__(self, n_frames: int, pages: int | None, duration: float | None) -> None:
        self.n_frames = n_frames
        self.pages = pages
        self.duration = duration
        self.next = 0
        self.deadline = float("inf")

    def start(self) -> None:
        self.next = 0
        if self.duration is not None:
            self.deadline = time.perf_counter() + self.duration

    def take(self) -> int | None:
        if self.pages is not None and self.next >= self.pages:
            return None
        if time.perf_counter() >= self.deadline:
            return None
        ticket = self.next
        self.next += 1
        return ticket % self.n_frames


async def roundtrip(ws: aiohttp.ClientWebSocketResponse, frame: bytes, request_id: str) -> None:
    """Send one pre-packed layout frame and wait for its answer."""
    await ws.send_bytes(frame)
    message = await ws.receive(timeout=RECEIVE_TIMEOUT_S)
    if message.type != aiohttp.WSMsgType.BINARY:
        raise RuntimeError(f"expected a binary frame, got {message.type.name}: {message.data!r}")
    answer = msgpack.unpackb(message.data, raw=False)
    if answer.get("type") != "layout" or answer.get("id") != request_id:
        raise RuntimeError(f"unexpected answer to {request_id}: {str(answer)[:200]}")


async def client(
    ws: aiohttp.ClientWebSocketResponse,
    frames: Sequence[tuple[str, bytes]],
    tickets: Tickets,
    go: asyncio.Event,
    latencies: list[float],
) -> float:
    """Run one socket's requests after ``go``; returns when its last answer arrived."""
    await go.wait()
    last = time.perf_counter()
    while (page := tickets.take()) is not None:
        request_id, frame = frames[page]
        t0 = time.perf_counter()
        await roundtrip(ws, frame, request_id)
        last = time.perf_counter()
        latencies.append((last - t0) * 1000)
    return last


async def run_clients(
    target: Target,
    config: str,
    clients: int,
    frames: Sequence[tuple[str, bytes]],
    *,
    pages: int | None,
    duration: float | None,
    warmup: int,
) -> RunResult:
    """Open ``clients`` sockets, warm up, then time the page budget (or the duration)."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        sockets = [
            await http.ws_connect(target.ws_url, max_msg_size=0, autoclose=True)
            for _ in range(clients)
        ]
        try:
            for ws in sockets:
                hello = msgpack.unpackb((await ws.receive(timeout=30)).data, raw=False)
                if hello.get("type") != "hello":
                    raise RuntimeError(f"expected hello, got {str(hello)[:200]}")
            # Warm-up: every socket sends a few pages, all at once, untimed.
            for round_ in range(warmup):
                picks = [frames[(i + round_ * clients) % len(frames)] for i in range(clients)]
                await asyncio.gather(
                    *(
                        roundtrip(ws, frame, rid)
                        for ws, (rid, frame) in zip(sockets, picks, strict=True)
                    )
                )
            before = await read_histograms(http, target.metrics_url)
            tickets = Tickets(len(frames), pages, duration)
            go = asyncio.Event()
            latencies: list[float] = []
            tasks = [
                asyncio.ensure_future(client(ws, frames, tickets, go, latencies)) for ws in sockets
            ]
            tickets.start()
            cpu0 = time.process_time() + workers_cpu(target)
            started = time.perf_counter()
            go.set()
            finished = max(await asyncio.gather(*tasks))
            cpu_s = time.process_time() + workers_cpu(target) - cpu0
            after = await read_histograms(http, target.metrics_url)
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    model_s = histogram_mean(before, after, "ragws_layout_inference_seconds")
    return RunResult(
        config,
        clients,
        len(latencies),
        finished - started,
        latencies,
        mean_batch=histogram_mean(before, after, "ragws_layout_batch_size"),
        model_ms=None if model_s is None else 1000 * model_s,
        # With --url the server's CPU is another process's: only an in-process server counts.
        cpu_s=cpu_s if target.runner is not None else None,
    )


# --- orchestration --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    name: str
    batch_size: int
    preferred: str  # "auto" or an integer


def server_configs(args: argparse.Namespace) -> list[ServerConfig]:
    batching = ServerConfig("batching", args.batch_size, args.preferred)
    single = ServerConfig("no-batching", 1, "1")
    if args.no_batching:
        return [single]
    if args.batching_only:
        return [batching]
    return [batching, single]


def settings_for(config: ServerConfig, args: argparse.Namespace, clients: int) -> Settings:
    return Settings(
        host="127.0.0.1",
        port=0,
        log_level="warning",
        layout_model="embedded",
        max_concurrent=max(100, 2 * clients),
        layout_batch_size=config.batch_size,
        layout_preferred_batch_size=config.preferred,
        max_wait_ms=args.max_wait_ms,
        preprocess_threads=args.preprocess_threads,
        inference_threads=args.inference_threads,
    )


async def run_servers(
    args: argparse.Namespace,
    models: Models,
    pngs: Sequence[bytes],
    client_counts: Sequence[int],
) -> list[RunResult]:
    frames = [
        (f"p{i}", msgpack.packb({"type": "layout", "id": f"p{i}", "image": png}, use_bin_type=True))
        for i, png in enumerate(pngs)
    ]
    results: list[RunResult] = []
    if args.url is not None:
        plan: list[tuple[str, ServerConfig | None]] = [("external", None)]
    else:
        plan = [(c.name, c) for c in server_configs(args)]
    for name, config in plan:
        if config is None:
            target = urls_for(args.url)
            label = name
        else:
            settings = settings_for(config, args, max(client_counts))
            log(
                f"starting server '{name}': max batch {settings.layout_batch_size}, preferred "
                f"{settings.layout_preferred_batch_size}, window {settings.max_wait_ms} ms, "
                f"preprocess threads {settings.preprocess_threads or os.cpu_count()}, "
                f"inference threads {settings.inference_threads or 'default'}"
            )
            target, preferred = await start_server(settings, models.get(settings.inference_threads))
            label = f"{name} (max {config.batch_size}, pref {preferred})"
        try:
            for clients in client_counts:
                log(f"{label}: {clients} clients ...")
                result = await run_clients(
                    target,
                    label,
                    clients,
                    frames,
                    pages=args.pages,
                    duration=args.duration,
                    warmup=args.warmup,
                )
                log(
                    f"{label}: {clients} clients: {result.pages} pages in {result.seconds:.1f} s "
                    f"= {result.pages_per_s:.2f} pages/s"
                )
                results.append(result)
        finally:
            await target.close()
    return results


def sequential_reference(baselines: Sequence[RunResult]) -> float | None:
    """The sequential pages/s the ratios divide by: all sequential pages over their time.

    Warns when the runs before and after the servers disagree by more than 10%: the machine's
    speed changed during the benchmark (another process, throttling), and so may the ratios.
    """
    if not baselines:
        return None
    rates = [b.pages_per_s for b in baselines]
    if len(rates) > 1 and (spread := (max(rates) - min(rates)) / min(rates)) > 0.10:
        log(
            f"warning: the sequential runs differ by {100 * spread:.0f}% "
            f"({', '.join(f'{r:.2f}' for r in rates)} pages/s): the machine's speed drifted, "
            "ratios are uncertain by about as much; rerun on a quiet machine"
        )
    return sum(b.pages for b in baselines) / sum(b.seconds for b in baselines)


def parse_clients(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4,16, got {text!r}") from None
    if not counts or any(n < 1 or n > 1024 for n in counts):
        raise argparse.ArgumentTypeError("client counts must be 1..1024")
    return counts


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pages/s of the ragws layout server under N concurrent WebSocket clients, "
        "against the same model run sequentially in one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--pdf", type=Path, default=DEFAULT_PDF, help="document whose pages to use")
    parser.add_argument(
        "--scale", type=float, default=2.0, help="pymupdf render scale of the pages"
    )
    parser.add_argument(
        "--clients",
        type=parse_clients,
        default="16",
        help="concurrent WebSocket clients; a list like 1,4,16 runs each",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--pages",
        type=positive_int,
        default=None,
        help=f"pages per run (default: {DEFAULT_PASSES} passes over the document's pages)",
    )
    budget.add_argument(
        "--duration", type=float, default=None, help="seconds per run instead of a page count"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed requests per client (and pages for the baseline) before each run",
    )
    parser.add_argument("--batch-size", type=positive_int, default=16, help="largest layout batch")
    parser.add_argument(
        "--preferred", default="auto", help="preferred batch size: auto (measured) or an integer"
    )
    parser.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="batch window of the oldest queued page"
    )
    parser.add_argument(
        "--preprocess-threads",
        type=int,
        default=0,
        help="server's decode/prepare threads; 0 = one per core",
    )
    parser.add_argument(
        "--inference-threads",
        type=int,
        default=0,
        help="onnxruntime intra-op threads of the server's model; 0 = onnxruntime's default "
        "(the sequential baseline always uses the default)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--no-batching",
        action="store_true",
        help="run only the batch-size-1 server (default: batching and batch size 1)",
    )
    which.add_argument("--batching-only", action="store_true", help="run only the batching server")
    parser.add_argument(
        "--url",
        default=None,
        help="load an already running server at this loopback ws:// URL instead of starting one",
    )
    parser.add_argument("--no-sequential", action="store_true", help="skip the sequential baseline")
    parser.add_argument(
        "--sequential-once",
        action="store_true",
        help="run the sequential baseline only before the servers (default: before and after, "
        "and the ratios use both, so that a machine whose speed drifts shows it)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.preferred != "auto" and not (args.preferred.isdigit() and int(args.preferred) >= 1):
        raise SystemExit(f"--preferred {args.preferred!r}: expected auto or an integer ≥ 1")
    if args.url is not None:
        urls_for(args.url)  # refuse a non-loopback URL before doing any work
    if not args.pdf.is_file():
        raise SystemExit(f"--pdf {args.pdf}: no such file")

    started = time.perf_counter()
    log(f"rendering {args.pdf.name} at scale {args.scale} ...")
    pngs = render_pngs(args.pdf, args.scale)
    if args.pages is None and args.duration is None:
        args.pages = DEFAULT_PASSES * len(pngs)
    log(
        f"{len(pngs)} pages, {sum(map(len, pngs)) / len(pngs) / 1024:.0f} KiB PNG each on "
        f"average; {args.pages or f'{args.duration} s'} per run; {os.cpu_count()} CPUs"
    )
    models = Models()

    def sequential(label: str) -> RunResult:
        log(f"{label} ...")
        result = run_sequential(
            models.get(0),
            pngs,
            pages=args.pages,
            duration=args.duration,
            warmup=args.warmup,
            label=label,
        )
        log(f"{label}: {result.pages_per_s:.2f} pages/s")
        return result

    baselines: list[RunResult] = []
    if not args.no_sequential:
        once = args.sequential_once
        baselines.append(sequential("sequential" if once else "sequential (before)"))
    servers = asyncio.run(run_servers(args, models, pngs, args.clients))
    if baselines and not args.sequential_once:
        baselines.append(sequential("sequential (after)"))
    results = [baselines[0], *servers, *baselines[1:]] if baselines else servers
    reference = sequential_reference(baselines)
    if reference is not None:
        for result in results:
            result.ratio = result.pages_per_s / reference
    log(f"done in {time.perf_counter() - started:.0f} s")

    print(format_table(results))
    if args.json is not None:
        report = {
            "pdf": str(args.pdf),
            "scale": args.scale,
            "document_pages": len(pngs),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "onnxruntime": onnxruntime.__version__,
                "device": models.device,
            },
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "sequential_reference_pages_per_s": None if reference is None else round(reference, 3),
            "results": [r.as_dict() for r in results],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
