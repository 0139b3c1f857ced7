"""What the load scripts and benchmarks share: the machine's name, loopback-only targets."""

from __future__ import annotations

import ipaddress
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

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
