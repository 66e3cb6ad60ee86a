"""The ``balancectl`` command: thin Typer commands that parse options and call functions.

Every option also reads ``BALANCECTL_<OPTION>``. Exit status: 0 success, 1 a check
failed (the load test's verdict), 2 bad usage or configuration.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from balancectl.errors import ConfigError

if TYPE_CHECKING:
    from balancectl.loadtest import LoadtestConfig

app = typer.Typer(
    help="An exact balance service and a masterless cluster scheduler on PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
out = Console()


def env(option: str) -> str:
    return f"BALANCECTL_{option.upper().replace('-', '_')}"


DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        envvar=env("database-url"),
        help="postgresql:// URL; without one an embedded PostgreSQL starts in your data folder.",
        show_default=False,
    ),
]


def resolve_database_url(database_url: str | None) -> str:
    """The given URL, checked; or an embedded server's URL (printed to stderr)."""
    from balancectl.config import check_database_url

    if database_url:
        check_database_url(database_url)
        return database_url
    from balancectl.embedded import embedded_database_url

    url = embedded_database_url()
    err.print(f"[dim]embedded PostgreSQL: {url}[/dim]")
    return url


@app.command()
def migrate(database_url: DatabaseUrl = None) -> None:
    """Upgrade the schema to head; safe when many run at once."""
    from balancectl import migrations

    migrations.upgrade(resolve_database_url(database_url))
    err.print(f"schema at {migrations.head_revision()}")


@app.command()
def serve(
    database_url: DatabaseUrl = None,
    node_id: Annotated[str, typer.Option(envvar=env("node-id"), help="This node's id.")] = "node-1",
    host: Annotated[str, typer.Option(envvar=env("host"))] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar=env("port"), min=1, max=65535)] = 8000,
    jobs_file: Annotated[
        Path | None,
        typer.Option(envvar=env("jobs-file"), help="TOML jobs file (default: the shipped one)."),
    ] = None,
    lease_ttl: Annotated[
        float, typer.Option(envvar=env("lease-ttl"), min=0.5, help="Job lease TTL, seconds.")
    ] = 15.0,
    poll_interval: Annotated[
        float, typer.Option(envvar=env("poll-interval"), min=0.05, help="Claim poll, seconds.")
    ] = 1.0,
    settle: Annotated[
        float,
        typer.Option(
            envvar=env("settle"),
            min=0,
            help="No claims until no node has joined for this long, seconds.",
        ),
    ] = 5.0,
    no_scheduler: Annotated[
        bool, typer.Option(envvar=env("no-scheduler"), help="Serve the API only.")
    ] = False,
    api_token: Annotated[
        str | None,
        typer.Option(envvar=env("api-token"), help="Bearer token for mutating routes."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option(envvar=env("insecure"), help="Allow a non-loopback host without token.")
    ] = False,
    pool_size: Annotated[
        int,
        typer.Option(
            envvar=env("pool-size"),
            min=1,
            help="Request connections of the node, shared by its workers.",
        ),
    ] = 5,
    pool_timeout: Annotated[
        float, typer.Option(envvar=env("pool-timeout"), min=0.1, help="Wait for a connection, s.")
    ] = 30.0,
    no_prepare: Annotated[
        bool,
        typer.Option(
            envvar=env("no-prepare"), help="No server-side prepared statements (PgBouncer)."
        ),
    ] = False,
    db_wait: Annotated[
        float, typer.Option(envvar=env("db-wait"), min=0, help="Wait for the database at start, s.")
    ] = 30.0,
    workers: Annotated[
        int | None,
        typer.Option(
            envvar=env("workers"),
            min=1,
            max=64,
            help="HTTP worker processes (default: the CPU count); one scheduler per node.",
            show_default=False,
        ),
    ] = None,
    backlog: Annotated[
        int,
        typer.Option(envvar=env("backlog"), min=1, help="Listen backlog (capped by somaxconn)."),
    ] = 16384,
    log_level: Annotated[str, typer.Option(envvar=env("log-level"))] = "INFO",
) -> None:
    """One node: W HTTP workers and one scheduler; migrates on start."""
    import os

    from balancectl import node
    from balancectl.config import NodeSettings, PoolSettings, SchedulerSettings
    from balancectl.scheduler import load_jobs

    node.configure_logging(node_id, log_level)
    specs = load_jobs(jobs_file)
    settings = NodeSettings(
        database_url=resolve_database_url(database_url),
        node_id=node_id,
        host=host,
        port=port,
        api_token=api_token,
        insecure=insecure,
        workers=workers or os.cpu_count() or 1,
        backlog=backlog,
        log_level=log_level,
        pool=PoolSettings(
            max_size=pool_size, timeout=pool_timeout, prepared_statements=not no_prepare
        ),
        scheduler=SchedulerSettings(
            jobs_file=jobs_file,
            lease_ttl=lease_ttl,
            poll_interval=poll_interval,
            settle=settle,
            enabled=not no_scheduler,
        ),
    )
    node.serve(settings, specs, db_wait=db_wait)


@app.command()
def up(
    database_url: DatabaseUrl = None,
    nodes: Annotated[int, typer.Option(envvar=env("nodes"), min=1, max=64)] = 5,
    base_port: Annotated[int, typer.Option(envvar=env("base-port"), min=1, max=65000)] = 8000,
    jobs_file: Annotated[Path | None, typer.Option(envvar=env("jobs-file"))] = None,
    lease_ttl: Annotated[float, typer.Option(envvar=env("lease-ttl"), min=0.5)] = 15.0,
) -> None:
    """Start N local nodes (node-1..node-N) with prefixed logs; stop them on Ctrl-C or SIGTERM."""
    from balancectl import migrations
    from balancectl.cluster import LocalCluster

    url = resolve_database_url(database_url)
    migrations.upgrade(url)
    extra = ["--lease-ttl", str(lease_ttl)]
    if jobs_file is not None:
        extra += ["--jobs-file", str(jobs_file)]
    cluster = LocalCluster(url, nodes, base_port, extra, log=sys.stderr)
    with terminate_on_sigterm():
        try:
            cluster.start()
            cluster.wait_ready(timeout=180)
            err.print(f"{nodes} nodes up: {', '.join(cluster.urls)} (Ctrl-C stops them)")
            while all(node.process.poll() is None for node in cluster.members):
                time.sleep(0.5)
            err.print("a node exited; stopping the others")
        except KeyboardInterrupt:
            err.print("stopping the nodes")
        finally:
            cluster.stop()


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the launcher, so both stop the nodes."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def loadtest(
    url: Annotated[
        list[str], typer.Option(envvar=env("url"), help="A node's base URL; repeat for more.")
    ],
    requests: Annotated[int, typer.Option(envvar=env("requests"), min=1, max=1_000_000)] = 10000,
    amount: Annotated[int, typer.Option(envvar=env("amount"), min=1, max=10**12)] = 2,
    user_id: Annotated[int, typer.Option(envvar=env("user-id"), min=1)] = 1,
    reset: Annotated[
        int | None,
        typer.Option(envvar=env("reset"), min=0, help="First bring the balance to this value."),
    ] = None,
    idempotent: Annotated[
        bool,
        typer.Option(envvar=env("idempotent"), help="Key every request; retry unseen outcomes."),
    ] = False,
    api_token: Annotated[str | None, typer.Option(envvar=env("api-token"))] = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", envvar=env("json"), help="Also write the report as JSON here."),
    ] = None,
    progress: Annotated[bool, typer.Option(envvar=env("progress"))] = True,
) -> None:
    """Fire all requests at the same moment, verify, report; exit 1 when a check fails."""
    from balancectl.loadtest import LoadtestConfig

    config = LoadtestConfig(
        urls=tuple(url),
        requests=requests,
        amount=amount,
        user_id=user_id,
        reset=reset,
        idempotent=idempotent,
        api_token=api_token,
        progress=progress,
    )
    if not run_and_report(config, json_out):
        raise typer.Exit(1)


def run_and_report(config: LoadtestConfig, json_out: Path | None) -> bool:
    """Run the load test, print its verdict table (and JSON); whether it passed."""
    from balancectl.loadtest import LoadtestError, build_verdict_table, report_json, run_loadtest

    try:
        report = asyncio.run(run_loadtest(config))
    except LoadtestError as error:
        raise ConfigError(str(error)) from error
    out.print(build_verdict_table(report))
    if json_out is not None:
        json_out.write_text(json.dumps(report_json(report), indent=2) + "\n")
    return bool(report.passed)


@app.command()
def jobs(
    url: Annotated[
        str | None, typer.Option(envvar=env("url"), help="A node to ask (else the database).")
    ] = None,
    database_url: DatabaseUrl = None,
    watch: Annotated[bool, typer.Option(help="Refresh live until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="Refresh period, seconds.")] = 1.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print GET /jobs as JSON.")] = False,
) -> None:
    """The cluster's jobs as a table (live with --watch)."""
    from balancectl.jobs_view import build_jobs_table

    fetch = jobs_source(url, database_url)
    if json_output:
        out.print_json(data=fetch())
        return
    if not watch:
        out.print(build_jobs_table(fetch()))
        return
    from rich.live import Live

    with Live(build_jobs_table(fetch()), console=out, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(build_jobs_table(fetch()))
        except KeyboardInterrupt:
            pass


def jobs_source(url: str | None, database_url: str | None) -> Callable[[], dict[str, Any]]:
    """A function returning the ``GET /jobs`` document, from a node or the database."""
    from balancectl.jobs_view import fetch_jobs

    if url:
        return lambda: fetch_jobs(url)
    from balancectl.config import PoolSettings
    from balancectl.db import Database
    from balancectl.scheduler.listing import jobs_document

    resolved = resolve_database_url(database_url)

    async def read() -> dict[str, Any]:
        db = Database(resolved, PoolSettings(min_size=1, max_size=1))
        await db.open(wait=True)
        try:
            return await jobs_document(db)
        finally:
            await db.close()

    return lambda: asyncio.run(read())


@app.command()
def demo(
    database_url: DatabaseUrl = None,
    base_port: Annotated[int, typer.Option(envvar=env("base-port"), min=1, max=65000)] = 8000,
    nodes: Annotated[int, typer.Option(envvar=env("nodes"), min=1, max=64)] = 5,
    requests: Annotated[int, typer.Option(envvar=env("requests"), min=1)] = 10000,
    watch_seconds: Annotated[
        float, typer.Option(envvar=env("watch-seconds"), min=0, help="Show the jobs this long.")
    ] = 20.0,
) -> None:
    """The whole story on one machine, from nothing: migrate, 5 nodes, the 10,000-request
    test across them, the verdict, then the jobs spreading over the nodes, live."""
    from balancectl.demo import run_demo

    if not run_demo(resolve_database_url(database_url), nodes, base_port, requests, watch_seconds):
        raise typer.Exit(1)


def main() -> None:
    """The console script: bad configuration is one line on stderr and exit status 2."""
    try:
        app()
    except ConfigError as error:
        err.print(f"balancectl: {error}", highlight=False, markup=False, soft_wrap=True)
        raise SystemExit(2) from None
