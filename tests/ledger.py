"""Checks of user 1's balance against its ledger, shared by the burst tests."""

from __future__ import annotations

from itertools import accumulate

from tests.conftest import sql


def balance_in_database(url: str) -> int:
    return int(sql(url, "SELECT balance FROM users WHERE id = 1")[0][0])


def assert_ledger_adds_up(url: str) -> None:
    """User 1's ledger, in the order it was written, is a running sum ending at the balance."""
    rows = sql(url, "SELECT amount, balance_after FROM ledger WHERE user_id = 1 ORDER BY id")
    amounts = [int(amount) for amount, _ in rows]
    assert [int(after) for _, after in rows] == list(accumulate(amounts))
    assert min(int(after) for _, after in rows) >= 0
    assert sum(amounts) == balance_in_database(url)
