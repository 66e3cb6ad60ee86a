"""Pooled connections that the server (or something on the way) closed while they sat idle.

A database restart, a failover or a firewall that resets connections closes every idle
connection of a pool at once. Such a connection says so on its socket (end of file or a
reset) before anyone uses it, so the pool must never hand it to a request: the request
after the link heals is answered, not failed with ``503 unknown``. The link is a real TCP
proxy (``tests.faults.TcpProxy``) in front of the real server; nothing is mocked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from balancectl.config import PoolSettings
from balancectl.db import Database
from tests.faults import TcpProxy, proxied, through

POOL = 4


@pytest.fixture
def proxy(database_url: str) -> Iterator[TcpProxy]:
    with proxied(database_url) as running:
        yield running


@pytest.fixture
async def db(database_url: str, proxy: TcpProxy) -> AsyncIterator[Database]:
    url = through(database_url, proxy)
    database = Database(url, PoolSettings(min_size=POOL, max_size=POOL))
    await database.open(wait=True)
    try:
        yield database
    finally:
        await database.close()


async def busy_statements(db: Database, count: int) -> None:
    """``count`` statements at once, so that every pooled connection has served one."""

    async def sleep_briefly() -> None:
        async with db.session() as session:
            await session.command("SELECT pg_sleep(0.05)")

    await asyncio.gather(*(sleep_briefly() for _ in range(count)))


async def test_connections_reset_while_idle_are_never_handed_out(
    db: Database, proxy: TcpProxy
) -> None:
    await busy_statements(db, POOL)
    proxy.cut("reject")  # every connection through the proxy is reset
    proxy.restore()  # and the link is back before any request comes
    await asyncio.sleep(0.2)  # the resets have reached the node's sockets
    answers = [await db.fetch_one("database_now") for _ in range(2 * POOL)]
    assert all(answer is not None for answer in answers)
    async with db.transaction() as session:  # the transaction path checks out the same way
        assert await session.fetch_one("database_now") is not None


async def test_a_pool_whose_connections_were_all_reset_serves_a_burst(
    db: Database, proxy: TcpProxy
) -> None:
    await busy_statements(db, POOL)
    proxy.cut("reject")
    proxy.restore()
    await asyncio.sleep(0.2)
    answers = await asyncio.gather(*(db.fetch_one("database_now") for _ in range(4 * POOL)))
    assert all(answer is not None for answer in answers)
