"""Five nodes started together share the due jobs evenly in the first round.

Each node claims only while it runs no more jobs than the least loaded live node, after
a settle delay that lets every node of a cold start register first. With J due jobs and
5 nodes, every node must run floor(J/5) or ceil(J/5) of them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.processes import ClusterFactory, node_args
from tests.scheduling import (
    POLL,
    all_running,
    assert_listing_agrees,
    start_skew,
    wait_for,
    write_jobs,
)

NODES = 5
TRIALS = 2


@pytest.mark.parametrize("trial", range(1, TRIALS + 1))
@pytest.mark.parametrize("job_count", [5, 7, 10])
def test_nodes_started_together_share_the_jobs_evenly(
    cluster_factory: ClusterFactory, tmp_path: Path, job_count: int, trial: int
) -> None:
    names = [f"job-{number:02d}" for number in range(1, job_count + 1)]
    # min_duration outlasts the whole first round, so no job runs twice before we count.
    jobs = write_jobs(tmp_path / "jobs.toml", names, min_duration="8s", interval="60s")
    cluster = cluster_factory(NODES, *node_args(jobs_file=jobs, lease_ttl=3, poll=POLL))
    observer = cluster.members[0]

    listing = wait_for(f"all {job_count} jobs to run", lambda: all_running(observer), timeout=30)
    per_node = Counter(str(job["node"]) for job in listing.values())
    counts = {node.node_id: per_node.get(node.node_id, 0) for node in cluster.members}
    print(f"J={job_count} trial {trial}: {counts}; start skew {start_skew(observer.url):.2f} s")

    assert all(job["last_run"] is None for job in listing.values()), "not the first round"
    assert sum(counts.values()) == job_count
    fair = {job_count // NODES, -(-job_count // NODES)}
    assert set(counts.values()) <= fair, f"uneven first round: {counts}"
    assert_listing_agrees(cluster, names)
