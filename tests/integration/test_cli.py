"""The command line as a user meets it: the built wheel, `jobs`, `up`, `demo`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import IO

import pytest

from tests.conftest import free_ports, sql
from tests.processes import ClusterFactory, alive, descendants

ROOT = Path(__file__).resolve().parents[2]


def balancectl(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "balancectl", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
        cwd=cwd,
    )  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(folder), str(ROOT)],
        check=True, timeout=300,
    )  # fmt: skip
    return next(folder.glob("balancectl-*.whl"))


def test_wheel_ships_migrations_queries_and_jobs(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "balancectl/_migrations/env.py" in names
    assert "balancectl/_migrations/versions/0001_users.py" in names
    assert "balancectl/sql/queries.sql" in names
    assert "balancectl/jobs/default.toml" in names


def test_installed_wheel_migrates_without_the_source_tree(
    wheel: Path, empty_database_url: str, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {"PYTHONPATH": str(site), "BALANCECTL_DATABASE_URL": empty_database_url}
    result = balancectl("migrate", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    probe = subprocess.run(
        [sys.executable, "-c", "import balancectl.migrations as m; print(m.script_location())"],
        capture_output=True, text=True, env={**os.environ, **env}, cwd=tmp_path, check=True,
    )  # fmt: skip
    assert probe.stdout.strip().startswith(str(site))
    assert sql(empty_database_url, "SELECT id, balance FROM users") == [(1, 10000)]


def test_bad_usage_exits_2_with_one_line() -> None:
    result = balancectl("serve", "--database-url", "mysql://x@y/z")
    assert result.returncode == 2
    assert "postgresql://" in result.stderr
    assert "Traceback" not in result.stderr
    assert balancectl("serve", "--port", "not-a-port").returncode == 2
    assert balancectl("no-such-command").returncode == 2


def test_help_lists_every_command() -> None:
    result = balancectl("--help")
    assert result.returncode == 0
    for command in ("migrate", "serve", "up", "loadtest", "jobs", "demo"):
        assert command in result.stdout


def test_jobs_command_reads_the_database_and_a_node(
    cluster_factory: ClusterFactory, database_url: str, tmp_path: Path
) -> None:
    jobs_file = tmp_path / "jobs.toml"
    jobs_file.write_text(
        '[[jobs]]\nname = "alpha"\nfunction = "balancectl.jobs.builtin:idle"\n'
        'interval = "60s"\nmin_duration = "30s"\n'
    )
    cluster = cluster_factory(1, "--jobs-file", str(jobs_file), "--settle", "0")
    deadline = time.monotonic() + 30
    document: dict[str, object] = {}
    while time.monotonic() < deadline:
        result = balancectl("jobs", "--url", cluster.urls[0], "--json")
        assert result.returncode == 0, result.stderr
        document = json.loads(result.stdout)
        if document["jobs"][0]["state"] == "running":  # type: ignore[index]
            break
        time.sleep(0.5)
    assert document["jobs"][0]["node"] == "node-1"  # type: ignore[index]
    table = balancectl("jobs", "--database-url", database_url, env={"COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert "alpha" in table.stdout and "running" in table.stdout and "node-1" in table.stdout


def test_up_starts_nodes_and_stops_them_on_sigterm(database_url: str, tmp_path: Path) -> None:
    base = free_ports(2)
    log = (tmp_path / "up.log").open("w")
    process = start_up(database_url, base, log)
    try:
        wait_until(lambda: "2 nodes up" in (tmp_path / "up.log").read_text(), 90)
        nodes = sql(database_url, "SELECT id FROM nodes WHERE stopped_at IS NULL ORDER BY id")
        assert nodes == [("node-1",), ("node-2",)]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143  # 128 + SIGTERM, after stopping both nodes
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    text = (tmp_path / "up.log").read_text()
    assert "[node-1]" in text and "[node-2]" in text
    stopped = sql(database_url, "SELECT count(*) FROM nodes WHERE stopped_at IS NOT NULL")
    assert stopped == [(2,)]
    assert not port_in_use(base) and not port_in_use(base + 1)


def test_up_killed_with_sigkill_takes_its_nodes_with_it(database_url: str, tmp_path: Path) -> None:
    """A launcher that cannot stop its nodes (kill -9) still leaves no node behind: each
    node is SIGTERMed by the kernel when its launcher dies, and stops as on Ctrl-C."""
    base = free_ports(2)
    log = (tmp_path / "up.log").open("w")
    process = start_up(database_url, base, log)
    below: set[int] = set()
    try:
        wait_until(lambda: "2 nodes up" in (tmp_path / "up.log").read_text(), 90)
        below = descendants(process.pid)  # the two nodes and their workers
        assert len(below) >= 4, below
        process.kill()
        process.wait(timeout=10)
        wait_until(lambda: not any(alive(pid) for pid in below), 30)
    finally:
        for pid in below:  # the test leaves nothing behind, whatever it found
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
    stopped = sql(database_url, "SELECT count(*) FROM nodes WHERE stopped_at IS NOT NULL")
    assert stopped == [(2,)]  # each stopped as on a SIGTERM: it recorded its leaving
    assert not port_in_use(base) and not port_in_use(base + 1)


@pytest.mark.slow
def test_demo_runs_the_whole_story(database_url: str) -> None:
    base = free_ports(5)
    result = balancectl(
        "demo", "--database-url", database_url, "--base-port", str(base),
        "--requests", "2000", "--watch-seconds", "5",
        env={"COLUMNS": "200"}, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout and "FAIL" not in result.stdout
    assert sql(database_url, "SELECT balance FROM users WHERE id = 1") == [(10000 - 2 * 2000,)]
    assert "jobs per node" in result.stdout


def start_up(database_url: str, base: int, log: IO[str]) -> subprocess.Popen[bytes]:
    """``balancectl up`` with 2 nodes from ``base``, its output in ``log``."""
    return subprocess.Popen(
        [sys.executable, "-m", "balancectl", "up", "--nodes", "2", "--base-port", str(base),
         "--database-url", database_url],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def port_in_use(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def wait_until(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout} s")
