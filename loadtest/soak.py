"""Soak: minutes of mixed traffic with cancels and disconnects; does the server give it all back?

Usage::

    python loadtest/soak.py --minutes 10 --out out/soak [--users 8] [--got-size mid] \\
        [-- RAGWS SERVE FLAGS]
    python loadtest/soak.py --minutes 10 --url ws://127.0.0.1:7088/ws --out out/soak

By default the script starts its own server (``python -m ragws serve`` on a free loopback port;
flags after ``--`` go to it) and stops it with SIGTERM at the end; ``--url`` loads a running
loopback server instead. ``--users`` users, each on its own WebSocket with one request in
flight, draw requests as ``run.py mixed`` does (layout 50%, ocr 30%, pdf 10%, parse 10%); a
``--cancel-fraction`` of them are cancelled with a ``cancel`` frame and a
``--disconnect-fraction`` abandoned by closing the socket, each at a random moment within
``--cut-ms`` of being sent. Every ``--sample-s`` seconds the server's resident memory and its
gauges are read from ``/metrics``.

After ``--minutes`` (or ``--requests``) the users stop issuing, requests in flight finish, and
the gauges are polled until they read 0 (at most ``--settle-s``). The targets:

* resident memory grows by at most ``--growth-limit-pct`` (10%) from the end of the warm-up
  (``--warmup-minutes``, default the first 20% of the run) to the end;
* ``ragws_inflight_requests``, ``ragws_ocr_running``, ``ragws_ocr_waiting``,
  ``ragws_kv_slots_used`` and ``ragws_websocket_connections`` are back to 0;
* no request ended in an error other than ``overloaded`` (a cancel or a disconnect the client
  asked for is not an error; a request that ended any other way than the client asked is).

Writes ``DIR/summary.json`` (also printed), ``DIR/samples.json`` (the server over time),
``DIR/chart.png`` and, for a spawned server, ``DIR/server.log``. Exit status 0 only when every
target passes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    GAUGES,
    MIB,
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
from run import MIXED, Inputs

#: How each action may end without it being an error: the client asked for it.
EXPECTED = {
    "complete": {"ok"},
    "cancel": {"ok", "cancelled"},  # "ok": it ended before the cut, or crossed the cancel
    "disconnect": {"ok", "disconnected"},
}
TOLERATED = "overloaded"  # the server's admission doing its job
OVERLOADED_BACKOFF_S = 0.05
CHARTED_GAUGES = ("ragws_inflight_requests", "ragws_ocr_running", "ragws_kv_slots_used")


@dataclass(slots=True)
class Record:
    """One request as the client saw it. ``stray``: frames that arrived while it was in flight
    about another id (none is in flight; the protocol sends nothing about an id after its end),
    as ``type:code`` or ``type:finish_reason``."""

    kind: str
    action: str
    start: float
    end: float = 0.0
    outcome: str = ""
    stray: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.outcome not in EXPECTED[self.action] and self.outcome != TOLERATED


class Soak:
    """The run's clock, request budget, records and server samples."""

    def __init__(self, args: argparse.Namespace, target: Target) -> None:
        self.args = args
        self.target = target
        self.origin = time.monotonic()
        self.records: list[Record] = []
        self.points: list[dict[str, Any]] = []
        self.issued = 0
        self.closing = asyncio.Event()
        self.unfinished = 0  # users still busy when the grace period ran out
        self.scrape_failures = 0
        self.settled_after_s = 0.0

    def now(self) -> float:
        return time.monotonic() - self.origin

    def may_issue(self) -> bool:
        """Whether a user may send another request (counted when so)."""
        if self.args.requests and self.issued >= self.args.requests:
            self.closing.set()
        if self.closing.is_set():
            return False
        self.issued += 1
        return True


# --- the users ----------------------------------------------------------------------------------


def pack(frame: dict[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def end_of(reply: dict[str, Any]) -> str | None:
    """The outcome a frame ends its request with, or None for a frame along the way."""
    kind = reply.get("type")
    if kind == "layout":
        return "ok"
    if kind == "error":
        return str(reply.get("code"))
    if kind == "done":
        reason = reply.get("finish_reason")
        return "ok" if reason in ("stop", "length") else str(reason)
    return None


async def follow(
    ws: aiohttp.ClientWebSocketResponse,
    frame: dict[str, Any],
    record: Record,
    cut_s: float,
    timeout: float,
) -> str:
    """Send ``frame`` and read its frames to its end; for a cancel or a disconnect, act at
    ``cut_s`` unless the request ended before. Past ``timeout`` the request counts as hung."""
    loop = asyncio.get_running_loop()
    await ws.send_bytes(pack(frame))
    deadline = loop.time() + timeout
    cut_at = None if record.action == "complete" else loop.time() + cut_s
    while True:
        wake = deadline if cut_at is None else min(cut_at, deadline)
        try:
            message = await ws.receive(timeout=max(0.001, wake - loop.time()))
        except asyncio.TimeoutError:
            if cut_at is None or loop.time() >= deadline:
                await ws.close()  # its late frames must not land in the next request's
                return "timeout"
            if record.action == "disconnect":
                await ws.close()
                return "disconnected"
            await ws.send_bytes(pack({"type": "cancel", "id": frame["id"]}))
            cut_at = None
            continue
        if message.type != aiohttp.WSMsgType.BINARY:
            return "socket_closed"
        reply = msgpack.unpackb(message.data, raw=False)
        if reply.get("id") != frame["id"]:
            detail = reply.get("code") or reply.get("finish_reason")
            record.stray.append(f"{reply.get('type')}:{detail} (id {reply.get('id')!r})")
            continue
        outcome = end_of(reply)
        if outcome is not None:
            return outcome


def draw_action(rng: random.Random, args: argparse.Namespace) -> str:
    draw = rng.random()
    if draw < args.cancel_fraction:
        return "cancel"
    if draw < args.cancel_fraction + args.disconnect_fraction:
        return "disconnect"
    return "complete"


async def soak_user(number: int, soak: Soak, inputs: Inputs) -> None:
    """One user: a socket, requests one at a time, a new socket after each disconnect."""
    rng = random.Random(soak.args.seed * 1000 + number)
    request_id = 0
    async with aiohttp.ClientSession() as http:
        while not soak.closing.is_set():
            try:
                ws = await http.ws_connect(soak.target.ws_url, max_msg_size=0)
                await ws.receive(timeout=30)  # hello
            except (aiohttp.ClientError, asyncio.TimeoutError):
                now = soak.now()
                soak.records.append(Record("connect", "complete", now, now, "connect_failed"))
                await asyncio.sleep(1.0)
                continue
            async with ws:
                while not ws.closed and soak.may_issue():
                    request_id += 1
                    record = await one_request(ws, soak, inputs, rng, request_id)
                    soak.records.append(record)
                    if record.outcome == TOLERATED:  # as a client should: not straight back
                        await asyncio.sleep(OVERLOADED_BACKOFF_S)


async def one_request(
    ws: aiohttp.ClientWebSocketResponse,
    soak: Soak,
    inputs: Inputs,
    rng: random.Random,
    request_id: int,
) -> Record:
    """Draw a request (kind as ``run.py mixed``, then what to do with it) and carry it out."""
    args = soak.args
    kind = rng.choices([k for k, _ in MIXED], [w for _, w in MIXED])[0]
    record = Record(kind, draw_action(rng, args), soak.now())
    frame = inputs.frame(kind, rng, request_id)
    cut_s = rng.random() * args.cut_ms / 1000
    try:
        record.outcome = await follow(ws, frame, record, cut_s, args.request_timeout)
    except (aiohttp.ClientError, ConnectionError) as exc:
        record.outcome = f"socket_error: {type(exc).__name__}"
    record.end = soak.now()
    return record


# --- the server over time -----------------------------------------------------------------------


async def take_sample(soak: Soak, http: aiohttp.ClientSession, phase: str) -> None:
    try:
        metrics = await scrape(http, soak.target)
    except aiohttp.ClientError as exc:
        soak.scrape_failures += 1
        log(f"t={soak.now():6.1f}s /metrics: {exc}")
        return
    point: dict[str, Any] = {"t": round(soak.now(), 2), "phase": phase}
    point["rss_mib"] = round(metrics.get(RSS, 0.0) / MIB, 1)
    point.update({name: metrics.get(name, 0.0) for name in GAUGES})
    point["requests"] = len(soak.records)
    point["failures"] = sum(r.failed for r in soak.records)
    soak.points.append(point)
    log(
        f"t={point['t']:6.1f}s {phase:7s} rss={point['rss_mib']:7.1f} MiB "
        f"inflight={point['ragws_inflight_requests']:.0f} "
        f"running={point['ragws_ocr_running']:.0f} slots={point['ragws_kv_slots_used']:.0f} "
        f"sockets={point['ragws_websocket_connections']:.0f} "
        f"requests={point['requests']} failures={point['failures']}"
    )


async def sample_forever(soak: Soak, http: aiohttp.ClientSession, warmup_s: float) -> None:
    while True:
        await take_sample(soak, http, "warm-up" if soak.now() <= warmup_s else "load")
        await asyncio.sleep(soak.args.sample_s)


async def soak_run(
    args: argparse.Namespace, target: Target, inputs: Inputs, warmup_s: float
) -> Soak:
    """Load for the run's length, let in-flight work end, wait for the gauges, sample once more."""
    soak = Soak(args, target)
    async with aiohttp.ClientSession() as http:
        sampler = asyncio.create_task(sample_forever(soak, http, warmup_s))
        users = [asyncio.create_task(soak_user(n, soak, inputs)) for n in range(args.users)]
        try:
            await asyncio.wait_for(soak.closing.wait(), args.minutes * 60)
        except asyncio.TimeoutError:
            soak.closing.set()
        log(f"t={soak.now():6.1f}s stopped issuing; waiting for requests in flight")
        _, pending = await asyncio.wait(users, timeout=args.grace)
        soak.unfinished = len(pending)
        for task in pending:
            task.cancel()
        for result in await asyncio.gather(*users, return_exceptions=True):
            if isinstance(result, Exception):  # a bug on this side: counted, not hidden
                log(f"a user crashed: {result!r}")
                crash = f"client_crash: {type(result).__name__}"
                soak.records.append(Record("client", "complete", soak.now(), outcome=crash))
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        try:
            _, soak.settled_after_s = await gauges_at_rest(http, target, args.settle_s)
        except aiohttp.ClientError as exc:  # the server is gone: the report says so
            log(f"/metrics after the run: {exc}")
        await take_sample(soak, http, "end")
    return soak


# --- the report ---------------------------------------------------------------------------------


def request_report(records: Sequence[Record], unfinished: int) -> dict[str, Any]:
    failures = [r for r in records if r.failed]
    return {
        "total": len(records),
        "by_kind": _nested(records, "kind"),
        "by_action": _nested(records, "action"),
        "errors": dict(Counter(r.outcome for r in records if r.failed or r.outcome == TOLERATED)),
        "failures": len(failures) + unfinished,
        "unfinished_at_end": unfinished,
        "stray_frames": dict(Counter(_no_id(s) for r in records for s in r.stray)),
    }


def _no_id(stray: str) -> str:
    return stray.split(" (id ", 1)[0]


def _nested(records: Sequence[Record], key: str) -> dict[str, dict[str, int]]:
    """{kind or action: {outcome: count}}."""
    table: dict[str, Counter[str]] = {}
    for record in records:
        table.setdefault(getattr(record, key), Counter())[record.outcome] += 1
    return {name: dict(counts) for name, counts in sorted(table.items())}


def rss_report(points: Sequence[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """Memory at the end of the warm-up (its last sample, or the first sample of all if the
    warm-up had none), at the end (after settling), at its peak, and the growth in between."""
    loaded = [p for p in points if p["phase"] != "end"] or list(points)
    warm = [p for p in loaded if p["t"] <= warmup_s] or loaded[:1]
    if not warm:
        return {"samples": 0}
    warm_mib, end_mib = warm[-1]["rss_mib"], points[-1]["rss_mib"]
    return {
        "samples": len(points),
        "warmup_end_t": warm[-1]["t"],
        "warmup_mib": warm_mib,
        "end_mib": end_mib,
        "peak_mib": max(p["rss_mib"] for p in points),
        "growth_pct": round(100 * (end_mib - warm_mib) / warm_mib, 2) if warm_mib else None,
    }


def verdict(
    rss: dict[str, Any], gauges: dict[str, float], requests: dict[str, Any], limit_pct: float
) -> dict[str, Any]:
    """Each target with its value and pass/fail; ``pass`` overall only when all pass."""
    growth = rss.get("growth_pct")
    clean = requests["failures"] == 0 and not requests["stray_frames"]
    checks = {
        "rss_growth": {
            "limit_pct": limit_pct,
            "value": growth,
            "pass": growth is not None and growth <= limit_pct,
        },
        "gauges_zero": {"value": gauges, "pass": bool(gauges) and not any(gauges.values())},
        "no_errors": {
            "value": {"failures": requests["failures"], "stray_frames": requests["stray_frames"]},
            "pass": clean,
        },
    }
    return {**checks, "pass": all(c["pass"] for c in checks.values())}


def summarize(
    soak: Soak, warmup_s: float, server: SpawnedServer | None, got: Path | None
) -> dict[str, Any]:
    args = soak.args
    end = soak.points[-1] if soak.points and soak.points[-1]["phase"] == "end" else {}
    gauges = {name: end[name] for name in GAUGES if name in end}
    requests = request_report(soak.records, soak.unfinished)
    rss = rss_report(soak.points, warmup_s)
    return {
        "minutes": args.minutes,
        "users": args.users,
        "warmup_s": round(warmup_s, 1),
        "cancel_fraction": args.cancel_fraction,
        "disconnect_fraction": args.disconnect_fraction,
        "ocr_model": str(got) if got else "the server's",
        "server": server.describe() if server else {"url": args.url},
        "requests": requests,
        "rss": rss,
        "gauges_after": gauges,
        "settled_after_s": soak.settled_after_s,
        "scrape_failures": soak.scrape_failures,
        "verdict": verdict(rss, gauges, requests, args.growth_limit_pct),
    }


def with_rates(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples, each with the requests/s ended since the one before it."""
    rows, before = [], None
    for point in points:
        span = point["t"] - before["t"] if before else 0.0
        done = point["requests"] - before["requests"] if before else 0
        rows.append({**point, "rps": round(done / span, 3) if span > 0 else 0.0})
        before = point
    return rows


def chart(rows: Sequence[dict[str, Any]], summary: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    t = [r["t"] for r in rows]
    rss, warmup_s = summary["rss"], summary["warmup_s"]
    axes[0].plot(t, [r["rss_mib"] for r in rows], marker=".", color="tab:blue", label="RSS")
    if "warmup_mib" in rss:
        limit = rss["warmup_mib"] * (1 + summary["verdict"]["rss_growth"]["limit_pct"] / 100)
        axes[0].axhline(limit, color="tab:red", ls="--", lw=1, label="growth limit")
    axes[0].set_ylabel("server RSS (MiB)")
    verdict_word = "pass" if summary["verdict"]["pass"] else "FAIL"
    axes[0].set_title(
        f"ragws soak: {summary['users']} users, {summary['requests']['total']} requests, "
        f"growth {rss.get('growth_pct')}% ({verdict_word})"
    )
    for name in CHARTED_GAUGES:
        axes[1].step(t, [r[name] for r in rows], where="post", label=name.removeprefix("ragws_"))
    axes[1].set_ylabel("gauge")
    axes[2].plot(t, [r["rps"] for r in rows], color="tab:green", label="requests/s")
    axes[2].set_ylabel("requests/s")
    axes[2].set_xlabel("time since start (s)")
    for ax in axes:
        ax.axvspan(0, warmup_s, color="0.9", zorder=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    at_bottom = axes[0].get_xaxis_transform()
    axes[0].text(warmup_s / 2, 0.02, "warm-up", transform=at_bottom, ha="center")
    save_chart(fig, out)


# --- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__, "loadtest-out/soak", "--max-concurrent 8 --log-level warning")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load")
    parser.add_argument("--warmup-minutes", type=float, help="default: 20%% of --minutes")
    parser.add_argument("--users", type=int, default=8, help="sockets, one request each")
    parser.add_argument("--requests", type=int, default=0, help="stop after this many (0: no cap)")
    parser.add_argument("--cancel-fraction", type=float, default=0.1)
    parser.add_argument("--disconnect-fraction", type=float, default=0.1)
    parser.add_argument("--cut-ms", type=float, default=500.0, help="cancel/close within this")
    parser.add_argument("--pdf-pages", default="0,1", help="pages of each pdf request")
    parser.add_argument("--max-tokens", type=int, help="ocr max_tokens (default: 64 with GOT)")
    parser.add_argument("--got-size", choices=("tiny", "mid"), help="random GOT-OCR2 as OCR")
    parser.add_argument("--got-dir", type=Path, help="where it is built (default: a temp dir)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--grace", type=float, default=60.0, help="seconds for in-flight work")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="a hang, past it")
    parser.add_argument("--settle-s", type=float, default=15.0, help="wait for gauges at 0")
    parser.add_argument("--growth-limit-pct", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def got_checkpoint(args: argparse.Namespace) -> Path | None:
    """The random-weight GOT-OCR2 of ``--got-size``, built on first use and reused after
    (a few seconds to build; the \"mid\" size never emits EOS, so streams run to max_tokens)."""
    if args.got_size is None:
        return None
    folder = args.got_dir or Path(tempfile.gettempdir()) / f"ragws-got-{args.got_size}"
    if not (folder / "config.json").is_file():
        log(f"building a random-weight GOT-OCR2 ({args.got_size}) in {folder}")
        command = [sys.executable, "-m", "ragws.testing.got_tiny", str(folder)]
        subprocess.run([*command, "--size", args.got_size], check=True, capture_output=True)
    return folder


def soak_inputs(args: argparse.Namespace) -> Inputs:
    """run.py's payloads: the fixture paper's pages, its PDF, the OCR crops. A pdf request
    carries ``--pdf-pages``, a parse request the first page only (parse is the slowest kind)."""
    pages = [int(p) for p in args.pdf_pages.split(",")]
    inputs = Inputs(argparse.Namespace(inputs=None, pages=pages, text="auto", max_tokens=0))
    inputs.parse_pages = [0]
    inputs.max_tokens = args.max_tokens
    return inputs


def check_args(args: argparse.Namespace) -> None:
    if args.minutes <= 0 or args.users < 1 or args.sample_s <= 0:
        raise SystemExit("--minutes, --users and --sample-s must be positive")
    if not 0 <= args.cancel_fraction + args.disconnect_fraction <= 1:
        raise SystemExit("--cancel-fraction + --disconnect-fraction must be within [0, 1]")
    if args.url is not None and args.got_size:
        raise SystemExit("--got-size configures a spawned server; with --url there is none")


def main(argv: Sequence[str] | None = None) -> int:
    args, serve_flags = parse_script_args(build_parser(), argv)
    check_args(args)
    got = got_checkpoint(args)
    if got is not None:
        serve_flags = ["--ocr-model", str(got), "--max-model-len", "1024", *serve_flags]
        args.max_tokens = 64 if args.max_tokens is None else args.max_tokens
    warmup_s = 60 * (0.2 * args.minutes if args.warmup_minutes is None else args.warmup_minutes)
    inputs = soak_inputs(args)
    args.out.mkdir(parents=True, exist_ok=True)
    with server_under_test(args.url, serve_flags, args.out / "server.log") as (target, server):
        log(f"soak: {args.users} users for {args.minutes} min against {target.ws_url}")
        soak = asyncio.run(soak_run(args, target, inputs, warmup_s))
    summary = summarize(soak, warmup_s, server, got)
    rows = with_rates(soak.points)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "samples.json").write_text(json.dumps(rows, indent=1))
    (args.out / "requests.json").write_text(json.dumps([asdict(r) for r in soak.records]))
    chart(rows, summary, args.out / "chart.png")
    print(json.dumps(summary, indent=2))
    return 0 if summary["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
