"""Twenty nodes through one PgBouncer in transaction mode (``--no-prepare``, PgBouncer 1.18).

Twenty nodes hold up to 20 x (1 x 5 + 3 + 2) = 200 connections, past a default
PostgreSQL's 100; PgBouncer multiplexes them onto 20 server connections. Every rule
must still hold on this 2-core machine:

- a burst of 10,000 debits of 2 on 10,000, spread over all 20 nodes, is exact: 5,000
  succeed, 5,000 are refused, the balance ends at 0, the ledger holds 5,000 debits;
- 24 jobs on 20 nodes spread floor/ceil (every node runs 1 or 2), a kill -9 of a node
  holding 2 is taken over within TTL + poll + slack, its runs are ``lost``, the 19
  survivors run 1 or 2 each again, and no two runs of a job overlap.

The settle delay is long enough for all 20 nodes to register before anyone claims (they
start at once, but on 2 cores their starts are spread over many seconds).
"""

from __future__ import annotations

import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from balancectl.toolkit.loadtest import LoadtestConfig, run_loadtest
from tests.ledger import assert_burst_exact
from tests.pgbouncer import PgBouncer
from tests.processes import ClusterFactory, node_args
from tests.scheduling import (
    assert_listing_agrees,
    assert_no_overlap,
    history,
    lease,
    per_node,
    running,
    start_skew,
    wait_for,
    write_jobs,
)

pytestmark = pytest.mark.slow

NODES = 20
JOBS = [f"job-{n:02d}" for n in range(1, 25)]
TTL, POLL, SETTLE = 3.0, 0.5, 40.0
SLACK = 3.0  # claim latency, an HTTP poll, 20 nodes on a busy 2-core machine
START_WITHIN = 300.0  # seconds for 20 nodes to be ready on 2 shared cores
REQUESTS, AMOUNT = 10000, 2  # on 10,000: assert_burst_exact


def debits_served(url: str) -> int:
    """The POSTs this node answered, from its ``/metrics`` (every worker counted once)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    posts = [line for line in lines if line.startswith("balancectl_http_requests_total{")]
    return sum(int(float(line.split()[-1])) for line in posts if 'method="POST"' in line)


async def test_a_burst_over_twenty_nodes_through_pgbouncer_is_exact(
    bouncer: PgBouncer, cluster_factory: ClusterFactory, database_url: str
) -> None:
    began = time.monotonic()
    cluster = cluster_factory(
        NODES, "--no-prepare", "--no-scheduler", url=bouncer.url, ready_timeout=START_WITHIN
    )
    started = time.monotonic() - began
    config = LoadtestConfig(
        urls=tuple(cluster.urls), requests=REQUESTS, amount=AMOUNT, progress=False
    )
    report = await run_loadtest(config)
    verdict = report.verdict
    served = {node.node_id: debits_served(node.url) for node in cluster.members}
    print(
        f"\n{NODES} nodes ready in {started:.1f} s; burst: 200: {verdict.successes}, "
        f"409: {verdict.insufficient}, other: {verdict.other_outcomes}, "
        f"final {verdict.final_balance}, wall {report.wall_seconds:.1f} s, "
        f"{report.requests_per_second:.0f} req/s; debits per node "
        f"{min(served.values())}..{max(served.values())}"
    )
    assert_burst_exact(report, database_url, cluster.urls)
    assert min(served.values()) >= REQUESTS // NODES, served  # round-robin: 500 each
    assert all(node.process.poll() is None for node in cluster.members)


def test_twenty_nodes_through_pgbouncer_spread_24_jobs_and_take_over(
    bouncer: PgBouncer, cluster_factory: ClusterFactory, database_url: str, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", JOBS, min_duration="10m", interval="10m")
    args = node_args(jobs_file=jobs, lease_ttl=TTL, poll=POLL, settle=SETTLE)
    began = time.monotonic()
    cluster = cluster_factory(
        NODES, "--no-prepare", *args, url=bouncer.url, ready_timeout=START_WITHIN
    )
    started = time.monotonic() - began
    observer = cluster.members[0]
    skew = start_skew(observer.url)
    print(f"\n{NODES} nodes ready in {started:.1f} s; registrations spread over {skew:.1f} s")
    assert skew < SETTLE, f"the nodes joined over {skew:.1f} s, past the {SETTLE} s settle"

    first = per_node(cluster, observer, timeout=SETTLE + 60)
    print(f"first round: {sorted(Counter(first.values()).items())} (jobs per node: nodes)")
    assert sum(first.values()) == len(JOBS) and set(first.values()) == {1, 2}, first

    victim = next(node for node in cluster.members[1:] if first[node.node_id] == 2)
    taken = [name for name, owner in running(observer).items() if owner == victim.node_id]
    tokens = {job: lease(database_url, job)[0] for job in taken}
    victim.process.kill()
    killed = time.monotonic()
    victim.process.wait()

    def takers() -> dict[str, str] | None:
        owners = {job: running(observer).get(job) for job in taken}
        moved = all(owner not in (None, victim.node_id) for owner in owners.values())
        return {job: str(owner) for job, owner in owners.items()} if moved else None

    new_owners = wait_for(f"{taken} taken over", takers, timeout=TTL + 30)
    took = time.monotonic() - killed
    print(f"kill -9 of {victim.node_id} ({taken}): taken over by {new_owners} in {took:.2f} s")
    assert took <= TTL + POLL * 1.2 + SLACK, f"takeover took {took:.2f} s"
    for job, token in tokens.items():
        [lost] = [run for run in history(observer, job=job) if run.token == token]
        assert (lost.node, lost.status) == (victim.node_id, "lost"), lost

    after = per_node(cluster, observer, timeout=30)
    print(f"after: {sorted(Counter(after.values()).items())} on {len(after)} nodes")
    assert sum(after.values()) == len(JOBS) and set(after.values()) == {1, 2}, after
    runs = history(observer)
    assert_no_overlap(runs)
    assert_listing_agrees(cluster, JOBS)
    assert sorted(run.status for run in runs) == ["lost"] * len(taken), runs
    print(f"runs recorded: {len(runs)}; overlaps: 0")
