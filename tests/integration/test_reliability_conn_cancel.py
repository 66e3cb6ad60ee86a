"""A statement nobody waits for any more ends on the server, in bounded time.

- the caller's task is cancelled: the statement is cancelled on the server within 1 s
  (``pg_stat_activity`` no longer shows it running), not left to run to its end;
- the statement misses its deadline: the caller gets ``NoAnswer`` at the deadline and
  the server no longer runs it within 1 s after;
- the link goes silent (a DROP rule) mid-statement: the cancel cannot reach the server,
  yet the caller has its 503 within the deadline + 1 s (psycopg alone waits 5 s for the
  cancel and 5 s more for the statement), and the server ends the statement itself at
  its ``statement_timeout``; the pool serves again once the link returns.

Every connection carries the server settings and TCP keepalives that make this hold.
"""

from __future__ import annotations

import asyncio
import socket
import time
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from balancectl.config import PoolSettings
from balancectl.db import Database
from balancectl.errors import Unavailable
from tests.conftest import open_database, sql
from tests.faults import proxied, through

GONE_WITHIN = 1.0  # seconds for the server to stop a statement after its caller gave up
PROBE = "SELECT pg_sleep(30) /* cancel-probe */"


def database(url: str, statement_timeout: float) -> AbstractAsyncContextManager[Database]:
    return open_database(
        url, PoolSettings(min_size=1, max_size=1, statement_timeout=statement_timeout)
    )


def probes_running(database_url: str) -> int:
    [(count,)] = sql(
        database_url,
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = %s",
        (PROBE,),
    )
    return int(count)


async def wait_probe(database_url: str, running: bool, timeout: float) -> float:
    """Seconds until the probe statement is (or is no longer) running on the server."""
    began = time.monotonic()
    while (probes_running(database_url) > 0) != running:
        assert time.monotonic() - began < timeout, (
            f"probe still {'absent' if running else 'running'}"
        )
        await asyncio.sleep(0.02)
    return time.monotonic() - began


async def run_probe(db: Database) -> None:
    async with db.session() as session:
        await session.command(PROBE)


async def test_a_cancelled_caller_cancels_its_statement_on_the_server(database_url: str) -> None:
    async with database(database_url, statement_timeout=30.0) as db:
        task = asyncio.create_task(run_probe(db))
        await wait_probe(database_url, running=True, timeout=5)
        task.cancel()
        began = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        answered = time.monotonic() - began
        gone = await wait_probe(database_url, running=False, timeout=10) + answered
        print(f"\ncancelled caller: returned in {answered:.3f} s; statement gone in {gone:.3f} s")
        assert gone < GONE_WITHIN, gone
        assert await db.fetch_one("database_now") is not None  # the connection serves again


async def test_a_statement_past_its_deadline_is_cancelled_on_the_server(
    database_url: str,
) -> None:
    async with database(database_url, statement_timeout=1.0) as db:
        began = time.monotonic()
        # NoAnswer when the node's deadline passes first, else the server's statement_timeout
        with pytest.raises(Unavailable):
            await run_probe(db)
        answered = time.monotonic() - began
        gone = await wait_probe(database_url, running=False, timeout=10)
        print(f"\ndeadline 1 s: 503 after {answered:.3f} s; statement gone {gone:.3f} s later")
        assert 1.0 <= answered < 1.0 + 1.0, answered
        assert gone < GONE_WITHIN, gone


async def test_a_cancel_to_a_silent_server_does_not_hang(database_url: str) -> None:
    deadline = 2.0
    with proxied(database_url) as proxy:
        async with database(through(database_url, proxy), statement_timeout=deadline) as db:
            task = asyncio.create_task(run_probe(db))
            await wait_probe(database_url, running=True, timeout=5)
            proxy.cut("drop")
            began = time.monotonic()
            with pytest.raises(Unavailable):
                await task
            answered = time.monotonic() - began
            assert answered < deadline + 1.0, answered
            gone = await wait_probe(database_url, running=False, timeout=30) + answered
            proxy.restore()
            await serves_again(db)
    print(
        f"\nsilent link, deadline {deadline:g} s: 503 {answered:.2f} s after the cut; "
        f"statement gone {gone:.2f} s after the cut"
    )
    assert gone < deadline + GONE_WITHIN, gone


async def serves_again(db: Database, timeout: float = 15.0) -> None:
    """The pool replaces the severed connection once the link returns."""
    began = time.monotonic()
    while True:
        try:
            assert await db.fetch_one("database_now") is not None
            return
        except Unavailable:
            assert time.monotonic() - began < timeout, "the pool did not serve again"
            await asyncio.sleep(0.1)


async def test_every_connection_has_keepalives_and_the_session_settings(
    database_url: str,
) -> None:
    # Over TCP whatever the server (the embedded test server listens on a Unix socket only).
    with proxied(database_url) as proxy:
        tcp_url = through(database_url, proxy)
        options, settings = await connection_options(tcp_url)
    assert options == (1, 2, 5000), options
    assert settings == {
        "transaction_isolation": "read committed",
        "statement_timeout": "10s",
        "lock_timeout": "5s",
        "idle_in_transaction_session_timeout": "1s",
    }, settings


async def connection_options(url: str) -> tuple[tuple[int, int, int], dict[str, Any]]:
    """A pooled connection's TCP keepalive options and its session settings."""
    async with database(url, statement_timeout=10.0) as db:
        async with db.pool.connection() as connection:
            with socket.socket(fileno=connection.pgconn.socket) as sock:
                try:
                    options = (
                        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                    )
                finally:
                    sock.detach()  # the descriptor stays psycopg's
            settings = {}
            for name in (
                "transaction_isolation",
                "statement_timeout",
                "lock_timeout",
                "idle_in_transaction_session_timeout",
            ):
                cursor = await connection.execute(f"SHOW {name}")
                settings[name] = (await cursor.fetchone() or {}).get(name)
    return options, settings
