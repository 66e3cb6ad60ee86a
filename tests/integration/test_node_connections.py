"""A node that cannot open its connections says so in one line and exits 2; one that can
open the ones it starts with serves, degraded, never half-working.

A node holds up to ``W x ceil(P / W) + 3 scheduler + 2 jobs`` connections
(docs/operations.md, "Connection arithmetic") and starts with the pools' minimum
(``W x 2 + 1 + 1``). The tests run a private embedded PostgreSQL with
``max_connections = 20`` (the shared server's settings are never touched), hold all but
a few of its slots with connections of their own, as other nodes would, and start one
``balancectl serve --workers 2`` beside them:

- room for 1 connection (the supervisor opens its scheduler's two pools first, before
  its workers start, and one of them is refused) or 4 (the scheduler's pools take 2, the
  workers need 4: a worker's pool is refused): the node exits 2 with one ``balancectl:``
  line naming the arithmetic, the server's refusal and ``max_connections``; it never
  answers ``/readyz`` 200 on the way, and leaves no process behind; with
  ``--no-scheduler`` too (room for 2);
- room for 8 (its start needs 6, its most 11): it starts, is ready and serves every
  request;
- five nodes that hold all 20 slots: a sixth is refused already at its migration (after
  ``--db-wait``), in the same one line, and the five serve on;
- a server still coming up is no refusal: started while the server is down (``--db-wait``),
  the node waits for it and serves once it is up.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg
import pytest

from balancectl.migrations import upgrade
from balancectl.toolkit.embedded import embedded_database_url, stop_embedded
from tests.conftest import free_port, sql
from tests.pgbouncer import PgBouncer
from tests.processes import ClusterFactory, Launched, http_json
from tests.scheduling import write_jobs

pytestmark = pytest.mark.slow

MAX_CONNECTIONS = 20
CLIENTS = """SELECT count(*) FROM pg_stat_activity
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"""
REFUSAL_WITHIN = 60.0  # seconds: a refused start ends well inside this on a busy machine


@pytest.fixture
def pgdata(tmp_path: Path) -> Iterator[Path]:
    """The data folder of this test's own embedded PostgreSQL; stopped afterwards."""
    yield tmp_path / "pg"
    stop_embedded(tmp_path / "pg")


@pytest.fixture
def small_server(pgdata: Path) -> str:
    """The URL of a private, migrated PostgreSQL with ``max_connections = 20``."""
    url = embedded_database_url(pgdata)
    sql(url, f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS}")
    stop_embedded(pgdata)
    assert embedded_database_url(pgdata) == url
    assert sql(url, "SHOW max_connections") == [(str(MAX_CONNECTIONS),)]
    upgrade(url)
    return url


def clients(url: str) -> int:
    """Client connections to the server, not counting the one asking."""
    [(count,)] = sql(url, CLIENTS)
    return int(count)


@contextmanager
def room_for(url: str, free: int) -> Iterator[None]:
    """Hold connections until exactly ``free`` of the server's slots are left."""
    with ExitStack() as held:
        for _ in range(MAX_CONNECTIONS - clients(url) - free):
            held.enter_context(psycopg.connect(url, autocommit=True))
        assert clients(url) == MAX_CONNECTIONS - free
        yield


def readyz(url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def start_node(url: str, port: int, *args: str) -> Launched:
    return Launched(
        "serve", "--node-id", "node-x", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "2", *args,
        env={"BALANCECTL_DATABASE_URL": url},
    )  # fmt: skip


def watch_until_exit(node: Launched, port: int) -> tuple[int, set[int | None], float]:
    """Poll ``/readyz`` until the node exits: its status, what ``/readyz`` said, how long."""
    began, seen = time.monotonic(), set[int | None]()
    while node.process.poll() is None:
        assert time.monotonic() - began < REFUSAL_WITHIN, f"still running:\n{node.output}"
        seen.add(readyz(f"http://127.0.0.1:{port}"))
        time.sleep(0.2)
    return node.finish(), seen, time.monotonic() - began


def refusal_line(output: str) -> str:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("balancectl: ")]
    assert len(lines) == 1, output
    assert output.rstrip("\n").splitlines()[-1] == lines[0], output
    return lines[0]


WITH_SCHEDULER = "its 11 connections (2 workers x 3 + 3 scheduler + 2 jobs)"


@pytest.mark.parametrize(
    ("scheduler", "room", "refused", "arithmetic"),
    [
        ("with-scheduler", 1, "supervisor", WITH_SCHEDULER),  # the scheduler's or jobs pool
        ("with-scheduler", 4, "api", WITH_SCHEDULER),  # a worker's request pool
        ("no-scheduler", 2, "api", "its 6 connections (2 workers x 3, no scheduler)"),
    ],
)
def test_a_node_without_room_for_its_connections_exits_2_in_one_line(
    small_server: str, tmp_path: Path, scheduler: str, room: int, refused: str, arithmetic: str
) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", ["tick"], min_duration="1s", interval="2s")
    args = ["--jobs-file", str(jobs)] if scheduler == "with-scheduler" else ["--no-scheduler"]
    port = free_port()
    with room_for(small_server, room), start_node(small_server, port, *args) as node:
        status, seen, seconds = watch_until_exit(node, port)
        line = refusal_line(node.output)
        print(f"\n{scheduler}, room for {room}: exit {status} after {seconds:.1f} s; ", end="")
        print(f"/readyz saw {seen}\n{line}")
        assert status == 2, node.output
        # The pool the supervisor opens second may be the one refused, or its first, if
        # the slot of the connection that read max_connections is not free again yet.
        pools = ("scheduler", "jobs") if refused == "supervisor" else (refused,)
        assert any(f"error connecting in '{pool}'" in node.output for pool in pools), node.output
        if refused == "supervisor":
            assert "error connecting in 'api'" not in node.output, node.output
            assert "worker 0 serving" not in node.output, "a worker started"
        assert 200 not in seen, "the node answered ready while it could not open its pools"
        assert line.startswith(f"balancectl: node-x cannot open {arithmetic}: "), line
        assert "the server refused: " in line and "too many clients already" in line, line
        assert f"(max_connections={MAX_CONNECTIONS})" in line, line
        assert line.endswith("; use PgBouncer (docs/operations.md) or fewer nodes"), line
        assert node.leftovers() == []


def test_a_node_with_room_for_its_start_serves_degraded(small_server: str, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", ["tick"], min_duration="1s", interval="2s")
    port, url = free_port(), ""
    with (
        room_for(small_server, 8),
        start_node(small_server, port, "--jobs-file", str(jobs)) as node,
    ):
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while readyz(url) != 200:
            assert node.process.poll() is None, node.output
            assert time.monotonic() < deadline, node.output
            time.sleep(0.2)
        statuses = [readyz(url) for _ in range(10)]
        debits = [http_json(f"{url}/users/1/balance", "POST", {"amount": -1})[0] for _ in range(20)]
        print(f"\nroom for 8: /readyz {statuses}; 20 debits {set(debits)}")
        assert statuses == [200] * 10 and debits == [200] * 20
        assert node.process.poll() is None
        assert sql(small_server, "SELECT balance FROM users WHERE id = 1") == [(9980,)]


def wait_ready(node: Launched, url: str, timeout: float = 90.0) -> float:
    """Seconds until ``/readyz`` answers 200; fails if the node exits first."""
    began = time.monotonic()
    while readyz(url) != 200:
        assert node.process.poll() is None, node.output
        assert time.monotonic() - began < timeout, node.output
        time.sleep(0.2)
    return time.monotonic() - began


def test_a_server_still_coming_up_is_waited_for_not_refused(
    small_server: str, pgdata: Path, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", ["tick"], min_duration="1s", interval="2s")
    port = free_port()
    assert stop_embedded(pgdata)
    with start_node(small_server, port, "--jobs-file", str(jobs), "--db-wait", "60") as node:
        node.wait_for("database not reachable yet", timeout=30)
        time.sleep(3.0)
        assert embedded_database_url(pgdata) == small_server
        up = wait_ready(node, f"http://127.0.0.1:{port}")
        status, _ = http_json(f"http://127.0.0.1:{port}/users/1/balance", "POST", {"amount": -1})
        print(f"\nready {up:.2f} s after the server came up; a debit: {status}")
        assert status == 200 and node.process.poll() is None


def test_the_node_past_the_servers_connections_is_refused_and_the_others_serve(
    small_server: str, cluster_factory: ClusterFactory
) -> None:
    # 5 nodes x 2 workers x 2 connections (the pools' minimum, idle) = all 20 slots.
    cluster = cluster_factory(5, "--no-scheduler", "--workers", "2", url=small_server)
    port = free_port()
    with start_node(small_server, port, "--no-scheduler", "--db-wait", "3") as node:
        status, seen, seconds = watch_until_exit(node, port)
        line = refusal_line(node.output)
    print(f"\n5 nodes hold all {MAX_CONNECTIONS} slots; the 6th: exit {status} after "
          f"{seconds:.1f} s\n{line}")  # fmt: skip
    assert status == 2 and 200 not in seen, node.output
    assert "database not reachable yet" in node.output, "not refused at its migration"
    assert line.startswith(
        "balancectl: node-x cannot open its 6 connections (2 workers x 3, no scheduler): "
        "the server refused: sorry, too many clients already; use PgBouncer"
    ), line
    for url in cluster.urls:
        assert readyz(url) == 200
        assert http_json(f"{url}/users/1/balance", "POST", {"amount": -1})[0] == 200


def test_a_node_past_pgbouncers_max_client_conn_exits_2_in_one_line(database_url: str) -> None:
    """PgBouncer's own refusal (``max_client_conn``) is a refusal too, named as PgBouncer's."""
    bouncer = PgBouncer(database_url, pool_size=4, max_client_conn=3)
    bouncer.start()
    try:
        port = free_port()
        with start_node(bouncer.url, port, "--no-scheduler", "--no-prepare") as node:
            status, seen, seconds = watch_until_exit(node, port)
            line = refusal_line(node.output)
            print(f"\nbehind PgBouncer, max_client_conn 3: exit {status} after {seconds:.1f} s")
            print(line)
            assert status == 2, node.output
            assert 200 not in seen, "the node answered ready while it could not open its pools"
            assert line.startswith("balancectl: node-x cannot open its 6 connections "), line
            assert "PgBouncer refused: no more connections allowed (max_client_conn)" in line
            assert line.endswith("; raise PgBouncer's max_client_conn or run fewer nodes"), line
            assert node.leftovers() == []
    finally:
        bouncer.stop()
