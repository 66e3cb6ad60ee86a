"""The node's ASGI app: routes, problem details, and the resources its lifespan opens."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

import balancectl
from balancectl.api import balance_routes, jobs_routes, ops_routes
from balancectl.api.metrics import Metrics, MetricsMiddleware
from balancectl.api.problems import exception_handlers
from balancectl.config import NodeSettings, PoolSettings
from balancectl.db import Database
from balancectl.migrations import head_revision
from balancectl.scheduler import JobRetention, JobSpec, Scheduler, SchedulerStore


def scheduler_pool(settings: NodeSettings) -> PoolSettings:
    """A small pool of its own, so a burst of requests never delays a lease renewal."""
    return replace(
        settings.pool,
        min_size=1,
        max_size=3,
        timeout=settings.scheduler.renew_every,
        statement_timeout=settings.scheduler.renew_every,
        max_waiting=100,
    )


def job_pool(settings: NodeSettings) -> PoolSettings:
    """The jobs' own work (an audit over the whole ledger) may take longer than a renewal."""
    return replace(settings.pool, min_size=1, max_size=2, statement_timeout=300.0)


@asynccontextmanager
async def opened(db: Database) -> AsyncIterator[Database]:
    await db.open()
    try:
        yield db
    finally:
        await db.close()


def lifespan(
    settings: NodeSettings, specs: Sequence[JobSpec]
) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    """Open the request pool, then (unless disabled) run the scheduler, for the app's life."""

    @asynccontextmanager
    async def resources(app: Litestar) -> AsyncIterator[None]:
        async with opened(Database(settings.database_url, settings.pool, name="api")) as db:
            app.state.db = db
            if not settings.scheduler.enabled or not specs:
                yield
                return
            async with scheduled(settings, specs):
                yield

    return resources


@asynccontextmanager
async def scheduled(settings: NodeSettings, specs: Sequence[JobSpec]) -> AsyncIterator[Scheduler]:
    """Run the node's scheduler for the life of the app; stop it before the pools close."""
    url = settings.database_url
    async with (
        opened(Database(url, scheduler_pool(settings), name="scheduler")) as db,
        opened(Database(url, job_pool(settings), name="jobs")) as job_db,
    ):
        store = SchedulerStore(db, settings.node_id, settings.scheduler.lease_ttl)
        retention = JobRetention(idempotency_seconds=settings.idempotency_retention)
        scheduler = Scheduler(store, specs, settings.scheduler, job_db, retention)
        await scheduler.start()
        try:
            yield scheduler
        finally:
            await scheduler.stop()


def provide_db(state: State) -> Database:
    db: Database = state.db
    return db


def create_app(settings: NodeSettings, specs: Sequence[JobSpec] = ()) -> Litestar:
    """A node's app; nothing is opened until its lifespan starts."""
    state = State(
        {
            "api_token": settings.api_token,
            "head_revision": head_revision(),
            "lease_ttl": settings.scheduler.lease_ttl,
            "metrics": Metrics(),
            "node_id": settings.node_id,
        }
    )
    return Litestar(
        route_handlers=[
            balance_routes.change_balance,
            balance_routes.get_user,
            jobs_routes.list_jobs,
            jobs_routes.job_history,
            jobs_routes.list_nodes,
            ops_routes.healthz,
            ops_routes.readyz,
            ops_routes.metrics,
        ],
        dependencies={"db": Provide(provide_db, sync_to_thread=False)},
        exception_handlers=exception_handlers(),
        middleware=[MetricsMiddleware()],
        lifespan=[lifespan(settings, specs)],
        state=state,
        openapi_config=OpenAPIConfig(title="balancectl", version=balancectl.__version__),
        request_max_body_size=settings.max_body_bytes,
        logging_config=None,
    )
