"""A silent link (DROP) under the scheduler: SIGTERM still ends the node in bounded time,
and the renewal loop keeps its cadence while every call hangs.

- A node reaches PostgreSQL through a TCP proxy and runs a job. The proxy starts dropping
  everything (nothing delivered, nothing refused). SIGTERM must end the node within
  TTL + 5 s.
- In-process, a scheduler whose link is cut sends a renewal every ``renew_every``: the
  worst gap between two renewals stays well under the TTL.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from itertools import pairwise
from pathlib import Path

import pytest

from balancectl.config import PoolSettings, SchedulerSettings
from balancectl.db import Database
from balancectl.scheduler import Scheduler, SchedulerStore
from balancectl.scheduler.registry import JobSpec, parse_jobs
from tests.faults import proxied, through
from tests.processes import ClusterFactory, node_args
from tests.scheduling import POLL, running, wait_for, write_jobs

TTL = 3.0


@pytest.mark.slow
def test_sigterm_under_a_dropped_link_ends_the_node_within_ttl_plus_5_s(
    cluster_factory: ClusterFactory, database_url: str, tmp_path: Path
) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.toml", ["tick"], min_duration="60s", function="tests.jobs:busy"
    )
    with proxied(database_url) as proxy:
        args = node_args(jobs_file=jobs, lease_ttl=TTL, poll=POLL, settle=0)
        node = cluster_factory(1, *args, url=through(database_url, proxy)).members[0]
        wait_for("tick to run", lambda: running(node) == {"tick": "node-1"}, timeout=30)
        time.sleep(1.0)
        proxy.cut("drop")
        time.sleep(0.5)
        node.process.send_signal(signal.SIGTERM)
        began = time.monotonic()
        code = node.process.wait(timeout=60)
        took = time.monotonic() - began
        proxy.restore()
    print(f"\nSIGTERM under a dropped link: the node exited ({code}) after {took:.2f} s")
    assert took <= TTL + 5.0, f"the node took {took:.2f} s to exit"


def test_renewals_keep_their_cadence_while_the_link_drops_everything(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    specs = parse_jobs(
        '[[jobs]]\nname = "x"\nfunction = "balancectl.jobs.builtin:idle"\ninterval = "1h"\n',
        "inline",
    )
    settings = SchedulerSettings(lease_ttl=TTL, poll_interval=POLL, settle=0)
    gaps = asyncio.run(renewal_gaps(database_url, specs, settings, caplog))
    print(f"\nseconds between renewals sent while cut: {[round(g, 2) for g in gaps]}")
    assert len(gaps) >= 3, gaps
    assert max(gaps) <= settings.renew_every * 1.3, gaps
    assert max(gaps) < TTL - 1.0


async def renewal_gaps(
    database_url: str,
    specs: list[JobSpec],
    settings: SchedulerSettings,
    caplog: pytest.LogCaptureFixture,
) -> list[float]:
    pool = PoolSettings(min_size=1, max_size=3, timeout=1.0, statement_timeout=1.0)
    with proxied(database_url) as proxy:
        db = Database(through(database_url, proxy), pool, name="scheduler")
        await db.open(wait=True)
        scheduler = Scheduler(SchedulerStore(db, "in-process", TTL), specs, settings, db)
        await scheduler.start()
        await asyncio.sleep(1.5)  # the job is claimed and its lease renewed once
        proxy.cut("drop")
        with caplog.at_level(logging.WARNING, logger="balancectl.scheduler"):
            await asyncio.sleep(6.0)
        stamps = [r.created for r in caplog.records if r.getMessage().startswith("renew failed")]
        began = time.monotonic()
        await scheduler.stop()
        stopped = time.monotonic() - began
        proxy.restore()
        await asyncio.sleep(1.5)  # the calls given up on wind down once the link is back
        await db.close()
    print(f"\nScheduler.stop() under a dropped link took {stopped:.2f} s")
    assert stopped <= TTL + 5.0
    starts = [stamp - 0.9 * settings.renew_every for stamp in stamps]
    return [b - a for a, b in pairwise(starts)]
