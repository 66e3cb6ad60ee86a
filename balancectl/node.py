"""Run one node, the composition root: bind, migrate, join, start the HTTP workers, claim jobs.

A node is one supervisor process and W HTTP worker processes (``balancectl.worker``)
that share its listening socket. The supervisor owns the node's identity: it runs the
node's one scheduler (its own pools, its own event loop, never slowed by HTTP), keeps
the workers running, and on SIGTERM or Ctrl-C stops them and the scheduler, then exits
as that signal would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import replace
from typing import Any

from balancectl.config import NodeSettings, PoolSettings, worker_pool
from balancectl.db import BOUNCER_FULL, Database, TooManyConnections, refusal, server_facts
from balancectl.errors import ConfigError
from balancectl.logs import configure_logging
from balancectl.open_files import raise_open_files_limit
from balancectl.orphans import end_with_launcher
from balancectl.revision import SCHEMA_HEAD
from balancectl.scheduler import JobRetention, JobSpec, Scheduler, SchedulerStore
from balancectl.scheduler.metrics import SchedulerMetrics
from balancectl.workers import Workers, WorkersFailed, metrics_folder

log = logging.getLogger("balancectl.node")
SOMAXCONN = "/proc/sys/net/core/somaxconn"
CLOSE_WAIT = 1.0  # seconds a closing scheduler pool waits for its connection attempts

__all__ = ["bind", "configure_logging", "serve"]


def bind(host: str, port: int, backlog: int = 16384) -> socket.socket:
    """Bind and listen here, so a port in use is one clear error; workers share the socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror}") from error
    sock.listen(backlog)
    warn_if_backlog_capped(backlog)
    sock.set_inheritable(True)
    return sock


def warn_if_backlog_capped(backlog: int) -> None:
    """Say once when the kernel shortens the accept queue a burst needs."""
    try:
        with open(SOMAXCONN) as limit:
            cap = int(limit.read())
    except (OSError, ValueError):
        return
    if cap < backlog:
        log.warning(
            "listen backlog %d is capped at %d by net.core.somaxconn: more simultaneous "
            "connects than that wait for SYN retries (sysctl -w net.core.somaxconn=%d)",
            backlog,
            cap,
            backlog,
        )


def serve(settings: NodeSettings, specs: Sequence[JobSpec], db_wait: float = 30.0) -> None:
    """Migrate, then serve the API and run the scheduler until asked to stop."""
    end_with_launcher(os.environ)
    sock = bind(settings.host, settings.port, settings.backlog)
    raise_open_files_limit()
    facts = server_facts(settings.database_url)
    migrate(settings, specs, db_wait, facts.schema_revision)
    # Read again only if the server could not answer before the migration waited for it.
    limit = facts.max_connections or server_facts(settings.database_url).max_connections
    try:
        with metrics_folder(settings.node_id):
            received = asyncio.run(supervise(settings, specs, sock))
    except WorkersFailed as error:
        raise ConfigError(f"node {settings.node_id} cannot serve: {error}") from error
    except TooManyConnections as error:
        raise ConfigError(refused(settings, specs, error, limit)) from error
    if received is not None:
        # Exit as the signal would have made us (status 128 + n in a shell), like uvicorn.
        signal.signal(received, signal.SIG_DFL)
        signal.raise_signal(received)


async def supervise(
    settings: NodeSettings, specs: Sequence[JobSpec], sock: socket.socket
) -> signal.Signals | None:
    """Run the workers and the scheduler until SIGTERM or SIGINT; the signal received."""
    stop, received = asyncio.Event(), list[signal.Signals]()

    def on_signal(number: signal.Signals) -> None:
        received.append(number)
        stop.set()

    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, on_signal, number)
    # The node joins before its workers' CPU-heavy start, so peers started with it count
    # it from the start; it claims jobs once its workers serve. A signal while it joins
    # (its pools or its registration waiting on a database gone silent) ends it at once.
    async with AsyncExitStack() as stack:
        joining = asyncio.ensure_future(stack.enter_async_context(scheduled(settings, specs)))
        if not await done_before(stop, joining):
            return received[0] if received else None
        scheduler = joining.result()
        with Workers(settings, sock) as workers:
            try:
                await serve_until(stop, settings, workers, scheduler)
            finally:
                workers.terminate()
                if scheduler is not None:
                    await scheduler.stop()  # hands its jobs back while the workers drain
            await workers.wait()
    return received[0] if received else None


async def done_before(stop: asyncio.Event, task: asyncio.Future[Any]) -> bool:
    """Whether ``task`` ended before ``stop`` was set; if not, it is cancelled and awaited."""
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        return True
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
    return False


async def serve_until(
    stop: asyncio.Event, settings: NodeSettings, workers: Workers, scheduler: Scheduler | None
) -> None:
    """Once every worker serves: claim jobs, read ready, keep the workers running."""
    if not await workers.wait_started(until=stop):
        return
    if scheduler is not None:
        scheduler.start_claiming()
    workers.node_ready.set()
    log.info(
        "node %s listening on http://%s:%d with %d workers",
        settings.node_id,
        settings.host,
        settings.port,
        settings.workers,
    )
    await workers.keep_running(until=stop)


def migrate(
    settings: NodeSettings, specs: Sequence[JobSpec], db_wait: float, revision: str | None
) -> None:
    """Upgrade to head (waiting ``db_wait`` for the server) from ``revision``, the one read
    at start; a server that was full all that time is the same one line as a pool it
    refuses.

    A database at head already, as on every start but the first, is left alone without
    importing Alembic and SQLAlchemy (0.4 s of the supervisor's CPU at each start).
    """
    if revision == SCHEMA_HEAD:
        return
    from balancectl import migrations  # only when there is something to upgrade

    try:
        migrations.upgrade_when_reachable(settings.database_url, db_wait)
    except ConfigError as error:
        reason = refusal(error.__cause__)
        if reason is None:
            raise
        raise ConfigError(refused(settings, specs, TooManyConnections(reason), None)) from error


def refused(
    settings: NodeSettings, specs: Sequence[JobSpec], error: TooManyConnections, limit: int | None
) -> str:
    """The one line of a node the server (or PgBouncer) has no connection slots for, with
    its arithmetic."""
    wanted = f"{settings.node_id} cannot open {connection_arithmetic(settings, specs)}"
    if BOUNCER_FULL in error.detail:
        return f"{wanted}: PgBouncer refused: {error.detail}; " + (
            "raise PgBouncer's max_client_conn or run fewer nodes"
        )
    server = "" if limit is None else f" (max_connections={limit})"
    return (
        f"{wanted}: the server refused: {error.detail}{server}; "
        "use PgBouncer (docs/operations.md) or fewer nodes"
    )


def connection_arithmetic(settings: NodeSettings, specs: Sequence[JobSpec]) -> str:
    """``its 11 connections (2 workers x 3 + 3 scheduler + 2 jobs)``: docs/operations.md."""
    workers, share = settings.workers, worker_pool(settings).max_size
    requests = f"{workers} workers x {share}"
    if not runs_scheduler(settings, specs):
        return f"its {workers * share} connections ({requests}, no scheduler)"
    scheduler, jobs = scheduler_pool(settings).max_size, job_pool(settings).max_size
    total = workers * share + scheduler + jobs
    return f"its {total} connections ({requests} + {scheduler} scheduler + {jobs} jobs)"


def runs_scheduler(settings: NodeSettings, specs: Sequence[JobSpec]) -> bool:
    return settings.scheduler.enabled and bool(specs)


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
    """The pool, open with its first connections (``TooManyConnections`` if refused).

    Closed without waiting on a connection attempt a silent link holds (a stop while the
    node joins, or with the database gone) for longer than ``CLOSE_WAIT``."""
    await db.open()
    try:
        await db.wait_open()
        yield db
    finally:
        await db.close(timeout=CLOSE_WAIT)


@asynccontextmanager
async def scheduled(
    settings: NodeSettings, specs: Sequence[JobSpec]
) -> AsyncIterator[Scheduler | None]:
    """The node's one scheduler (``None`` if disabled), registered and heartbeating but
    not yet claiming (``start_claiming``); stopped before its pools close."""
    if not runs_scheduler(settings, specs):
        yield None
        return
    url = settings.database_url
    async with (
        opened(Database(url, scheduler_pool(settings), name="scheduler")) as db,
        opened(Database(url, job_pool(settings), name="jobs")) as job_db,
    ):
        store = SchedulerStore(db, settings.node_id, settings.scheduler.lease_ttl)
        retention = JobRetention(idempotency_seconds=settings.idempotency_retention)
        metrics = SchedulerMetrics()  # after metrics_folder(): samples go to the folder
        scheduler = Scheduler(store, specs, settings.scheduler, job_db, retention, metrics)
        await scheduler.start(claiming=False)
        try:
            yield scheduler
        finally:
            await scheduler.stop()
