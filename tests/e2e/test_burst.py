"""The proof: 10,000 debits of 2 fired at once on a balance of 10,000, against real nodes.

Exactly 5,000 must succeed and 5,000 be refused as insufficient funds, nothing else; the
balance ends at 0 (asked over HTTP of every node and read from the database), and the
ledger holds one row of -2 per success and still adds up to the balance. Each cluster
size runs the burst twice, the second after the load tester's reset to 10,000.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from balancectl.toolkit.loadtest import LoadtestConfig, LoadtestReport, run_loadtest
from tests.conftest import sql
from tests.ledger import assert_ledger_adds_up, balance_in_database
from tests.processes import ClusterFactory, http_json

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 10000
AMOUNT = 2
START = 10000
# Five nodes with their schedulers hold up to 65 connections; without, 50. The scheduler
# is proven elsewhere, and the margin keeps the burst clear of PostgreSQL's 100.
CLUSTER_ARGS = ("--no-scheduler",)


def last_ledger_id(url: str) -> int:
    return int(sql(url, "SELECT coalesce(max(id), 0) FROM ledger")[0][0])


def amounts_since(url: str, ledger_id: int) -> Counter[int]:
    rows = sql(url, "SELECT amount FROM ledger WHERE user_id = 1 AND id > %s", (ledger_id,))
    return Counter(int(amount) for (amount,) in rows)


def assert_burst_exact(report: LoadtestReport, nodes: int) -> None:
    verdict = report.verdict
    assert report.passed, verdict.failures
    assert report.url_count == nodes
    assert verdict.start_balance == START
    assert (verdict.successes, verdict.insufficient) == (5000, 5000)
    assert verdict.other_outcomes == {}
    assert verdict.final_balance == 0


@pytest.mark.parametrize("nodes", [1, 5])
async def test_ten_thousand_debits_twice(
    cluster_factory: ClusterFactory, database_url: str, nodes: int
) -> None:
    cluster = cluster_factory(nodes, *CLUSTER_ARGS)
    config = LoadtestConfig(
        urls=tuple(cluster.urls), requests=REQUESTS, amount=AMOUNT, reset=START, progress=False
    )

    for _ in range(2):
        balance_before, ledger_before = (
            balance_in_database(database_url),
            last_ledger_id(database_url),
        )

        report = await run_loadtest(config)

        assert_burst_exact(report, nodes)
        for url in cluster.urls:
            assert http_json(f"{url}/users/1") == (200, {"userId": 1, "balance": 0})
        assert balance_in_database(database_url) == 0
        reset = Counter({START - balance_before: 1}) if balance_before != START else Counter()
        assert amounts_since(database_url, ledger_before) == Counter({-AMOUNT: 5000}) + reset
        assert_ledger_adds_up(database_url)


def loadtest_command(urls: list[str], json_out: Path, requests: int, reset: int) -> list[str]:
    command = [sys.executable, "-m", "balancectl", "loadtest"]
    for url in urls:
        command += ["--url", url]
    return [
        *command,
        "--requests", str(requests), "--amount", str(AMOUNT), "--reset", str(reset),
        "--json", str(json_out), "--no-progress",
    ]  # fmt: skip


def test_command_line_passes_and_writes_the_report(
    cluster_factory: ClusterFactory, database_url: str, tmp_path: Path
) -> None:
    cluster = cluster_factory(5, *CLUSTER_ARGS)
    json_out = tmp_path / "report.json"

    done = subprocess.run(
        loadtest_command(cluster.urls, json_out, REQUESTS, START),
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS" in done.stdout and "FAIL" not in done.stdout
    report = json.loads(json_out.read_text())
    assert report["passed"] is True and report["failures"] == []
    assert (report["successes"], report["insufficient"], report["other_outcomes"]) == (
        5000,
        5000,
        {},
    )
    assert (report["start_balance"], report["final_balance"], report["url_count"]) == (START, 0, 5)
    assert balance_in_database(database_url) == 0
    assert amounts_since(database_url, 0)[-AMOUNT] == 5000
    assert_ledger_adds_up(database_url)


def test_command_line_fails_when_the_balance_moves_under_it(
    cluster_factory: ClusterFactory, database_url: str, tmp_path: Path
) -> None:
    """Someone else credits the user during the burst: the arithmetic no longer holds, exit 1."""
    cluster = cluster_factory(1, *CLUSTER_ARGS)
    json_out = tmp_path / "report.json"
    requests, start = 4000, 2000
    loadtest = subprocess.Popen(
        loadtest_command(cluster.urls, json_out, requests, start),
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_first_debit(database_url, loadtest)
        credit_behind_the_service(database_url, 1000)
        stdout, stderr = loadtest.communicate(timeout=300)
    finally:
        loadtest.kill()

    assert loadtest.returncode == 1, stdout + stderr
    assert "FAIL" in stdout
    report = json.loads(json_out.read_text())
    assert report["passed"] is False
    assert report["start_balance"] == start
    assert any(line.startswith("final balance:") for line in report["failures"]), report
    # The service itself stayed exact: every debit it accepted is in the ledger.
    assert balance_in_database(database_url) == start + 1000 - AMOUNT * report["successes"]
    assert_ledger_adds_up(database_url)


def wait_for_first_debit(url: str, loadtest: subprocess.Popen[str]) -> None:
    """Until the burst's first debit of 2 is in the ledger (so the start balance is read)."""
    deadline = time.monotonic() + 120
    while not sql(url, "SELECT 1 FROM ledger WHERE amount = %s LIMIT 1", (-AMOUNT,)):
        assert loadtest.poll() is None, "the load test ended before its burst began"
        assert time.monotonic() < deadline, "no debit reached the ledger"
        time.sleep(0.01)


def credit_behind_the_service(url: str, amount: int) -> None:
    """A credit written straight into the database, with its ledger row (the audit holds)."""
    sql(
        url,
        "WITH changed AS (UPDATE users SET balance = balance + %(amount)s WHERE id = 1"
        " RETURNING balance) INSERT INTO ledger (user_id, amount, balance_after)"
        " SELECT 1, %(amount)s, balance FROM changed",
        {"amount": amount},
    )
