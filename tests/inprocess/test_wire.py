"""The balance change's statements straight on libpq (``balancectl.wire``) give the rows
psycopg's cursor gives, prepared or not, and psycopg's own errors, on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from balancectl import balance
from balancectl.config import PoolSettings
from balancectl.db import Database, Session
from balancectl.errors import Unavailable
from balancectl.wire import PREPARED, positional
from tests.conftest import open_database, sql

# Each statement twice with the same parameters: once by psycopg, once by the wire path.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("change_balance", {"user_id": 1, "amount": -3}),  # applied
    ("change_balance", {"user_id": 1, "amount": -(10**9)}),  # refused: balance and seen
    ("change_balance", {"user_id": 404, "amount": 5}),  # no such user: both NULL
    ("change_balance_locked", {"user_id": 1, "amount": 4}),
    ("change_balance_locked", {"user_id": 1, "amount": -(10**9)}),
    ("change_balance_once", {"user_id": 1, "amount": -2, "key": "k-{}"}),  # stored: JSON back
    ("change_balance_once", {"user_id": 1, "amount": -(10**9), "key": "k-{}"}),  # a 409 stored
    ("change_balance_once", {"user_id": 404, "amount": 1, "key": "k-{}"}),  # a 404 stored
]


@pytest.fixture(params=[True, False], ids=["prepared", "unprepared"])
async def db(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[Database]:
    settings = PoolSettings(min_size=1, max_size=1, prepared_statements=request.param)
    async with open_database(database_url, settings) as database:
        yield database


@pytest.mark.parametrize(
    ("name", "params"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)]
)
async def test_the_wire_row_is_psycopgs_row(
    db: Database, database_url: str, name: str, params: dict[str, Any]
) -> None:
    rows = []
    for side in ("psycopg", "wire"):
        sql(database_url, "UPDATE users SET balance = 10000 WHERE id = 1")
        given = {k: v.format(side) if isinstance(v, str) else v for k, v in params.items()}
        async with db.session() as session:
            if side == "psycopg":
                rows.append(await session.fetch_one(name, given))
            else:
                rows.append(await session.fetch_row(name, given))
    assert rows[0] is not None and rows[0] == rows[1]
    assert all(type(rows[0][key]) is type(rows[1][key]) for key in rows[0])


async def test_a_statement_is_prepared_once_per_connection(db: Database) -> None:
    for _ in range(3):
        async with db.session() as session:
            await session.fetch_row("change_balance", {"user_id": 1, "amount": 1})
    connection = await db.pool.getconn()
    try:
        prepared = getattr(connection, PREPARED, None)
        named = await (
            await connection.execute("SELECT name FROM pg_prepared_statements")
        ).fetchall()
    finally:
        await db.pool.putconn(connection)
    ours = {row["name"] for row in named if row["name"].startswith("balancectl_")}
    if db.settings.prepared_statements:
        assert prepared == {positional("change_balance").name} and ours == {
            "balancectl_change_balance"
        }
    else:
        assert prepared is None and ours == set()


async def test_a_server_error_is_psycopgs_and_the_connection_stays_usable(
    db: Database, database_url: str
) -> None:
    """A statement past its lock_timeout: psycopg's LockNotAvailable, mapped to a 503 that
    says nothing was applied; the next statement on the same connection is answered."""
    holder = psycopg.connect(database_url)
    try:
        holder.execute("SELECT 1 FROM users WHERE id = 1 FOR UPDATE")
        with pytest.raises(Unavailable) as refused:
            async with db.session() as session:
                await session.command("BEGIN")
                await session.command("SET LOCAL lock_timeout = 100")
                await session.fetch_row("change_balance", {"user_id": 1, "amount": 1})
        assert isinstance(refused.value.__cause__, psycopg.errors.LockNotAvailable)
        assert refused.value.extensions["outcome"] == "not-applied"
    finally:
        holder.close()
    outcome = await balance.change_balance(db, 1, 1)
    assert outcome.status == 200 and outcome.body["balance"] == 10001


def test_named_parameters_become_positional_in_order() -> None:
    statement = positional("change_balance_once")
    assert statement.order == ("user_id", "amount", "key")
    assert b"%(" not in statement.text and b"$3" in statement.text


async def test_a_session_on_a_connection_of_its_own_reads_the_row(database_url: str) -> None:
    """``Session`` on a connection of its own (as the scheduler's tests build one)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        session = Session(conn, 5.0)  # type: ignore[arg-type]
        row = await session.fetch_row("change_balance", {"user_id": 1, "amount": 1})
    assert row == {"balance": 10001, "seen": 10000}
