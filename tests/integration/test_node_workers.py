"""A node with W > 1 HTTP workers is still one node: one scheduler, one row, one count.

Real processes: each node is ``balancectl serve --workers 2`` (a supervisor and two worker
processes on one socket). The tests check that the spread is counted per node, that
kill -9 and SIGTERM of the supervisor leave no worker behind and hand the leases over,
and that ``/metrics`` on any worker counts every request of the node exactly once.
"""

from __future__ import annotations

import re
import signal
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from tests.conftest import sql
from tests.processes import ClusterFactory, alive, http_json, node_args, workers_of
from tests.scheduling import (
    POLL,
    assert_no_overlap,
    history,
    jobs_listing,
    node_running,
    running,
    wait_for,
    write_jobs,
)

WORKERS = ("--workers", "2")
TTL = 3.0


def test_two_workers_serve_one_node_that_counts_once_in_the_spread(
    cluster_factory: ClusterFactory, database_url: str, tmp_path: Path
) -> None:
    names = [f"job-{n}" for n in range(1, 7)]
    jobs = write_jobs(tmp_path / "jobs.toml", names, min_duration="30s", interval="60s")
    cluster = cluster_factory(3, *node_args(jobs_file=jobs, lease_ttl=TTL, poll=POLL), *WORKERS)
    for node in cluster.members:
        assert len(workers_of(node)) == 2, f"{node.node_id} should run 2 workers"

    def all_running() -> dict[str, dict[str, object]] | None:
        jobs = jobs_listing(cluster.members[0])
        return jobs if all(job["state"] == "running" for job in jobs.values()) else None

    listing = wait_for("all 6 jobs to run", all_running, timeout=30)
    per_node = Counter(str(job["node"]) for job in listing.values())
    assert per_node == {"node-1": 2, "node-2": 2, "node-3": 2}, per_node
    registered = sql(database_url, "SELECT id FROM nodes ORDER BY id")
    assert registered == [("node-1",), ("node-2",), ("node-3",)]


def test_kill_9_of_the_supervisor_takes_its_workers_and_the_job_moves(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", ["tick"], min_duration="20s")
    cluster = cluster_factory(2, *node_args(jobs_file=jobs, lease_ttl=TTL, poll=POLL), *WORKERS)
    victim = node_running(cluster, "tick")
    workers = workers_of(victim)
    assert len(workers) == 2

    victim.process.kill()
    killed = time.monotonic()
    victim.process.wait()
    wait_for("the workers to die with their node", lambda: not any(map(alive, workers)), 5)
    print(f"workers gone {time.monotonic() - killed:.2f} s after kill -9 of the supervisor")
    observer = next(node for node in cluster.members if node is not victim)
    taker = wait_for(
        "tick to run elsewhere",
        lambda: (owner := running(observer).get("tick")) not in (None, victim.node_id) and owner,
        timeout=TTL + 15,
    )
    print(f"tick taken over by {taker} {time.monotonic() - killed:.2f} s after the kill")
    assert taker == observer.node_id
    assert_no_overlap(history(observer, job="tick", limit=100))


def test_sigterm_stops_every_worker_and_hands_the_job_back(
    cluster_factory: ClusterFactory, database_url: str, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", ["tick"], min_duration="20s")
    cluster = cluster_factory(2, *node_args(jobs_file=jobs, lease_ttl=TTL, poll=POLL), *WORKERS)
    leaving = node_running(cluster, "tick")
    workers = workers_of(leaving)

    leaving.process.send_signal(signal.SIGTERM)
    asked = time.monotonic()
    leaving.process.wait(timeout=30)
    print(f"node with 2 workers stopped {time.monotonic() - asked:.2f} s after SIGTERM")
    assert leaving.process.returncode == -signal.SIGTERM
    assert not any(map(alive, workers))
    stopped = sql(database_url, "SELECT stopped_at IS NOT NULL FROM nodes WHERE id = %s",
                  (leaving.node_id,))  # fmt: skip
    assert stopped == [(True,)]
    observer = next(node for node in cluster.members if node is not leaving)
    runs = history(observer, job="tick", limit=10)
    assert runs and runs[0].node == leaving.node_id and runs[0].status == "cancelled"


def requests_counted(url: str) -> int:
    """``balancectl_http_requests_total`` for ``GET /users/{userId}`` answered 200."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = ('route="/users/{userId}"', 'method="GET"', 'status="200"')
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("balancectl_http_requests_total{")
            and all(label in line for label in wanted)
        )
    )


def pids_with_samples(workers: set[int]) -> set[int]:
    """Which of ``workers`` wrote request counters to a metrics folder of the node."""
    files = Path(tempfile.gettempdir()).glob("balancectl-node-1-metrics-*/counter_*.db")
    written = {int(match.group(1)) for f in files if (match := re.search(r"_(\d+)\.db$", f.name))}
    return written & workers


def test_metrics_count_every_request_once_across_workers(cluster_factory: ClusterFactory) -> None:
    node = cluster_factory(1, "--no-scheduler", *WORKERS).members[0]
    sent = 400
    for _ in range(sent):  # a connection each, so the kernel hands them to both workers
        status, _ = http_json(f"{node.url}/users/1")
        assert status == 200
    assert pids_with_samples(workers_of(node)) == workers_of(node), "one worker served all"
    counts = [requests_counted(node.url) for _ in range(20)]  # /metrics from either worker
    assert set(counts) == {sent}, counts
