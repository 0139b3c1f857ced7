"""Overload: at 10× the admission limit, are excess requests refused at once, and do the
admitted ones keep their latency?

Usage::

    python loadtest/overload.py --out out/overload [--max-concurrent 8] [--factor 10] \\
        [--duration 20] [--kind layout|ocr] [--backoff-ms 50] [-- RAGWS SERVE FLAGS]
    python loadtest/overload.py --url ws://127.0.0.1:7088/ws --out out/overload

By default the script starts its own server with ``--max-concurrent N`` (flags after ``--`` go
to ``ragws serve`` too) and stops it with SIGTERM at the end; ``--url`` loads a running loopback
server instead, whose limit is read from its ``hello``. After ``--warmup-s`` seconds of untimed
load (the first calls of a model are slow), two phases of ``--duration`` seconds, each with
users in a closed loop (one WebSocket each, one request in flight, the next sent when
the last has ended), every request the same (a page of the fixture paper for ``layout``, the
``title.png`` crop for ``ocr``):

1. **baseline**: N users, as many as the server admits: the latency of admitted requests when
   nothing is turned away;
2. **overload**: ``--factor`` × N users. An ``overloaded`` answer is timed (send → error frame)
   and the user waits ``--backoff-ms`` before it tries again.

A benchmark, not a test: it measures and asserts nothing. The figures to read: the rejection
latency (p50/p95/p99 in ms: refused "within milliseconds"), the admitted latency of the overload
phase over the baseline's (ratio near 1: admitted requests keep their latency), the server's
resident memory at the end of the baseline, at its peak and after (bounded: the refused
requests cost nothing lasting), and that the server's ``ragws_rejected_total`` grew by exactly
the refusals the users saw (every refusal came back). Writes ``DIR/summary.json`` (also
printed), ``DIR/samples.json`` (the server every ``--sample-s``), ``DIR/chart.png`` and, for a
spawned server, ``DIR/server.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pymupdf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    FIXTURES,
    MIB,
    PAPER,
    RSS,
    SpawnedServer,
    Target,
    gauges_at_rest,
    log,
    parse_script_args,
    pyplot,
    save_chart,
    scrape,
    script_parser,
    server_under_test,
)
from run import Run, ms, one_request, pct

REJECTED = "ragws_rejected_total"
PHASES = ("baseline", "overload")


@dataclass(slots=True)
class Attempt:
    """One request: its phase, when it was sent and ended (s since the start), how it ended."""

    phase: str
    start: float
    end: float
    outcome: str  # "ok", "overloaded", another error code, "timeout"

    @property
    def latency(self) -> float:
        return self.end - self.start


class Bench:
    """The clock (run.py's, so that its request loop can be used as is), the attempts, the
    server samples."""

    def __init__(self, args: argparse.Namespace, target: Target, payload: bytes) -> None:
        self.args = args
        self.target = target
        self.payload = payload
        self.clock = Run(args)
        self.attempts: list[Attempt] = []
        self.points: list[dict[str, Any]] = []
        self.phase = "before"
        self.phase_starts: dict[str, float] = {}
        self.max_concurrent = args.max_concurrent

    def now(self) -> float:
        return self.clock.now()

    def frame(self, request_id: int) -> dict[str, Any]:
        return {"type": self.args.kind, "id": request_id, "image": self.payload}


def payload(kind: str, page: int) -> bytes:
    """The one input every request carries: a page of the paper at 144 dpi, or an OCR crop."""
    if kind == "ocr":
        return (FIXTURES / "title.png").read_bytes()
    with pymupdf.open(PAPER) as doc:
        return doc[page].get_pixmap(dpi=144).tobytes("png")


# --- the users ----------------------------------------------------------------------------------


async def closed_loop(ws: aiohttp.ClientWebSocketResponse, bench: Bench, until: float) -> None:
    """Requests one after another until ``until``; after ``overloaded``, a backoff first."""
    phase, request_id = bench.phase, 0
    while bench.now() < until and not ws.closed:
        request_id += 1
        started = bench.now()
        try:
            sample = await asyncio.wait_for(
                one_request(ws, bench.frame(request_id), bench.clock, bench.args.kind),
                bench.args.timeout,
            )
        except asyncio.TimeoutError:
            bench.attempts.append(Attempt(phase, started, bench.now(), "timeout"))
            return  # the socket may still carry that request's frames: stop using it
        outcome = "ok" if sample.ok else sample.error or "error"
        bench.attempts.append(Attempt(phase, sample.start, sample.end, outcome))
        if outcome == "overloaded":
            await asyncio.sleep(bench.args.backoff_ms / 1000)


async def run_phase(
    bench: Bench, http: aiohttp.ClientSession, name: str, users: int, seconds: float
) -> None:
    """Open every socket first (connecting is not what is measured), then load together."""
    sockets = [await http.ws_connect(bench.target.ws_url, max_msg_size=0) for _ in range(users)]
    try:
        for ws in sockets:
            await ws.receive(timeout=30)  # hello
        bench.phase = name
        bench.phase_starts[name] = bench.now()
        log(f"t={bench.now():6.1f}s {name}: {users} users for {seconds} s")
        until = bench.now() + seconds
        await asyncio.gather(*(closed_loop(ws, bench, until) for ws in sockets))
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))


async def sample_forever(bench: Bench, http: aiohttp.ClientSession) -> None:
    while True:
        await take_sample(bench, http)
        await asyncio.sleep(bench.args.sample_s)


async def take_sample(bench: Bench, http: aiohttp.ClientSession) -> dict[str, float]:
    metrics = await scrape(http, bench.target)
    bench.points.append(
        {
            "t": round(bench.now(), 2),
            "phase": bench.phase,
            "rss_mib": round(metrics.get(RSS, 0.0) / MIB, 1),
            "inflight": metrics.get("ragws_inflight_requests", 0.0),
            "rejected_total": metrics.get(REJECTED, 0.0),
        }
    )
    return metrics


async def read_limit(http: aiohttp.ClientSession, target: Target) -> int:
    """The server's own ``max_concurrent``, from its hello (what ``--url`` servers run with)."""
    async with http.ws_connect(target.ws_url, max_msg_size=0) as ws:
        hello = msgpack.unpackb((await ws.receive(timeout=30)).data, raw=False)
    return int(hello["limits"]["max_concurrent"])


async def overload_run(bench: Bench) -> dict[str, Any]:
    """Both phases with the server sampled throughout; the server's counters and gauges after."""
    args = bench.args
    async with aiohttp.ClientSession() as http:
        bench.max_concurrent = await read_limit(http, bench.target)
        before = await take_sample(bench, http)
        sampler = asyncio.create_task(sample_forever(bench, http))
        limit = bench.max_concurrent
        if args.warmup_s > 0:  # first calls of a model are slow: not part of the baseline
            await run_phase(bench, http, "warm-up", limit, args.warmup_s)
        await run_phase(bench, http, "baseline", limit, args.duration)
        await run_phase(bench, http, "overload", args.factor * limit, args.duration)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        bench.phase = "after"
        gauges, settled_s = await gauges_at_rest(http, bench.target)
        after = await take_sample(bench, http)
    return {
        "rejected_by_server": after.get(REJECTED, 0.0) - before.get(REJECTED, 0.0),
        "gauges_after": gauges,
        "settled_after_s": settled_s,
    }


# --- the report ---------------------------------------------------------------------------------


def latency_ms(attempts: Sequence[Attempt]) -> dict[str, float | None]:
    values = [a.latency for a in attempts]
    return {
        "p50": ms(pct(values, 0.50)),
        "p95": ms(pct(values, 0.95)),
        "p99": ms(pct(values, 0.99)),
        "max": ms(max(values)) if values else None,
    }


def phase_report(attempts: Sequence[Attempt], users: int, duration: float) -> dict[str, Any]:
    admitted = [a for a in attempts if a.outcome == "ok"]
    rejected = [a for a in attempts if a.outcome == "overloaded"]
    return {
        "users": users,
        "attempts": len(attempts),
        "admitted": len(admitted),
        "rejected": len(rejected),
        "admitted_per_s": round(len(admitted) / duration, 2),
        "admitted_ms": latency_ms(admitted),
        "rejected_ms": latency_ms(rejected),
    }


def rss_report(points: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Before any request, at the end of the baseline (the models warm, their buffers
    allocated: the reference for the overload phase), at the peak, and after."""
    if not points:
        return {}
    baseline = [p["rss_mib"] for p in points if p["phase"] == "baseline"] or [points[0]["rss_mib"]]
    return {
        "before": points[0]["rss_mib"],
        "baseline_end": baseline[-1],
        "peak": max(p["rss_mib"] for p in points),
        "after": points[-1]["rss_mib"],
    }


def ratio(over: float | None, base: float | None) -> float | None:
    return round(over / base, 2) if over is not None and base else None


def summarize(bench: Bench, server_side: dict[str, Any], server: SpawnedServer | None) -> dict:
    args, attempts = bench.args, bench.attempts
    users = {"baseline": bench.max_concurrent, "overload": args.factor * bench.max_concurrent}
    phases = {
        name: phase_report([a for a in attempts if a.phase == name], users[name], args.duration)
        for name in PHASES
    }
    base, over = phases["baseline"]["admitted_ms"], phases["overload"]["admitted_ms"]
    return {
        "kind": args.kind,
        "max_concurrent": bench.max_concurrent,
        "factor": args.factor,
        "duration_s": args.duration,
        "backoff_ms": args.backoff_ms,
        "phases": phases,
        "admitted_p50_ratio": ratio(over["p50"], base["p50"]),
        "admitted_p95_ratio": ratio(over["p95"], base["p95"]),
        "rejection_ms": latency_ms([a for a in attempts if a.outcome == "overloaded"]),
        "admitted": sum(a.outcome == "ok" for a in attempts),
        "rejected": sum(a.outcome == "overloaded" for a in attempts),
        "errors": dict(Counter(a.outcome for a in attempts if a.outcome != "ok")),
        "unanswered": sum(a.outcome == "timeout" for a in attempts),
        "rss_mib": rss_report(bench.points),
        **server_side,
        "server": server.describe() if server else {"url": args.url},
    }


def chart(bench: Bench, summary: dict[str, Any], out: Path) -> None:
    """Every attempt's latency over time (admitted and refused apart), and the server's RSS and
    requests in flight."""
    plt = pyplot()
    fig, (lat, mem) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for outcome, color in (("ok", "tab:blue"), ("overloaded", "tab:red")):
        chosen = [a for a in bench.attempts if a.outcome == outcome]
        label = "admitted" if outcome == "ok" else "overloaded"
        latencies = [1000 * a.latency for a in chosen]
        lat.scatter([a.end for a in chosen], latencies, s=4, c=color, label=label)
    lat.set_yscale("log")
    lat.set_ylabel("send → answer (ms)")
    lat.set_title(
        f"ragws overload: {summary['kind']}, max_concurrent {summary['max_concurrent']}, "
        f"{summary['factor']}× users; {summary['admitted']} admitted, "
        f"{summary['rejected']} overloaded"
    )
    t = [p["t"] for p in bench.points]
    mem.plot(t, [p["rss_mib"] for p in bench.points], color="tab:purple", label="RSS (MiB)")
    mem.set_ylabel("server RSS (MiB)")
    inflight = mem.twinx()
    inflight_series = [p["inflight"] for p in bench.points]
    inflight.step(t, inflight_series, where="post", color="tab:gray", label="in flight")
    inflight.set_ylabel("requests in flight")
    inflight.legend(loc="upper left", fontsize=8)
    mem.set_xlabel("time since start (s)")
    for ax in (lat, mem):
        for name, start in bench.phase_starts.items():
            ax.axvline(start, color="black", lw=0.8, ls="--")
            ax.text(start, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    save_chart(fig, out)


# --- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__, "loadtest-out/overload", "--layout-batch-size 4")
    parser.add_argument("--max-concurrent", type=int, default=8, help="the spawned server's")
    parser.add_argument("--factor", type=int, default=10, help="overload users = factor × limit")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="untimed, before (0: none)")
    parser.add_argument("--backoff-ms", type=float, default=50.0, help="after overloaded")
    parser.add_argument("--kind", choices=("layout", "ocr"), default="layout")
    parser.add_argument("--page", type=int, default=0, help="layout: the paper's page (0-based)")
    parser.add_argument("--timeout", type=float, default=60.0, help="unanswered after this (s)")
    parser.add_argument("--sample-s", type=float, default=0.5, help="seconds between samples")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, serve_flags = parse_script_args(build_parser(), argv)
    if args.max_concurrent < 1 or args.factor < 1 or args.duration <= 0:
        raise SystemExit("--max-concurrent, --factor and --duration must be positive")
    if args.url is None:
        serve_flags = ["--max-concurrent", str(args.max_concurrent), *serve_flags]
    body = payload(args.kind, args.page)
    args.out.mkdir(parents=True, exist_ok=True)
    with server_under_test(args.url, serve_flags, args.out / "server.log") as (target, server):
        bench = Bench(args, target, body)
        server_side = asyncio.run(overload_run(bench))
    summary = summarize(bench, server_side, server)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "samples.json").write_text(json.dumps(bench.points, indent=1))
    chart(bench, summary, args.out / "chart.png")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
