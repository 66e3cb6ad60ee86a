"""Test databases: one server, one migrated template per run, a fresh clone for each test.

The server is ``BALANCECTL_TEST_DATABASE_URL`` when set, else an embedded PostgreSQL in
a temporary folder, stopped and removed at the end of the run. Every database this run
creates is named with a random prefix, so that runs sharing a server never clash.

Helpers for tests: ``sql(url, statement, params)``, ``free_port()`` and
``open_database(url, settings)`` (the package's pool, open) (``from tests.conftest import sql``).
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from itertools import count
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql as pgsql
from psycopg.abc import Params

from balancectl.config import PoolSettings
from balancectl.db import Database
from balancectl.migrations import upgrade
from balancectl.toolkit.embedded import embedded_database_url, stop_embedded

RUN_PREFIX = f"balancectl_test_{secrets.token_hex(4)}"
_database_numbers = count(1)
_ports_handed_out: set[int] = set()


def sql(url: str, statement: str, params: Params | None = None) -> list[tuple[Any, ...]]:
    """Run one statement in its own autocommit connection; its rows, or [] when it has none."""
    with psycopg.connect(url, autocommit=True) as connection:
        cursor = connection.execute(statement, params)
        return cursor.fetchall() if cursor.description is not None else []


@asynccontextmanager
async def open_database(url: str, settings: PoolSettings) -> AsyncIterator[Database]:
    """The package's pool on ``url``, open with its first connections; closed after."""
    db = Database(url, settings)
    await db.open(wait=True)
    try:
        yield db
    finally:
        await db.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and that this run has not handed out before."""
    return free_ports(1)


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports, none handed out before in this run.

    They are picked below the kernel's ephemeral range (32768 and up here), so an outgoing
    connection (a load test opens thousands) cannot take one before a node binds it; and
    from this process's own share of that range, so parallel workers never pick the same.
    """
    low, high = port_share()
    while True:
        base = random.randrange(low, high - count)
        block = range(base, base + count)
        if not _ports_handed_out.intersection(block) and all(map(_bindable, block)):
            _ports_handed_out.update(block)
            return base


def port_share(low: int = 20000, high: int = 32000) -> tuple[int, int]:
    """This process's slice of ``low..high``: all of it, or worker N's Nth of it when
    pytest-xdist runs the tests (``PYTEST_XDIST_WORKER`` is ``gwN``)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return low, high
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    span = (high - low) // workers
    start = low + int(worker.removeprefix("gw")) * span
    return start, start + span


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def url_for_database(server_url: str, database: str) -> str:
    """The same server and credentials, another database."""
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{database}"))


def create_database(server_url: str, name: str, template: str = "template0") -> str:
    """Create ``name`` as a copy of ``template`` and return its URL."""
    statement = pgsql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
        pgsql.Identifier(name), pgsql.Identifier(template)
    )
    _admin(server_url, statement)
    return url_for_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    """Drop ``name``, ending any session still connected to it (nodes a test left behind)."""
    statement = pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
    _admin(server_url, statement.format(pgsql.Identifier(name)))


def _admin(server_url: str, statement: pgsql.Composed) -> None:
    # CREATE and DROP DATABASE cannot run inside a transaction block.
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(statement)


def _next_database_name() -> str:
    return f"{RUN_PREFIX}_{next(_database_numbers)}"


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """The URL of the server's maintenance database, where this run creates its databases."""
    configured = os.environ.get("BALANCECTL_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    folder = Path(tempfile.mkdtemp(prefix="balancectl-test-"))
    try:
        yield embedded_database_url(folder / "pgdata")
    finally:
        stop_embedded(folder / "pgdata")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def template_database(server_url: str) -> Iterator[str]:
    """The name of a database migrated to head once per run; tests get copies of it."""
    name = f"{RUN_PREFIX}_template"
    try:
        upgrade(create_database(server_url, name))
        yield name
    finally:
        drop_database(server_url, name)


@pytest.fixture
def database_url(server_url: str, template_database: str) -> Iterator[str]:
    """A fresh database at head (user 1 holds 10000), this test's alone; dropped afterwards."""
    name = _next_database_name()
    try:
        yield create_database(server_url, name, template=template_database)
    finally:
        drop_database(server_url, name)


@pytest.fixture
def empty_database_url(server_url: str) -> Iterator[str]:
    """A fresh database with no schema at all, for migration tests; dropped afterwards."""
    name = _next_database_name()
    try:
        yield create_database(server_url, name)
    finally:
        drop_database(server_url, name)


@pytest.fixture
def tcp_port() -> int:
    """A free TCP port on 127.0.0.1 (call ``free_port()`` for more than one)."""
    return free_port()


# The tests that run one after another under pytest-xdist, by chain (path or node id prefix).
# serial: each bounds a time (a takeover within TTL + slack, a 503 within a deadline), so no
# two of them may run side by side. heavy: each loads the whole machine (a 10,000-request
# burst, five to twenty nodes started at once, whose registrations must fall within the
# settle delay for an even first round), so no two of them may either. long: each bounds a
# time too, but spends minutes of it idle (the shipped jobs' two minutes, an outage of its
# own embedded server), so it runs beside the other two chains, never beside its own kind:
# in serial and heavy, these modules made those chains the suite's wall time. The outage
# test is heavy: its five nodes' registrations must fall within a 2 s settle (in long, beside
# a burst, they once did not).
CHAINS = {
    "serial": (
        "tests/e2e/test_multihost_netns.py",
        "tests/integration/test_faults_partition.py",
        "tests/integration/test_faults_takeover_spread.py",
        "tests/integration/test_operator_verbs.py",
        "tests/integration/test_reliability_conn_cancel.py",
        "tests/integration/test_reliability_conn_pool.py",
        "tests/integration/test_reliability_conn_stall.py",
        "tests/integration/test_reliability_scheduler_claims.py",
        "tests/integration/test_reliability_scheduler_fence.py",
        "tests/integration/test_reliability_scheduler_history.py",
        "tests/integration/test_reliability_scheduler_jobs.py",
        "tests/integration/test_reliability_scheduler_link.py",
        "tests/integration/test_scheduler_faults.py",
    ),
    "heavy": (
        "tests/e2e/test_burst.py",
        "tests/e2e/test_faults_kill9_burst.py",
        "tests/e2e/test_faults_pgbouncer.py",
        "tests/e2e/test_newcomer_demo.py",
        "tests/e2e/test_scale_pgbouncer.py",
        "tests/integration/test_cli.py::test_demo_runs_the_whole_story",
        "tests/integration/test_node_start.py::test_five_nodes_started_at_once",
        "tests/integration/test_scheduler_slow_start.py",
        "tests/integration/test_scheduler_spread.py",
    ),
    "long": (
        "tests/e2e/test_default_jobs.py",
        "tests/integration/test_faults_db_restart.py",
        "tests/integration/test_reliability_scheduler_outage.py",  # 5 nodes, settle 2 s
    ),
}


def chain_of(item: pytest.Item) -> str | None:
    """The chain ``item`` belongs to, if any."""
    return next((name for name, starts in CHAINS.items() if item.nodeid.startswith(starts)), None)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks and groups for pytest-xdist's ``--dist loadgroup`` (``nox -s tests``).

    Each chain of ``CHAINS`` is a marker (``-m serial`` selects that chain) and one group,
    which one worker runs one after another, first, as the longest work. A module whose
    tests share a module-scoped fixture (one node for the module) is a group of its own,
    so that the fixture is made once. Without xdist the groups change nothing.
    """
    for item in items:
        chain = chain_of(item)
        if chain is not None:
            item.add_marker(chain)
            item.add_marker(pytest.mark.xdist_group(chain))
        elif shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    items.sort(key=lambda item: chain_of(item) is None)  # stable


def shares_a_module_fixture(item: pytest.Item) -> bool:
    definitions = getattr(item, "_fixtureinfo", None)
    if definitions is None:
        return False
    return any(
        chain[-1].scope == "module" for chain in definitions.name2fixturedefs.values() if chain
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the test item, so fixtures can print logs on failure."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


pytest_plugins = ["tests.processes", "tests.faults", "tests.pgbouncer"]
