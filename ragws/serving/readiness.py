"""What one replica tells a load balancer and an autoscaler: readiness, and draining.

A WebSocket is routed once, at its upgrade, so a balancer's view of a replica has to be true
at that moment. ``GET /ready`` answers 503 while the models load, while the replica drains,
while it is saturated (``max_concurrent`` requests in flight, or more OCR work waiting than
``ready_max_ocr_waiting``) and while a model service is down; 200 otherwise. ``GET /health``
stays the liveness answer: a draining or saturated replica is alive.

Stopping (SIGTERM or SIGINT), in this order:

1. ``/ready`` turns 503 and every open socket gets a ``goaway`` frame: its requests in flight
   go on, new ones belong on another connection (a client opens one, and the balancer sends
   it to another replica);
2. for ``drain_delay_s`` new requests are still served, for balancers that notice slowly;
3. then new WebSocket upgrades and HTTP requests are answered 503 with ``Retry-After``, and
   new requests on open sockets ``overloaded``. The listener stays open, so that a refusal is
   an answer that a balancer can retry on another replica, not a connection error;
4. running requests get ``shutdown_grace_s`` to finish; what still runs then ends with
   ``finish_reason: "shutdown"``, and every socket closes with 1001.

While the models load, a small application on the same listening socket answers: ``/ready``
and ``/health`` 503 with ``"status": "starting"``, everything else 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ragws.config import Settings
from ragws.errors import ErrorCode
from ragws.serving import frames
from ragws.serving.services import Services
from ragws.serving.session import Session

log = logging.getLogger(__name__)

#: Seconds a refused client is told to wait (``Retry-After``) before it tries again.
RETRY_AFTER_S = 1
#: Paths answered while draining: probes and scrapes must see the drain, not be refused by it.
PROBES = frozenset({"/health", "/ready", "/metrics"})
#: How often sockets opened during ``drain_delay_s`` are told ``goaway``.
ANNOUNCE_EVERY_S = 0.1
LISTEN_BACKLOG = 1024


class Phase(enum.Enum):
    STARTING = "starting"  # models loading (answered by the start-up application)
    SERVING = "serving"
    DRAINING = "draining"  # /ready 503, requests still served (drain_delay_s)
    REFUSING = "refusing"  # /ready 503, new work refused until the grace period ends


@dataclass(frozen=True, slots=True)
class Report:
    """The answer of ``GET /ready``."""

    ready: bool
    status: str  # ready, starting, draining, saturated, unhealthy
    reasons: list[str]
    inflight: int = 0
    max_concurrent: int = 0
    queues: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "status": self.status,
            "reasons": self.reasons,
            "inflight": self.inflight,
            "max_concurrent": self.max_concurrent,
            "queues": self.queues,
        }


@dataclass(eq=False)
class Readiness:
    """The replica's phase, and the readiness decision made from it and the services."""

    max_ocr_waiting: int = 0  # ready_max_ocr_waiting; 0 = OCR never saturates
    phase: Phase = Phase.STARTING
    services: Services | None = None  # set once the models are loaded
    told: weakref.WeakSet[Session] = field(default_factory=weakref.WeakSet)  # got goaway

    @property
    def draining(self) -> bool:
        return self.phase in (Phase.DRAINING, Phase.REFUSING)

    def report(self) -> Report:
        services = self.services
        if self.phase is Phase.STARTING or services is None:
            return Report(False, "starting", ["the models are loading"])
        admission = services.admission
        queues = queue_depths(services)
        known = dict(inflight=admission.inflight, max_concurrent=admission.max_concurrent)
        if self.draining:
            return Report(False, "draining", ["the replica is shutting down"], **known)
        down = [
            f"the {name} service is down"
            for name, service in (("layout", services.layout), ("ocr", services.ocr))
            if service is not None and not service.healthy
        ]
        if down:
            return Report(False, "unhealthy", down, queues=queues, **known)
        reasons = []
        if admission.inflight >= admission.max_concurrent:
            reasons.append(f"{admission.inflight} requests in flight (max_concurrent)")
        waiting = queues.get("ocr_sequences", queues.get("ocr_recognize", 0))
        if self.max_ocr_waiting and waiting > self.max_ocr_waiting:
            reasons.append(
                f"{waiting} OCR items waiting, over ready_max_ocr_waiting={self.max_ocr_waiting}"
            )
        if reasons:
            return Report(False, "saturated", reasons, queues=queues, **known)
        return Report(True, "ready", [], queues=queues, **known)


READINESS = web.AppKey("readiness", Readiness)


def queue_depths(services: Services) -> dict[str, int]:
    """Work waiting for each model: the autoscaler's signal (``ragws_queue_depth``)."""
    depths = {"layout": services.layout.batcher.queue_depth()}
    if services.ocr is not None:
        depths.update(services.ocr.queue_depths())
    parse = services.parse
    for name, service in (("table_structure", parse.tables), ("orientation", parse.orientation)):
        if service is not None:
            depths[name] = service.queue_depth()
    return depths


def install(app: web.Application, settings: Settings, services: web.AppKey[Services]) -> None:
    """Give ``app`` its ``GET /ready``, the refusals of a draining replica and the gauges an
    autoscaler reads; the services under ``services`` are read once they are loaded."""
    readiness = Readiness(max_ocr_waiting=settings.ready_max_ocr_waiting)
    app[READINESS] = readiness
    app.middlewares.insert(0, refuse_while_draining)
    app.router.add_get("/ready", ready)

    async def loaded(app: web.Application) -> None:
        # Runs after the services' start-up context (registered before it), so they exist.
        readiness.services = loaded_services = app[services]
        metrics = loaded_services.metrics
        metrics.ready.set_function(lambda: float(readiness.report().ready))
        metrics.draining.set_function(lambda: float(readiness.draining))
        metrics.max_concurrent.set(loaded_services.admission.max_concurrent)
        for name in queue_depths(loaded_services):
            gauge = metrics.queue_depth.labels(name)
            gauge.set_function(lambda name=name: queue_depths(loaded_services).get(name, 0))
        readiness.phase = Phase.SERVING

    app.on_startup.append(loaded)


async def ready(request: web.Request) -> web.Response:
    report = request.app[READINESS].report()
    return web.json_response(report.to_json(), status=200 if report.ready else 503)


def _unavailable(message: str) -> web.Response:
    response = web.json_response(
        {"error": ErrorCode.UNAVAILABLE.value, "message": message},
        status=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )
    response.force_close()  # the body, if any, is not read: the connection cannot be reused
    return response


@web.middleware
async def refuse_while_draining(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.app[READINESS].phase is Phase.REFUSING and request.path not in PROBES:
        return _unavailable("the server is shutting down; retry on another instance")
    return await handler(request)


# --- start-up -------------------------------------------------------------------------------


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host:port`` (one per address family it resolves to), bound
    before the models load so that the port answers from the first second."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def _starting(request: web.Request) -> web.Response:
    if request.path in ("/ready", "/health"):
        report = Report(False, "starting", ["the models are loading"])
        return web.json_response(report.to_json(), status=503)
    return _unavailable("the server is starting; retry shortly")


@contextlib.asynccontextmanager
async def answering_while_starting(sockets: list[socket.socket]) -> AsyncIterator[None]:
    """Answer on ``sockets`` (503, ``"status": "starting"``) until the block ends. The real
    application's sites should start inside the block, on the same sockets: both accept for a
    moment, so the port never stops answering."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _starting)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        # Duplicates: closing the start-up sites closes these, not the sockets themselves.
        for sock in sockets:
            await web.SockSite(runner, sock.dup()).start()
        yield
    finally:
        await runner.cleanup()


# --- draining -------------------------------------------------------------------------------


async def drain(readiness: Readiness, services: Services, settings: Settings) -> None:
    """Stop as the module docstring says; returns once every socket is closed."""
    readiness.phase = Phase.DRAINING
    started = time.monotonic()
    log.info(
        "draining: /ready answers 503; new requests are refused in %.0f s (drain_delay_s)",
        settings.drain_delay_s,
    )
    sends: set[asyncio.Task[None]] = set()
    goaway = frames.goaway_frame("shutdown")
    while True:
        for session in list(services.sessions):
            if session not in readiness.told:
                readiness.told.add(session)
                sends.add(asyncio.create_task(session.send(goaway)))
        # The goaway frames are queued ahead of any refusal (a full send queue aside).
        await asyncio.sleep(0)
        left = settings.drain_delay_s - (time.monotonic() - started)
        if left <= 0:
            break
        await asyncio.sleep(min(ANNOUNCE_EVERY_S, left))
    readiness.phase = Phase.REFUSING
    services.admission.draining = True
    log.info(
        "shutting down: %d request(s) in flight, up to %.0f s to finish",
        services.admission.inflight,
        settings.shutdown_grace_s,
    )
    try:
        if not await services.admission.wait_idle(settings.shutdown_grace_s):
            log.info("grace period over: ending %d request(s)", services.admission.inflight)
        await asyncio.gather(*(session.shutdown() for session in list(services.sessions)))
    finally:
        for send in sends:
            send.cancel()
