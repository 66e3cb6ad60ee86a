"""A node whose workers are slow to start still gets its share of the first round.

Two nodes are started together. The second one's HTTP workers are held (SIGSTOP) as soon
as they appear, until its peer runs a job and ``HOLD`` s more, far past the settle
delay: a loaded machine, a cold disk. The node joins the cluster before its workers
start, so its peer counts it from the start: while it is held, the peer runs one job and
leaves the rest to it, and the held node claims nothing (it claims once it serves). Once
its workers run, the jobs are spread evenly. (A node that joined only once its workers
had started would have been invisible for those seconds, and its peer would have taken
every job.)
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from balancectl.toolkit.cluster import LocalCluster, NodeProcess
from tests.conftest import free_port
from tests.processes import workers_of
from tests.scheduling import POLL, running, wait_for, write_jobs

JOBS = [f"job-{number}" for number in range(1, 5)]
# The hold (at most 20 s until the peer runs a job, then HOLD s: many polls) ends well
# before a job may starve (settle + TTL).
SETTLE, HOLD, TTL = 1.0, 3.0, 30.0


@contextmanager
def started(database_url: str, jobs: Path, log_path: Path) -> Iterator[LocalCluster]:
    args = ["--jobs-file", str(jobs), "--settle", str(SETTLE), "--lease-ttl", str(TTL)]
    args += ["--poll-interval", str(POLL), "--workers", "1"]
    with log_path.open("w") as log:
        cluster = LocalCluster(
            database_url, 2, extra_args=args, log=log, ports=[free_port(), free_port()]
        )
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


def spread(node: NodeProcess, cluster: LocalCluster) -> Counter[str] | None:
    owners = running(node)
    if len(owners) < len(JOBS):
        return None
    counts = Counter({member.node_id: 0 for member in cluster.members})
    counts.update(owners.values())
    return counts


def test_a_node_slow_to_serve_is_counted_from_its_start(database_url: str, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", JOBS, min_duration="10m", interval="10m")
    with started(database_url, jobs, tmp_path / "cluster.log") as cluster:
        first, slow = cluster.members
        held = wait_for("the slow node's worker", lambda: workers_of(slow), 30, 0.005)
        for pid in held:
            os.kill(pid, signal.SIGSTOP)
        held_at = time.monotonic()
        try:
            wait_for("the first node to run a job", lambda: running_or_none(first), 20)
            time.sleep(HOLD)  # it would take the others now, had it not counted the held node
            while_held = running(first)
            held_for = time.monotonic() - held_at
        finally:
            for pid in held:
                os.kill(pid, signal.SIGCONT)
        cluster.wait_ready(timeout=60)
        after = wait_for("every job to run", lambda: spread(first, cluster), timeout=30)

    print(
        f"\nwhile the slow node's workers were held {held_for:.1f} s: {while_held}; after: {after}"
    )
    assert Counter(while_held.values()) == {first.node_id: 1}, while_held
    assert sorted(after.values()) == [2, 2], after


def running_or_none(node: NodeProcess) -> dict[str, str] | None:
    try:
        return running(node)
    except (AssertionError, OSError):
        return None
