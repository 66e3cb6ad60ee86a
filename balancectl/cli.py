"""The ``balancectl`` command: thin Typer commands that parse options and call functions.

Every option also reads ``BALANCECTL_<OPTION>``. Exit status: 0 success, 1 a check
failed (the load test's verdict), 2 bad usage or configuration, an unreachable node or
database, or a node that could not start; 70 an internal error (a bug: one line, and
``BALANCECTL_DEBUG=1`` shows the traceback); 130 or 143 when ``up`` or ``demo`` was
stopped by SIGINT or SIGTERM, after stopping every node it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import typer
from rich.console import Console

from balancectl.config import FIRST_BYTE_TIMEOUT
from balancectl.errors import ConfigError

if TYPE_CHECKING:
    from balancectl.scheduler.listing import JobsDocument
    from balancectl.toolkit.cluster import LocalCluster, NodeProcess
    from balancectl.toolkit.loadtest import LoadtestConfig

app = typer.Typer(
    help="An exact balance service and a masterless cluster scheduler on PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
out = Console()
EX_SOFTWARE = 70  # sysexits.h: an internal software error
DB_TIMEOUT = 5  # seconds a read-only command waits to connect to the database


def say(text: str, style: str = "") -> None:
    """One line on stderr, never wrapped by rich: URLs and ports in it stay copyable."""
    err.print(text, style=style, soft_wrap=True, highlight=False, markup=False)


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
    from balancectl.toolkit.embedded import embedded_database_url

    url = embedded_database_url()
    say(f"embedded PostgreSQL: {url}", style="dim")
    return url


@app.command()
def migrate(database_url: DatabaseUrl = None) -> None:
    """Upgrade the schema to head; safe when many run at once."""
    from balancectl import migrations
    from balancectl.toolkit.cluster import migrate as upgrade

    upgrade(resolve_database_url(database_url))
    say(f"schema at {migrations.head_revision()}")


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
    scheduler: Annotated[
        bool,
        typer.Option(
            "--scheduler/--no-scheduler",
            envvar=env("scheduler"),
            callback=older_negative_env("scheduler"),
            help="Run the scheduler; --no-scheduler serves the API only "
            "(also the older BALANCECTL_NO_SCHEDULER=1).",
        ),
    ] = True,
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
    prepare: Annotated[
        bool,
        typer.Option(
            "--prepare/--no-prepare",
            envvar=env("prepare"),
            callback=older_negative_env("prepare"),
            help="Server-side prepared statements; --no-prepare for PgBouncer < 1.21 "
            "(also the older BALANCECTL_NO_PREPARE=1).",
        ),
    ] = True,
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
    first_byte_timeout: Annotated[
        float,
        typer.Option(
            envvar=env("first-byte-timeout"),
            min=0.1,
            help="Close a new connection that sends nothing this long, s.",
        ),
    ] = FIRST_BYTE_TIMEOUT,
    log_level: Annotated[str, typer.Option(envvar=env("log-level"))] = "INFO",
) -> None:
    """One node: W HTTP workers and one scheduler; migrates on start."""
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
        first_byte_timeout=first_byte_timeout,
        log_level=log_level,
        pool=PoolSettings(max_size=pool_size, timeout=pool_timeout, prepared_statements=prepare),
        scheduler=SchedulerSettings(
            lease_ttl=lease_ttl,
            poll_interval=poll_interval,
            settle=settle,
            enabled=scheduler,
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
    from balancectl.toolkit.cluster import LocalCluster, check_ports_free, in_thread, migrate

    extra = ["--lease-ttl", str(lease_ttl)]
    if jobs_file is not None:
        extra += ["--jobs-file", str(jobs_file)]
    with launcher():
        url = resolve_database_url(database_url)
        check_ports_free(base_port, nodes)
        in_thread(lambda: migrate(url))
        cluster = LocalCluster(url, nodes, base_port, extra, log=sys.stderr)
        try:
            cluster.start()
            cluster.wait_ready(timeout=180)
            say(f"{nodes} nodes up (Ctrl-C or SIGTERM stops them):")
            for node in cluster.members:
                say(f"  {node.node_id} {node.url}")
            raise until_one_exits(cluster).failure()
        finally:
            cluster.stop()


def until_one_exits(cluster: LocalCluster) -> NodeProcess:
    """Wait (interruptibly) until a node of ``cluster`` exits on its own; that node."""
    while (gone := cluster.exited()) is None:
        time.sleep(0.2)
    return gone


@contextmanager
def launcher() -> Iterator[None]:
    """For ``up`` and ``demo``: the first SIGINT or SIGTERM stops every node started (the
    commands stop them on the way out), then exits 130 or 143."""
    from balancectl.toolkit.cluster import Interrupted, stop_signals

    try:
        with stop_signals():
            yield
    except Interrupted as stop:
        name = signal.Signals(stop.signum).name
        say(f"balancectl: stopped by {name}; every node it started is stopped")
        raise typer.Exit(stop.exit_status) from None


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
    from balancectl.toolkit.loadtest import LoadtestConfig

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
    from balancectl.toolkit.loadtest import (
        LoadtestError,
        build_verdict_table,
        report_json,
        run_loadtest,
    )

    try:
        report = asyncio.run(run_loadtest(config))
    except LoadtestError as error:
        raise ConfigError(str(error)) from error
    out.print(build_verdict_table(report))
    if json_out is not None:
        json_out.write_text(json.dumps(report_json(report), indent=2) + "\n")
    return bool(report.passed)


jobs_app = typer.Typer(
    help="The cluster's jobs as a table (live with --watch); subcommands act on one job.",
    pretty_exceptions_enable=False,
)
app.add_typer(jobs_app, name="jobs")
DEFAULT_NODE = "http://127.0.0.1:8000"
NodeUrl = Annotated[
    str | None,
    typer.Option(
        envvar=env("url"),
        help=f"The node to ask (default: `jobs --url`, else {DEFAULT_NODE}).",
        show_default=False,
    ),
]
ApiToken = Annotated[
    str | None,
    typer.Option(envvar=env("api-token"), help="The node's API token, for run/pause/resume."),
]
JobName = Annotated[str, typer.Argument(help="The job's name, as in the jobs file.")]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print the node's answer as JSON.")]


@jobs_app.callback(invoke_without_command=True)
def jobs(
    ctx: typer.Context,
    url: Annotated[
        str | None, typer.Option(envvar=env("url"), help="A node to ask (else the database).")
    ] = None,
    database_url: DatabaseUrl = None,
    watch: Annotated[bool, typer.Option(help="Refresh live until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="Refresh period, seconds.")] = 1.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print GET /jobs as JSON.")] = False,
) -> None:
    """The cluster's jobs as a table (live with --watch); subcommands act on one job."""
    ctx.obj = url  # the node the subcommands ask when they are given no --url
    if ctx.invoked_subcommand is not None:
        return
    from balancectl.toolkit.jobs_view import build_jobs_table, watch_jobs

    fetch = jobs_source(url, database_url)
    if json_output:
        print_document(fetch())
        return
    if not watch:
        out.print(build_jobs_table(fetch()))
        return
    try:
        watch_jobs(fetch, out, interval)
    except KeyboardInterrupt:
        pass


def node_url(ctx: typer.Context, url: str | None) -> str:
    """A subcommand's node: its own --url, else the group's, else the default port."""
    return url or (ctx.obj if isinstance(ctx.obj, str) else None) or DEFAULT_NODE


def act_on_job(ctx: typer.Context, verb: str, name: str, url: str | None,
               token: str | None, json_output: bool) -> None:  # fmt: skip
    from balancectl.toolkit.jobs_view import control, verb_summary

    job = control(node_url(ctx, url), verb, name, token)
    if json_output:
        print_document(job)
    else:
        out.print(verb_summary(verb, job), soft_wrap=True, highlight=False, markup=False)


@jobs_app.command("run")
def jobs_run(
    ctx: typer.Context,
    name: JobName,
    url: NodeUrl = None,
    api_token: ApiToken = None,
    json_output: JsonOutput = False,
) -> None:
    """Make the job due now; a running job is due again as soon as its run ends (never two)."""
    act_on_job(ctx, "run", name, url, api_token, json_output)


@jobs_app.command("pause")
def jobs_pause(
    ctx: typer.Context,
    name: JobName,
    stop: Annotated[
        bool, typer.Option("--stop", help="Also stop the run in progress (recorded cancelled).")
    ] = False,
    url: NodeUrl = None,
    api_token: ApiToken = None,
    json_output: JsonOutput = False,
) -> None:
    """Never claim the job until resumed; a run in progress finishes, unless --stop."""
    act_on_job(ctx, "pause-stop" if stop else "pause", name, url, api_token, json_output)


@jobs_app.command("resume")
def jobs_resume(
    ctx: typer.Context,
    name: JobName,
    url: NodeUrl = None,
    api_token: ApiToken = None,
    json_output: JsonOutput = False,
) -> None:
    """Let a paused job be claimed again; an overdue one is due at once."""
    act_on_job(ctx, "resume", name, url, api_token, json_output)


@jobs_app.command("history")
def jobs_history(
    ctx: typer.Context,
    name: JobName,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many runs.")] = 20,
    url: NodeUrl = None,
    api_token: ApiToken = None,
    json_output: JsonOutput = False,
) -> None:
    """The job's finished runs, newest first (GET /jobs/history)."""
    from balancectl.toolkit.jobs_view import build_history_table, fetch_history

    document = fetch_history(node_url(ctx, url), name, limit, api_token)
    if json_output:
        print_document(document)
    else:
        out.print(build_history_table(document, name))


@app.command()
def nodes(
    url: NodeUrl = None,
    api_token: ApiToken = None,
    json_output: JsonOutput = False,
) -> None:
    """Every node that has run: alive or gone, host, pid, since when (GET /nodes)."""
    from balancectl.toolkit.jobs_view import build_nodes_table, fetch_nodes

    document = fetch_nodes(url or DEFAULT_NODE, api_token)
    if json_output:
        print_document(document)
    else:
        out.print(build_nodes_table(document))


def print_document(document: msgspec.Struct) -> None:
    """A listing document on stdout as the node sends it (the same Struct, encoded)."""
    out.print_json(msgspec.json.encode(document).decode())


def jobs_source(url: str | None, database_url: str | None) -> Callable[[], JobsDocument]:
    """A function returning the ``GET /jobs`` document, from a node or the database."""
    from balancectl.toolkit.jobs_view import fetch_jobs

    if url:
        return lambda: fetch_jobs(url)
    from balancectl.config import PoolSettings
    from balancectl.db import Database
    from balancectl.scheduler.listing import ListingStore

    resolved = resolve_database_url(database_url)

    async def read() -> JobsDocument:
        db = Database(resolved, PoolSettings(min_size=1, max_size=1, timeout=DB_TIMEOUT))
        await db.open(wait=True)
        try:
            return await ListingStore(db).jobs()
        finally:
            await db.close()

    def fetch() -> JobsDocument:
        probe_database(resolved)  # the reason in one line, not a pool's retries and timeout
        return read_or_explain(read)

    return fetch


def read_or_explain(read: Callable[[], Coroutine[Any, Any, JobsDocument]]) -> JobsDocument:
    """Run ``read``; a database gone away meanwhile (``jobs --watch``), or one that was never
    migrated, is one line, exit 2."""
    from psycopg import OperationalError
    from psycopg.errors import UndefinedTable
    from psycopg_pool import PoolTimeout

    from balancectl.errors import BalancectlError

    try:
        return asyncio.run(read())
    except (PoolTimeout, OperationalError, BalancectlError) as error:
        raise ConfigError(f"the database cannot be reached: {describe(error)}") from error
    except UndefinedTable as error:
        raise ConfigError(
            f"the database has no balancectl schema ({describe(error)}): "
            "start a node on it, or run balancectl migrate, first"
        ) from error


def probe_database(url: str, timeout: int = DB_TIMEOUT) -> None:
    """One connection attempt, so an unreachable database is one line, not a pool's retries."""
    import psycopg

    from balancectl.db import first_line

    try:
        psycopg.connect(url, connect_timeout=timeout).close()
    except psycopg.OperationalError as error:
        raise ConfigError(f"the database cannot be reached: {first_line(error)}") from error


@app.command()
def demo(
    database_url: DatabaseUrl = None,
    base_port: Annotated[
        int | None,
        typer.Option(
            envvar=env("base-port"),
            min=1,
            max=65000,
            help="Fixed ports from this one (default: free ports, printed).",
            show_default=False,
        ),
    ] = None,
    nodes: Annotated[int, typer.Option(envvar=env("nodes"), min=1, max=64)] = 5,
    requests: Annotated[int, typer.Option(envvar=env("requests"), min=1)] = 10000,
    watch_seconds: Annotated[
        float, typer.Option(envvar=env("watch-seconds"), min=0, help="Show the jobs this long.")
    ] = 20.0,
) -> None:
    """The whole story on one machine, from nothing: migrate, 5 nodes, the 10,000-request
    test across them, the verdict, then the jobs spreading over the nodes, live."""
    from balancectl.toolkit.demo import run_demo

    with launcher():
        url = resolve_database_url(database_url)
        passed = run_demo(url, nodes, base_port, requests, watch_seconds)
    if not passed:
        raise typer.Exit(1)


def older_negative_env(name: str) -> Callable[[typer.Context, typer.CallbackParam, bool], bool]:
    """Keep the older ``BALANCECTL_NO_<NAME>=1`` working: it counts only when neither
    ``--[no-]<name>`` nor ``BALANCECTL_<NAME>`` is given."""

    def callback(ctx: typer.Context, param: typer.CallbackParam, value: bool) -> bool:
        older = os.environ.get(env(f"no-{name}"))
        source = ctx.get_parameter_source(param.name or "")
        if older is None or source is None or source.name != "DEFAULT":
            return value
        return not env_flag(env(f"no-{name}"), older)

    return callback


def env_flag(variable: str, raw: str) -> bool:
    """A boolean environment variable, spelled as click spells booleans."""
    text = raw.strip().lower()
    if text in ("1", "true", "t", "yes", "y", "on"):
        return True
    if text in ("", "0", "false", "f", "no", "n", "off"):
        return False
    raise typer.BadParameter(f"{variable}={raw!r} is not a boolean (use 1 or 0)")


def describe(error: BaseException) -> str:
    """``Type: first line of the message``, for a one-line report."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def main() -> None:
    """The console script. Bad configuration, an unreachable node or database: one line on
    stderr and exit status 2. Anything unexpected (a bug): one line, a hint, status 70."""
    try:
        app()
    except ConfigError as error:
        say(f"balancectl: {error}")
        raise SystemExit(2) from None
    except Exception as error:
        if os.environ.get("BALANCECTL_DEBUG", "") not in ("", "0"):
            raise
        say(f"balancectl: internal error: {describe(error)}")
        say("(this is a bug; run again with BALANCECTL_DEBUG=1 to see the traceback)")
        raise SystemExit(EX_SOFTWARE) from None
