"""kill -9 of a node that holds several jobs: the survivors share them, within one.

Three nodes run six long jobs, two each. One is killed. When its two leases expire, the
two survivors must take one each (3 and 3), not one of them both (4 and 2): the spread
rule ("claim only while running no more than the least loaded live node") holds for a
takeover too. The runs are older than ``starve_after`` when their leases expire, which
is what once let the first survivor to poll claim every expired job at once.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from tests.processes import ClusterFactory, node_args
from tests.scheduling import (
    POLL,
    assert_listing_agrees,
    assert_no_overlap,
    history,
    running,
    wait_for,
    write_jobs,
)

pytestmark = pytest.mark.slow

TTL = 3.0
SLACK = 2.0  # claim latency, an HTTP poll and a busy 2-core machine
JOBS = [f"job-{n}" for n in range(1, 7)]


def test_kill_9_of_a_node_with_two_jobs_the_survivors_take_one_each(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", JOBS, min_duration="10m", interval="10m")
    cluster = cluster_factory(3, *node_args(jobs_file=jobs, lease_ttl=TTL, poll=POLL))
    observer, victim = cluster.members[0], cluster.members[2]
    wait_for("every job to run", lambda: len(running(observer)) == len(JOBS), timeout=30)
    before = Counter(running(observer).values())
    assert set(before.values()) == {2}, before
    time.sleep(TTL + 1)  # the runs' due times are now older than starve_after at takeover

    victim.process.kill()
    killed = time.monotonic()
    victim.process.wait()

    def taken_over() -> Counter[str] | None:
        owners = running(observer)
        done = len(owners) == len(JOBS) and victim.node_id not in owners.values()
        return Counter(owners.values()) if done else None

    after = wait_for("both jobs taken over", taken_over, timeout=TTL + 20)
    took = time.monotonic() - killed
    print(f"\nspread before {dict(before)}, after kill -9 of {victim.node_id}: {dict(after)}, "
          f"both jobs taken over {took:.2f} s after the kill")  # fmt: skip
    assert after == Counter({"node-1": 3, "node-2": 3}), after
    assert took <= TTL + POLL * 1.2 + SLACK, f"takeover took {took:.2f} s"
    runs = history(observer)
    assert sorted((run.node, run.status) for run in runs) == [(victim.node_id, "lost")] * 2
    assert_no_overlap(runs)
    assert_listing_agrees(cluster, JOBS)
