"""The balance change called directly (no HTTP, no process) on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from balancectl import balance
from balancectl.config import PoolSettings
from balancectl.db import Database
from tests.conftest import open_database, sql
from tests.ledger import assert_ledger_adds_up


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    async with open_database(database_url, PoolSettings(min_size=1, max_size=5)) as database:
        yield database


async def test_concurrent_debits_on_one_row_are_exact(db: Database, database_url: str) -> None:
    sql(database_url, "UPDATE users SET balance = 100 WHERE id = 1")
    sql(database_url, "UPDATE ledger SET amount = 100, balance_after = 100 WHERE user_id = 1")
    outcomes = await asyncio.gather(*(balance.change_balance(db, 1, -2) for _ in range(120)))
    assert Counter(o.status for o in outcomes) == {200: 50, 409: 70}
    assert all(o.body["balance"] < 2 for o in outcomes if o.status == 409)
    assert sorted(o.body["balance"] for o in outcomes if o.status == 200) == list(range(0, 100, 2))
    assert_ledger_adds_up(database_url)


async def test_outcomes_of_each_kind(db: Database) -> None:
    assert (await balance.change_balance(db, 1, 5)).body == {
        "userId": 1, "balance": 10005, "amount": 5,
    }  # fmt: skip
    refused = await balance.change_balance(db, 1, -10006)
    assert (refused.status, refused.body["balance"]) == (409, 10005)
    missing = await balance.change_balance(db, 7, 5)
    assert (missing.status, missing.body["type"]) == (404, "urn:balancectl:problem:user-not-found")
    overflow = await balance.change_balance(db, 1, 2**63 - 10005 + 1)
    assert overflow.body["type"] == "urn:balancectl:problem:balance-overflow"


async def test_the_same_key_from_many_callers_applies_once(db: Database, database_url: str) -> None:
    outcomes = await asyncio.gather(
        *(balance.change_balance_once(db, 1, -7, "one-key") for _ in range(20))
    )
    assert {o.status for o in outcomes} == {200}
    assert {o.body["balance"] for o in outcomes} == {9993}
    assert sum(not o.replayed for o in outcomes) == 1
    assert sql(database_url, "SELECT count(*) FROM ledger WHERE idempotency_key = 'one-key'") == [
        (1,)
    ]
