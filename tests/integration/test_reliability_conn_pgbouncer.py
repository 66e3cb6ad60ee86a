"""The session settings hold where they matter, directly and through PgBouncer.

A transaction-pooling PgBouncer (1.18, ``ignore_startup_parameters = options``) drops
the libpq startup ``options`` that carry the settings to a direct connection; every
transaction repeats them as ``SET LOCAL`` in its ``BEGIN``, so through PgBouncer too:

- a transaction left idle (its node stalled between two statements) while it holds a
  row lock is ended by the server after ``idle_in_transaction_session_timeout`` (1 s),
  and another session gets the lock then, not when the stalled node wakes up;
- inside a transaction the isolation level is READ COMMITTED and the timeouts are set.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager

import psycopg
import pytest

from balancectl.config import PoolSettings
from balancectl.db import Database, begin
from balancectl.errors import Unavailable
from tests.conftest import open_database
from tests.pgbouncer import pgbouncer

IDLE_TIMEOUT = PoolSettings().idle_in_transaction_timeout
SETTINGS = ("transaction_isolation", "lock_timeout", "idle_in_transaction_session_timeout")


@pytest.fixture(params=["direct", "pgbouncer"])
def url(request: pytest.FixtureRequest, database_url: str) -> Iterator[str]:
    """The test database, reached directly or through a transaction-pooling PgBouncer."""
    if request.param == "direct":
        yield database_url
        return
    with pgbouncer(database_url, pool_size=4) as bouncer:
        yield bouncer.url


def database(url: str) -> AbstractAsyncContextManager[Database]:
    return open_database(url, PoolSettings(min_size=1, max_size=2, prepared_statements=False))


def seconds_to_lock_user_1(database_url: str) -> float:
    """Lock user 1's row from a session of our own (waiting at most 5 s for it)."""
    with psycopg.connect(database_url) as connection:
        connection.execute("SET lock_timeout = '5s'")
        began = time.monotonic()
        try:
            connection.execute("SELECT 1 FROM users WHERE id = 1 FOR UPDATE")
        except psycopg.errors.LockNotAvailable:
            return float("inf")
        return time.monotonic() - began


async def test_a_stalled_transaction_gives_up_its_row_lock(url: str, database_url: str) -> None:
    async with database(url) as db:
        with pytest.raises(Unavailable):  # COMMIT finds the transaction ended by the server
            async with db.transaction() as tx:
                await tx.command("SELECT 1 FROM users WHERE id = 1 FOR UPDATE")
                # This "node" now sends nothing, as if paused, while another session waits.
                waited = await asyncio.to_thread(seconds_to_lock_user_1, database_url)
                print(f"\nanother session got the row lock after {waited:.2f} s")
                assert waited < IDLE_TIMEOUT + 0.5, waited


async def test_a_transaction_runs_under_the_session_settings(url: str) -> None:
    seen: dict[str, str] = {}
    async with database(url) as db, db.pool.connection() as connection:
        await connection.execute(begin(db.settings))  # what Database.transaction sends
        for name in SETTINGS:
            cursor = await connection.execute(f"SHOW {name}")
            seen[name] = str((await cursor.fetchone() or {}).get(name))
        await connection.execute("ROLLBACK")
    assert seen == {
        "transaction_isolation": "read committed",
        "lock_timeout": "5s",
        "idle_in_transaction_session_timeout": "1s",
    }, seen
