"""What a newcomer meets, with real processes: each command in each ordinary trouble.

Every case ends with one clear ``balancectl: ...`` line (no traceback), the documented
exit status (2 for bad usage, an unreachable node or database, a node that cannot start;
70 for a bug; 130 / 143 for SIGINT / SIGTERM) and no process left behind: each command
runs in a session of its own and the check counts that session's processes (every node,
worker and process group it made), not names.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from balancectl import cli
from balancectl.config import NodeSettings
from tests.conftest import free_port, free_ports, sql
from tests.faults import proxied, through
from tests.processes import ClusterFactory, Launched, session_processes

REFUSED_DB = "postgresql://postgres@127.0.0.1:1/nothing"
REFUSED_NODE = "http://127.0.0.1:1"
PREFIX = "balancectl: "


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str]:
    """Run a command to its end in its own session; its status and output. Nothing of it
    may be left running."""
    with Launched(*args, env=env) as launched:
        status = launched.finish(timeout)
        assert launched.leftovers() == [], launched.output
        return status, launched.output


def clear_line(output: str, *parts: str) -> str:
    """The output ends with one ``balancectl: ...`` line holding every part; no traceback."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines, "no output"
    last = lines[-1]
    assert last.startswith(PREFIX), output
    for part in parts:
        assert part in last, f"{part!r} not in {last!r}\n{output}"
    return last


# --- a busy port --------------------------------------------------------------------------


def test_busy_port_serve(busy_port: int, database_url: str) -> None:
    status, output = run("serve", "--port", str(busy_port), "--database-url", database_url)
    assert status == 2
    clear_line(output, f"127.0.0.1:{busy_port}", "in use")


@pytest.mark.parametrize("command", ["up", "demo"])
def test_busy_port_up_and_demo(command: str, busy_port: int, database_url: str) -> None:
    base = busy_port - 1
    status, output = run(command, "--nodes", "3", "--base-port", str(base), "--database-url",
                         database_url)  # fmt: skip
    assert status == 2
    clear_line(output, f"port {busy_port} is in use", "--base-port")
    assert sql(database_url, "SELECT count(*) FROM nodes") == [(0,)]  # no node started


# --- an unreachable database --------------------------------------------------------------


@pytest.mark.parametrize("command", ["migrate", "up", "demo"])
def test_unreachable_database(command: str) -> None:
    ports = ["--base-port", str(free_ports(5))] if command == "up" else []
    status, output = run(command, "--database-url", REFUSED_DB, *ports)
    assert status == 2
    clear_line(output, "the database cannot be reached", "port 1")


def test_unreachable_database_jobs() -> None:
    status, output = run("jobs", "--database-url", REFUSED_DB, timeout=30)
    assert status == 2
    clear_line(output, "the database cannot be reached", "port 1")


def test_jobs_on_a_database_never_migrated_says_so(empty_database_url: str) -> None:
    status, output = run("jobs", "--database-url", empty_database_url, timeout=30)
    assert status == 2, output
    clear_line(output, "has no balancectl schema", "balancectl migrate")


def test_serve_reports_a_database_still_coming_up_once_then_every_5_s() -> None:
    """--db-wait 7 against a refusing database: reported at 0 s and 5 s, not every retry."""
    status, output = run("serve", "--port", str(free_port()), "--db-wait", "7", "--database-url",
                         REFUSED_DB)  # fmt: skip
    assert status == 2
    clear_line(output, "the database cannot be reached")
    warnings = [line for line in output.splitlines() if "not reachable yet" in line]
    assert 1 <= len(warnings) <= 2, output


# --- an unreachable node ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("jobs", "--url", REFUSED_NODE),
        ("jobs", "--url", REFUSED_NODE, "--json"),
        ("jobs", "--url", REFUSED_NODE, "--watch"),
        ("loadtest", "--url", REFUSED_NODE, "--requests", "10"),
        ("loadtest", "--url", REFUSED_NODE, "--requests", "10", "--reset", "100"),
    ],
    ids=["jobs", "jobs-json", "jobs-watch", "loadtest", "loadtest-reset"],
)
def test_unreachable_node(args: tuple[str, ...]) -> None:
    status, output = run(*args, timeout=60)
    assert status == 2
    clear_line(output, REFUSED_NODE)


def test_node_gone_during_jobs_watch(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory(1, "--no-scheduler")
    with Launched("jobs", "--url", cluster.urls[0], "--watch", "--interval", "0.5") as watch:
        wait_a_moment(watch, 3.0)  # off a terminal, a live view prints only at its end
        cluster.stop()
        assert watch.finish(timeout=30) == 2
        assert watch.leftovers() == [], watch.output
    clear_line(watch.output, "cannot reach the node", cluster.urls[0])


def test_database_gone_during_jobs_watch(database_url: str) -> None:
    with proxied(database_url) as proxy:
        url = through(database_url, proxy)
        with Launched("jobs", "--database-url", url, "--watch", "--interval", "0.5") as watch:
            wait_a_moment(watch, 3.0)  # off a terminal, a live view prints only at its end
            proxy.cut("reject")
            assert watch.finish(timeout=30) == 2
            assert watch.leftovers() == [], watch.output
    clear_line(watch.output, "the database cannot be reached")


@pytest.mark.parametrize(
    ("url", "parts"),
    [("127.0.0.1:8000", ["--url", "http://"]), ("http://[::1", ["--url", "not a valid URL"])],
)
def test_jobs_url_that_is_not_one(url: str, parts: list[str]) -> None:
    status, output = run("jobs", "--url", url)
    assert status == 2
    clear_line(output, *parts)


# --- a broken jobs file -------------------------------------------------------------------

BROKEN_JOBS = '[[jobs]]\nname = "audit"\nfunction = "balancectl.jobs.builtin:ledger_audit"\n'


def test_broken_jobs_file_up_shows_the_node_s_own_line(tmp_path: Path, database_url: str) -> None:
    """Every node refuses the file; ``up`` ends with a node's own refusal, and stops."""
    jobs_file = tmp_path / "jobs.toml"
    jobs_file.write_text(BROKEN_JOBS)  # no interval
    base = free_ports(3)
    status, output = run("up", "--nodes", "3", "--base-port", str(base), "--jobs-file",
                         str(jobs_file), "--database-url", database_url)  # fmt: skip
    assert status == 2
    clear_line(output, "node-", "exited with status 2", "'audit'", "interval")


def test_node_that_cannot_start_demo_shows_its_own_line(tmp_path: Path, database_url: str) -> None:
    """The demo hides node output, yet a node's refusal is what it ends with."""
    jobs_file = tmp_path / "jobs.toml"
    jobs_file.write_text(BROKEN_JOBS)
    env = {"BALANCECTL_JOBS_FILE": str(jobs_file)}  # the nodes read it, the demo passes it on
    status, output = run("demo", "--nodes", "2", "--database-url", database_url, env=env)
    assert status == 2
    clear_line(output, "node-", "exited with status 2", "'audit'", "interval")


# --- an embedded data folder that is not writable -------------------------------------------


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this user cannot create anything in (for root, sysfs refuses too)."""
    if os.geteuid() == 0:
        return Path("/sys/kernel")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("command", ["migrate", "demo", "up"])
def test_embedded_folder_not_writable(command: str, tmp_path: Path) -> None:
    env = {"XDG_DATA_HOME": str(unwritable_folder(tmp_path)), "BALANCECTL_DATABASE_URL": ""}
    status, output = run(command, env=env)
    assert status == 2
    clear_line(output, "cannot start the embedded PostgreSQL", "balancectl/pgdata")


# --- signals to `up` alone, at each step ----------------------------------------------------


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_up_while_running(sig: int, status: int, database_url: str) -> None:
    with two_nodes_up(database_url) as up:
        os.kill(up.process.pid, sig)
        assert up.finish(timeout=20) == status
        assert up.leftovers() == [], up.output
    clear_line(up.output, "stopped by")
    assert sql(database_url, "SELECT count(*) FROM nodes WHERE stopped_at IS NULL") == [(0,)]


def test_node_killed_under_up_ends_it_with_that_node(database_url: str) -> None:
    with two_nodes_up(database_url) as up:
        os.kill(node_pid(up, "node-2"), signal.SIGKILL)
        assert up.finish(timeout=30) == 2
        assert up.leftovers() == [], up.output
    clear_line(up.output, "node-2 was killed by SIGKILL; its last line:")


@pytest.mark.slow
def test_a_stuck_node_is_killed_with_its_process_group(database_url: str) -> None:
    """A node that ignores SIGTERM (stopped here) is SIGKILLed, its whole group with it."""
    with two_nodes_up(database_url) as up:
        os.kill(node_pid(up, "node-1"), signal.SIGSTOP)
        os.kill(up.process.pid, signal.SIGTERM)
        assert up.finish(timeout=60) == 143
        assert up.leftovers() == [], up.output
    clear_line(up.output, "stopped by SIGTERM")


@contextmanager
def two_nodes_up(database_url: str) -> Iterator[Launched]:
    """``balancectl up --nodes 2``, once it says both nodes are up."""
    with Launched("up", "--nodes", "2", "--base-port", str(free_ports(2)), "--database-url",
                  database_url) as up:  # fmt: skip
        up.wait_for("2 nodes up")
        yield up


def node_pid(up: Launched, node_id: str) -> int:
    """The pid of ``node_id``'s ``balancectl serve`` under ``up``."""
    marker = node_id.encode()
    return next(pid for pid in session_processes(up.process.pid) if marker in cmdline(pid))


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_sigint_to_up_while_starting(database_url: str) -> None:
    base = free_ports(3)
    with Launched("up", "--nodes", "3", "--base-port", str(base), "--database-url",
                  database_url) as up:  # fmt: skip
        up.wait_for("[node-1]")  # a node has started talking: it is starting, not ready
        os.kill(up.process.pid, signal.SIGINT)
        assert up.finish(timeout=20) == 130
        assert up.leftovers() == [], up.output
    clear_line(up.output, "stopped by SIGINT")


def test_sigint_to_up_while_migrating(busy_port: int) -> None:
    """The "database" takes the connection and never answers: migrating hangs, yet stops."""
    url = f"postgresql://postgres@127.0.0.1:{busy_port}/nothing"
    with Launched("up", "--nodes", "2", "--base-port", str(free_ports(2)),
                  "--database-url", url) as up:  # fmt: skip
        wait_a_moment(up, 2.0)
        os.kill(up.process.pid, signal.SIGINT)
        assert up.finish(timeout=20) == 130
        assert up.leftovers() == [], up.output
    clear_line(up.output, "stopped by SIGINT")
    assert "[node-" not in up.output  # it was still migrating


def wait_a_moment(launched: Launched, seconds: float) -> None:
    try:
        launched.process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return
    raise AssertionError(f"ended early:\n{launched.output}")


# --- a bug: the last-resort guard in main() -------------------------------------------------

INJECT = (
    "import sys, balancectl.migrations as m\n"
    "def broken(url): raise KeyError('injected failure')\n"
    "m.upgrade = broken\n"
    "sys.argv = ['balancectl', 'migrate', '--database-url', sys.argv[1]]\n"
    "from balancectl.cli import main\n"
    "main()\n"
)


def injected(database_url: str, debug: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BALANCECTL_DEBUG"}
    if debug is not None:
        env["BALANCECTL_DEBUG"] = debug
    return subprocess.run([sys.executable, "-c", INJECT, database_url], capture_output=True,
                          text=True, timeout=60, env=env)  # fmt: skip


def test_internal_error_is_one_line_a_hint_and_status_70(database_url: str) -> None:
    done = injected(database_url, None)
    assert done.returncode == 70
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "balancectl: internal error: KeyError: 'injected failure'",
        "(this is a bug; run again with BALANCECTL_DEBUG=1 to see the traceback)",
    ]


def test_internal_error_with_debug_shows_the_traceback(database_url: str) -> None:
    done = injected(database_url, "1")
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "KeyError: 'injected failure'" in done.stderr


# --- boolean options ------------------------------------------------------------------------


def test_help_shows_each_boolean_once_with_its_negation() -> None:
    done = subprocess.run([sys.executable, "-m", "balancectl", "serve", "--help"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert "--no-no-" not in done.stdout
    assert "--scheduler" in done.stdout and "--no-scheduler" in done.stdout
    assert "--prepare" in done.stdout and "--no-prepare" in done.stdout
    assert "BALANCECTL_SCHEDULER" in done.stdout and "BALANCECTL_PREPARE" in done.stdout
    assert "BALANCECTL_NO_SCHEDULER=1" in done.stdout and "BALANCECTL_NO_PREPARE=1" in done.stdout


BOOLEAN_CASES = {
    "defaults": ([], {}, (True, True)),
    "flags-off": (["--no-scheduler", "--no-prepare"], {}, (False, False)),
    "flags-on": (["--scheduler", "--prepare"], {}, (True, True)),
    "env-off": ([], {"BALANCECTL_SCHEDULER": "0", "BALANCECTL_PREPARE": "false"}, (False, False)),
    "older-env-off": (
        [],
        {"BALANCECTL_NO_SCHEDULER": "1", "BALANCECTL_NO_PREPARE": "1"},
        (False, False),
    ),
    "older-env-no": ([], {"BALANCECTL_NO_SCHEDULER": "0"}, (True, True)),
    "flag-beats-older-env": (["--scheduler"], {"BALANCECTL_NO_SCHEDULER": "1"}, (True, True)),
    "env-beats-older-env": (
        [],
        {"BALANCECTL_SCHEDULER": "1", "BALANCECTL_NO_SCHEDULER": "1"},
        (True, True),
    ),
}


@pytest.mark.parametrize(
    ("args", "env", "expected"), BOOLEAN_CASES.values(), ids=list(BOOLEAN_CASES)
)
def test_boolean_options_and_their_env_vars(
    args: list[str], env: dict[str, str], expected: tuple[bool, bool],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """What ``serve`` hands the node, parsed by the real command (the node is not run)."""
    import balancectl.node

    seen: list[NodeSettings] = []
    monkeypatch.setattr(balancectl.node, "serve", lambda settings, *_, **__: seen.append(settings))
    monkeypatch.setattr(balancectl.node, "configure_logging", lambda *_: None)
    for name in ("SCHEDULER", "PREPARE", "NO_SCHEDULER", "NO_PREPARE"):
        monkeypatch.delenv(f"BALANCECTL_{name}", raising=False)
    result = CliRunner().invoke(
        cli.app, ["serve", "--database-url", "postgresql://x@127.0.0.1/x", *args], env=env
    )
    assert result.exit_code == 0, result.output
    assert (seen[0].scheduler.enabled, seen[0].pool.prepared_statements) == expected


# --- copyable output --------------------------------------------------------------------------


def test_embedded_url_is_printed_whole_at_any_width(tmp_path: Path) -> None:
    """At 40 columns the URL is still one line, and it works when pasted."""
    from balancectl.toolkit.embedded import stop_embedded

    env = {"XDG_DATA_HOME": str(tmp_path), "BALANCECTL_DATABASE_URL": "", "COLUMNS": "40"}
    try:
        status, output = run("migrate", env=env)
        assert status == 0, output
        line = next(line for line in output.splitlines() if "embedded PostgreSQL" in line)
        url = line.split("embedded PostgreSQL: ", 1)[1].strip()
        assert sql(url, "SELECT balance FROM users WHERE id = 1") == [(10000,)]
    finally:
        stop_embedded(tmp_path / "balancectl" / "pgdata")


def test_verdict_table_fits_80_columns_with_every_value_whole() -> None:
    from rich.console import Console

    from balancectl.toolkit.loadtest import LatencyStats, LoadtestReport, build_verdict_table, judge

    outcomes = ["ok"] * 4990 + ["error:ClientConnectorError"] * 7 + ["http-503"] * 3
    verdict = judge(10000, 2, 10000, outcomes + ["insufficient"] * 5000, 9980)
    report = LoadtestReport(
        verdict=verdict, latency=LatencyStats(1234.5, 2345.6, 3456.7, 4567.8),
        wall_seconds=12.34, requests_per_second=810.4, urls=("http://127.0.0.1:8000",) * 5,
        user_id=1, idempotent=True, retries=12, replayed=3, open_files_limit=1024,
        open_files_needed=10064, open_files_note="too low",
    )  # fmt: skip
    console = Console(width=80, record=True)
    console.print(build_verdict_table(report))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    for value in ("error:ClientConnectorError", ">= 10064", "4567.8 ms", "balance never negative"):
        assert value in text, text
