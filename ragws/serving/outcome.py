"""How a request's end is recorded, the same for every API: counted in
``ragws_requests_total{type, outcome}`` and logged as one line (text, or JSON with its fields)
on the logger of the API that served it."""

from __future__ import annotations

import logging
import time

from ragws.errors import RequestId
from ragws.metrics import Metrics


def request_ended(
    log: logging.Logger,
    metrics: Metrics,
    *,
    kind: str,
    request_id: RequestId,
    peer: str,
    outcome: str,
    started: float,
) -> None:
    metrics.requests_total.labels(kind, outcome).inc()
    total_ms = round((time.monotonic() - started) * 1000, 1)
    log.info(
        "request %s %r on %s: %s in %.1f ms",
        kind,
        request_id,
        peer,
        outcome,
        total_ms,
        extra={
            "event": "request",
            "request_id": request_id,
            "socket": peer,
            "type": kind,
            "outcome": outcome,
            "total_ms": total_ms,
        },
    )
