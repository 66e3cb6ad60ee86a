"""Random credits and debits on several users, all at once, across three real nodes.

Whatever order PostgreSQL serialises them in, each user's balance must end at its start
plus the amounts the nodes accepted, never go below zero, and equal the sum of its
ledger; every answer must agree with the ledger row it produced.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import aiohttp

from tests.conftest import sql
from tests.processes import ClusterFactory

SEED = 20261129
REQUESTS = 3000
NODES = 3
# user -> opening balance; user 1 is the migration's seed, the others are added here.
OPENING = {1: 10000, 2: 0, 3: 50, 4: 500, 5: 5000}
INSUFFICIENT = "urn:balancectl:problem:insufficient-funds"


@dataclass(frozen=True)
class Sent:
    user: int
    amount: int
    status: int
    body: dict[str, Any]


def plan(rng: random.Random) -> list[tuple[int, int]]:
    """(user, amount) pairs: more debits than credits, so that refusals happen under load."""
    users = list(OPENING)
    orders = []
    for _ in range(REQUESTS):
        magnitude = rng.choice([1, 2, 7, rng.randint(1, 300), rng.randint(300, 3000)])
        sign = -1 if rng.random() < 0.6 else 1
        orders.append((rng.choice(users), sign * magnitude))
    return orders


async def fire(urls: list[str], orders: list[tuple[int, int]]) -> list[Sent]:
    """Every request at the same moment, spread round-robin over the nodes."""
    start = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(index: int, user: int, amount: int) -> Sent:
            await start.wait()
            url = f"{urls[index % len(urls)]}/users/{user}/balance"
            async with session.post(url, json={"amount": amount}) as response:
                return Sent(user, amount, response.status, await response.json(content_type=None))

        tasks = [asyncio.create_task(one(i, u, a)) for i, (u, a) in enumerate(orders)]
        await asyncio.sleep(0)
        start.set()
        return await asyncio.gather(*tasks)


def add_users(url: str) -> None:
    for user, balance in OPENING.items():
        if user == 1:
            continue
        sql(url, "INSERT INTO users (id, balance) VALUES (%s, %s)", (user, balance))
        sql(
            url,
            "INSERT INTO ledger (user_id, amount, balance_after) VALUES (%s, %s, %s)",
            (user, balance, balance),
        )


def check_answer(sent: Sent) -> None:
    """A 200 reports the change it made; a 409 reports the refused debit."""
    if sent.status == 200:
        assert sent.body == {
            "userId": sent.user,
            "balance": sent.body["balance"],
            "amount": sent.amount,
        }
        assert sent.body["balance"] >= 0
        return
    assert sent.status == 409, sent
    assert sent.body["type"] == INSUFFICIENT, sent
    assert sent.amount < 0
    assert sent.body["amount"] == sent.amount
    assert sent.body["balance"] >= 0


def ledger(url: str, user: int) -> list[tuple[int, int]]:
    rows = sql(
        url, "SELECT amount, balance_after FROM ledger WHERE user_id = %s ORDER BY id", (user,)
    )
    return [(int(a), int(b)) for a, b in rows]


async def test_random_credits_and_debits_add_up(
    cluster_factory: ClusterFactory, database_url: str
) -> None:
    add_users(database_url)
    urls = cluster_factory(NODES).urls
    orders = plan(random.Random(SEED))

    answers = await fire(urls, orders)

    assert {(s.status, s.body.get("type")) for s in answers} <= {(200, None), (409, INSUFFICIENT)}
    accepted = [s for s in answers if s.status == 200]
    # The test means something only if the load both applied and refused changes.
    assert any(s.amount > 0 for s in accepted) and any(s.amount < 0 for s in accepted)
    assert len(accepted) < len(answers)
    for user, opening in OPENING.items():
        mine = [s for s in accepted if s.user == user]
        await check_user(database_url, urls, user, opening, mine)
    for sent in answers:
        check_answer(sent)
    # The 409's ``balance`` is the current balance (contract): one that would cover the
    # debit contradicts the refusal it explains.
    stale = [s for s in answers if s.status == 409 and s.body["balance"] >= -s.amount]
    assert not stale, f"{len(stale)} refusals report a balance covering the debit: {stale[:3]}"


async def check_user(
    database_url: str, urls: list[str], user: int, opening: int, accepted: list[Sent]
) -> None:
    """Start plus accepted amounts, never negative, equal to its ledger, row by row."""
    expected = opening + sum(s.amount for s in accepted)
    assert expected >= 0
    assert sql(database_url, "SELECT balance FROM users WHERE id = %s", (user,)) == [(expected,)]
    async with aiohttp.ClientSession() as session:
        for url in urls:
            async with session.get(f"{url}/users/{user}") as response:
                assert await response.json() == {"userId": user, "balance": expected}

    rows = ledger(database_url, user)
    assert rows[0] == (opening, opening)
    amounts = [amount for amount, _ in rows]
    assert sum(amounts) == expected
    # The ledger is the order PostgreSQL applied them in: a running sum, never negative.
    assert [after for _, after in rows] == list(accumulate(amounts))
    assert min(after for _, after in rows) >= 0
    # Each accepted answer is exactly one ledger row, with the balance it reported.
    assert Counter(rows[1:]) == Counter((s.amount, s.body["balance"]) for s in accepted)
