"""1, 2 and 3 ragws replicas behind HAProxy under the same load: throughput ratios, p95, and
what the balancer costs against a direct connection.

Each run starts its own replicas (``python -m ragws serve`` on free loopback ports) and HAProxy
in front of them (:mod:`ragws.testing.cluster`, the configuration deploy/haproxy/haproxy.cfg
ships), then ``--users`` clients, each on its own WebSocket (so ``balance leastconn`` spreads
them), send requests in a closed loop for ``--duration`` seconds after ``--warmup`` seconds.
With one replica the same load also runs on a direct connection, for the balancer's overhead.

    python loadtest/cluster.py --out out/cluster                      # layout and parse
    python loadtest/cluster.py --replicas 1,2 --kinds layout -- --device cuda

Flags after ``--`` go to every replica. On a machine with fewer cores than replicas need, the
replicas share the cores and the ratios say so (about 1x): the benchmark measures, it does not
assert.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.documents, ragws

from _common import cpu_name, log

from ragws.client import AsyncClient
from ragws.testing.cluster import LocalCluster, haproxy_binary
from tests import documents

#: Replicas are started light unless flags after -- say otherwise.
REPLICA_FLAGS = ("--layout-preferred-batch-size", "1", "--ocr-model", "none", "--log-level",
                 "warning")  # fmt: skip


@dataclass
class Run:
    kind: str
    replicas: int
    path: str  # "haproxy" or "direct"
    users: int
    requests: int
    pages_per_s: float
    p50_ms: float
    p95_ms: float
    errors: int


def machine() -> str:
    gpu = ""
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        names = subprocess.run(query, capture_output=True, text=True).stdout.split("\n")
        gpu = ", ".join(n.strip() for n in names if n.strip())
    return cpu_name() + (f", {gpu}" if gpu else ", no GPU")


async def load(url: str, kind: str, users: int, warmup: float, duration: float) -> Run:
    paper = documents.write_paper()
    pages = [_png(paper, page) for page in range(3)]
    clients = await asyncio.gather(*(AsyncClient.connect(url) for _ in range(users)))
    latencies: list[float] = []
    errors = 0
    started = time.monotonic()
    measure_from = started + warmup
    stop_at = measure_from + duration

    async def user(i: int, client: AsyncClient) -> None:
        nonlocal errors
        n = i
        while time.monotonic() < stop_at:
            n += 1
            sent = time.monotonic()
            try:
                if kind == "layout":
                    await client.layout(pages[n % len(pages)])
                else:
                    await client.parse_document(paper.pdf, pages=[n % documents.PAGES], text="pdf")
            except Exception as exc:  # counted; a benchmark goes on
                errors += 1
                log(f"user {i}: {exc}")
                continue
            if sent >= measure_from and time.monotonic() <= stop_at:
                latencies.append(time.monotonic() - sent)

    try:
        await asyncio.gather(*(user(i, c) for i, c in enumerate(clients)))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    ordered = sorted(latencies) or [0.0]
    return Run(
        kind=kind,
        replicas=0,
        path="",
        users=users,
        requests=len(latencies),
        pages_per_s=round(len(latencies) / duration, 2),
        p50_ms=round(statistics.median(ordered) * 1000, 1),
        p95_ms=round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000, 1),
        errors=errors,
    )


def _png(paper: documents.Paper, page: int) -> bytes:
    return paper.render(page, 1.5).tobytes("png")


async def measure(args: argparse.Namespace, flags: tuple[str, ...]) -> list[Run]:
    runs: list[Run] = []
    for count in args.replicas:
        with tempfile.TemporaryDirectory(prefix="ragws-cluster-") as workdir:
            log(f"starting {count} replica(s) and haproxy…")
            cluster = LocalCluster(Path(workdir), count=count, flags=flags)
            await asyncio.to_thread(cluster.start)
            try:
                paths = [("haproxy", cluster.ws_url)]
                if count == 1:
                    direct = cluster.replicas[0].url.replace("http", "ws") + "/ws"
                    paths.append(("direct", direct))
                for kind in args.kinds:
                    for path, url in paths:
                        run = await load(url, kind, args.users, args.warmup, args.duration)
                        run.replicas, run.path = count, path
                        log(f"{kind}, {count} replica(s), {path}: {run.pages_per_s} pages/s, "
                            f"p95 {run.p95_ms} ms, {run.errors} errors")  # fmt: skip
                        runs.append(run)
            finally:
                await asyncio.to_thread(cluster.stop)
    return runs


def table(runs: list[Run], where: str) -> str:
    base = {(r.kind): r for r in runs if r.replicas == 1 and r.path == "haproxy"}
    direct = {(r.kind): r for r in runs if r.replicas == 1 and r.path == "direct"}
    lines = [
        f"Machine: {where}",
        "",
        "| load | replicas | path | pages/s | vs 1 replica | p50 ms | p95 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        ratio = "–"
        if r.path == "haproxy" and r.kind in base and base[r.kind].pages_per_s:
            ratio = f"{r.pages_per_s / base[r.kind].pages_per_s:.2f}×"
        lines.append(
            f"| {r.kind} | {r.replicas} | {r.path} | {r.pages_per_s} | {ratio} | {r.p50_ms} "
            f"| {r.p95_ms} | {r.errors} |"
        )
    lines.append("")
    for kind, d in direct.items():
        if kind in base and d.pages_per_s:
            ratio = base[kind].pages_per_s / d.pages_per_s
            lines.append(
                f"{kind}, one replica, through HAProxy against a direct connection: "
                f"{ratio:.2f}× the throughput, p95 {base[kind].p95_ms} ms against {d.p95_ms} ms"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2,3", help="replica counts (default 1,2,3)")
    parser.add_argument("--kinds", default="layout,parse", help="layout, parse (default both)")
    parser.add_argument("--users", type=int, default=12, help="clients, one socket each")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds not measured")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/cluster"))
    args = parser.parse_args(argv)
    args.replicas = [int(n) for n in args.replicas.split(",")]
    args.kinds = [k for k in args.kinds.split(",") if k]
    if haproxy_binary() is None:
        raise SystemExit("haproxy is not installed: apt-get install haproxy")
    flags = (*REPLICA_FLAGS, *extra)
    load_before = os.getloadavg()[0]
    runs = asyncio.run(measure(args, flags))
    # Other work on the machine shows here: the replicas' share of the cores is what is left.
    where = f"{machine()}; 1-min load average {load_before:.1f} before, "
    where += f"{os.getloadavg()[0]:.1f} after"
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"machine": where, "flags": flags, "runs": [asdict(r) for r in runs]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = table(runs, where)
    (args.out / "cluster.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
