"""``register_jobs`` is one statement: no lock on a job row is held across round trips.

Before, a node's start registered its jobs in a transaction of one statement per job,
each locking its row until ``COMMIT``: a node stalled or cut off between two of them
held every row it had written so far. Counted at the wire (a TCP proxy that counts what
the client sends): registering five jobs is one round trip, and every job is there.
"""

from __future__ import annotations

import asyncio

from balancectl.config import PoolSettings
from balancectl.db import Database
from balancectl.scheduler import SchedulerStore
from balancectl.scheduler.registry import parse_jobs
from tests.conftest import sql
from tests.faults import TcpProxy, server_address, through

TABLE = '[[jobs]]\nname = "job-{}"\nfunction = "balancectl.jobs.builtin:idle"\ninterval = "1h"\n'


class CountingProxy(TcpProxy):
    """A ``TcpProxy`` that counts the chunks the client sends to the server."""

    sent = 0

    async def _to_server(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        original = reader.read

        async def counted(n: int = -1) -> bytes:
            data = await original(n)
            self.sent += 1 if data else 0
            return data

        reader.read = counted  # type: ignore[method-assign]
        await super()._to_server(reader, writer)


async def register_through(proxy: CountingProxy, url: str) -> int:
    db = Database(through(url, proxy), PoolSettings(min_size=1, max_size=1))
    await db.open(wait=True)
    try:
        await db.fetch_one("database_now")  # the connection is set up; count from here
        before = proxy.sent
        specs = parse_jobs("\n".join(TABLE.format(n) for n in range(5)), "inline")
        await SchedulerStore(db, "n1", 3.0).register_jobs(specs)
        return proxy.sent - before
    finally:
        await db.close()


def test_registering_five_jobs_is_one_round_trip(database_url: str) -> None:
    proxy = CountingProxy(server_address(database_url))
    proxy.start()
    try:
        sent = asyncio.run(register_through(proxy, database_url))
    finally:
        proxy.stop()
    names = [name for (name,) in sql(database_url, "SELECT name FROM jobs ORDER BY name")]
    print(f"\nregistering 5 jobs: {sent} message(s) sent to the server")
    assert names == [f"job-{n}" for n in range(5)]
    assert sent == 1, f"{sent} round trips to register the jobs"
