"""Starting nodes: five at once on an empty database, and every way a start must refuse.

A refused start is exit status 2 and one line on stderr that says why (naming the job
and the field for a bad jobs file), never a traceback.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from balancectl.migrations import head_revision
from tests.conftest import free_port, sql
from tests.processes import ClusterFactory, http_json

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MESSAGE_PREFIX = "balancectl: "


def test_five_nodes_started_at_once_on_an_empty_database(
    cluster_factory: ClusterFactory, empty_database_url: str
) -> None:
    cluster = cluster_factory(5, "--no-scheduler", url=empty_database_url)

    assert all(node.process.poll() is None for node in cluster.members)
    for url in cluster.urls:
        assert http_json(f"{url}/readyz") == (200, {"status": "ready", "revision": head_revision()})
        assert http_json(f"{url}/users/1") == (200, {"userId": 1, "balance": 10000})
    assert sql(empty_database_url, "SELECT id, balance FROM users") == [(1, 10000)]
    assert sql(empty_database_url, "SELECT amount, balance_after FROM ledger") == [(10000, 10000)]
    assert sql(empty_database_url, "SELECT version_num FROM alembic_version") == [
        (head_revision(),)
    ]


# --- refused starts ------------------------------------------------------------------------


def serve(*args: str, database_url: str | None = None, timeout: float = 60) -> tuple[int, str]:
    """Run ``balancectl serve`` to its end; its exit status and stderr."""
    command = [sys.executable, "-m", "balancectl", "serve", "--host", "127.0.0.1", *args]
    if database_url is not None:
        command += ["--database-url", database_url]
    done = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    return done.returncode, done.stderr


def the_message(stderr: str) -> str:
    """The refusal: stderr's last line, and all of it on that line (log lines may precede)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.rstrip("\n").splitlines()
    assert lines, "nothing on stderr"
    message = lines[-1]
    assert message.startswith(MESSAGE_PREFIX), stderr
    # Not wrapped: a refusal split over two lines would leave its start on an earlier line.
    assert sum(line.startswith(MESSAGE_PREFIX) for line in lines) == 1, stderr
    return message


def assert_whole_line(stderr: str, *parts: str) -> str:
    message = the_message(stderr)
    for part in parts:
        assert part in message, f"{part!r} not in the refusal line {message!r}\n{stderr}"
    return message


def test_port_in_use(busy_port: int, database_url: str) -> None:
    status, stderr = serve("--port", str(busy_port), "--no-scheduler", database_url=database_url)

    assert status == 2, stderr
    assert stderr.strip().splitlines() == [the_message(stderr)]
    assert_whole_line(stderr, str(busy_port), "in use")


def test_database_url_that_is_not_postgresql() -> None:
    status, stderr = serve("--port", str(free_port()), database_url="mysql://root@127.0.0.1/x")

    assert status == 2, stderr
    assert stderr.strip().splitlines() == [the_message(stderr)]
    assert_whole_line(stderr, "postgresql://", "mysql")


def test_database_that_cannot_be_reached() -> None:
    url = "postgresql://postgres@127.0.0.1:1/x"
    status, stderr = serve("--port", str(free_port()), "--db-wait", "2", database_url=url)

    assert status == 2, stderr
    assert_whole_line(stderr, "cannot be reached", "127.0.0.1", "port 1")


JOB = 'function = "balancectl.jobs.builtin:ledger_audit"\ninterval = "3m"\n'
BAD_JOBS_FILES = {
    "unknown-key": (f'[[jobs]]\nname = "audit"\n{JOB}colour = "red"\n', ["'audit'", "colour"]),
    "duplicate-name": (
        f'[[jobs]]\nname = "twice"\n{JOB}[[jobs]]\nname = "twice"\n{JOB}',
        ["'twice'", "name"],
    ),
    "function-does-not-import": (
        '[[jobs]]\nname = "ghost"\nfunction = "no_such_module_here:run"\ninterval = "3m"\n',
        ["'ghost'", "function", "no_such_module_here"],
    ),
    "function-not-async": (
        '[[jobs]]\nname = "sync"\nfunction = "os.path:join"\ninterval = "3m"\n',
        ["'sync'", "function"],
    ),
    "interval-zero": (
        '[[jobs]]\nname = "never"\nfunction = "balancectl.jobs.builtin:ledger_audit"\n'
        "interval = 0\n",
        ["'never'", "interval"],
    ),
    "interval-negative": (
        '[[jobs]]\nname = "back"\nfunction = "balancectl.jobs.builtin:ledger_audit"\n'
        'interval = "-3m"\n',
        ["'back'", "interval"],
    ),
}


@pytest.mark.parametrize(("text", "parts"), BAD_JOBS_FILES.values(), ids=list(BAD_JOBS_FILES))
def test_bad_jobs_file(tmp_path: Path, database_url: str, text: str, parts: Sequence[str]) -> None:
    jobs_file = tmp_path / "jobs.toml"
    jobs_file.write_text(text)
    port = free_port()

    status, stderr = serve(
        "--port", str(port), "--jobs-file", str(jobs_file), database_url=database_url
    )

    assert status == 2, stderr
    assert_whole_line(stderr, *parts)
    # Refused before it served or registered anything.
    assert sql(database_url, "SELECT count(*) FROM jobs") == [(0,)]
    assert sql(database_url, "SELECT count(*) FROM nodes") == [(0,)]
