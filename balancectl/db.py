"""The one caller of the database driver: a psycopg async pool and named queries.

Everything else asks this module for a named statement's rows; a database that
cannot be reached in time surfaces as the domain error ``Unavailable``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from balancectl.config import PoolSettings
from balancectl.errors import BalancectlError, Unavailable
from balancectl.queries import query

Row = dict[str, Any]
FAILING_WAIT = 1.0  # seconds a request waits for a connection while the database fails
# psycopg_pool retries a failed connection with a doubling delay (1, 2, 4, ... 32 s) for
# reconnect_timeout (5 min by default): after a 45 s outage a pool could wait 18 s more
# before it tried again. Giving an attempt up after 2 s lets the next request start a new
# one at once, so a pool is back within about 2 s of the database.
RECONNECT_GIVE_UP = 2.0
UNKNOWN = "A statement was sent: it may have been applied; retry with the same Idempotency-Key"
Params = Mapping[str, Any]


class Session:
    """Named queries on one connection (autocommit, or inside ``Database.transaction``).

    Each statement has a deadline: a connection that stops answering (a cut link)
    gives ``Unavailable`` in time instead of a hang; the query is cancelled behind.
    """

    def __init__(self, connection: psycopg.AsyncConnection[Row], deadline: float) -> None:
        self._connection, self._deadline = connection, deadline

    async def fetch_one(self, name: str, params: Params | None = None) -> Row | None:
        cursor = await self._execute(name, params)
        return await cursor.fetchone()

    async def fetch_all(
        self, name: str, params: Params | None = None, *, prepare: bool | None = None
    ) -> list[Row]:
        cursor = await self._execute(name, params, prepare)
        return await cursor.fetchall()

    async def execute(self, name: str, params: Params | None = None) -> int:
        cursor = await self._execute(name, params)
        return cursor.rowcount

    async def command(self, statement: str) -> None:
        """A transaction-control statement (``BEGIN``, ``COMMIT``) under the same deadline."""
        await self._run(statement, None, prepare=False)

    async def _execute(
        self, name: str, params: Params | None, prepare: bool | None = None
    ) -> psycopg.AsyncCursor[Row]:
        return await self._run(query(name), params, prepare)

    async def _run(
        self, statement: str, params: Params | None, prepare: bool | None
    ) -> psycopg.AsyncCursor[Row]:
        running = asyncio.ensure_future(
            self._connection.execute(statement, params, prepare=prepare)
        )
        done, _ = await asyncio.wait({running}, timeout=self._deadline)
        if not done:
            running.cancel()  # psycopg cancels the query server-side, in the background
            raise NoAnswer(
                f"the database did not answer within {self._deadline:g} s. {UNKNOWN}",
                outcome="unknown",
            )
        return running.result()


class NoAnswer(Unavailable):
    """A statement got no answer within its deadline: the link or the server is failing."""


class Database:
    """A pool of autocommit connections; open it in a lifespan, close it on the way out."""

    def __init__(self, url: str, settings: PoolSettings, *, name: str = "balancectl") -> None:
        self.settings = settings
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[Row]] = AsyncConnectionPool(
            url,
            min_size=settings.min_size,
            max_size=settings.max_size,
            timeout=settings.timeout,
            max_waiting=settings.max_waiting,
            reconnect_timeout=RECONNECT_GIVE_UP,
            kwargs=connection_kwargs(settings),
            connection_class=psycopg.AsyncConnection[Row],
            name=name,
            open=False,
        )
        self._failing_since: float | None = None

    async def open(self, *, wait: bool = False) -> None:
        await self.pool.open(wait=wait, timeout=self.settings.timeout)

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        """One pooled connection in autocommit mode: each statement is its own transaction.

        While the database is failing, waits for a connection are cut short, so
        requests answer 503 at once instead of queueing for the full timeout.
        """
        try:
            async with self.pool.connection(timeout=self._wait()) as connection:
                yield Session(connection, self.settings.statement_timeout)
        except PoolTimeout as error:
            self._failing_since = self._failing_since or time.monotonic()
            raise Unavailable(
                f"no database connection in time, nothing was sent: {first_line(error)}",
                outcome="not-applied",
            ) from error
        except psycopg.OperationalError as error:
            self._failing_since = self._failing_since or time.monotonic()
            raise Unavailable(
                f"the database connection failed: {first_line(error)}. {UNKNOWN}",
                outcome="unknown",
            ) from error
        except NoAnswer:
            # A silent link (packets dropped) fails this way, not with a connection error.
            self._failing_since = self._failing_since or time.monotonic()
            raise
        self._failing_since = None

    def _wait(self) -> float:
        if self._failing_since is None:
            return self.settings.timeout
        return min(self.settings.timeout, FAILING_WAIT)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Session]:
        """One pooled connection inside one transaction, committed on a clean exit.

        ``BEGIN``, ``COMMIT`` and ``ROLLBACK`` run under the statement deadline like every
        statement, so a silent link answers 503 in time here too. A domain error (a reused
        key) rolls back here; after a database failure the pool discards or resets the
        connection.
        """
        async with self.session() as session:
            await session.command("BEGIN")
            try:
                yield session
            except BalancectlError as error:
                if not isinstance(error, Unavailable):
                    await session.command("ROLLBACK")
                raise
            await session.command("COMMIT")

    async def fetch_one(self, name: str, params: Params | None = None) -> Row | None:
        async with self.session() as session:
            return await session.fetch_one(name, params)

    async def fetch_all(
        self, name: str, params: Params | None = None, *, prepare: bool | None = None
    ) -> list[Row]:
        async with self.session() as session:
            return await session.fetch_all(name, params, prepare=prepare)

    async def execute(self, name: str, params: Params | None = None) -> int:
        async with self.session() as session:
            return await session.execute(name, params)

    def stats(self) -> dict[str, int]:
        """The pool's counters (size, in use, waiting) for ``/metrics``."""
        stats = self.pool.get_stats()
        return {
            "size": stats.get("pool_size", 0),
            "available": stats.get("pool_available", 0),
            "waiting": stats.get("requests_waiting", 0),
        }


def connection_kwargs(settings: PoolSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"autocommit": True, "row_factory": dict_row, "connect_timeout": 5}
    if not settings.prepared_statements:
        # Behind a transaction-pooling PgBouncer older than 1.21, server-side
        # prepared statements would land on other server connections.
        kwargs["prepare_threshold"] = None
    return kwargs


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
