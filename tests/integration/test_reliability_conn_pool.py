"""The request pool tells load from failure, and sets what the balance change relies on.

- a wait for a connection that times out while statements keep answering is load: it is
  a 503 ``not-applied`` for that request, and the next request still waits the full pool
  timeout (not the 1 s of a failing database, which turned a burst into a storm of 503s);
- a request refused because too many already wait (``TooManyRequests``) sent nothing:
  ``not-applied``, not ``unknown``;
- the balance change relies on READ COMMITTED (a concurrent change re-reads the row and
  applies): it is set on every connection, so a database whose default is REPEATABLE
  READ still applies every concurrent debit instead of failing them with serialization
  errors.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import pytest

from balancectl import balance
from balancectl.config import PoolSettings
from balancectl.db import Database
from balancectl.errors import Unavailable
from tests.conftest import open_database, sql


async def hold(db: Database, seconds: float) -> float:
    """One session that runs for ``seconds``; the seconds it waited for its connection."""
    asked = time.monotonic()
    async with db.session() as session:
        waited = time.monotonic() - asked
        await session.command(f"SELECT pg_sleep({seconds})")
    return waited


async def test_a_pool_timeout_caused_by_load_keeps_the_full_wait(database_url: str) -> None:
    settings = PoolSettings(min_size=1, max_size=1, timeout=2.5)
    async with open_database(database_url, settings) as db:
        # Four one-second sessions on one connection: the fourth waits past 2.5 s.
        burst = [asyncio.create_task(hold(db, 1.0)) for _ in range(4)]
        done, _ = await asyncio.wait(burst, return_when=asyncio.FIRST_EXCEPTION)
        refused = [task.exception() for task in done if task.exception() is not None]
        assert len(refused) == 1 and isinstance(refused[0], Unavailable), refused
        assert refused[0].extensions["outcome"] == "not-applied", refused[0].extensions
        # The database answered all along: the next requests still queue up to 2.5 s.
        behind = asyncio.create_task(hold(db, 1.0))
        await asyncio.sleep(0.05)
        last = asyncio.create_task(hold(db, 0.0))
        waits = await asyncio.gather(*burst[:3], behind, last, return_exceptions=True)
    print(f"\nwaits after a load timeout: {waits}")
    assert not [wait for wait in waits if isinstance(wait, BaseException)], waits
    last_wait = waits[-1]
    assert isinstance(last_wait, float) and 1.0 < last_wait < 2.5, waits  # over a failing 1 s


async def test_too_many_waiting_requests_sent_nothing(database_url: str) -> None:
    settings = PoolSettings(min_size=1, max_size=1, max_waiting=1)
    async with open_database(database_url, settings) as db:
        holder = asyncio.create_task(hold(db, 1.0))
        await asyncio.sleep(0.2)
        waiter = asyncio.create_task(hold(db, 0.0))
        await asyncio.sleep(0.2)
        with pytest.raises(Unavailable) as refused:
            await hold(db, 0.0)
        await asyncio.gather(holder, waiter)
    assert refused.value.extensions["outcome"] == "not-applied", refused.value.extensions
    assert "nothing was sent" in str(refused.value)


@pytest.fixture
def repeatable_read_database(database_url: str) -> str:
    """The test's database, with REPEATABLE READ as its default isolation level."""
    name = urlsplit(database_url).path.lstrip("/")
    sql(
        database_url,
        f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'repeatable read'",
    )
    return database_url


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
async def test_concurrent_debits_apply_under_a_repeatable_read_default(
    repeatable_read_database: str, keyed: bool
) -> None:
    debits = 40

    async def debit(n: int) -> int:
        if keyed:
            stored = await balance.change_balance_once(db, 1, -1, f"rr-{n}")
            return stored.status
        await balance.change_balance(db, 1, -1)
        return 200

    async with open_database(repeatable_read_database, PoolSettings(max_size=5)) as db:
        outcomes = await asyncio.gather(*(debit(n) for n in range(debits)), return_exceptions=True)
    refused = [outcome for outcome in outcomes if outcome != 200]
    assert refused == [], refused[:3]
    assert sql(repeatable_read_database, "SELECT balance FROM users WHERE id = 1") == [
        (10000 - debits,)
    ]
