"""WebSocket load against a ragws server on loopback, with a summary and charts over time.

Usage::

    python loadtest/run.py SCENARIO --url ws://127.0.0.1:7088/ws --users N --spawn-rate R \\
        --duration S --out DIR [--requests M] [--inputs FILE ...]

Scenarios (each user holds one WebSocket and has one request in flight at a time):

* ``layout``     — page images (the fixture paper's pages as PNG) → ``layout``;
* ``pdf``        — whole PDFs → ``pdf`` (``--pages`` to send a subset);
* ``ocr``        — images → streamed ``ocr`` (time to first token, inter-token latency);
* ``parse``      — PDFs → ``parse`` (``--pages``, default the first page; ``--text``);
* ``mixed``      — each request drawn at random: layout 50%, ocr 30%, pdf 10%, parse 10%;
* ``disconnect`` — users open OCR streams and close their sockets at a random point (after
  0–``--cut-tokens`` tokens), then reconnect; the point is that the server frees everything:
  after the run its ``ragws_ocr_running``, ``ragws_kv_slots_used`` and
  ``ragws_inflight_requests`` are read from ``/metrics`` (waiting up to 10 s for them to settle).

Users start at ``--spawn-rate`` per second up to ``--users`` (as locust does) and stop issuing
requests after ``--duration`` seconds or ``--requests`` requests in all, whichever comes first;
requests in flight then get ``--grace`` seconds to finish. Only loopback URLs are accepted.

Writes ``DIR/summary.json`` (requests, failures, rps, p50/p95/p99 response time in ms; for OCR
scenarios tokens_per_s, ttft p50/p95, inter-token latency p50; for ``disconnect`` the server's
gauges after the run), ``DIR/timeline.json`` (per-second series) and ``DIR/chart.png``: the
seed's three panels over time (requests/s and failures/s, p50 and p95 response time, users),
plus time to first token for OCR scenarios. Progress goes to the terminal once a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pymupdf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    FIXTURES,
    PAPER,
    Target,
    gauges_at_rest,
    log,
    loopback_target,
    pyplot,
    save_chart,
)

SCENARIOS = ("layout", "pdf", "ocr", "parse", "mixed", "disconnect")
MIXED = (("layout", 0.5), ("ocr", 0.3), ("pdf", 0.1), ("parse", 0.1))
OCR_KINDS = ("ocr", "disconnect")
GAUGES = ("ragws_ocr_running", "ragws_kv_slots_used", "ragws_inflight_requests")


@dataclass(slots=True)
class Sample:
    kind: str
    start: float  # seconds since the run started
    end: float
    ok: bool
    error: str | None = None
    ttft: float | None = None
    tokens: int = 0
    itl: list[float] = field(default_factory=list)

    @property
    def latency(self) -> float:
        return self.end - self.start


class Inputs:
    """Request payloads, built once before the clock starts."""

    def __init__(self, args: argparse.Namespace) -> None:
        files = [Path(p) for p in args.inputs] if args.inputs else []
        pdfs = [f for f in files if f.suffix.lower() == ".pdf"] or [PAPER]
        images = [f for f in files if f.suffix.lower() != ".pdf"]
        if not images:
            images = [FIXTURES / n for n in ("table1.png", "table2.png", "title.png")]
        for path in [*pdfs, *images]:
            if not path.is_file():
                raise SystemExit(f"input not found: {path} (pass --inputs FILE ...)")
        self.pdfs = [p.read_bytes() for p in pdfs]
        self.images = [p.read_bytes() for p in images]
        # Layout pages: every page of the first PDF as PNG at scale 1 (1.2 MP, like a scan).
        with pymupdf.open(pdfs[0]) as doc:
            self.pages = [page.get_pixmap(dpi=144).tobytes("png") for page in doc]
        self.pdf_pages = args.pages
        self.parse_pages = args.pages or [0]
        self.text = args.text
        self.max_tokens = args.max_tokens

    def frame(self, kind: str, rng: random.Random, request_id: int) -> dict[str, Any]:
        if kind == "layout":
            return {"type": "layout", "id": request_id, "image": rng.choice(self.pages)}
        if kind == "pdf":
            frame = {"type": "pdf", "id": request_id, "pdf": rng.choice(self.pdfs)}
            return {**frame, "pages": self.pdf_pages} if self.pdf_pages else frame
        if kind in OCR_KINDS:
            frame = {"type": "ocr", "id": request_id, "image": rng.choice(self.images)}
            return {**frame, "max_tokens": self.max_tokens} if self.max_tokens else frame
        if kind == "parse":
            return {
                "type": "parse",
                "id": request_id,
                "pdf": rng.choice(self.pdfs),
                "pages": self.parse_pages,
                "text": self.text,
            }
        raise ValueError(kind)


class Run:
    """Shared state of one run: the clock, the request budget, the samples."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.samples: list[Sample] = []
        self.users = 0
        self.user_series: list[tuple[float, int]] = [(0.0, 0)]
        self.issued = 0
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def now(self) -> float:
        return time.monotonic() - self.started

    def take_request(self) -> bool:
        """May a user start another request? Counts it when so."""
        if self.stopping.is_set():
            return False
        if self.args.requests and self.issued >= self.args.requests:
            self.stopping.set()
            return False
        self.issued += 1
        return True

    def user_count(self, delta: int) -> None:
        self.users += delta
        self.user_series.append((self.now(), self.users))


async def one_request(
    ws: aiohttp.ClientWebSocketResponse, frame: dict[str, Any], run: Run, kind: str
) -> Sample:
    sample = Sample(kind, run.now(), 0.0, False)
    last_token: float | None = None
    await ws.send_bytes(msgpack.packb(frame, use_bin_type=True))
    while True:
        message = await ws.receive()
        if message.type != aiohttp.WSMsgType.BINARY:
            sample.end, sample.error = run.now(), f"socket closed ({message.type.name})"
            return sample
        reply = msgpack.unpackb(message.data, raw=False)
        if reply.get("id") != frame["id"]:
            continue
        kind_of = reply["type"]
        if kind_of == "token":
            now = run.now()
            if sample.ttft is None:
                sample.ttft = now - sample.start
            elif last_token is not None:
                sample.itl.append(now - last_token)
            last_token = now
            sample.tokens += 1
        elif kind_of in ("layout", "done"):
            sample.end, sample.ok = run.now(), True
            if kind_of == "done" and "usage" in reply:
                sample.tokens = reply["usage"].get("completion_tokens", sample.tokens)
            return sample
        elif kind_of == "error":
            sample.end, sample.error = run.now(), reply.get("code", "error")
            return sample


async def cut_stream(
    ws: aiohttp.ClientWebSocketResponse, frame: dict[str, Any], run: Run, cut: int
) -> Sample:
    """Open an OCR stream and close the socket after ``cut`` tokens (or at its end)."""
    sample = Sample("disconnect", run.now(), 0.0, True)
    await ws.send_bytes(msgpack.packb(frame, use_bin_type=True))
    while sample.tokens < cut:
        message = await ws.receive()
        if message.type != aiohttp.WSMsgType.BINARY:
            break
        reply = msgpack.unpackb(message.data, raw=False)
        if reply["type"] == "token":
            if sample.ttft is None:
                sample.ttft = run.now() - sample.start
            sample.tokens += 1
        elif reply["type"] in ("done", "error"):
            sample.ok = reply["type"] == "done"
            sample.error = reply.get("code")
            break
    await ws.close()
    sample.end = run.now()
    return sample


async def user(number: int, run: Run, target: Target, inputs: Inputs) -> None:
    rng = random.Random(run.args.seed * 1000 + number)
    scenario = run.args.scenario
    request_id = 0
    run.user_count(+1)
    try:
        async with aiohttp.ClientSession() as http:
            while not run.stopping.is_set():
                try:
                    ws = await http.ws_connect(target.ws_url, max_msg_size=0, heartbeat=30)
                except aiohttp.ClientError as exc:
                    now = run.now()
                    run.samples.append(Sample(scenario, now, now, False, f"connect: {exc}"))
                    await asyncio.sleep(1.0)
                    continue
                async with ws:
                    await ws.receive()  # hello
                    while run.take_request():
                        request_id += 1
                        kind = scenario
                        if scenario == "mixed":
                            kind = rng.choices([k for k, _ in MIXED], [w for _, w in MIXED])[0]
                        frame = inputs.frame(kind, rng, request_id)
                        if kind == "disconnect":
                            cut = rng.randint(0, run.args.cut_tokens)
                            run.samples.append(await cut_stream(ws, frame, run, cut))
                            break  # this socket is gone; open another
                        sample = await one_request(ws, frame, run, kind)
                        run.samples.append(sample)
                        if ws.closed:
                            break
    finally:
        run.user_count(-1)


async def spawn(run: Run, target: Target, inputs: Inputs) -> None:
    for number in range(run.args.users):
        if run.stopping.is_set():
            break
        run.tasks.append(asyncio.create_task(user(number, run, target, inputs)))
        await asyncio.sleep(1.0 / run.args.spawn_rate)


async def progress(run: Run) -> None:
    shown = 0
    while True:
        await asyncio.sleep(1.0)
        now = run.now()
        recent = run.samples[shown:]
        shown = len(run.samples)
        done = [s for s in recent if s.ok]
        latencies = [s.latency for s in done]
        p50, p95 = ms(pct(latencies, 0.5)), ms(pct(latencies, 0.95))
        log(
            f"t={now:5.1f}s users={run.users:3d} requests={len(run.samples):5d} "
            f"ok/s={len(done):3d} fail/s={len(recent) - len(done):3d} "
            f"p50={p50 if p50 is not None else '-'}ms p95={p95 if p95 is not None else '-'}ms"
        )


async def settle(target: Target, timeout: float = 10.0) -> dict[str, Any]:
    """The server's gauges once they reach 0 (or after ``timeout``), and how long that took."""
    async with aiohttp.ClientSession() as http:
        gauges, waited = await gauges_at_rest(http, target, timeout, GAUGES)
    return {**gauges, "settled_after_s": waited}


async def drive(args: argparse.Namespace, target: Target, inputs: Inputs) -> Run:
    run = Run(args)
    reporter = asyncio.create_task(progress(run))
    spawner = asyncio.create_task(spawn(run, target, inputs))
    try:
        await asyncio.wait_for(run.stopping.wait(), args.duration)
    except asyncio.TimeoutError:
        run.stopping.set()
    spawner.cancel()
    pending: set[asyncio.Task[None]] = set()
    if run.tasks:
        _, pending = await asyncio.wait(run.tasks, timeout=args.grace)
    for task in pending:  # still in flight after the grace period: abandon (closes sockets)
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    reporter.cancel()
    return run


# --- results ------------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 1)


def summarize(run: Run, elapsed: float) -> dict[str, Any]:
    samples = run.samples
    ok = [s for s in samples if s.ok]
    latencies = [s.latency for s in ok]
    summary: dict[str, Any] = {
        "scenario": run.args.scenario,
        "users": run.args.users,
        "spawn_rate": run.args.spawn_rate,
        "duration_s": round(elapsed, 2),
        "requests": len(samples),
        "failures": len(samples) - len(ok),
        "rps": round(len(ok) / elapsed, 3) if elapsed else 0.0,
        "p50_ms": ms(pct(latencies, 0.50)),
        "p95_ms": ms(pct(latencies, 0.95)),
        "p99_ms": ms(pct(latencies, 0.99)),
        "errors": _count(s.error or "" for s in samples if not s.ok),
        "by_kind": _count(s.kind for s in samples),
    }
    if run.args.scenario in (*OCR_KINDS, "mixed"):
        streams = [s for s in ok if s.kind in OCR_KINDS]
        ttfts = [s.ttft for s in streams if s.ttft is not None]
        summary["tokens_per_s"] = round(sum(s.tokens for s in streams) / elapsed, 2)
        summary["ttft_p50_ms"] = ms(pct(ttfts, 0.50))
        summary["ttft_p95_ms"] = ms(pct(ttfts, 0.95))
        summary["itl_p50_ms"] = ms(pct([x for s in streams for x in s.itl], 0.50))
    return summary


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def timeline(run: Run, elapsed: float, window: int) -> list[dict[str, Any]]:
    """Per-second rows: completions in that second (``rps``, ``failures``, by end time) and,
    over the trailing ``window`` seconds, the mean rate and the latency and TTFT percentiles
    (a sparse scenario has seconds without completions; the window keeps the lines readable).
    """
    seconds = max(1, int(elapsed + 0.999))
    rows = []
    for t in range(seconds):
        ended = [s for s in run.samples if t <= s.end < t + 1]
        recent = [s for s in run.samples if s.ok and t + 1 - window <= s.end < t + 1]
        ok = [s for s in ended if s.ok]
        users = [u for at, u in run.user_series if at < t + 1][-1]
        ttfts = [s.ttft for s in recent if s.ttft is not None]
        rows.append(
            {
                "t": t,
                "rps": len(ok),
                "failures": len(ended) - len(ok),
                "rps_avg": round(len(recent) / min(window, t + 1), 3),
                "p50_ms": ms(pct([s.latency for s in recent], 0.50)),
                "p95_ms": ms(pct([s.latency for s in recent], 0.95)),
                "users": users,
                "ttft_p50_ms": ms(pct(ttfts, 0.50)),
                "ttft_p95_ms": ms(pct(ttfts, 0.95)),
            }
        )
    return rows


def chart(rows: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    with_ttft = summary["scenario"] in (*OCR_KINDS, "mixed")
    panels = 4 if with_ttft else 3
    fig, axes = plt.subplots(panels, 1, figsize=(10, 2.6 * panels), sharex=True)
    t = [r["t"] for r in rows]

    def series(key: str) -> list[float]:
        return [r[key] if r[key] is not None else float("nan") for r in rows]

    window = summary["window_s"]
    axes[0].plot(t, series("rps_avg"), color="tab:green", label=f"requests/s ({window} s mean)")
    axes[0].plot(t, series("failures"), color="tab:red", label="failures/s")
    axes[0].set_ylabel("per second")
    axes[0].set_title(
        f"ragws {summary['scenario']}: {summary['users']} users, "
        f"{summary['requests']} requests, {summary['failures']} failures"
    )
    axes[1].plot(t, series("p50_ms"), color="tab:blue", label=f"p50 (last {window} s)")
    axes[1].plot(t, series("p95_ms"), color="tab:orange", label=f"p95 (last {window} s)")
    axes[1].set_ylabel("response time (ms)")
    axes[2].step(t, series("users"), where="post", color="tab:purple", label="users")
    axes[2].set_ylabel("users")
    if with_ttft:
        axes[3].plot(
            t, series("ttft_p50_ms"), color="tab:blue", label=f"TTFT p50 (last {window} s)"
        )
        axes[3].plot(
            t, series("ttft_p95_ms"), color="tab:orange", label=f"TTFT p95 (last {window} s)"
        )
        axes[3].set_ylabel("time to first token (ms)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel("time since start (s)")
    save_chart(fig, out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--url", default="ws://127.0.0.1:7088/ws", help="loopback only")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--requests", type=int, default=0, help="stop after this many (0: no cap)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds for in-flight work")
    parser.add_argument("--out", type=Path, default=Path("loadtest-out"))
    parser.add_argument("--inputs", nargs="*", help="PDFs and images (default: the fixtures)")
    parser.add_argument(
        "--pages",
        type=lambda s: [int(p) for p in s.split(",")],
        help="pdf/parse: 0-based pages, e.g. 0,1 (parse default: 0)",
    )
    parser.add_argument("--text", default="auto", choices=("auto", "ocr", "pdf"), help="parse")
    parser.add_argument("--max-tokens", type=int, default=0, help="ocr: max_tokens (0: server's)")
    parser.add_argument("--cut-tokens", type=int, default=8, help="disconnect: most tokens read")
    parser.add_argument("--window", type=int, default=5, help="chart smoothing window (s)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.users < 1 or args.spawn_rate <= 0 or args.duration <= 0:
        raise SystemExit("--users, --spawn-rate and --duration must be positive")
    target = loopback_target(args.url)
    inputs = Inputs(args)
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"{args.scenario}: {args.users} users at {args.spawn_rate}/s for {args.duration}s")

    async def go() -> tuple[Run, float, dict[str, Any] | None]:
        run = await drive(args, target, inputs)
        elapsed = run.now()
        gauges = await settle(target) if args.scenario in (*OCR_KINDS, "mixed") else None
        return run, elapsed, gauges

    run, elapsed, gauges = asyncio.run(go())
    summary = summarize(run, elapsed)
    summary["window_s"] = args.window
    if gauges is not None:
        summary["server_after"] = gauges
    rows = timeline(run, elapsed, max(1, args.window))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "timeline.json").write_text(json.dumps(rows, indent=1))
    (args.out / "samples.json").write_text(json.dumps([asdict(s) for s in run.samples]))
    chart(rows, summary, args.out / "chart.png")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
