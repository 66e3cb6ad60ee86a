"""Run history as users read it (``GET /jobs/history``, ``GET /jobs``), and the checks that
every scheduler test makes of it: runs of one job never overlap, and every node's listing
shows every configured job, consistent with the history.

The helpers here are shared by the other ``test_scheduler_*`` modules and the e2e test.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

from balancectl.toolkit.cluster import LocalCluster, NodeProcess
from tests.processes import ClusterFactory, http_json, node_args

T = TypeVar("T")
IDLE = "balancectl.jobs.builtin:idle"
POLL = 0.2


# ---------------------------------------------------------------- helpers for every test


def write_jobs(
    path: Path,
    names: Iterable[str],
    min_duration: str = "6s",
    interval: str = "30s",
    function: str = IDLE,
    max_duration: str | None = None,
) -> Path:
    """A jobs file of ``idle`` (or ``function``) jobs that each last ``min_duration``."""
    longest = "" if max_duration is None else f'max_duration = "{max_duration}"\n'
    tables = [
        f'[[jobs]]\nname = "{name}"\nfunction = "{function}"\n'
        f'interval = "{interval}"\nmin_duration = "{min_duration}"\n{longest}'
        for name in names
    ]
    path.write_text("\n".join(tables))
    return path


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.05) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(every)


def jobs_listing(node: NodeProcess) -> dict[str, dict[str, Any]]:
    """``GET /jobs`` of one node, by job name."""
    status, body = http_json(f"{node.url}/jobs")
    assert status == 200, body
    return {job["name"]: job for job in body["jobs"]}


def running(node: NodeProcess) -> dict[str, str]:
    """The running jobs as ``GET /jobs`` on ``node`` shows them: job name -> node id."""
    return {
        name: job["node"] for name, job in jobs_listing(node).items() if job["state"] == "running"
    }


@dataclass(frozen=True)
class Run:
    id: int
    job: str
    node: str
    token: int
    started_at: datetime
    finished_at: datetime
    duration_seconds: float
    status: str
    error: str | None


def history(asked: NodeProcess, **filters: object) -> list[Run]:
    """``GET /jobs/history`` of node ``asked`` with the given filters (newest first)."""
    query = "&".join(f"{key}={value}" for key, value in {"limit": 1000, **filters}.items())
    status, body = http_json(f"{asked.url}/jobs/history?{query}")
    assert status == 200, body
    return [parse_run(run) for run in body["runs"]]


def parse_run(run: dict[str, Any]) -> Run:
    return Run(
        **{
            **run,
            "started_at": datetime.fromisoformat(run["started_at"]),
            "finished_at": datetime.fromisoformat(run["finished_at"]),
        }
    )


def assert_no_overlap(runs: Sequence[Run]) -> None:
    """Runs of one job never intersect in [started_at, finished_at]; one run per token."""
    by_job: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        assert run.finished_at >= run.started_at, run
        by_job[run.job].append(run)
    for job, job_runs in by_job.items():
        tokens = [run.token for run in job_runs]
        assert len(tokens) == len(set(tokens)), f"{job}: two runs under one token: {tokens}"
        ordered = sorted(job_runs, key=lambda run: run.started_at)
        for earlier, later in pairwise(ordered):
            assert later.started_at > earlier.finished_at, f"{job} runs overlap: {earlier} {later}"
            assert later.token > earlier.token, f"{job}: tokens out of order: {earlier} {later}"


def assert_listing_agrees(cluster: LocalCluster, names: Iterable[str]) -> None:
    """Every live node lists every configured job, the same way, consistent with history.

    A claim or a finish between two nodes' answers can make them differ for a moment, so
    a mismatch is retried a few times before it fails.
    """
    nodes = [node for node in cluster.members if node.process.poll() is None]
    for attempt in range(5):
        listings = [jobs_listing(node) for node in nodes]
        views = [sorted((n, j["state"], j["node"], j["started_at"]) for n, j in li.items())
                 for li in listings]  # fmt: skip
        if all(view == views[0] for view in views) or attempt == 4:
            break
        time.sleep(0.3)
    for node, listing in zip(nodes, listings, strict=True):
        assert set(listing) == set(names), f"{node.node_id} lists {sorted(listing)}"
        for job in listing.values():
            assert_job_document(job)
    assert all(view == views[0] for view in views), f"nodes disagree: {views}"
    assert_last_runs_match_history(nodes[0], listings[0])


def assert_job_document(job: dict[str, Any]) -> None:
    if job["state"] == "running":
        assert job["node"] and job["started_at"], job
        assert job["elapsed_seconds"] is not None and job["elapsed_seconds"] >= 0, job
        assert job["next_run_at"] is None, job
    else:
        assert job["state"] == "waiting", job
        assert job["node"] is None and job["started_at"] is None, job
        assert job["elapsed_seconds"] is None, job
        assert job["next_run_at"] is not None, job


def assert_last_runs_match_history(node: NodeProcess, listing: dict[str, dict[str, Any]]) -> None:
    runs = history(node)
    for name, job in listing.items():
        newest = next((run for run in runs if run.job == name), None)
        last = job["last_run"]
        if newest is None:
            assert last is None, job
            continue
        assert last is not None and last["id"] == newest.id, (job, newest)
        if job["state"] == "running":
            assert datetime.fromisoformat(job["started_at"]) > newest.finished_at, (job, newest)


def node_running(cluster: LocalCluster, job: str) -> NodeProcess:
    """The node that runs ``job`` (waiting for it to run), as ``GET /jobs`` says."""
    owner = wait_for(f"{job} to run", lambda: running(cluster.members[0]).get(job), timeout=30)
    return cluster.node(owner)


# ---------------------------------------------------------------- the history tests


def test_runs_are_recorded_with_their_duration_and_interval(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    names = ["alpha", "beta"]
    jobs = write_jobs(tmp_path / "jobs.toml", names, min_duration="1s", interval="2s")
    cluster = cluster_factory(2, *node_args(jobs_file=jobs, lease_ttl=3, poll=POLL))
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
    jobs = write_jobs(tmp_path / "jobs.toml", names, min_duration="0.5s", interval="1s")
    cluster = cluster_factory(2, *node_args(jobs_file=jobs, lease_ttl=3, poll=POLL))
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


def test_history_limit_out_of_range_is_a_problem(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", ["alpha"])
    cluster = cluster_factory(1, *node_args(jobs_file=jobs, no_scheduler=True))

    for limit in ("0", "1001", "-1", "ten"):
        status, content_type, body = raw_get(f"{cluster.members[0].url}/jobs/history?limit={limit}")
        assert status == 422, (limit, body)
        assert content_type.startswith("application/problem+json"), (limit, content_type)
        assert body["type"] == "urn:balancectl:problem:invalid-request", body
        assert body["status"] == 422 and body["title"] and body["detail"], body
    for limit in ("1", "1000"):
        status, _, body = raw_get(f"{cluster.members[0].url}/jobs/history?limit={limit}")
        assert (status, body) == (200, {"runs": []}), limit


def raw_get(url: str) -> tuple[int, str, Any]:
    """Status, Content-Type and JSON body of one GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], json.loads(error.read())
