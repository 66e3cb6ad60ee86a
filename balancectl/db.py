"""The one caller of the database driver: a psycopg async pool and named queries.

Everything else asks this module for a named statement's rows; a database that
cannot be reached in time surfaces as the domain error ``Unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from balancectl.admission import Admission, AdmissionFull, AdmissionTimeout
from balancectl.config import PoolSettings
from balancectl.errors import BalancectlError, Unavailable
from balancectl.sql.loader import query
from balancectl.wire import fetch_row

Row = dict[str, Any]
FAILING_WAIT = 1.0  # seconds a request waits for a connection while the database fails
# psycopg_pool retries a failed connection with a doubling delay (1, 2, 4, ... 32 s) for
# reconnect_timeout (5 min by default): after a 45 s outage a pool could wait 18 s more
# before it tried again. Giving an attempt up after 2 s lets the next request start a new
# one at once, so a pool is back within about 2 s of the database.
RECONNECT_GIVE_UP = 2.0
# How long a statement past its deadline (or whose caller was cancelled) gets for the
# server's cancel, then for the answer to it, before its connection is cut: a cancel to
# a dead server must not hang the caller (psycopg's own waits are 5 s + 5 s).
CANCEL_WAIT = 0.4
UNKNOWN = "A statement was sent: it may have been applied; retry with the same Idempotency-Key"
# Errors the server reports when it gave up the statement (and so its transaction):
# lock_timeout, statement_timeout, idle_in_transaction_session_timeout, a serialization
# failure, a deadlock. The database answers; nothing was applied.
NOT_APPLIED_STATES = frozenset({"55P03", "57014", "25P03", "40001", "40P01"})
# How long a node's start waits for a pool's first connections before it carries on and
# lets the pool keep trying (a slow server is not a refusal).
OPEN_WAIT = 10.0
# PgBouncer's words when its max_client_conn is reached.
BOUNCER_FULL = "no more connections allowed (max_client_conn)"
# The server's words for SQLSTATE 53300 (too_many_connections), and PgBouncer's: libpq
# reports a refused connection by its message only, without the SQLSTATE.
NO_SLOTS = (
    "too many clients already",
    "too many connections for",
    "remaining connection slots are reserved",
    BOUNCER_FULL,
)
Params = Mapping[str, Any]
T = TypeVar("T")


class Reader(Protocol):
    """What reads named queries: a ``Database`` (each call its own session) or a ``Session``."""

    async def fetch_one(self, name: str, params: Params | None = None) -> Row | None: ...

    async def fetch_all(
        self, name: str, params: Params | None = None, *, prepare: bool | None = None
    ) -> list[Row]: ...


log = logging.getLogger("balancectl.db")


class Session:
    """Named queries on one connection (autocommit, or inside ``Database.transaction``).

    Each statement has a deadline: a connection that stops answering (a cut link)
    gives ``Unavailable`` in time instead of a hang; the query is cancelled behind.
    """

    def __init__(
        self,
        connection: psycopg.AsyncConnection[Row],
        deadline: float,
        health: Health | None = None,
        prepared: bool = True,
    ) -> None:
        self._connection, self._deadline = connection, deadline
        self._health = health or Health()
        self._prepared = prepared

    async def fetch_one(self, name: str, params: Params | None = None) -> Row | None:
        cursor = await self._execute(name, params)
        return await cursor.fetchone()

    async def fetch_row(self, name: str, params: Params) -> Row:
        """The one row of a statement that returns exactly one, of integers, text and JSON,
        straight on libpq (``wire.py``: the balance change's hot path)."""
        row: Row = await self._bounded(fetch_row(self._connection, name, params, self._prepared))
        return row

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
        cursor: psycopg.AsyncCursor[Row] = await self._bounded(
            self._connection.execute(statement, params, prepare=prepare)
        )
        return cursor

    async def _bounded(self, statement: Coroutine[Any, Any, T]) -> T:
        """Run ``statement`` (its task alone, so neither the deadline nor a caller's
        cancellation interrupts the protocol mid-message) within the deadline."""
        running = asyncio.ensure_future(statement)
        try:
            done, _ = await asyncio.wait({running}, timeout=self._deadline)
        except asyncio.CancelledError:
            # The caller gave up (a deadline of its own, a stopping task): so does the server.
            await abandon(self._connection, running)
            raise
        if not done:
            await abandon(self._connection, running)
            raise NoAnswer(
                f"the database did not answer within {self._deadline:g} s. {UNKNOWN}",
                outcome="unknown",
            )
        answer = running.result()
        self._health.answered()
        return answer


async def abandon(connection: psycopg.AsyncConnection[Row], running: asyncio.Future[Any]) -> None:
    """End a statement nobody waits for any more: cancelled on the server, or its link cut.

    The cancel and the wait for its answer are each bounded by ``CANCEL_WAIT``; when the
    server cannot be reached (a silent link) the connection's socket is shut down, so
    psycopg fails the statement at once and the pool discards the connection. The server
    then ends the statement itself, at its ``statement_timeout``.
    """
    running.add_done_callback(retrieve)
    done = False
    try:
        await connection.cancel_safe(timeout=CANCEL_WAIT)
        done = bool((await asyncio.wait({running}, timeout=CANCEL_WAIT))[0])
    except (psycopg.Error, OSError) as error:
        log.debug("cancel not delivered: %s", first_line(error))
    if not done:
        sever(connection)
        done = bool((await asyncio.wait({running}, timeout=CANCEL_WAIT))[0])
    if not done:
        running.cancel()


def sever(connection: psycopg.AsyncConnection[Row]) -> None:
    """Shut the connection's socket down (not close it: psycopg still owns the descriptor)."""
    with contextlib.suppress(OSError, psycopg.Error):
        with socket.socket(fileno=os.dup(connection.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)


def closed_while_idle(connection: psycopg.AsyncConnection[Row]) -> bool:
    """Whether an idle connection's socket says the server is gone: one poll, no round trip.

    An idle connection has nothing to read. If its socket is readable, the server (or a
    proxy) has closed it, reset it, or is closing it with a FATAL error; either way it
    must not carry a statement. A silent link (packets dropped) reads as alive here: the
    statement deadline covers that case.
    """
    if connection.closed or connection.broken:
        return True
    poller = select.poll()
    try:
        poller.register(connection.pgconn.socket, select.POLLIN)
    except psycopg.OperationalError:  # libpq has no socket for it any more
        return True
    return bool(poller.poll(0))


def retrieve(future: asyncio.Future[Any]) -> None:
    """An abandoned statement's outcome is nobody's business: read it, so asyncio is quiet."""
    if not future.cancelled():
        future.exception()


class NoAnswer(Unavailable):
    """A statement got no answer within its deadline: the link or the server is failing."""


class TooManyConnections(Unavailable):
    """The server refused a connection for lack of slots (``max_connections``, a role's or
    a database's connection limit): SQLSTATE 53300."""


class Health:
    """Whether the database answers, told apart from load.

    A wait for a connection that times out means failure only if no statement was
    answered during the wait: under a burst, statements keep answering and a request
    that queued too long is load, not a reason to cut every other request's wait short.
    """

    def __init__(self) -> None:
        self.failing_since: float | None = None
        self.answered_at = float("-inf")

    def answered(self) -> None:
        self.answered_at, self.failing_since = time.monotonic(), None

    def failed(self) -> None:
        self.failing_since = self.failing_since or time.monotonic()

    def answered_since(self, moment: float) -> bool:
        return self.answered_at >= moment


class Database:
    """A pool of autocommit connections; open it in a lifespan, close it on the way out."""

    def __init__(self, url: str, settings: PoolSettings, *, name: str = "balancectl") -> None:
        self.url, self.settings = url, settings
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[Row]] = AsyncConnectionPool(
            url,
            min_size=settings.min_size,
            max_size=settings.max_size,
            timeout=settings.timeout,
            max_waiting=settings.max_waiting,
            reconnect_timeout=RECONNECT_GIVE_UP,
            reconnect_failed=self._gave_up,
            kwargs=connection_kwargs(settings),
            connection_class=psycopg.AsyncConnection[Row],
            name=name,
            open=False,
        )
        self.health = Health()
        self.gave_up_connecting = False
        # Requests queue here, not in the pool: a burst's waiters cost a future each.
        self.admission = Admission(settings.max_size, settings.max_waiting)

    async def open(self, *, wait: bool = False) -> None:
        await self.pool.open(wait=wait, timeout=self.settings.timeout)

    async def close(self, timeout: float = 5.0) -> None:
        """Close the pool, waiting up to ``timeout`` s for its connection attempts to end."""
        await self.pool.close(timeout=timeout)

    async def wait_open(self, bound: float = OPEN_WAIT) -> None:
        """Wait (at most ``bound`` s) for the pool's ``min_size`` connections, at a node's start.

        Raises ``TooManyConnections`` when the server refuses them for lack of slots, so a
        node that cannot open its pools says so instead of serving half-working. Any other
        failure (a server still coming up, a slow link) is left to the pool, which keeps
        connecting as requests ask, as before.
        """
        deadline = time.monotonic() + bound
        while self.pool.get_stats().get("pool_available", 0) < self.settings.min_size:
            if self.gave_up_connecting:
                await self._raise_if_refused()
                return
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.05)

    async def _gave_up(self, pool: object) -> None:
        """psycopg_pool stopped retrying a connection (after ``RECONNECT_GIVE_UP``)."""
        self.gave_up_connecting = True

    async def _raise_if_refused(self) -> None:
        """One connection of our own, to learn the reason psycopg_pool only logged."""
        kwargs = connection_kwargs(self.settings)
        try:
            connection = await psycopg.AsyncConnection.connect(self.url, **kwargs)
        except psycopg.OperationalError as error:
            reason = refusal(error)
            if reason is not None:
                raise TooManyConnections(reason) from error
            return
        await connection.close()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        """One pooled connection in autocommit mode: each statement is its own transaction.

        While the database is failing, waits for a connection are cut short, so
        requests answer 503 at once instead of queueing for the full timeout.
        """
        asked = time.monotonic()
        try:
            async with (
                self.admission.place(self._wait()),
                self._connection(self._wait()) as connection,
            ):
                yield Session(
                    connection,
                    self.settings.statement_timeout,
                    self.health,
                    self.settings.prepared_statements,
                )
        except (PoolTimeout, TooManyRequests, AdmissionTimeout, AdmissionFull) as error:
            timed_out = isinstance(error, PoolTimeout | AdmissionTimeout)
            if timed_out and not self.health.answered_since(asked):
                self.health.failed()
            raise Unavailable(
                f"no database connection in time, nothing was sent: {first_line(error)}",
                outcome="not-applied",
            ) from error
        except psycopg.Error as error:
            unavailable = self._unavailable(error)
            if unavailable is None:
                raise  # our statement was wrong: a bug, not an outage
            raise unavailable from error
        except NoAnswer:
            # A silent link (packets dropped) fails this way, not with a connection error.
            self.health.failed()
            raise

    @asynccontextmanager
    async def _connection(self, timeout: float) -> AsyncIterator[psycopg.AsyncConnection[Row]]:
        """A pooled connection that the server has not closed while it sat idle.

        A restart, a failover or a resetting firewall closes every idle connection of the
        pool at once; each one is discarded here, unused (the pool opens its replacement),
        instead of failing a request with ``503 unknown`` after the database is back. While
        it is still down, the wait for a new connection is the failing database's short one
        (the request is answered ``503 not-applied``, nothing was sent). Not psycopg_pool's
        ``check=``: after a failed check it sleeps 1, 2, 4 ... s before the next connection.
        """
        deadline = time.monotonic() + timeout
        connection = await self.pool.getconn(timeout)
        while closed_while_idle(connection):
            await connection.close()
            await self.pool.putconn(connection)
            # The server may be down: this and every later request wait for a new
            # connection as while it fails, until a statement is answered again.
            self.health.failed()
            deadline = min(deadline, time.monotonic() + FAILING_WAIT)
            connection = await self.pool.getconn(max(0.0, deadline - time.monotonic()))
        try:
            async with connection:
                yield connection
        finally:
            await self.pool.putconn(connection)

    def _unavailable(self, error: psycopg.Error) -> Unavailable | None:
        """The 503 for a driver error, or ``None`` when it says our statement was wrong."""
        if error.sqlstate in NOT_APPLIED_STATES:
            return Unavailable(
                f"the database gave the statement up, nothing was applied: {first_line(error)}",
                outcome="not-applied",
            )
        if not isinstance(error, psycopg.OperationalError):
            return None
        self.health.failed()
        return Unavailable(
            f"the database connection failed: {first_line(error)}. {UNKNOWN}",
            outcome="unknown",
        )

    def _wait(self) -> float:
        if self.health.failing_since is None:
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
            await session.command(begin(self.settings))
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

    async def schema_revision(self) -> str | None:
        """The schema's revision, ``None`` before the first migration (for ``/readyz``)."""
        try:
            row = await self.fetch_one("schema_revision")
        except psycopg.errors.UndefinedTable:
            return None
        return None if row is None else str(row["version_num"])

    def stats(self) -> dict[str, int]:
        """The pool's counters (size, in use, waiting) for ``/metrics``."""
        stats = self.pool.get_stats()
        return {
            "size": stats.get("pool_size", 0),
            "available": stats.get("pool_available", 0),
            "waiting": stats.get("requests_waiting", 0) + self.admission.waiting,
        }


@dataclass(frozen=True)
class ServerFacts:
    """What a node reads of the database before it starts; ``None`` for what it could not."""

    schema_revision: str | None  # also None before the first migration
    max_connections: int | None  # behind PgBouncer, the server's: named in a refused node's line


def server_facts(url: str) -> ServerFacts:
    """The schema's revision and the server's ``max_connections``, read on one connection of
    its own (a node's start opens one, not one per value); a database that cannot answer
    now has neither (a node then leaves it to Alembic, which waits for the server)."""
    try:
        with psycopg.connect(url, autocommit=True, prepare_threshold=None, **link_bounds()) as conn:
            revision = first_value(conn, "schema_revision")
            limit = first_value(conn, "max_connections")
    except psycopg.Error:
        return ServerFacts(None, None)
    return ServerFacts(
        None if revision is None else str(revision), None if limit is None else int(limit)
    )


def first_value(conn: psycopg.Connection[Any], name: str) -> Any:
    """The first column of query ``name``'s first row; ``None`` when there is none or the
    query fails (no ``alembic_version`` table yet). A broken link still raises."""
    try:
        row = conn.execute(query(name)).fetchone()
    except psycopg.Error:
        if conn.closed:
            raise
        return None
    return None if row is None else row[0]


def session_settings(settings: PoolSettings) -> dict[str, str]:
    """The server settings every statement runs under (milliseconds for the timeouts)."""
    return {
        "default_transaction_isolation": "read committed",  # what the balance change relies on
        "statement_timeout": milliseconds(settings.statement_timeout),
        "lock_timeout": milliseconds(settings.lock_timeout),
        "idle_in_transaction_session_timeout": milliseconds(settings.idle_in_transaction_timeout),
    }


def begin(settings: PoolSettings) -> str:
    """``BEGIN`` with the session settings made ``LOCAL``, in one message (no round trip more).

    A transaction-pooling PgBouncer drops or refuses startup ``options``, but a transaction
    stays on one server connection, so these hold there too: a stalled node's open
    transaction is ended by the server, whatever sits between.
    """
    values = session_settings(settings)
    isolation = values.pop("default_transaction_isolation").upper()
    local = "".join(f"; SET LOCAL {name} = {value}" for name, value in values.items())
    return f"BEGIN ISOLATION LEVEL {isolation}{local}"


def startup_options(settings: PoolSettings) -> str:
    """libpq ``options``: the session settings, set by the server as the connection starts."""
    values = session_settings(settings)
    # A space inside a value is escaped with a backslash in libpq's options.
    escaped = {name: value.replace(" ", "\\ ") for name, value in values.items()}
    return " ".join(f"-c {name}={value}" for name, value in escaped.items())


def link_bounds(link_timeout: float = 5.0) -> dict[str, Any]:
    """Every connection's bounds: it is set up within 5 s, or fails (a server that accepts
    and then says nothing, a DROP rule), and a link gone silent fails in ``link_timeout`` s."""
    return {"connect_timeout": 5, **keepalive_kwargs(link_timeout)}


def keepalive_kwargs(link_timeout: float) -> dict[str, int]:
    """TCP keepalives and ``tcp_user_timeout``: a silent link fails in ``link_timeout`` s."""
    idle = max(1, int(link_timeout / 2))
    return {
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": 1,
        "keepalives_count": max(1, round(link_timeout) - idle),
        "tcp_user_timeout": int(link_timeout * 1000),  # unacknowledged data, in milliseconds
    }


def milliseconds(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))


def connection_kwargs(settings: PoolSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "row_factory": dict_row,
        "options": startup_options(settings),
        **link_bounds(settings.link_timeout),
    }
    if not settings.prepared_statements:
        # Behind a transaction-pooling PgBouncer older than 1.21, server-side
        # prepared statements would land on other server connections.
        kwargs["prepare_threshold"] = None
    return kwargs


def refusal(error: BaseException | None) -> str | None:
    """The server's words when it refused a connection for lack of slots, else ``None``
    (``error`` a psycopg error, or one that wraps it: SQLAlchemy's, the migration's)."""
    while error is not None and not isinstance(error, psycopg.OperationalError):
        error = error.__cause__ or getattr(error, "orig", None)
    if error is None:
        return None
    text = str(error)
    if not any(words in text for words in NO_SLOTS):
        return None
    _, _, said = text.rpartition("FATAL:")  # libpq: 'connection to server ... failed: FATAL:  ...'
    return said.strip().splitlines()[0]


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
