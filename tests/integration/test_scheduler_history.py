"""Run history as users read it (``GET /jobs/history``): each run recorded with its
duration and interval, filtered and ordered newest first, its limit bounded.

The checks every scheduler test makes (no overlap, listings agree) are in tests/scheduling.py.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

from balancectl.toolkit.cluster import LocalCluster
from tests.processes import ClusterFactory, node_args
from tests.scheduling import (
    POLL,
    assert_listing_agrees,
    assert_no_overlap,
    history,
    wait_for,
    write_jobs,
)


def two_nodes_running(
    cluster_factory: ClusterFactory, tmp_path: Path, names: list[str], min_duration: str,
    interval: str,
) -> LocalCluster:  # fmt: skip
    """Two nodes running the ``idle`` jobs ``names`` (lease TTL 3 s)."""
    jobs = write_jobs(tmp_path / "jobs.toml", names, min_duration, interval)
    return cluster_factory(2, *node_args(jobs_file=jobs, lease_ttl=3, poll=POLL))


def test_runs_are_recorded_with_their_duration_and_interval(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    names = ["alpha", "beta"]
    cluster = two_nodes_running(cluster_factory, tmp_path, names, min_duration="1s", interval="2s")
    node = cluster.members[0]

    def three_runs_each() -> bool:
        jobs_run = [run.job for run in history(node)]
        return all(jobs_run.count(name) >= 3 for name in names)

    wait_for("three runs of each job", three_runs_each, timeout=40, every=0.5)
    runs = history(node)

    for run in runs:
        assert run.status == "succeeded", run
        assert run.error is None, run
        assert run.duration_seconds >= 1.0, run
        measured = (run.finished_at - run.started_at).total_seconds()
        assert abs(run.duration_seconds - measured) < 0.01, run
    for name in names:
        starts = sorted(run.started_at for run in runs if run.job == name)
        gaps = [(b - a).total_seconds() for a, b in pairwise(starts)]
        print(f"{name}: seconds between run starts {[round(g, 2) for g in gaps]}")
        assert all(gap >= 2.0 for gap in gaps), gaps
    assert_no_overlap(runs)
    assert_listing_agrees(cluster, names)


def test_history_filters_and_orders_newest_first(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    names = ["alpha", "beta"]
    cluster = two_nodes_running(cluster_factory, tmp_path, names, "0.5s", interval="1s")
    wait_for(
        "four runs of alpha",
        lambda: len(history(cluster.members[0], job="alpha")) >= 4,
        timeout=40,
        every=0.5,
    )
    cluster.stop()  # the history stops changing; the runs in progress end cancelled
    reader = cluster_factory(1, *node_args(no_scheduler=True)).members[0]

    everything = history(reader)
    alpha = history(reader, job="alpha")
    on_node_1 = history(reader, node="node-1")

    assert {run.job for run in everything} == set(names)
    assert {run.node for run in everything} == {"node-1", "node-2"}
    assert alpha == [run for run in everything if run.job == "alpha"]
    assert on_node_1 == [run for run in everything if run.node == "node-1"]
    assert history(reader, job="alpha", node="node-2") == [
        run for run in alpha if run.node == "node-2"
    ]
    assert [run.started_at for run in everything] == sorted(
        (run.started_at for run in everything), reverse=True
    )
    assert history(reader, job="alpha", limit=2) == alpha[:2]
    assert history(reader, limit=3) == everything[:3]
    assert history(reader, job="no-such-job") == []
    assert {run.status for run in everything} <= {"succeeded", "cancelled"}
    assert_no_overlap(everything)
