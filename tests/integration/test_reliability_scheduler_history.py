"""History stays true: no finished_at in the future, crashes recorded at once, no early runs.

1. A node paused for a little less than its lease (past its own local deadline) stops
   its run itself on resume: the row it writes must not end in the future.
2. A node that runs the only copy of a job is killed: the run shows up ``lost`` in
   history within about one TTL, although no node may claim the job again.
3. A rolling restart of 5 nodes (SIGTERM, start again, one after the other) cuts runs
   short while they wait out their minimum duration; no job may then run again before
   its interval has passed.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import pytest

from balancectl.toolkit.cluster import LocalCluster, ready
from tests.conftest import sql
from tests.processes import ClusterFactory, node_args
from tests.scheduling import (
    POLL,
    assert_no_overlap,
    history,
    node_running,
    running,
    wait_for,
    write_jobs,
)

pytestmark = pytest.mark.slow

TTL = 3.0
SLACK = 0.5  # an HTTP poll on a busy 2-core machine


def first_sight(url: str, job: str, token: int) -> tuple[datetime, datetime] | None:
    """The run of ``token`` (finished_at) and the database's now() when first seen."""
    rows = sql(
        url, "SELECT finished_at, now() FROM job_runs WHERE job = %s AND token = %s", (job, token)
    )
    return (rows[0][0], rows[0][1]) if rows else None


def test_a_run_the_node_stops_itself_never_ends_in_the_future(
    cluster_factory: ClusterFactory, database_url: str, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", ["tick"], min_duration="30s", interval="10m")
    cluster = cluster_factory(1, *node_args(jobs_file=jobs, lease_ttl=TTL, poll=POLL, settle=0))
    paused = node_running(cluster, "tick")
    [(token,)] = sql(database_url, "SELECT token FROM jobs WHERE name = 'tick'")
    time.sleep(1.2)

    paused.process.send_signal(signal.SIGSTOP)
    time.sleep(TTL - 0.7)  # past the node's local deadline (TTL - 1 s), inside the lease
    paused.process.send_signal(signal.SIGCONT)
    finished, seen = wait_for(
        "the paused node to record its run", lambda: first_sight(database_url, "tick", token), 10,
        every=0.01,
    )  # fmt: skip

    [run] = [run for run in history(paused) if run.token == token]
    print(f"\nrun {run.status}, finished_at {finished}, first seen at {seen}")
    assert finished <= seen, f"finished_at {finished} is in the future (seen at {seen})"
    assert run.finished_at >= run.started_at, run
    assert run.status == "lost", run


def test_a_crashed_run_is_in_history_within_a_ttl_without_a_new_claim(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    solo = write_jobs(tmp_path / "solo.toml", ["solo"], min_duration="60s", interval="10m")
    other = write_jobs(tmp_path / "other.toml", ["other"], min_duration="60s", interval="10m")
    victim = cluster_factory(1, *node_args(jobs_file=solo, lease_ttl=TTL, poll=POLL, settle=0))
    args = node_args(jobs_file=other, lease_ttl=TTL, poll=POLL, settle=0)
    witness = cluster_factory(1, *args, "--node-id", "witness").members[0]
    wait_for("solo to run", lambda: running(witness).get("solo") == "node-1", timeout=30)
    time.sleep(1.5)

    victim.members[0].process.kill()
    killed = time.monotonic()
    victim.members[0].process.wait()
    [lost] = wait_for(
        "the crashed run in history",
        lambda: [run for run in history(witness, job="solo") if run.status == "lost"],
        timeout=TTL + 10,
    )
    took = time.monotonic() - killed

    print(f"\nthe crashed run was in history {took:.2f} s after kill -9 (TTL {TTL} s): {lost}")
    assert took <= TTL + POLL * 1.2 + SLACK, f"recorded {took:.2f} s after the crash"
    assert lost.node == "node-1" and lost.finished_at >= lost.started_at, lost
    assert "solo" not in running(witness)


def restart(cluster: LocalCluster, index: int) -> float:
    """SIGTERM one node, start it again on its port; seconds it took to exit."""
    old = cluster.members[index]
    old.process.send_signal(signal.SIGTERM)
    began = time.monotonic()
    old.process.wait(timeout=30)
    took = time.monotonic() - began
    old.reap()
    env = {**os.environ, **cluster.env, "BALANCECTL_DATABASE_URL": cluster.database_url}
    cluster.members[index] = cluster._spawn(old.node_id, old.port, env)
    wait_for(f"{old.node_id} to be ready again", lambda: ready(cluster.members[index].url), 60)
    return took


def test_a_rolling_restart_runs_no_job_before_its_interval(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    names = [f"job-{n}" for n in range(1, 6)]
    interval = 10.0
    jobs = write_jobs(tmp_path / "jobs.toml", names, min_duration="5s", interval=f"{interval}s")
    cluster = cluster_factory(5, *node_args(jobs_file=jobs, lease_ttl=TTL, poll=POLL, settle=1))
    wait_for("every job to run", lambda: len(running(cluster.members[0])) == len(names), 40)
    time.sleep(1.0)  # every run has done its work and waits out its minimum duration

    exits = [restart(cluster, index) for index in range(len(cluster.members))]
    time.sleep(interval)
    runs = history(cluster.members[0])

    gaps = {
        name: [
            round((b.started_at - a.started_at).total_seconds(), 2)
            for a, b in pairwise(sorted((r for r in runs if r.job == name),
                                        key=lambda r: r.started_at))
        ]
        for name in names
    }  # fmt: skip
    print(f"\nexits after SIGTERM {[round(s, 2) for s in exits]} s; seconds between run "
          f"starts {gaps}; statuses {sorted({r.status for r in runs})}")  # fmt: skip
    assert any(r.status == "cancelled" for r in runs), "no run was cut short: proves nothing"
    for name, seconds in gaps.items():
        assert all(gap >= interval - 0.01 for gap in seconds), (name, seconds)
    assert_no_overlap(runs)
