"""The shipped jobs on five nodes, as a user starts them: default jobs file, default lease
TTL, poll and settle. Every job runs for its full two minutes, one job per node in the
first round, and no two runs of one job overlap."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from balancectl.scheduler import load_jobs
from tests.conftest import sql
from tests.processes import ClusterFactory
from tests.scheduling import (
    assert_listing_agrees,
    assert_no_overlap,
    history,
    jobs_listing,
    wait_for,
)

NODES = 5


@pytest.mark.slow
def test_default_jobs_run_two_minutes_each_spread_over_the_nodes(
    cluster_factory: ClusterFactory, database_url: str, tmp_path: Path
) -> None:
    specs = {spec.name: spec for spec in load_jobs(None)}
    assert len(specs) == NODES, "one job per node in the first round needs as many jobs"
    cluster = cluster_factory(NODES)
    observer = cluster.members[0]
    began = time.monotonic()

    def every_job_finished_once() -> bool:
        return {run.job for run in history(observer)} >= set(specs)

    wait_for("every default job to finish once", every_job_finished_once, timeout=210, every=2)
    print(f"every default job finished once {time.monotonic() - began:.1f} s after start")

    runs = history(observer)
    first = {name: min((r for r in runs if r.job == name), key=lambda r: r.token) for name in specs}
    for name, run in first.items():
        print(f"{name}: {run.node} token {run.token} {run.duration_seconds:.1f} s {run.status}")
        assert run.token == 1, run
        assert run.status == "succeeded", run
        assert run.duration_seconds >= specs[name].min_duration >= 120.0, run
    assert sorted(run.node for run in first.values()) == [f"node-{n}" for n in range(1, 6)]
    assert_no_overlap(runs)
    assert_listing_agrees(cluster, specs)
    for node in cluster.members:
        listing = jobs_listing(node)
        assert set(listing) == set(specs), node.node_id
        assert all(job["last_run"] is not None for job in listing.values()), listing
    # The snapshot job's write is fenced by its run's token, and it was written.
    assert sql(database_url, "SELECT job_token FROM balance_snapshots") == [
        (first["balance-snapshot"].token,)
    ]
