"""``balancectl demo`` as a newcomer runs it: free ports, copyable output, two at once, and a
SIGINT or SIGTERM sent to the demo process alone at each of its steps.

Each demo runs in a session of its own; "no process left behind" counts that session's
processes (every node and whatever a node starts), never names. A smaller burst
(``--requests``) and fewer nodes keep each run short; the mechanism is the same.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest

from tests.conftest import sql
from tests.processes import Launched

STOPPED_WITHIN = 15.0  # seconds from the signal to the demo's exit, every node gone
pytestmark = pytest.mark.slow


def demo(database_url: str, *args: str, columns: int = 80) -> Launched:
    return Launched("demo", "--database-url", database_url, "--nodes", "2", *args,
                    env={"COLUMNS": str(columns)})  # fmt: skip


def ends_with(output: str, text: str) -> None:
    assert "Traceback" not in output, output
    last = [line for line in output.splitlines() if line.strip()][-1]
    assert last.startswith("balancectl: ") and text in last, output


def test_demo_picks_free_ports_says_which_and_prints_them_whole(database_url: str) -> None:
    with demo(database_url, "--requests", "400", "--watch-seconds", "2", columns=40) as run:
        assert run.finish(timeout=300) == 0, run.output
        assert run.leftovers() == [], run.output
    output = run.output
    first, last = map(int, re.search(r"on ports (\d+)\.\.(\d+) \(free ones", output).groups())  # type: ignore[union-attr]
    assert last == first + 1 and first != 8000
    for index, port in enumerate((first, last), start=1):
        assert f"   node-{index} http://127.0.0.1:{port}\n" in output  # whole, at 40 columns
    assert "Load test verdict: PASS" in output
    assert sql(database_url, "SELECT balance FROM users WHERE id = 1") == [(10000 - 2 * 400,)]


def test_two_demos_at_once_on_one_database_both_pass(database_url: str) -> None:
    """They take turns for the burst (both debit user 1), so both verdicts stay exact."""
    runs = [demo(database_url, "--requests", "400", "--watch-seconds", "1") for _ in range(2)]
    try:
        statuses = [run.finish(timeout=300) for run in runs]
        assert statuses == [0, 0], [run.output for run in runs]
        for run in runs:
            assert "Load test verdict: PASS" in run.output
            assert run.leftovers() == [], run.output
    finally:
        for run in runs:
            run.close()
    assert sql(database_url, "SELECT balance FROM users WHERE id = 1") == [(10000 - 2 * 400,)]


def signal_at(run: Launched, marker: str, sig: int, delay: float = 0.3) -> float:
    """Send ``sig`` to the demo process alone once ``marker`` is out; seconds until it ended
    (every process it started is gone by then)."""
    run.wait_for(marker, timeout=180)
    time.sleep(delay)
    sent = time.monotonic()
    os.kill(run.process.pid, sig)
    run.finish(timeout=60)
    took = time.monotonic() - sent
    assert run.leftovers() == [], run.output
    print(f"{signal.Signals(sig).name} after {marker!r}: all stopped in {took:.1f} s")
    return took


STEPS = {
    "starting": ("2. starting", ()),
    "burst": ("3. ", ("--requests", "3000")),
    "live-view": ("4. ", ("--requests", "400", "--watch-seconds", "60")),
}


@pytest.mark.parametrize(("marker", "args"), STEPS.values(), ids=list(STEPS))
def test_sigint_to_the_demo_alone_stops_everything(
    marker: str, args: tuple[str, ...], database_url: str
) -> None:
    with demo(database_url, *args) as run:
        took = signal_at(run, marker, signal.SIGINT)
    assert run.process.returncode == 130, run.output
    assert took < STOPPED_WITHIN, f"{took:.1f} s"
    ends_with(run.output, "stopped by SIGINT")
    if marker == "3. ":
        assert "Load test verdict" not in run.output  # it was stopped during the burst
    assert sql(database_url, "SELECT count(*) FROM nodes WHERE stopped_at IS NULL") == [(0,)]


def test_sigterm_to_the_demo_during_the_burst(database_url: str) -> None:
    with demo(database_url, "--requests", "3000") as run:
        took = signal_at(run, "3. ", signal.SIGTERM)
    assert run.process.returncode == 143, run.output
    assert took < STOPPED_WITHIN, f"{took:.1f} s"
    ends_with(run.output, "stopped by SIGTERM")


def test_sigint_to_the_demo_while_migrating() -> None:
    """A "database" that takes the connection and never answers: the demo stops all the same."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # never accepts: the connection is made, no answer ever comes
        url = f"postgresql://postgres@127.0.0.1:{listener.getsockname()[1]}/nothing"
        with demo(url) as run:
            took = signal_at(run, "1. migrating", signal.SIGINT, delay=1.0)
    assert run.process.returncode == 130, run.output
    assert took < STOPPED_WITHIN, f"{took:.1f} s"
    ends_with(run.output, "stopped by SIGINT")
    assert "2. starting" not in run.output
