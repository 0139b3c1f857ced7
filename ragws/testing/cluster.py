"""Several ``ragws serve`` replicas on loopback behind HAProxy, for tests and benchmarks.

The replicas are real processes on free loopback ports; HAProxy (Debian's ``haproxy``) runs in
front of them with the configuration :func:`haproxy_config` writes, the same one
``deploy/haproxy/haproxy.cfg`` ships: ``balance leastconn``, ``option httpchk GET /ready``,
``timeout tunnel`` for WebSockets, and retries of refused connections on another replica.
Everything is blocking (``subprocess``), so that it can back a module-wide test fixture used by
tests on any event loop; everything started is stopped by :meth:`LocalCluster.stop`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Health checks this often, so a replica that turns unready leaves the rotation within about
#: this long (one failed check takes it out: ``fall 1``).
CHECK_INTER_MS = 200

HAPROXY_CONFIG = """\
global
    maxconn 4096
    stats socket {stats_socket} mode 600 level admin

defaults
    mode http
    option dontlognull
    timeout connect 2s
    timeout client 600s
    timeout server 600s
    # A WebSocket is a tunnel once upgraded: this bounds how long one may stay silent.
    timeout tunnel 1h
    timeout client-fin 5s
    timeout http-request 60s
    # A refused connection or a 503 (a replica starting or draining) is tried again on
    # another replica; a request with a body larger than HAProxy's buffer is not (the client
    # gets the 503 and its Retry-After).
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response 503

frontend ragws
    bind {host}:{port}
    default_backend replicas

backend replicas
    balance leastconn
    option httpchk GET /ready
    http-check expect status 200
    default-server check inter {inter}ms fall 1 rise 2 maxconn 1000
{servers}
"""


def haproxy_config(
    port: int,
    replicas: Sequence[tuple[str, int]],
    *,
    stats_socket: Path | str,
    host: str = "127.0.0.1",
    inter_ms: int = CHECK_INTER_MS,
) -> str:
    """HAProxy in front of ``replicas`` ((address, port) pairs), listening on ``host:port``."""
    servers = "\n".join(
        f"    server r{i} {address}:{replica_port}"
        for i, (address, replica_port) in enumerate(replicas)
    )
    return HAPROXY_CONFIG.format(
        stats_socket=stats_socket, host=host, port=port, inter=inter_ms, servers=servers
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.path.exists(p)), None
    )


def get_json(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    """GET ``url``: (status, JSON body); status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError):
            return exc.code, json.loads(exc.read() or b"{}")
        return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


def metrics(url: str) -> dict[str, float]:
    """A replica's ``/metrics`` as {"name{labels}": value}."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def metric_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        metric, _, rest = key.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


@dataclass(eq=False)
class Replica:
    """One ``ragws serve`` process."""

    name: str
    port: int
    flags: tuple[str, ...]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ragws", "serve", "--port", str(self.port), *self.flags],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"replica {self.name} exited:\n{self.log()}")
            if get_json(self.url + "/ready", timeout=2)[0] == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"replica {self.name} not ready in {timeout:.0f} s:\n{self.log()}")

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@dataclass(eq=False)
class LocalCluster:
    """``count`` replicas and HAProxy in front of them, in ``workdir``."""

    workdir: Path
    count: int = 3
    flags: tuple[str, ...] = ()
    balancer: bool = True
    replicas: list[Replica] = field(default_factory=list)
    haproxy: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def url(self) -> str:
        """The balancer's HTTP address (or the only replica's, without a balancer)."""
        return f"http://127.0.0.1:{self.port}" if self.balancer else self.replicas[0].url

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws"

    def start(self, timeout: float = 180.0) -> LocalCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for i in range(self.count):
                replica = Replica(f"r{i}", free_port(), self.flags, self.workdir / f"r{i}.log")
                self.replicas.append(replica)
                replica.start()
            for replica in self.replicas:
                replica.wait_ready(timeout)
            if self.balancer:
                self._start_haproxy()
                self.wait_balanced(timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_haproxy(self) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        self.port = free_port()
        config = self.workdir / "haproxy.cfg"
        config.write_text(
            haproxy_config(
                self.port,
                [("127.0.0.1", r.port) for r in self.replicas],
                stats_socket=self.workdir / "haproxy.sock",
            )
        )
        check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejects its configuration: {check.stderr.decode()}")
        with (self.workdir / "haproxy.log").open("ab") as log:
            self.haproxy = subprocess.Popen(
                [binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while True:
            try:
                self.stats()
                return
            except OSError:
                if self.haproxy.poll() is not None or time.monotonic() > deadline:
                    log_text = (self.workdir / "haproxy.log").read_text(errors="replace")
                    raise RuntimeError(f"haproxy did not start: {log_text}") from None
                time.sleep(0.05)

    def stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's ``show stat`` for the replicas: server name → its row (``status``:
        UP/DOWN/..., ``stot``: connections it was sent, ``scur``: open now)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.workdir / "haproxy.sock"))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == "replicas" and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    def wait_status(self, name: str, statuses: tuple[str, ...], timeout: float) -> float:
        """Wait until HAProxy reports server ``name`` in one of ``statuses``; seconds waited."""
        started = time.monotonic()
        while True:
            status = self.stats()[name]["status"]
            if status.split()[0] in statuses:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{name} stayed {status}")
            time.sleep(0.02)

    def wait_balanced(self, timeout: float) -> None:
        """Wait until HAProxy sees every running replica UP."""
        for replica in self.replicas:
            if replica.running:
                self.wait_status(replica.name, ("UP",), timeout)

    def ensure_up(self, timeout: float = 180.0) -> None:
        """Start again any replica that has stopped, and wait until HAProxy sees it."""
        stopped = [r for r in self.replicas if not r.running]
        for replica in stopped:
            replica.stop()
            replica.start()
        for replica in stopped:
            replica.wait_ready(timeout)
        if self.balancer and stopped:
            self.wait_balanced(timeout=30)

    def stop(self) -> None:
        if self.haproxy is not None:
            if self.haproxy.poll() is None:
                self.haproxy.terminate()
                try:
                    self.haproxy.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.haproxy.kill()
                    self.haproxy.wait()
            self.haproxy = None
        for replica in self.replicas:
            replica.signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for replica in self.replicas:
            if replica.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    replica.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            replica.stop()
