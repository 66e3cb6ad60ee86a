"""The balance change's statements straight on libpq: send, wait until readable, read one row.

psycopg's async ``execute`` costs about 115 µs of CPU a statement on this machine (a
cursor, its query conversion and dumpers, its wait generator), where libpq itself costs
about 16 µs (``docs/benchmarks.md``). The route's statements return one row of integers
and JSON, so they go round the cursor on the same pooled connection (``Session.fetch_row``):
the statement's text from ``queries.sql`` with its named parameters made positional,
prepared once per connection under its own name (unless the node runs ``--no-prepare``,
as behind a transaction-pooling PgBouncer), integers sent as ``int8`` (every integer
these statements take is a ``bigint``) and strings as ``unknown``, as psycopg sends a
``str``. Errors are psycopg's own
(``psycopg.errors.error_from_result``), so ``Database.session`` maps them as before.

The caller owns the deadline and the cancellation (``Session``): a statement abandoned
mid-flight is cancelled on the server or its link cut (``db.abandon``), and libpq keeps
the connection ``ACTIVE`` until its results are read, so the pool never hands it out
half-read.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import msgspec
import psycopg
from psycopg import pq
from psycopg.errors import error_from_result

from balancectl.sql.loader import query

INT8, UNKNOWN_TYPE = 20, 0
INTEGERS = frozenset({20, 21, 23})  # int8, int2, int4
JSONS = frozenset({114, 3802})  # json, jsonb
TEXTS = frozenset({25, 1043})  # text, varchar
PREPARED = "_balancectl_prepared"  # the names prepared on a connection (an attribute of it)


@dataclass(frozen=True)
class Positional:
    """A named query as libpq takes it: ``$n`` placeholders and their names in order."""

    name: bytes
    text: bytes
    order: tuple[str, ...]


@cache
def positional(name: str) -> Positional:
    order: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        if match.group(1) not in order:
            order.append(match.group(1))
        return f"${order.index(match.group(1)) + 1}"

    text = re.sub(r"%\((\w+)\)s", placeholder, query(name))
    return Positional(f"balancectl_{name}".encode(), text.encode(), tuple(order))


def encoded(value: Any) -> tuple[bytes | None, int]:
    """A parameter as text and the type it is sent as."""
    if value is None:
        return None, UNKNOWN_TYPE
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"not a wire parameter: {value!r}")
    return str(value).encode(), INT8 if isinstance(value, int) else UNKNOWN_TYPE


async def fetch_row(
    connection: psycopg.AsyncConnection[Any],
    name: str,
    params: Mapping[str, Any],
    prepared: bool,
) -> dict[str, Any]:
    """Run query ``name`` and return its one row, decoded; raise psycopg's error for an
    error the server reports, ``psycopg.OperationalError`` for a failed link."""
    statement = positional(name)
    values, types = zip(*(encoded(params[key]) for key in statement.order), strict=True)
    pg = connection.pgconn
    if prepared:
        names: set[bytes] = getattr(connection, PREPARED, None) or set()
        if statement.name not in names:
            pg.send_prepare(statement.name, statement.text, param_types=types)
            await flushed(pg)
            checked(await results(pg), pq.ExecStatus.COMMAND_OK)
            names.add(statement.name)
            setattr(connection, PREPARED, names)
        pg.send_query_prepared(statement.name, values)
    else:
        pg.send_query_params(statement.text, values, param_types=types)
    await flushed(pg)
    return row_of(checked(await results(pg), pq.ExecStatus.TUPLES_OK))


async def flushed(pg: pq.abc.PGconn) -> None:
    """Everything sent is on its way (a statement this small is sent at once)."""
    loop = asyncio.get_running_loop()
    while pg.flush():
        await ready(pg.socket, loop.add_writer, loop.remove_writer)


async def results(pg: pq.abc.PGconn) -> list[Any]:
    """Every result of the statement sent, read as the socket becomes readable."""
    loop = asyncio.get_running_loop()
    found: list[Any] = []
    while True:
        pg.consume_input()
        while pg.is_busy():
            await ready(pg.socket, loop.add_reader, loop.remove_reader)
            pg.consume_input()
        result = pg.get_result()
        if result is None:
            return found
        found.append(result)


async def ready(socket: int, watch: Callable[..., None], unwatch: Callable[[int], object]) -> None:
    """Until ``socket`` is ready (``watch`` is the loop's ``add_reader`` or ``add_writer``)."""
    woken = asyncio.get_running_loop().create_future()
    watch(socket, _wake, woken)
    try:
        await woken
    finally:
        unwatch(socket)


def checked(found: Sequence[Any], wanted: pq.ExecStatus) -> Any:
    for result in found:
        if result.status != wanted:
            raise error_from_result(result)
    if len(found) != 1:
        raise psycopg.InternalError(f"{len(found)} results where one was expected")
    return found[0]


def row_of(result: Any) -> dict[str, Any]:
    if result.ntuples != 1:
        raise psycopg.InternalError(f"{result.ntuples} rows where one was expected")
    row: dict[str, Any] = {}
    for column in range(result.nfields):
        raw = result.get_value(0, column)
        row[result.fname(column).decode()] = (
            None if raw is None else value(raw, result.ftype(column))
        )
    return row


def value(raw: bytes, oid: int) -> Any:
    if oid in INTEGERS:
        return int(raw)
    if oid in JSONS:
        return msgspec.json.decode(raw)
    if oid in TEXTS:
        return raw.decode()
    raise TypeError(f"a wire query returned a column of type {oid}")


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
