"""The even spread survives a real PostgreSQL outage longer than the lease TTL.

Five nodes run five long jobs, one each (TTL 3 s). The test's own embedded PostgreSQL is
stopped for 10 s (then, in the second case, 45 s: past ``starve_after``) and started
again. Every lease expired meanwhile. Once the server is back:

- ``GET /jobs`` answers within 5 s;
- all five jobs run again, spread floor/ceil (one per node), within TTL + settle + 5 s;
- no two runs of one job overlap, in the history every node serves.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancectl.migrations import upgrade
from balancectl.toolkit.cluster import LocalCluster
from balancectl.toolkit.embedded import embedded_database_url, stop_embedded
from tests.processes import ClusterFactory, http_json, node_args
from tests.scheduling import (
    assert_no_overlap,
    history,
    running,
    wait_for,
    write_jobs,
)

pytestmark = pytest.mark.slow

NODES, TTL, POLL, SETTLE = 5, 3.0, 0.2, 2.0
JOBS = [f"job-{n}" for n in range(1, 6)]
BACK_WITHIN = TTL + SETTLE + 5.0  # the requirement: spread again this soon after the restart
LISTED_WITHIN = 5.0


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[Path]:
    pgdata = tmp_path / "pg"
    yield pgdata
    stop_embedded(pgdata)


def spread(cluster: LocalCluster) -> Counter[str] | None:
    """Jobs per node (every node counted, zeros too) once all jobs run; else ``None``."""
    for node in cluster.members:
        try:
            owners = running(node)
        except (AssertionError, OSError):
            continue
        if len(owners) < len(JOBS):
            return None
        counts = Counter({member.node_id: 0 for member in cluster.members})
        counts.update(owners.values())
        return counts
    return None


def listed_after(cluster: LocalCluster, up: float) -> float:
    """Seconds from the restart until ``GET /jobs`` answers 200 on the first node."""
    url = f"{cluster.members[0].url}/jobs"

    def answers() -> bool:
        try:
            return http_json(url, timeout=5)[0] == 200
        except OSError:
            return False

    wait_for("GET /jobs to answer", answers, timeout=30, every=0.1)
    return time.monotonic() - up


@pytest.mark.parametrize("outage", [10.0, 45.0])
def test_the_spread_is_even_again_after_an_outage_longer_than_the_ttl(
    cluster_factory: ClusterFactory, private_server: Path, tmp_path: Path, outage: float
) -> None:
    url = embedded_database_url(private_server)
    upgrade(url)
    jobs = write_jobs(tmp_path / "jobs.toml", JOBS, min_duration="10m", interval="10m")
    args = node_args(jobs_file=jobs, lease_ttl=TTL, poll=POLL, settle=SETTLE)
    cluster = cluster_factory(NODES, *args, url=url)
    before = wait_for("every job to run", lambda: spread(cluster), timeout=40, every=0.2)
    assert set(before.values()) == {1}, before

    assert stop_embedded(private_server)
    time.sleep(outage)
    assert embedded_database_url(private_server) == url
    up = time.monotonic()
    listed = listed_after(cluster, up)
    after = wait_for("every job to run again", lambda: spread(cluster), timeout=60, every=0.2)
    back = time.monotonic() - up
    time.sleep(1.0)  # a node that claimed too much would show it by now
    settled = spread(cluster)
    runs = history(cluster.members[0])

    print(f"\noutage {outage:.0f} s: before {sorted(before.values())}, after "
          f"{sorted(after.values())} then {sorted((settled or {}).values())}; /jobs answered "
          f"{listed:.2f} s and all jobs ran {back:.2f} s after the restart")  # fmt: skip
    assert listed <= LISTED_WITHIN, f"/jobs answered {listed:.2f} s after the restart"
    assert max(after.values()) - min(after.values()) <= 1, after
    assert settled is not None and max(settled.values()) - min(settled.values()) <= 1, settled
    assert back <= BACK_WITHIN, f"the jobs ran again {back:.2f} s after the restart"
    assert {run.status for run in runs} == {"lost"}, runs
    assert_no_overlap(runs)
