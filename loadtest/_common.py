"""What the load scripts and benchmarks share: the machine's name, loopback-only targets, a
server of their own in a subprocess, and the server's memory and gauges read from /metrics."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
PAPER = FIXTURES / "2310.01889v4.pdf"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_name() -> str:
    """The CPU model and core count, for result tables."""
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


@dataclass(frozen=True)
class Target:
    ws_url: str
    http_url: str  # scheme://host:port, for /metrics and /health

    @property
    def metrics_url(self) -> str:
        return self.http_url + "/metrics"


def loopback_target(ws_url: str) -> Target:
    """Check that ``ws_url`` is a loopback WebSocket URL; load is never sent elsewhere."""
    parts = urlsplit(ws_url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise SystemExit(f"--url {ws_url!r}: expected ws://127.0.0.1:PORT/ws")
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"--url {ws_url!r}: only loopback servers may be loaded (127.0.0.1, ::1)")
    http_scheme = "https" if parts.scheme == "wss" else "http"
    return Target(ws_url, urlunsplit((http_scheme, parts.netloc, "", "", "")))


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value} (label sets as written by the server)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            samples[key] = float(value)
        except ValueError:
            continue
    return samples


# --- a server of the script's own ------------------------------------------------------------

#: The server's resident memory, from prometheus_client's process collector.
RSS = "process_resident_memory_bytes"
#: Gauges that must read 0 once a run is over and its sockets are closed: anything else is
#: work (or a KV-cache slot, or a connection) the server failed to release.
GAUGES = (
    "ragws_inflight_requests",
    "ragws_ocr_running",
    "ragws_ocr_waiting",
    "ragws_kv_slots_used",
    "ragws_websocket_connections",
)
MIB = 1024 * 1024
#: What a spawned server gets before the caller's flags (which win, being later): no start-up
#: measurement of the layout batch size (it would take seconds and load the CPU the run is about
#: to measure), and a short grace period, since the scripts end their own work before stopping it.
SPAWN_DEFAULTS = ("--layout-preferred-batch-size", "1", "--shutdown-grace-s", "5")


def split_server_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``[script flags] -- [ragws serve flags]`` → the two lists; the second may be empty.
    The server's address is the script's to choose (a free loopback port), not the caller's."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    for flag in argv[cut + 1 :]:
        if flag.split("=", 1)[0] in ("--host", "--port"):
            raise SystemExit(f"{flag}: the script picks the spawned server's address")
    return argv[:cut], argv[cut + 1 :]


def free_port() -> int:
    """A loopback port nobody listens on now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SpawnedServer:
    """``ragws serve`` in a subprocess; ``exit_code`` is known once it has stopped."""

    target: Target
    command: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    exit_code: int | None = None

    def describe(self) -> dict[str, object]:
        return {"command": self.command, "log": str(self.log_path), "exit_code": self.exit_code}


@contextlib.contextmanager
def spawn_server(
    flags: Sequence[str], log_path: Path, start_timeout: float = 180.0
) -> Iterator[SpawnedServer]:
    """Start ``python -m ragws serve`` on a free loopback port with ``flags``, wait until
    ``GET /health`` answers 200, and stop it with SIGTERM on the way out (its graceful path).

    Its output goes to ``log_path``, not to a pipe: a pipe nobody reads fills up with the
    per-request log lines and then blocks the server's event loop."""
    port = free_port()
    command = [sys.executable, "-m", "ragws", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += [*SPAWN_DEFAULTS, *flags]
    server = SpawnedServer(loopback_target(f"ws://127.0.0.1:{port}/ws"), command, log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as output:
        server.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(server, start_timeout)
        yield server
    finally:
        server.exit_code = _stop(server.process)


def _wait_healthy(server: SpawnedServer, timeout: float) -> None:
    assert server.process is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log_path.read_text(errors="replace")[-2000:]
            raise SystemExit(f"the server exited with {server.process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(server.target.http_url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not healthy within {timeout:.0f} s (see {server.log_path})")


def _stop(process: subprocess.Popen[bytes] | None, timeout: float = 60.0) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``; its exit code."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"the server ignored SIGTERM for {timeout:.0f} s: killing it")
            process.kill()
            process.wait()
    return process.returncode


@contextlib.contextmanager
def server_under_test(
    url: str | None, flags: Sequence[str], log_path: Path
) -> Iterator[tuple[Target, SpawnedServer | None]]:
    """The target to load: a spawned server's (``url`` None), or the running one ``url`` names
    (then no server object). Both load scripts start here, so they work the same either way."""
    if url is None:
        with spawn_server(flags, log_path) as server:
            yield server.target, server
        return
    yield loopback_target(url), None


async def scrape(http: aiohttp.ClientSession, target: Target) -> dict[str, float]:
    """One read of the server's /metrics."""
    async with http.get(target.metrics_url) as resp:
        resp.raise_for_status()
        return parse_metrics(await resp.text())


async def gauges_at_rest(
    http: aiohttp.ClientSession,
    target: Target,
    timeout: float = 15.0,
    names: Sequence[str] = GAUGES,
) -> tuple[dict[str, float], float]:
    """Poll the gauges ``names`` until every one reads 0, for at most ``timeout`` seconds: the
    last values read, and the seconds it took. Releasing is asynchronous (a cancelled OCR
    sequence leaves the batch at the engine's next step), so a single read proves nothing."""
    started = time.monotonic()
    while True:
        metrics = await scrape(http, target)
        gauges = {name: metrics.get(name, 0.0) for name in names}
        elapsed = time.monotonic() - started
        if not any(gauges.values()) or elapsed >= timeout:
            return gauges, round(elapsed, 2)
        await asyncio.sleep(0.25)


# --- what the server-spawning scripts' command lines and charts share --------------------------


def script_parser(doc: str, default_out: str, serve_example: str) -> argparse.ArgumentParser:
    """A parser with the flags of every script that starts its own server (``--url`` to load a
    running one instead, ``--out``), and an epilog saying where ``ragws serve`` flags go."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=f"Flags after -- go to `ragws serve`, e.g. -- {serve_example}",
    )
    parser.add_argument("--url", help="a running loopback server (default: start one)")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="result folder")
    return parser


def parse_script_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, list[str]]:
    """The script's arguments and the ``ragws serve`` flags after ``--``; a ``--url`` is
    checked (loopback only, no server flags) before any work starts."""
    own, serve_flags = split_server_args(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    if args.url is not None:
        loopback_target(args.url)
        if serve_flags:
            raise SystemExit("flags after -- configure a spawned server; with --url there is none")
    return args, serve_flags


def pyplot() -> Any:
    """matplotlib's pyplot without a display (imported late: only the charts need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_chart(fig: Any, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    pyplot().close(fig)
