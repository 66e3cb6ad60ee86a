"""Checks of user 1's balance against its ledger, shared by the burst tests."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

from balancectl.toolkit.loadtest import LoadtestReport
from tests.conftest import sql
from tests.processes import http_json


def balance_in_database(url: str) -> int:
    return int(sql(url, "SELECT balance FROM users WHERE id = 1")[0][0])


def assert_ledger_adds_up(url: str) -> None:
    """User 1's ledger, in the order it was written, is a running sum ending at the balance."""
    rows = sql(url, "SELECT amount, balance_after FROM ledger WHERE user_id = 1 ORDER BY id")
    amounts = [int(amount) for amount, _ in rows]
    assert [int(after) for _, after in rows] == list(accumulate(amounts))
    assert min(int(after) for _, after in rows) >= 0
    assert sum(amounts) == balance_in_database(url)


def assert_burst_exact(report: LoadtestReport, database_url: str, urls: Sequence[str]) -> None:
    """A burst of 10,000 debits of 2 on 10,000 was exact: 5,000 applied, 5,000 refused, the
    balance 0 in the database, in the ledger and on every node."""
    verdict = report.verdict
    assert report.passed, verdict.failures
    assert (verdict.start_balance, verdict.successes, verdict.insufficient) == (10000, 5000, 5000)
    assert verdict.other_outcomes == {} and verdict.final_balance == 0
    debits = sql(database_url, "SELECT count(*), sum(amount) FROM ledger WHERE amount < 0")
    assert debits == [(5000, -2 * 5000)]
    assert sql(database_url, "SELECT balance FROM users WHERE id = 1") == [(0,)]
    assert sql(database_url, "SELECT sum(amount) FROM ledger WHERE user_id = 1") == [(0,)]
    for url in urls:
        assert http_json(f"{url}/users/1") == (200, {"userId": 1, "balance": 0})
