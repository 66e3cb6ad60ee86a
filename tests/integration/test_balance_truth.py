"""The truth rule of a refusal, under concurrent credits and debits on one row.

A 409 reports the balance it was refused against. That balance must have been the
committed balance at some moment while the request was in flight, and too low for the
debit. Every request here has its own amount, so each ledger row names the request that
wrote it; the ledger is the order the row took its values in. A value was current from
the commit of the change that made it to the commit of the next one, and a commit lies
between its request's send and its answer. So a refusal whose value was replaced by a
change answered before the refusal was sent reports a stale balance, and one whose value
was made by a change sent after the refusal was answered reports a balance from its
future: both are violations this test can see from the client's clock alone.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.conftest import sql
from tests.processes import ClusterFactory

SEED = 20261201
REQUESTS = 2000
OPENING = 2000  # user 1 is reset to this before the burst


@dataclass(frozen=True)
class Timed:
    amount: int
    status: int
    body: dict[str, Any]
    sent: float
    answered: float


def plan(rng: random.Random) -> list[int]:
    """Distinct amounts, a few more debits than credits, sized near the balance."""
    magnitudes = rng.sample(range(1, 4 * REQUESTS), REQUESTS)
    return [m if rng.random() < 0.45 else -m for m in magnitudes]


async def fire(urls: list[str], amounts: list[int], keyed: bool) -> list[Timed]:
    start = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:

        async def one(index: int, amount: int) -> Timed:
            headers = {"Idempotency-Key": str(uuid.uuid4())} if keyed else {}
            await start.wait()
            url = f"{urls[index % len(urls)]}/users/1/balance"
            sent = time.perf_counter()
            async with session.post(url, json={"amount": amount}, headers=headers) as response:
                body = await response.json(content_type=None)
                return Timed(amount, response.status, body, sent, time.perf_counter())

        tasks = [asyncio.create_task(one(i, a)) for i, a in enumerate(amounts)]
        await asyncio.sleep(0)
        start.set()
        return await asyncio.gather(*tasks)


def reset(url: str) -> None:
    sql(url, "UPDATE users SET balance = %s WHERE id = 1", (OPENING,))
    sql(url, "DELETE FROM ledger WHERE user_id = 1")
    opening = (OPENING, OPENING)
    sql(url, "INSERT INTO ledger (user_id, amount, balance_after) VALUES (1, %s, %s)", opening)


def current_windows(url: str, by_amount: dict[int, Timed]) -> dict[int, list[tuple[float, float]]]:
    """Each value the row held: (earliest it became current, latest it stopped being).

    The opening value was current from before the burst; a value made by request k became
    current after k was sent, and stopped before the next change was answered.
    """
    rows = sql(url, "SELECT amount, balance_after FROM ledger WHERE user_id = 1 ORDER BY id")
    makers: list[Timed | None] = [None] + [by_amount[int(a)] for a, _ in rows[1:]]
    windows: dict[int, list[tuple[float, float]]] = {}
    for index, (_, after) in enumerate(rows):
        made = makers[index]
        following = makers[index + 1] if index + 1 < len(makers) else None
        begins = float("-inf") if made is None else made.sent
        ends = float("inf") if following is None else following.answered
        windows.setdefault(int(after), []).append((begins, ends))
    return windows


def truthful(refusal: Timed, windows: dict[int, list[tuple[float, float]]]) -> bool:
    balance = refusal.body["balance"]
    if balance >= -refusal.amount:
        return False  # the reported balance would have covered the debit
    return any(
        begins < refusal.answered and ends > refusal.sent
        for begins, ends in windows.get(balance, [])
    )


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
async def test_every_refusal_reports_a_balance_current_during_it(
    cluster_factory: ClusterFactory, database_url: str, keyed: bool
) -> None:
    reset(database_url)
    urls = cluster_factory(2, "--no-scheduler").urls
    amounts = plan(random.Random(SEED))

    answers = await fire(urls, amounts, keyed)

    assert {a.status for a in answers} <= {200, 409}, {a.status for a in answers}
    accepted = [a for a in answers if a.status == 200]
    refusals = [a for a in answers if a.status == 409]
    # The rule is only exercised if credits and debits both applied and debits were refused.
    assert len(refusals) >= 100 and any(a.amount > 0 for a in accepted)
    assert any(a.amount < 0 for a in accepted)
    by_amount = {a.amount: a for a in answers}
    ledger_amounts = sql(database_url, "SELECT amount FROM ledger WHERE user_id = 1 ORDER BY id")
    assert sorted(int(a) for (a,) in ledger_amounts[1:]) == sorted(a.amount for a in accepted)
    windows = current_windows(database_url, by_amount)
    lies = [r for r in refusals if not truthful(r, windows)]
    assert not lies, f"{len(lies)} of {len(refusals)} refusals were not true: {lies[:3]}"
