"""A node whose run ended lost leaves that job to its peers for a settle period.

Losing a lease is evidence against the node that lost it (it was paused, cut off, or its
clock stepped), and a peer polling meanwhile should take the job over. Before this rule,
the loser's fenced write was refused, its run ended lost, and its own claim loop took the
job back within milliseconds: the two-node clock-step test saw the loser win that race
in about one run in five. Here the node is alone, so the job must come back to it, but
not before ``settle`` has passed since it lost it.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from balancectl.config import PoolSettings, SchedulerSettings
from balancectl.db import Database
from balancectl.scheduler import Scheduler, SchedulerStore
from balancectl.scheduler.registry import parse_jobs
from tests.conftest import sql

TTL, SETTLE = 3.0, 1.0
JOBS = '[[jobs]]\nname = "snap"\nfunction = "tests.jobs:snapshots"\ninterval = "1h"\n'


def token_of(url: str) -> int | None:
    rows = sql(url, "SELECT token FROM jobs WHERE name = 'snap' AND owner IS NOT NULL")
    return int(rows[0][0]) if rows else None


async def wait_token(url: str, wanted: int, within: float) -> None:
    deadline = time.monotonic() + within
    while token_of(url) != wanted:
        assert time.monotonic() < deadline, f"no claim of token {wanted} within {within} s"
        await asyncio.sleep(0.05)


async def test_a_lost_job_is_claimed_again_only_after_the_settle_delay(database_url: str) -> None:
    pool = PoolSettings(min_size=1, max_size=3, timeout=1.0, statement_timeout=1.0)
    settings = SchedulerSettings(lease_ttl=TTL, poll_interval=0.1, settle=SETTLE)
    db = Database(database_url, pool, name="scheduler")
    await db.open(wait=True)
    scheduler = Scheduler(SchedulerStore(db, "lone", TTL), parse_jobs(JOBS, "inline"), settings, db)
    try:
        await scheduler.start()
        await wait_token(database_url, 1, within=SETTLE + 5)
        sql(database_url, "UPDATE jobs SET lease_expires_at = now() - interval '1 ms'")
        await wait_token(database_url, 2, within=SETTLE + TTL + 5)
    finally:
        await scheduler.stop()
        await db.close()
    [(lost_at, status)] = sql(
        database_url, "SELECT finished_at, status FROM job_runs WHERE job = 'snap' AND token = 1"
    )
    [(claimed_at,)] = sql(
        database_url, "SELECT started_at FROM job_runs WHERE job = 'snap' AND token = 2"
    )
    gap = claimed_at - lost_at
    print(f"\nrun 1 ended {status} at {lost_at}; the node claimed the job again {gap} later")
    assert status == "lost"
    assert gap >= timedelta(seconds=SETTLE - 0.05), gap  # the database's clock, both ends
