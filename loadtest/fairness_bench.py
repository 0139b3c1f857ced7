"""Fair share: a bystander's latency while another client holds dense pages in flight.

What it measures
----------------
Each shared queue is loaded by a **flood**: one WebSocket that keeps ``--flood`` requests in
flight (6 by default; a new one goes as soon as one ends). A **bystander** on another socket
then sends ``--repeats`` small requests one after another, and each is timed (send → its last
frame). Three queues, each on a server of its own in this process:

* **layout** — flood and bystander send a page of the fixture paper (PNG, 144 dpi) as
  ``layout``; the layout batcher's queue (batch size 1 preferred, as on most CPUs);
* **line OCR** — the embedded PP-OCR: the flood sends a dense page (page 2 of the paper at
  72 dpi, ~65 text lines) as ``ocr``, the bystander the ``title.png`` crop (a few lines); the
  detection and recognition batchers' queues;
* **GOT engine** — a random-weight tiny GOT-OCR2 (``ragws.testing.got_tiny``; skipped without
  torch) with 2 KV slots: the flood's requests generate ``--got-flood-tokens`` tokens each, the
  bystander's ``--got-tokens``; the engine's waiting queue.

Each queue is measured three ways, one after another on the same server: the bystander
**alone**; next to the flood with **fair share** (clients served in turn, the server's
policy); next to the flood **by arrival** (``ragws.runtime.fairness.fcfs``, the policy before fair
share, switched in this process for the comparison). A way stops taking samples after
``--way-budget-s`` seconds (at least one sample), since by arrival a bystander waits for
everything the flood has queued. Also reported: the flood's own completions per second while
the bystander was measured (fair share should cost the flood little throughput).

How to read it
--------------
The ratios (a way's median bystander latency over the alone median) compare runs made side by
side and carry across machines; the absolute figures are this machine's. Fair share's
promise is that a bystander waits about one batch per active client: its ratio stays small
whatever the flood holds, while by arrival it grows with the flood.

Example::

    python loadtest/fairness_bench.py                    # all three, ~2-3 minutes on 2 cores
    python loadtest/fairness_bench.py --only layout,ocr --json /tmp/fair.json --md /tmp/fair.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pymupdf
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FIXTURES, PAPER, cpu_name, log

from ragws.bootstrap import create_app
from ragws.config import Settings
from ragws.runtime import fairness
from ragws.serving.services import SERVICES

QUEUES = ("layout", "ocr", "got")
WAYS = ("alone", "fair", "fcfs")
Frame = dict[str, Any]


@dataclass(frozen=True)
class Load:
    """One queue's requests: the flood's (numbered) and the bystander's."""

    name: str
    flood: Callable[[int], Frame]
    bystander: Frame
    settings: dict[str, Any]


def page_png(page: int, dpi: int) -> bytes:
    with pymupdf.open(PAPER) as doc:
        return doc[page].get_pixmap(dpi=dpi).tobytes("png")


def loads(args: argparse.Namespace, got_dir: Path | None) -> list[Load]:
    found = []
    if "layout" in args.only:
        page = page_png(1, 144)
        found.append(
            Load(
                "layout",
                lambda i: {"type": "layout", "id": i, "image": page},
                {"type": "layout", "image": page},
                {},
            )
        )
    if "ocr" in args.only:
        dense, title = page_png(1, 72), (FIXTURES / "title.png").read_bytes()
        found.append(
            Load(
                "line OCR",
                lambda i: {"type": "ocr", "id": i, "image": dense},
                {"type": "ocr", "image": title},
                {},
            )
        )
    if got_dir is not None:
        from ragws.testing.got_tiny import synthetic_images

        from_png = [_png(image) for image in synthetic_images(2, seed=11)]
        fields = {"type": "ocr", "mode": "plain", "ignore_eos": True}
        found.append(
            Load(
                "GOT engine",
                lambda i: {
                    **fields,
                    "id": i,
                    "image": from_png[0],
                    "max_tokens": args.got_flood_tokens,
                },
                {**fields, "image": from_png[1], "max_tokens": args.got_tokens},
                {"ocr_model": str(got_dir), "ocr_batch_size": 2, "max_model_len": 1024},
            )
        )
    return found


def _png(image: Any) -> bytes:
    import io

    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _ended(frame: Frame) -> bool:
    if frame["type"] == "error":
        raise RuntimeError(f"request {frame.get('id')!r}: {frame.get('message')}")
    return frame["type"] in ("layout", "done")


async def _open(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(url, max_msg_size=0)
    await ws.receive()  # hello
    return ws


async def _recv(ws: aiohttp.ClientWebSocketResponse) -> Frame:
    msg = await ws.receive()
    if msg.type != aiohttp.WSMsgType.BINARY:
        raise RuntimeError(f"the socket closed ({msg.type})")
    return msgpack.unpackb(msg.data, raw=False)


async def flood(
    http: aiohttp.ClientSession,
    url: str,
    load: Load,
    inflight: int,
    busy: asyncio.Event,
    ends: list[float],
) -> None:
    """Keep ``inflight`` requests in flight on one socket until cancelled (which closes the
    socket, and so withdraws what it still has queued)."""
    async with await _open(http, url) as ws:
        sent = 0
        for _ in range(inflight):
            await ws.send_bytes(msgpack.packb(load.flood(sent), use_bin_type=True))
            sent += 1
        while True:
            frame = await _recv(ws)
            busy.set()  # a first frame: the flood's work is being served, its queue full
            if _ended(frame):
                ends.append(time.monotonic())
                await ws.send_bytes(msgpack.packb(load.flood(sent), use_bin_type=True))
                sent += 1


async def bystander(
    http: aiohttp.ClientSession, url: str, load: Load, repeats: int, budget_s: float
) -> list[float]:
    """Latencies of the bystander's requests, one after another, in seconds."""
    latencies: list[float] = []
    started = time.monotonic()
    async with await _open(http, url) as ws:
        for i in range(repeats):
            if latencies and time.monotonic() - started > budget_s:
                break
            sent = time.monotonic()
            await ws.send_bytes(msgpack.packb({**load.bystander, "id": i}, use_bin_type=True))
            while not _ended(await _recv(ws)):
                pass
            latencies.append(time.monotonic() - sent)
    return latencies


async def one_way(
    app: web.Application, url: str, load: Load, way: str, args: argparse.Namespace
) -> dict[str, Any]:
    fairness.fcfs = way == "fcfs"
    ends: list[float] = []
    async with aiohttp.ClientSession() as http:
        flooding = None
        if way != "alone":
            busy = asyncio.Event()
            flooding = asyncio.ensure_future(flood(http, url, load, args.flood, busy, ends))
            served = asyncio.ensure_future(busy.wait())
            await asyncio.wait({flooding, served}, timeout=120, return_when="FIRST_COMPLETED")
            served.cancel()
            if flooding.done():
                flooding.result()  # raises what stopped it
        started = time.monotonic()
        try:
            latencies = await bystander(http, url, load, args.repeats, args.way_budget_s)
        finally:
            window = time.monotonic() - started
            if flooding is not None:
                flooding.cancel()
                await asyncio.gather(flooding, return_exceptions=True)
    await _settle(app)
    fairness.fcfs = False
    flood_done = sum(1 for t in ends if t >= started)
    result = {
        "way": way,
        "samples": len(latencies),
        "latency_s": [round(s, 3) for s in latencies],
        "median_s": round(statistics.median(latencies), 3),
        "max_s": round(max(latencies), 3),
    }
    if way != "alone":
        result["flood_per_s"] = round(flood_done / window, 3)
        result["all_per_s"] = round((flood_done + len(latencies)) / window, 3)
    log(f"{load.name}, {way}: bystander median {result['median_s']:.2f} s ({len(latencies)})")
    return result


async def _settle(app: web.Application, timeout: float = 60.0) -> None:
    """Wait until the server holds no request: the flood's withdrawn work has left."""
    admission = app[SERVICES].admission
    deadline = time.monotonic() + timeout
    while admission.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def measure(load: Load, args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(
        port=0,
        layout_preferred_batch_size="1",
        max_wait_ms=5.0,
        log_level="warning",
        **load.settings,
    )
    runner = web.AppRunner(create_app(settings), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"ws://127.0.0.1:{port}/ws"
    try:
        async with aiohttp.ClientSession() as http:  # warm-up: first model calls are slow
            await bystander(http, url, load, 1, 0.0)
        ways = [await one_way(runner.app, url, load, way, args) for way in WAYS]
    finally:
        await runner.cleanup()
    alone = ways[0]["median_s"]
    for way in ways:
        way["ratio_vs_alone"] = round(way["median_s"] / alone, 2)
    return {"queue": load.name, "flood": args.flood, "ways": ways}


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Fair share, {cpu_name()}: one client holds {args.flood} requests in flight, a "
        "bystander on another socket sends one small request at a time.",
        "",
        "| queue | way | bystander median | max | vs alone | flood done/s | all done/s | samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for queue in results:
        for way in queue["ways"]:
            flood_s, all_s = (_rate(way.get(k)) for k in ("flood_per_s", "all_per_s"))
            lines.append(
                f"| {queue['queue']} | {way['way']} | {way['median_s']:.2f} s "
                f"| {way['max_s']:.2f} s | {way['ratio_vs_alone']:.1f}× "
                f"| {flood_s} | {all_s} | {way['samples']} |"
            )
    return "\n".join(lines) + "\n"


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        type=lambda s: [q for q in s.split(",") if q],
        default=list(QUEUES),
        help="comma-separated subset of " + ",".join(QUEUES),
    )
    parser.add_argument("--flood", type=int, default=6, help="requests the flood keeps in flight")
    parser.add_argument("--repeats", type=int, default=5, help="bystander requests per way")
    parser.add_argument(
        "--way-budget-s", type=float, default=20.0, help="a way's sampling time (≥ 1 sample)"
    )
    parser.add_argument("--got-flood-tokens", type=int, default=256)
    parser.add_argument("--got-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--md", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(QUEUES)
    if unknown:
        parser.error(f"--only: unknown queue(s) {', '.join(sorted(unknown))}")
    if not PAPER.is_file():
        parser.error(f"{PAPER} not found (the shared fixtures folder sits beside the repo)")
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        got_dir = None
        if "got" in args.only:
            try:
                from ragws.testing.got_tiny import build_tiny_got_ocr2
            except ImportError:
                log("GOT engine: skipped (torch and transformers are not installed)")
            else:
                got_dir = build_tiny_got_ocr2(Path(tmp) / "got", eos_mode="never")
        results = [asyncio.run(measure(load, args)) for load in loads(args, got_dir)]
    table = markdown(results, args)
    print("\n" + table)
    if args.json:
        args.json.write_text(json.dumps({"device": cpu_name(), "results": results}, indent=2))
    if args.md:
        args.md.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
