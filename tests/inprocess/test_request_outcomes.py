"""The balance route's outcomes of the last minute: counted by each app, recorded in the
database once a second, summed by ``GET /dashboard`` over every node, on a real PostgreSQL.

Two apps in this process stand for two nodes (node ids ``node-a`` and ``node-b``); each
records its own counts, and either one's dashboard must show both nodes' sum, exactly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from balancectl import outcomes
from balancectl.api import create_app
from balancectl.api.documents import RequestCounts
from balancectl.config import NodeSettings, PoolSettings, SchedulerSettings
from balancectl.db import Database
from balancectl.outcomes import OutcomeCounts
from tests.conftest import free_port, sql

Client = AsyncTestClient[Litestar]
TOKEN = "s3cret-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}


def settings(url: str, node_id: str, token: str | None = None) -> NodeSettings:
    return NodeSettings(
        url, node_id=node_id, api_token=token, scheduler=SchedulerSettings(enabled=False)
    )


@pytest.fixture
async def nodes(database_url: str) -> AsyncIterator[tuple[Client, Client]]:
    first = AsyncTestClient(app=create_app(settings(database_url, "node-a", TOKEN)))
    second = AsyncTestClient(app=create_app(settings(database_url, "node-b")))
    async with first as a, second as b:
        yield a, b


async def change(client: Client, user: str, amount: Any, **headers: str) -> int:
    reply = await client.post(f"/users/{user}/balance", json={"amount": amount}, headers=headers)
    return reply.status_code


async def requests_last_minute(client: Client) -> dict[str, int]:
    reply = await client.get("/dashboard")
    assert reply.status_code == 200, reply.text
    counts: dict[str, int] = reply.json()["money"]["requests_last_minute"]
    return counts


async def wait_for_counts(client: Client, expected: dict[str, int]) -> dict[str, int]:
    """The document once it shows ``expected`` (records come once a second), or the last one."""
    deadline = time.monotonic() + 10
    while True:
        counts = await requests_last_minute(client)
        if counts == expected or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.2)


def expected(**counts: int) -> dict[str, int]:
    return outcomes.zeros() | counts


async def test_every_outcome_is_listed_at_zero_before_any_request(
    nodes: tuple[Client, Client],
) -> None:
    assert await requests_last_minute(nodes[0]) == expected()
    # The page's controls ask for a token only where the verbs need one.
    assert (await nodes[0].get("/dashboard")).json()["token_required"] is True
    assert (await nodes[1].get("/dashboard")).json()["token_required"] is False
    assert list(expected()) == list(RequestCounts.__struct_fields__)


async def test_known_requests_at_two_nodes_add_up_in_either_nodes_document(
    nodes: tuple[Client, Client], database_url: str
) -> None:
    a, b = nodes
    statuses = [
        *[await change(a, "1", -1, **BEARER) for _ in range(3)],  # changed
        *[await change(a, "1", -20000, **BEARER) for _ in range(2)],  # refused
        await change(a, "1", 0, **BEARER),  # invalid: amount 0
        await change(a, "abc", 5, **BEARER),  # invalid: userId
        await change(a, "1", "5", **BEARER),  # invalid: a string amount
        await change(a, "99", 5, **BEARER),  # not_found
        await change(a, "1", 5),  # unauthorized: no token
        await change(a, "1", 5, Authorization="Bearer wrong"),  # unauthorized
        await change(a, "1", 7, **BEARER, **{"Idempotency-Key": "k-1"}),  # changed
        await change(a, "1", 7, **BEARER, **{"Idempotency-Key": "k-1"}),  # replayed
        await change(a, "1", 8, **BEARER, **{"Idempotency-Key": "k-1"}),  # invalid: reused
        *[await change(b, "1", 2) for _ in range(2)],  # changed
        await change(b, "1", -50000),  # refused
        (await b.post("/users/1/balance", content=b"5", headers={"Content-Type": "text/plain"}))
        .status_code,  # invalid: 415
        (await b.post("/users/1/balance", content=b" " * 5000, headers=JSON)).status_code,  # 413
    ]  # fmt: skip
    assert statuses == [200] * 3 + [409] * 2 + [422] * 3 + [404, 401, 401, 200, 200, 422] + [
        200, 200, 409, 415, 413,
    ]  # fmt: skip
    want = expected(changed=6, replayed=1, refused=3, invalid=6, not_found=1, unauthorized=2)

    assert await wait_for_counts(a, want) == want
    assert await requests_last_minute(b) == want
    by_node = dict(
        sql(
            database_url,
            "SELECT node_id, sum(requests)::int FROM request_outcomes GROUP BY node_id",
        )
    )
    assert by_node == {"node-a": 14, "node-b": 5}


async def test_counts_older_than_a_minute_are_not_shown_and_old_rows_are_pruned(
    nodes: tuple[Client, Client], database_url: str
) -> None:
    sql(
        database_url,
        "INSERT INTO request_outcomes (bucket, node_id, worker, outcome, requests) VALUES"
        " (date_trunc('second', now()) - interval '61 seconds', 'node-x', 1, 'changed', 40),"
        " (date_trunc('second', now()) - interval '10 minutes', 'node-x', 1, 'refused', 9),"
        " (date_trunc('second', now()) - interval '5 seconds', 'node-x', 1, 'unavailable', 3)",
    )
    assert await requests_last_minute(nodes[1]) == expected(unavailable=3)
    db = Database(database_url, PoolSettings(min_size=1, max_size=1))
    await db.open()
    try:
        assert await outcomes.prune(db) == 1  # only the row past the 5-minute retention
    finally:
        await db.close()
    remaining = sql(database_url, "SELECT outcome FROM request_outcomes ORDER BY outcome")
    assert remaining == [("changed",), ("unavailable",)]


@pytest.fixture
async def dead_and_live(database_url: str) -> AsyncIterator[tuple[Database, Database]]:
    """A pool of a server that is not there, and one of the test's database."""
    dead = Database(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere",
                    PoolSettings(min_size=0, max_size=1, timeout=0.5))  # fmt: skip
    live = Database(database_url, PoolSettings(min_size=1, max_size=1))
    await dead.open()
    await live.open()
    try:
        yield dead, live
    finally:
        await dead.close()
        await live.close()


async def test_a_failed_record_keeps_the_counts_for_the_next_one(
    database_url: str, dead_and_live: tuple[Database, Database]
) -> None:
    dead, live = dead_and_live
    counts = OutcomeCounts("node-z", worker=7)
    for name in ("changed", "changed", "refused"):
        counts.count(name)
    assert await counts.record(dead) is False  # no exception: the worker's task goes on
    counts.count("invalid")
    assert await counts.record(live) is True
    rows = sql(database_url, "SELECT node_id, worker, outcome, requests FROM request_outcomes"
               " ORDER BY outcome")  # fmt: skip
    assert rows == [("node-z", 7, "changed", 2), ("node-z", 7, "invalid", 1),
                    ("node-z", 7, "refused", 1)]  # fmt: skip


async def test_counts_unrecorded_for_a_minute_are_dropped(
    database_url: str, dead_and_live: tuple[Database, Database]
) -> None:
    dead, live = dead_and_live
    counts = OutcomeCounts("node-z", worker=7)
    counts.count("unavailable")
    assert await counts.record(dead) is False
    assert counts.pending_since is not None
    counts.pending_since -= outcomes.KEEP_UNRECORDED  # as if a minute had gone by
    assert await counts.record(dead) is False
    counts.count("changed")
    assert await counts.record(live) is True
    rows = sql(database_url, "SELECT outcome, requests FROM request_outcomes")
    assert rows == [("changed", 1)]


def test_every_outcome_is_a_field_of_the_document() -> None:
    document = msgspec.convert(expected(changed=1), RequestCounts)
    assert msgspec.to_builtins(document) == expected(changed=1)


async def test_a_stopping_worker_records_what_it_counted_since_its_last_record(
    database_url: str,
) -> None:
    async with AsyncTestClient(app=create_app(settings(database_url, "node-s"))) as client:
        # Well within the first second: the task has recorded nothing yet.
        assert await change(client, "1", -1) == 200
        assert await change(client, "1", -99999) == 409
    rows = sql(database_url, "SELECT outcome, requests FROM request_outcomes ORDER BY outcome")
    assert rows == [("changed", 1), ("refused", 1)]
