"""Prometheus metrics: requests by route and status, latency, and the pool's use."""

from __future__ import annotations

import time
from typing import Any

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from balancectl.db import Database


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
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.pool = Gauge(
            "balancectl_db_pool_connections",
            "Database pool connections by state",
            ["state"],
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def render(self, db: Database) -> bytes:
        stats = db.stats()
        self.pool.labels("open").set(stats["size"])
        self.pool.labels("in_use").set(stats["size"] - stats["available"])
        self.pool.labels("waiting").set(stats["waiting"])
        return generate_latest(self.registry)


class MetricsMiddleware(ASGIMiddleware):
    """Times every routed request and counts it by its route template and status."""

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        started, status = time.perf_counter(), 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await next_app(scope, receive, send_wrapper)
        finally:
            metrics: Metrics = scope["litestar_app"].state.metrics
            route: Any = scope.get("path_template") or "unmatched"
            method = str(scope.get("method", "GET"))
            metrics.observe(route, method, status, time.perf_counter() - started)
