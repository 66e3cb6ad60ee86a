"""A scheduler whose database is slow to answer when its node starts.

Nodes started together on a busy server (the parallel suite's five-node spread test saw
it: every node died with "internal error: NoAnswer ... within 1 s") must not die because
the first registration took longer than one call's deadline: the database answers, late.
The link is a real TCP proxy that holds every byte (DROP) until it is restored.
"""

from __future__ import annotations

import asyncio
import time

from balancectl.config import PoolSettings, SchedulerSettings
from balancectl.db import Database
from balancectl.scheduler import Scheduler, SchedulerStore
from balancectl.scheduler.registry import parse_jobs
from tests.conftest import sql
from tests.faults import proxied, through

TTL = 3.0
HELD = 2.5  # seconds the link holds everything: more than two call deadlines (0.9 s)
JOBS = '[[jobs]]\nname = "x"\nfunction = "balancectl.jobs.builtin:idle"\ninterval = "1h"\n'


async def test_a_registration_held_past_its_deadline_is_tried_again(database_url: str) -> None:
    pool = PoolSettings(min_size=1, max_size=3, timeout=1.0, statement_timeout=1.0)
    settings = SchedulerSettings(lease_ttl=TTL, poll_interval=0.2, settle=0)
    with proxied(database_url) as proxy:
        url = through(database_url, proxy)
        db = Database(url, pool, name="scheduler")
        await db.open(wait=True)
        scheduler = Scheduler(
            SchedulerStore(db, "slow-start", TTL), parse_jobs(JOBS, "inline"), settings, db
        )
        proxy.cut("drop")
        asyncio.get_running_loop().call_later(HELD, proxy.restore)
        began = time.monotonic()
        try:
            await asyncio.wait_for(scheduler.start(), 30)
            started = time.monotonic() - began
        finally:
            await scheduler.stop()
            await db.close()
    print(f"\nregistered {started:.2f} s after a start whose link was held {HELD} s")
    assert started >= HELD - 0.1  # it did wait for the link: the registration was not skipped
    assert sql(database_url, "SELECT id FROM nodes WHERE id = 'slow-start'") == [("slow-start",)]
    assert sql(database_url, "SELECT name FROM jobs") == [("x",)]
