"""Prometheus metrics: requests by route and status, latency, and the pools' use.

A node's workers write their samples to the node's metrics folder (prometheus_client's
multiprocess mode, set up by ``balancectl.workers``), so ``/metrics`` on any worker
counts every request of the node once. Label children are bound once per label set,
so counting a request costs two increments, not a label lookup each.

The node's supervisor writes its scheduler's samples to the same folder
(``balancectl.scheduler.metrics``). The age of its last lease renewal is computed here,
at scrape time, from the timestamp it wrote: a frozen supervisor cannot update a gauge,
and that is exactly when the age matters.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from balancectl.db import Database

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
METRICS_FOLDER = "PROMETHEUS_MULTIPROC_DIR"
LAST_RENEWAL = "balancectl_scheduler_last_renewal_timestamp_seconds"


class Metrics:
    """One registry per app, so several apps in one process never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "balancectl_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "balancectl_http_request_seconds",
            "HTTP request latency by route",
            ["route", "method"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.pool = Gauge(
            "balancectl_db_pool_connections",
            "Request pool connections by state, summed over the node's live workers",
            ["state"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._bound: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        children = self._bound.get((route, method, status))
        if children is None:
            children = self._bind(route, method, status)
        children[0].inc()
        children[1].observe(seconds)

    def _bind(self, route: str, method: str, status: int) -> tuple[Any, Any]:
        children = (
            self.requests.labels(route, method, str(status)),
            self.latency.labels(route, method),
        )
        self._bound[(route, method, status)] = children
        return children

    def sample_pool(self, db: Database) -> None:
        """Record this worker's pool use (every second, and before each ``/metrics``)."""
        stats = db.stats()
        self.pool.labels("open").set(stats["size"])
        self.pool.labels("in_use").set(stats["size"] - stats["available"])
        self.pool.labels("waiting").set(stats["waiting"])

    def render(self, db: Database) -> bytes:
        self.sample_pool(db)
        folder = os.environ.get(METRICS_FOLDER)
        if not folder:
            return generate_latest(self.registry)
        node = CollectorRegistry()
        node.register(NodeCollector(folder))
        return generate_latest(node)


class NodeCollector:
    """Every sample of the node's folder, and the age of the scheduler's last renewal."""

    def __init__(self, folder: str) -> None:
        self.files = MultiProcessCollector(None, path=folder)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        families: list[Metric] = list(self.files.collect())  # type: ignore[no-untyped-call]
        yield from families
        renewed = last_value(families, LAST_RENEWAL)
        if renewed is not None:
            yield GaugeMetricFamily(
                "balancectl_scheduler_seconds_since_renewal",
                "Seconds since this node's scheduler last renewed its leases and heartbeat",
                value=max(0.0, time.time() - renewed),
            )


def last_value(families: Iterable[Metric], name: str) -> float | None:
    for family in families:
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


class MetricsMiddleware:
    """Times every routed request and counts it by its route template and status (raw ASGI)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics: Metrics = scope["litestar_app"].state.metrics
            route: Any = scope.get("path_template") or "unmatched"
            method: str = scope["method"]
            metrics.observe(route, method, status, time.perf_counter() - started)
