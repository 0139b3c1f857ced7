"""Prometheus metrics, named for what an operator asks.

Each application gets its own registry so that several servers can live in one process (tests,
embedding) without clashing.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from .batcher import BatchStats

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

__all__ = ["CONTENT_TYPE", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests_total = Counter(
            "ragws_requests_total",
            "Requests answered, by type and outcome",
            ["type", "outcome"],
            registry=r,
        )
        self.inflight_requests = Gauge(
            "ragws_inflight_requests", "Requests admitted and not yet answered", registry=r
        )
        self.rejected_total = Counter(
            "ragws_rejected_total",
            "Requests refused because the server was at capacity",
            registry=r,
        )
        self.websocket_connections = Gauge(
            "ragws_websocket_connections", "Open WebSocket connections", registry=r
        )
        self.layout_batch_size = Histogram(
            "ragws_layout_batch_size",
            "Pages per layout model call",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.layout_queue_seconds = Histogram(
            "ragws_layout_queue_seconds",
            "Time a page waited in the layout batcher before its batch started",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.layout_inference_seconds = Histogram(
            "ragws_layout_inference_seconds",
            "Wall time of one layout model call (whole batch)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.layout_pages_total = Counter(
            "ragws_layout_pages_total", "Pages that went through the layout model", registry=r
        )
        self.layout_batch_failures_total = Counter(
            "ragws_layout_batch_failures_total", "Layout model calls that raised", registry=r
        )
        self.layout_queue_depth = Gauge(
            "ragws_layout_queue_depth", "Pages waiting in the layout batcher", registry=r
        )

    def observe_layout_batch(self, stats: BatchStats) -> None:
        self.layout_inference_seconds.observe(stats.run_s)
        if stats.failed:
            self.layout_batch_failures_total.inc()
            return
        self.layout_batch_size.observe(stats.size)
        self.layout_pages_total.inc(stats.size)
        for wait in stats.queue_s:
            self.layout_queue_seconds.observe(wait)

    def render(self) -> bytes:
        return generate_latest(self.registry)
