"""Benchmark the balance route, on one scratch database, in one run.

    .venv/bin/python benchmarks/balance.py --database-url postgresql://postgres@127.0.0.1/postgres

Measures, against baselines taken in the same run (see benchmarks/README.md):

- the ceiling: the route's SQL statement driven by ``pgbench -M prepared`` at the client
  counts the nodes' pools would open;
- the data-access path: raw psycopg (``balancectl.db.Database``, and the bare pool) versus
  SQLAlchemy Core, in-process, the same statement, sequential and concurrent;
- sustained throughput of ``POST /users/1/balance`` under ``wrk`` (keep-alive credits)
  against 1 node at pool sizes 2, 5, 10, 20 and against 5 nodes at pool 5 and 10;
- the 10,000-request burst of ``balancectl loadtest`` against 1 and 5 nodes (and 5 at pool 5).

Before each measurement it waits (a bounded time) for free server connections and for
other work on the machine to calm down, and records the CPU share that work still used.

Writes ``benchmarks/results/<timestamp>.json`` and prints markdown tables on stdout;
progress goes to stderr. Every node, wrk and pgbench it starts is stopped, and the scratch
database dropped, on the way out (also on error, Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
# Benchmark this checkout, installed or not (the nodes get the same path below).
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402
from psycopg_pool import AsyncConnectionPool  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine  # noqa: E402

from balancectl import migrations  # noqa: E402
from balancectl.config import PoolSettings  # noqa: E402
from balancectl.db import Database, Row, connection_kwargs  # noqa: E402
from balancectl.sql.loader import query  # noqa: E402
from balancectl.toolkit.cluster import LocalCluster  # noqa: E402
from balancectl.toolkit.loadtest import LoadtestConfig, LoadtestReport, run_loadtest  # noqa: E402

HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "balance_post.lua"
RESULTS = HERE / "results"
STATEMENT = "change_balance"
# Every measurement hits user 1's single row: the hot row that bounds throughput.
CREDIT: dict[str, Any] = {"user_id": 1, "amount": 1, "key": None}
DEFAULT_POOL = PoolSettings().max_size
POOL_SIZES = tuple(sorted({2, 5, 10, 20, DEFAULT_POOL}))
CLUSTER_NODES = 5
CLIENTS = 50  # wrk connections in total, and in-process concurrent callers
HEADROOM_MARGIN = 5  # connections left for the benchmark's own admin sessions

Execute = Callable[[], Awaitable[object]]
T = TypeVar("T")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- options --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What to run, how long; the defaults are the documented benchmark."""

    database_url: str
    duration: int = 10
    warmup: int = 2
    rounds: int = 2
    requests: int = 10000
    statements: int = 5000
    wait_for_connections: float = 300.0
    quiet: float = 0.25
    wait_for_quiet: float = 60.0


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BALANCECTL_DATABASE_URL"),
        help="postgresql:// URL of a server (a scratch database is created there and dropped)",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk/pgbench run")
    parser.add_argument("--warmup", type=int, default=2, help="wrk warm-up seconds per setup")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats of each run")
    parser.add_argument("--requests", type=int, default=10000, help="requests in each burst")
    parser.add_argument("--statements", type=int, default=5000, help="in-process, per path/mode")
    parser.add_argument(
        "--wait-for-connections",
        type=float,
        default=300.0,
        help="seconds to wait for enough free server connections before giving up",
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.25,
        help="before each measurement, wait for other work to use at most this share of the CPUs",
    )
    parser.add_argument(
        "--wait-for-quiet",
        type=float,
        default=60.0,
        help="seconds to wait for that before measuring anyway (the share is recorded)",
    )
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("--database-url (or BALANCECTL_DATABASE_URL) is required")
    return Options(**vars(args))


# --- the scratch database -------------------------------------------------------------------


def with_database(server_url: str, name: str) -> str:
    """The same server and credentials, another database."""
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


@contextlib.contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    """A migrated database of its own, dropped (with any sessions left on it) at the end."""
    name = f"balancectl_bench_{time.strftime('%Y%m%d%H%M%S')}_{os.getpid()}"
    admin(server_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = with_database(server_url, name)
        migrations.upgrade(url)
        yield url
    finally:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        admin(server_url, drop)
        log(f"dropped scratch database {name}")


def admin(url: str, statement: sql.Composed | str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as connection:
        cursor = connection.execute(statement)
        return cursor.fetchall() if cursor.description is not None else []


def free_connections(url: str) -> int:
    """Connections the server would still accept (a superuser may use the reserved ones)."""
    rows = admin(
        url,
        "SELECT current_setting('max_connections')::int"
        " - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
    )
    return int(rows[0][0])


def await_connections(url: str, needed: int, patience: float) -> int:
    """Wait until ``needed`` connections are free: a shared server's other users come and go."""
    deadline = time.monotonic() + patience
    while (free := free_connections(url)) < needed:
        if time.monotonic() > deadline:
            raise SystemExit(
                f"the server has {free} free connections, the benchmark needs {needed}; "
                "stop other clients or raise max_connections"
            )
        log(f"waiting for free connections: {free} free, {needed} needed")
        time.sleep(5)
    return free


# --- a quiet machine ---------------------------------------------------------------------


def cpu_times() -> tuple[int, int] | None:
    """Busy and total jiffies of all CPUs since boot (Linux); None elsewhere."""
    try:
        first = Path("/proc/stat").read_text(encoding="ascii").split("\n", 1)[0]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, first.split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def busy_share(seconds: float = 1.0) -> float | None:
    """The share of all CPUs that was busy over the next ``seconds``."""
    before = cpu_times()
    time.sleep(seconds)
    after = cpu_times()
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def await_quiet(options: Options, database_url: str, connections: int) -> float | None:
    """Before a measurement, with nothing of ours running: free connections, and (for at
    most ``wait_for_quiet`` s) other work below ``quiet``; the busy share last seen."""
    await_connections(database_url, connections + HEADROOM_MARGIN, options.wait_for_connections)
    deadline = time.monotonic() + options.wait_for_quiet
    busy = busy_share()
    while busy is not None and busy > options.quiet and time.monotonic() < deadline:
        log(f"  waiting for a quieter machine: other work uses {busy:.0%} of the CPUs")
        busy = busy_share(2.0)
    return busy


# --- nodes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """Which nodes serve the route: how many, each with what pool size."""

    nodes: int
    pool_size: int

    @property
    def pool_connections(self) -> int:
        return self.nodes * self.pool_size

    @property
    def label(self) -> str:
        return f"{self.nodes} node{'s' if self.nodes > 1 else ''}, pool {self.pool_size}"


# 1 node at each pool size; 5 nodes at the default and at 5 (half the connections on the row).
SETUPS = list(
    dict.fromkeys(
        [Setup(1, size) for size in POOL_SIZES]
        + [Setup(CLUSTER_NODES, 5), Setup(CLUSTER_NODES, DEFAULT_POOL)]
    )
)


def free_base_port(count: int, start: int = 21000) -> int:
    """The first of ``count`` consecutive loopback ports that are free now."""
    for base in range(start, 60000, count + 5):
        if all(port_free(port) for port in range(base, base + count)):
            return base
    raise RuntimeError("no run of free ports found")


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def running_nodes(database_url: str, setup: Setup) -> Iterator[list[str]]:
    """``setup.nodes`` API-only nodes, stopped (SIGTERM, then SIGKILL) whatever happens."""
    extra = ["--no-scheduler", "--pool-size", str(setup.pool_size), "--log-level", "WARNING"]
    base = free_base_port(setup.nodes)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cluster = LocalCluster(database_url, setup.nodes, base, extra, env=env, log=sys.stderr)
    try:
        cluster.start()
        cluster.wait_ready(timeout=120)
        yield cluster.urls
    finally:
        cluster.stop()


# --- wrk: sustained route throughput --------------------------------------------------------


@dataclass(frozen=True)
class WrkRun:
    """One wrk process's summary (from the Lua ``done`` hook)."""

    requests: int
    duration_s: float
    errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def wrk_command(url: str, connections: int, threads: int, seconds: int) -> list[str]:
    return [
        "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
        "--timeout", "10s", "-s", str(WRK_SCRIPT), f"{url}/users/1/balance",
    ]  # fmt: skip


def parse_wrk(output: str) -> WrkRun:
    lines = [x for x in output.splitlines() if x.startswith("BENCH_JSON ")]
    if not lines:
        raise RuntimeError(f"wrk gave no summary:\n{output}")
    data = json.loads(lines[0].removeprefix("BENCH_JSON "))
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return WrkRun(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        errors=errors,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
    )


def run_wrk(urls: Sequence[str], seconds: int) -> list[WrkRun]:
    """One wrk per node, started together for the same window, ``CLIENTS`` connections in all.

    wrk hits one URL; running one per node over the same window and summing their counts
    gives the cluster's throughput with the same total client concurrency as a single node.
    """
    per_node = CLIENTS // len(urls)
    threads = 2 if len(urls) == 1 else 1
    processes: list[subprocess.Popen[str]] = []
    try:
        for url in urls:
            command = wrk_command(url, per_node, threads, seconds)
            processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
        return [parse_wrk(p.communicate(timeout=seconds + 60)[0]) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@dataclass(frozen=True)
class Sustained:
    """One wrk measurement of a setup (all its nodes together)."""

    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    background_cpu: float | None

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    @classmethod
    def combine(cls, runs: Sequence[WrkRun], background_cpu: float | None) -> Sustained:
        # Latency of several wrk processes cannot be merged: report the worst node's.
        return cls(
            requests=sum(r.requests for r in runs),
            seconds=max(r.duration_s for r in runs),
            errors=sum(r.errors for r in runs),
            p50_ms=max(r.p50_ms for r in runs),
            p99_ms=max(r.p99_ms for r in runs),
            background_cpu=background_cpu,
        )


def measure_sustained(options: Options, database_url: str, setup: Setup) -> Sustained:
    background = await_quiet(options, database_url, setup.pool_connections)
    with running_nodes(database_url, setup) as urls:
        run_wrk(urls, options.warmup)  # fills the pools and prepares the statement
        result = Sustained.combine(run_wrk(urls, options.duration), background)
    log(f"  {setup.label}: {result.per_second:,.0f} req/s, {result.errors} errors")
    return result


def sustained_sweep(options: Options, database_url: str) -> dict[Setup, list[Sustained]]:
    """Every setup once per round; rounds alternate the order so drift hits all alike."""
    results: dict[Setup, list[Sustained]] = {setup: [] for setup in SETUPS}
    for index, ordered in enumerate(alternating(SETUPS, options.rounds)):
        log(f"sustained, round {index + 1}/{options.rounds}")
        for setup in ordered:
            results[setup].append(measure_sustained(options, database_url, setup))
    return results


def alternating(items: Sequence[T], rounds: int) -> Iterator[list[T]]:
    for index in range(rounds):
        yield list(items) if index % 2 == 0 else list(reversed(items))


# --- pgbench: the ceiling -------------------------------------------------------------------


def with_constants(statement: str) -> str:
    """The route's statement text with its parameters written as constants."""
    values = {"user_id": "1", "amount": "1", "key": "NULL"}
    return re.sub(r"%\((\w+)\)s", lambda m: values[m.group(1)], statement)


@dataclass(frozen=True)
class Ceiling:
    """One pgbench run of the statement at ``clients`` connections."""

    clients: int
    tps: float | None
    latency_ms: float | None
    failed: int | None
    error: str | None = None
    background_cpu: float | None = None


def run_pgbench(database_url: str, script: Path, clients: int, seconds: int) -> Ceiling:
    command = [
        "pgbench", "-n", "-M", "prepared", "-f", str(script), "-c", str(clients),
        "-j", str(min(2, clients)), "-T", str(seconds), database_url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    tps = re.search(r"^tps = ([\d.]+)", done.stdout, re.MULTILINE)
    if done.returncode != 0 or tps is None:
        error = " / ".join(done.stderr.strip().splitlines()[-2:]) or "pgbench failed"
        log(f"  pgbench -c {clients} failed: {error}")
        return Ceiling(clients, None, None, None, error)
    latency = re.search(r"^latency average = ([\d.]+) ms", done.stdout, re.MULTILINE)
    failed = re.search(r"^number of failed transactions: (\d+)", done.stdout, re.MULTILINE)
    return Ceiling(
        clients,
        float(tps.group(1)),
        float(latency.group(1)) if latency else None,
        int(failed.group(1)) if failed else None,
    )


def ceiling_sweep(options: Options, database_url: str) -> dict[int, list[Ceiling]]:
    """pgbench at each client count the setups' pools add up to, interleaved over rounds."""
    counts = sorted({1, *(setup.pool_connections for setup in SETUPS)})
    results: dict[int, list[Ceiling]] = {count: [] for count in counts}
    with tempfile.TemporaryDirectory(prefix="balancectl-bench-") as folder:
        script = Path(folder) / "change_balance.sql"
        script.write_text(with_constants(query(STATEMENT)) + ";\n", encoding="utf-8")
        for index, ordered in enumerate(alternating(counts, options.rounds)):
            log(f"ceiling (pgbench), round {index + 1}/{options.rounds}")
            for clients in ordered:
                results[clients].append(measure_ceiling(options, database_url, script, clients))
    return results


def measure_ceiling(options: Options, database_url: str, script: Path, clients: int) -> Ceiling:
    """One pgbench run; again (3 tries) when other clients took the connections it needed."""
    for _ in range(3):
        background = await_quiet(options, database_url, clients)
        run = run_pgbench(database_url, script, clients, options.duration)
        if run.error is None or "too many clients" not in run.error:
            break
    if run.tps is not None:
        log(f"  -c {clients}: {run.tps:,.0f} tps")
    return replace(run, background_cpu=background)


# --- in-process: psycopg versus SQLAlchemy Core ---------------------------------------------

IN_PROCESS_POOL = DEFAULT_POOL
PATHS = (
    "psycopg, Database class",
    "psycopg pool, bare",
    "SQLAlchemy Core, autocommit",
    "SQLAlchemy Core, engine.begin()",
)


def sqlalchemy_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def sqlalchemy_statement(statement: str) -> str:
    """The same statement for ``text()``: ``:name`` binds, its ``::`` casts escaped.

    Compiled for the psycopg dialect it becomes the exact text psycopg sends itself.
    """
    return re.sub(r"%\((\w+)\)s", r":\1", statement.replace("::", r"\:\:"))


@contextlib.asynccontextmanager
async def database_path(url: str) -> AsyncIterator[Execute]:
    """The route's own path: ``Database.fetch_one`` (pool, statement deadline, errors)."""
    db = Database(url, PoolSettings(min_size=IN_PROCESS_POOL, max_size=IN_PROCESS_POOL))
    await db.open(wait=True)
    try:
        yield lambda: db.fetch_one(STATEMENT, CREDIT)
    finally:
        await db.close()


@contextlib.asynccontextmanager
async def bare_pool_path(url: str) -> AsyncIterator[Execute]:
    """The driver alone: the same pool and connections, without ``Database``'s wrapper."""
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Row]] = AsyncConnectionPool(
        url,
        min_size=IN_PROCESS_POOL,
        max_size=IN_PROCESS_POOL,
        kwargs=connection_kwargs(PoolSettings()),
        connection_class=psycopg.AsyncConnection[Row],
        open=False,
    )
    await pool.open(wait=True)
    statement = query(STATEMENT)

    async def run() -> object:
        async with pool.connection() as connection:
            return await (await connection.execute(statement, CREDIT)).fetchone()

    try:
        yield run
    finally:
        await pool.close()


def sqlalchemy_engine(url: str, autocommit: bool) -> AsyncEngine:
    isolation = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
    return create_async_engine(
        sqlalchemy_url(url), pool_size=IN_PROCESS_POOL, max_overflow=0, **isolation
    )


def sqlalchemy_execute(engine: AsyncEngine, autocommit: bool) -> Execute:
    statement = text(sqlalchemy_statement(query(STATEMENT)))

    async def run() -> object:
        # engine.begin() wraps the statement in BEGIN ... COMMIT: the idiomatic form.
        connect = engine.connect() if autocommit else engine.begin()
        async with connect as connection:
            return (await connection.execute(statement, CREDIT)).mappings().one()

    return run


async def open_paths(url: str, stack: contextlib.AsyncExitStack) -> dict[str, Execute]:
    paths = {
        PATHS[0]: await stack.enter_async_context(database_path(url)),
        PATHS[1]: await stack.enter_async_context(bare_pool_path(url)),
    }
    for name, autocommit in ((PATHS[2], True), (PATHS[3], False)):
        engine = sqlalchemy_engine(url, autocommit)
        stack.push_async_callback(engine.dispose)
        paths[name] = sqlalchemy_execute(engine, autocommit)
    return paths


async def timed(execute: Execute, count: int, concurrency: int) -> float:
    """Seconds for ``count`` statements from ``concurrency`` callers sharing the pool."""

    async def caller(share: int) -> None:
        for _ in range(share):
            await execute()

    shares = [count // concurrency + (i < count % concurrency) for i in range(concurrency)]
    began = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for share in shares:
            group.create_task(caller(share))
    return time.perf_counter() - began


SLICES = 10  # interleaved slices per path and mode: bursts of other work hit every path


@dataclass(frozen=True)
class AccessPath:
    """Statements per second of one path in one mode, over its interleaved slices."""

    path: str
    mode: str
    statements: int
    slice_seconds: tuple[float, ...]

    @property
    def seconds(self) -> float:
        return sum(self.slice_seconds)

    @property
    def per_second(self) -> float:
        return self.statements / self.seconds

    @property
    def best_slice_per_second(self) -> float:
        return self.statements / len(self.slice_seconds) / min(self.slice_seconds)


async def compare_paths(options: Options, database_url: str) -> list[AccessPath]:
    """Each path, each mode, in slices whose order alternates (ABCD DCBA ...)."""
    modes = {"sequential": 1, f"concurrent ({CLIENTS} callers)": CLIENTS}
    share = max(options.statements // SLICES, 1)
    results: list[AccessPath] = []
    async with contextlib.AsyncExitStack() as stack:
        paths = await open_paths(database_url, stack)
        for execute in paths.values():
            await timed(execute, 200, CLIENTS)  # fill pools, prepare statements
        for mode, concurrency in modes.items():
            seconds: dict[str, list[float]] = {name: [] for name in paths}
            for ordered in alternating(list(paths), SLICES):
                for name in ordered:
                    seconds[name].append(await timed(paths[name], share, concurrency))
            measured = [AccessPath(n, mode, share * SLICES, tuple(s)) for n, s in seconds.items()]
            log(f"  {mode}: " + ", ".join(f"{m.path} {m.per_second:,.0f}/s" for m in measured))
            results += measured
    return results


def run_in_process(options: Options, database_url: str) -> list[AccessPath]:
    """On uvloop when installed, as the nodes run under uvicorn."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(compare_paths(options, database_url))


# --- the burst ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Burst:
    """The 10,000-request burst of ``balancectl loadtest`` against ``nodes`` nodes."""

    nodes: int
    pool_size: int
    requests: int
    passed: bool
    wall_seconds: float
    per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    background_cpu: float | None
    outcomes: dict[str, int]
    failures: tuple[str, ...]

    @classmethod
    def of(cls, setup: Setup, report: LoadtestReport, background_cpu: float | None) -> Burst:
        lat, verdict = report.latency, report.verdict
        outcomes = {"ok": verdict.successes, "insufficient": verdict.insufficient}
        return cls(
            setup.nodes, setup.pool_size, verdict.requests, report.passed, report.wall_seconds,
            report.requests_per_second, lat.p50_ms, lat.p95_ms, lat.p99_ms, lat.max_ms,
            background_cpu, outcomes | verdict.other_outcomes, tuple(verdict.failures),
        )  # fmt: skip


# The burst at the default pool on 1 and 5 nodes, and on 5 nodes at pool 5.
BURSTS = list(
    dict.fromkeys(
        [Setup(1, DEFAULT_POOL), Setup(CLUSTER_NODES, DEFAULT_POOL), Setup(CLUSTER_NODES, 5)]
    )
)


def measure_burst(options: Options, database_url: str, setup: Setup) -> Burst:
    background = await_quiet(options, database_url, setup.pool_connections)
    with running_nodes(database_url, setup) as urls:
        config = LoadtestConfig(
            urls=tuple(urls), requests=options.requests, amount=2, reset=options.requests,
            progress=False,
        )  # fmt: skip
        burst = Burst.of(setup, asyncio.run(run_loadtest(config)), background)
    verdict = "PASS" if burst.passed else f"FAIL: {'; '.join(burst.failures)}"
    log(f"  {setup.label}: {burst.wall_seconds:.2f} s, verdict {verdict}")
    return burst


# --- the report -----------------------------------------------------------------------------


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return value / baseline


def mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def best(values: Sequence[float | None]) -> float | None:
    """The best of the rounds: other work only ever slows a run down, so the best run is
    the least disturbed one; ratios are taken best to best (means are kept beside them)."""
    present = [v for v in values if v is not None]
    return max(present) if present else None


Stat = Callable[[Sequence[float | None]], float | None]


@dataclass
class Report:
    """Everything measured, with the ratios against the same run's baselines."""

    machine: dict[str, Any]
    ceiling: dict[int, list[Ceiling]] = field(default_factory=dict)
    access: list[AccessPath] = field(default_factory=list)
    sustained: dict[Setup, list[Sustained]] = field(default_factory=dict)
    bursts: list[Burst] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)

    def ceiling_tps(self, clients: int, stat: Stat = best) -> float | None:
        return stat([c.tps for c in self.ceiling.get(clients, [])])

    def peak_ceiling(self, stat: Stat = best) -> float | None:
        """The best pgbench figure at any client count: more clients on one row is not more."""
        return best([self.ceiling_tps(clients, stat) for clients in self.ceiling])

    def route_per_second(self, setup: Setup, stat: Stat = best) -> float | None:
        return stat([s.per_second for s in self.sustained.get(setup, [])])


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def busiest(values: Sequence[float | None]) -> str:
    """Other work's CPU share seen just before the busiest of these runs."""
    present = [v for v in values if v is not None]
    return f"{max(present):.0%}" if present else "n/a"


def ceiling_table(report: Report) -> list[str]:
    rows = [
        "| pgbench clients | tps best (mean) | latency avg ms | failed | vs peak | other CPU |",
        "|---|---|---|---|---|---|",
    ]
    peak = report.peak_ceiling()
    for clients, runs in report.ceiling.items():
        latency = mean([r.latency_ms for r in runs])
        failed = sum(r.failed or 0 for r in runs)
        tps, other = [r.tps for r in runs], busiest([r.background_cpu for r in runs])
        rows.append(
            f"| {clients} | {fmt(best(tps))} ({fmt(mean(tps))}) | {fmt(latency, '.2f')} "
            f"| {failed} | {fmt(ratio(best(tps), peak), '.2f')} | {other} |"
        )
    return rows


def sustained_rows(report: Report) -> list[dict[str, Any]]:
    """Each setup's throughput over its pgbench ceiling, the peak one and 1 node at the default."""
    rows = []
    for setup, runs in report.sustained.items():
        rows.append({
            "setup": setup.label, "nodes": setup.nodes, "pool_size": setup.pool_size,
            "pgbench_clients": setup.pool_connections,
            "runs": [r.per_second for r in runs], "errors": sum(r.errors for r in runs),
            "background_cpu": [r.background_cpu for r in runs],
            "p50_ms": mean([r.p50_ms for r in runs]), "p99_ms": mean([r.p99_ms for r in runs]),
            "best": sustained_ratios(report, setup, best),
            "mean": sustained_ratios(report, setup, mean),
        })  # fmt: skip
    return rows


def sustained_ratios(report: Report, setup: Setup, stat: Stat) -> dict[str, float | None]:
    value = report.route_per_second(setup, stat)
    ceiling = report.ceiling_tps(setup.pool_connections, stat)
    default = report.route_per_second(Setup(1, DEFAULT_POOL), stat)
    return {
        "route_per_second": value,
        "ceiling_tps": ceiling,
        "ratio_to_ceiling": ratio(value, ceiling),
        "ratio_to_peak_ceiling": ratio(value, report.peak_ceiling(stat)),
        "ratio_to_default_1_node": ratio(value, default),
    }


def both(row: dict[str, Any], key: str, spec: str = ",.0f") -> str:
    """``best (mean)`` of one figure of a row."""
    return f"{fmt(row['best'][key], spec)} ({fmt(row['mean'][key], spec)})"


def sustained_table(report: Report) -> list[str]:
    rows = [
        "| setup (wrk, 50 conns) | route req/s | errors | p50 / p99 ms | pgbench -c "
        "| ceiling tps | route / ceiling | route / peak ceiling "
        f"| vs 1 node pool {DEFAULT_POOL} | other CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sustained_rows(report):
        rows.append(
            f"| {r['setup']} | {both(r, 'route_per_second')} | {r['errors']} "
            f"| {fmt(r['p50_ms'], '.0f')} / {fmt(r['p99_ms'], '.0f')} | {r['pgbench_clients']} "
            f"| {both(r, 'ceiling_tps')} | {both(r, 'ratio_to_ceiling', '.2f')} "
            f"| {both(r, 'ratio_to_peak_ceiling', '.2f')} "
            f"| {both(r, 'ratio_to_default_1_node', '.2f')} | {busiest(r['background_cpu'])} |"
        )
    return rows


def access_rows(report: Report) -> list[dict[str, Any]]:
    """Each path's rate over the ``Database`` class's in the same mode (all slices, best)."""
    base = {a.mode: a for a in report.access if a.path == PATHS[0]}
    return [
        {
            **asdict(a),
            "seconds": a.seconds,
            "per_second": a.per_second,
            "best_slice_per_second": a.best_slice_per_second,
            "ratio": ratio(a.per_second, base[a.mode].per_second),
            "best_slice_ratio": ratio(a.best_slice_per_second, base[a.mode].best_slice_per_second),
        }
        for a in report.access
    ]


def access_table(report: Report) -> list[str]:
    rows = [
        f"| path (pool {IN_PROCESS_POOL}) | mode | statements | s | statements/s "
        "| best slice/s | vs Database | vs Database, best slice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in access_rows(report):
        rows.append(
            f"| {r['path']} | {r['mode']} | {r['statements']:,} | {r['seconds']:.2f} "
            f"| {fmt(r['per_second'])} | {fmt(r['best_slice_per_second'])} "
            f"| {fmt(r['ratio'], '.2f')} | {fmt(r['best_slice_ratio'], '.2f')} |"
        )
    return rows


def burst_rows(report: Report) -> list[dict[str, Any]]:
    one = next((b for b in report.bursts if (b.nodes, b.pool_size) == (1, DEFAULT_POOL)), None)
    rows = []
    for b in report.bursts:
        clients = b.nodes * b.pool_size
        ceiling = report.ceiling_tps(clients)
        rows.append({
            **asdict(b),
            "wall_ratio_to_1_node": ratio(b.wall_seconds, one.wall_seconds if one else None),
            "pgbench_clients": clients, "ceiling_tps": ceiling,
            "ratio_to_ceiling": ratio(b.per_second, ceiling),
        })  # fmt: skip
    return rows


def burst_table(report: Report) -> list[str]:
    rows = [
        "| burst | verdict (outcomes) | wall s | req/s | p50 | p95 | p99 | max ms "
        f"| wall vs 1 node, pool {DEFAULT_POOL} | req/s / ceiling | other CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in burst_rows(report):
        rows.append(
            f"| {r['requests']:,} → {Setup(r['nodes'], r['pool_size']).label} | {verdict_cell(r)} "
            f"| {r['wall_seconds']:.2f} | {fmt(r['per_second'])} | {r['p50_ms']:,.0f} "
            f"| {r['p95_ms']:,.0f} | {r['p99_ms']:,.0f} | {r['max_ms']:,.0f} "
            f"| {fmt(r['wall_ratio_to_1_node'], '.2f')} | {fmt(r['ratio_to_ceiling'], '.2f')} "
            f"| {busiest([r['background_cpu']])} |"
        )
    return rows


def verdict_cell(row: dict[str, Any]) -> str:
    outcomes = ", ".join(f"{name} {count:,}" for name, count in row["outcomes"].items())
    return f"{'PASS' if row['passed'] else 'FAIL'} ({outcomes})"


def markdown(report: Report) -> str:
    m = report.machine
    sections = [
        f"## balancectl benchmark, {m['started_at']} ({m['cpus']} CPUs, PostgreSQL "
        f"{m['postgres']['server_version']})",
        "### Ceiling: the route's statement under pgbench -M prepared",
        *ceiling_table(report),
        "### Sustained route throughput (wrk, keep-alive credits, user 1's row)",
        *sustained_table(report),
        "### Data-access path, in-process (the same statement)",
        *access_table(report),
        "### The burst (balancectl.toolkit.loadtest.run_loadtest)",
        *burst_table(report),
        f"Checks: {json.dumps(report.checks)}",
    ]
    return "\n\n".join(blocks(sections))


def blocks(lines: list[str]) -> list[str]:
    """A table's lines stay together; headings and paragraphs stand apart."""
    joined: list[str] = []
    for line in lines:
        if line.startswith("|") and joined and joined[-1].startswith("|"):
            joined[-1] += "\n" + line
        else:
            joined.append(line)
    return joined


def report_json(report: Report, elapsed: float) -> dict[str, Any]:
    return {
        "machine": report.machine,
        "elapsed_seconds": elapsed,
        "ceiling": {str(k): [asdict(c) for c in v] for k, v in report.ceiling.items()},
        "ceiling_tps_best": {str(k): report.ceiling_tps(k) for k in report.ceiling},
        "ceiling_tps_mean": {str(k): report.ceiling_tps(k, mean) for k in report.ceiling},
        "ceiling_tps_peak": report.peak_ceiling(),
        "sustained": sustained_rows(report),
        "data_access": access_rows(report),
        "bursts": burst_rows(report),
        "checks": report.checks,
    }


# --- machine and checks ---------------------------------------------------------------------


def tool_version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except OSError as error:
        return f"unavailable: {error}"
    return (done.stdout + done.stderr).strip().splitlines()[0]


def machine(options: Options, server_url: str, free: int) -> dict[str, Any]:
    settings = admin(
        server_url,
        "SELECT name, setting FROM pg_settings WHERE name IN ('server_version', 'max_connections',"
        " 'shared_buffers', 'synchronous_commit', 'fsync', 'wal_sync_method')",
    )
    packages = ("psycopg", "psycopg-pool", "SQLAlchemy", "litestar", "uvicorn", "uvloop")
    return {
        "started_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgres": dict(settings),
        "free_connections_at_start": free,
        "packages": {p: metadata.version(p) for p in packages if has_distribution(p)},
        "wrk": tool_version(["wrk", "--version"]),
        "pgbench": tool_version(["pgbench", "--version"]),
        "options": {k: v for k, v in asdict(options).items() if k != "database_url"},
        "default_pool_size": DEFAULT_POOL,
    }


def has_distribution(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def ledger_checks(database_url: str) -> dict[str, Any]:
    """After everything: user 1's balance still equals the sum of its ledger."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        mismatches = connection.execute(query("audit_ledger")).fetchall()
        entries = connection.execute("SELECT count(*) FROM ledger").fetchone()
    return {"ledger_consistent": not mismatches, "ledger_entries": entries[0] if entries else 0}


# --- main -----------------------------------------------------------------------------------


def require_tools() -> None:
    missing = [tool for tool in ("wrk", "pgbench") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing on PATH: {', '.join(missing)} (apt-get install wrk)")


def run(options: Options, report: Report, database_url: str) -> None:
    phase(report, "ceiling: pgbench")
    report.ceiling = ceiling_sweep(options, database_url)
    phase(report, "data-access path: in-process")
    report.machine["background_cpu_before_in_process"] = await_quiet(
        options, database_url, len(PATHS) * IN_PROCESS_POOL
    )
    report.access = run_in_process(options, database_url)
    phase(report, "sustained: wrk")
    report.sustained = sustained_sweep(options, database_url)
    phase(report, "burst: loadtest")
    report.bursts = [measure_burst(options, database_url, setup) for setup in BURSTS]
    phase(report, "end")
    report.checks = ledger_checks(database_url)


def phase(report: Report, name: str) -> None:
    """Log the phase; keep the load average at its start (other work on the machine shows)."""
    load = os.getloadavg()
    report.machine.setdefault("load_average_1_5_15", {})[name] = load
    log(f"{name} (load average {load[0]:.2f})")


def write_results(report: Report, elapsed: float) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{stamp}.json"
    path.write_text(json.dumps(report_json(report, elapsed), indent=2) + "\n", encoding="utf-8")
    return path


def interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` stops its processes."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_options(argv)
    require_tools()
    interrupt_on_sigterm()
    needed = max(setup.pool_connections for setup in SETUPS) + HEADROOM_MARGIN
    free = await_connections(options.database_url, needed, options.wait_for_connections)
    report = Report(machine(options, options.database_url, free))
    began = time.monotonic()
    with scratch_database(options.database_url) as database_url:
        run(options, report, database_url)
    elapsed = time.monotonic() - began
    path = write_results(report, elapsed)
    print(markdown(report))
    log(f"wrote {path} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
