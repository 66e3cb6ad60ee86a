"""The node's ASGI app: routes, problem details, and the resources its lifespan opens."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

import balancectl
from balancectl.api import balance_routes, dashboard_routes, jobs_routes, ops_routes
from balancectl.api.balance_lane import answer_change, lane_user
from balancectl.api.metrics import Metrics, MetricsMiddleware
from balancectl.api.problems import exception_handlers
from balancectl.config import NodeSettings
from balancectl.db import Database
from balancectl.outcomes import OutcomeCounts, last_record, record_every_second
from balancectl.revision import SCHEMA_HEAD

POOL_SAMPLE_EVERY = 1.0  # seconds


class Ready(Protocol):
    """A flag another process sets (a ``multiprocessing.Event``)."""

    def is_set(self) -> bool: ...


@dataclass
class Resources:
    """What the lifespan opens, handed to handlers without a per-request ``State`` copy."""

    db: Database | None = None

    def database(self) -> Database:
        assert self.db is not None, "the request pool opens in the app's lifespan"
        return self.db


def lifespan(
    settings: NodeSettings, resources: Resources
) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    """Open this process's request pool for the app's life, and record its request counts."""

    @asynccontextmanager
    async def opened(app: Litestar) -> AsyncIterator[None]:
        db = Database(settings.database_url, settings.pool, name="api")
        await db.open()
        resources.db = app.state.db = db
        sampler = asyncio.create_task(sample_pool(app.state.metrics, db))
        recorder = asyncio.create_task(record_every_second(app.state.outcomes, db))
        try:
            yield
        finally:
            sampler.cancel()
            recorder.cancel()
            # A record in flight ends first: the last one must not send its counts again.
            with contextlib.suppress(asyncio.CancelledError):
                await recorder
            await last_record(app.state.outcomes, db)
            await db.close()

    return opened


async def sample_pool(metrics: Metrics, db: Database) -> None:
    """Keep this worker's pool gauges fresh for whichever worker answers ``/metrics``."""
    while True:
        metrics.sample_pool(db)
        await asyncio.sleep(POOL_SAMPLE_EVERY)


class NodeApp(Litestar):
    """Litestar, with the balance route's canonical path answered before the router
    (``api.balance_lane``: the hot path, without the framework's per-request objects)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (raw_user := lane_user(scope)) is not None:
            bound = self.request_max_body_size  # the one Litestar's own handlers apply
            limit = bound if isinstance(bound, int) else math.inf  # None: no bound
            await answer_change(self.state, scope, receive, send, raw_user, limit)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: NodeSettings, node_ready: Ready | None = None) -> Litestar:
    """A node's HTTP app (one per worker process); nothing is opened until its lifespan starts.

    The scheduler is not part of it: a node runs exactly one, in its supervisor process
    (``balancectl.node``), however many workers serve HTTP. ``node_ready`` is set by the
    supervisor once that scheduler has joined; ``/readyz`` answers 503 until then.
    """
    resources = Resources()
    state = State(
        {
            "api_token": settings.api_token,
            "head_revision": SCHEMA_HEAD,
            "lease_ttl": settings.scheduler.lease_ttl,
            "metrics": Metrics(),
            "node_id": settings.node_id,
            "node_ready": node_ready,
            "outcomes": OutcomeCounts(settings.node_id),
        }
    )
    return NodeApp(
        route_handlers=[
            balance_routes.change_balance,
            balance_routes.get_user,
            jobs_routes.list_jobs,
            jobs_routes.job_history,
            jobs_routes.list_nodes,
            jobs_routes.get_job,
            jobs_routes.run_job,
            jobs_routes.pause_job,
            jobs_routes.resume_job,
            ops_routes.healthz,
            ops_routes.readyz,
            ops_routes.metrics,
            dashboard_routes.root,
            dashboard_routes.dashboard_page,
            dashboard_routes.dashboard_script,
            dashboard_routes.dashboard_style,
            dashboard_routes.dashboard_state,
        ],
        dependencies={"db": Provide(resources.database, sync_to_thread=False, use_cache=True)},
        exception_handlers=exception_handlers(),
        middleware=[MetricsMiddleware],
        lifespan=[lifespan(settings, resources)],
        state=state,
        openapi_config=OpenAPIConfig(title="balancectl", version=balancectl.__version__),
        request_max_body_size=settings.max_body_bytes,
        logging_config=None,
    )
