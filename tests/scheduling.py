"""What every scheduler test reads and checks, over HTTP as a user would.

A jobs file of ``idle`` jobs (``write_jobs``), a bounded poll (``wait_for``), a node's
``GET /jobs`` (``jobs_listing``, ``running``, ``node_running``) and ``GET /jobs/history``
(``history``, as ``Run`` rows), and the checks made of them: runs of one job never overlap,
and every node's listing shows every configured job, consistent with the history.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

from balancectl.toolkit.cluster import LocalCluster, NodeProcess
from tests.conftest import sql
from tests.processes import http_json

T = TypeVar("T")
IDLE = "balancectl.jobs.builtin:idle"
POLL = 0.2


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


def start_skew(url: str) -> float:
    """Seconds between the first and the last node's registration (``GET /nodes``)."""
    status, body = http_json(f"{url}/nodes")
    assert status == 200, body
    starts = [datetime.fromisoformat(node["started_at"]) for node in body["nodes"]]
    return (max(starts) - min(starts)).total_seconds()


def all_running(observer: NodeProcess) -> dict[str, dict[str, Any]] | None:
    """``GET /jobs`` of ``observer`` by job name, once every job in it runs; else None."""
    listing = jobs_listing(observer)
    return listing if all(job["state"] == "running" for job in listing.values()) else None


def per_node(cluster: LocalCluster, observer: NodeProcess, timeout: float) -> dict[str, int]:
    """How many jobs each live node runs, once every job runs (``GET /jobs`` on ``observer``)."""
    listing = wait_for("every job to run", lambda: all_running(observer), timeout=timeout)
    counts = Counter(str(job["node"]) for job in listing.values())
    live = [node for node in cluster.members if node.process.poll() is None]
    return {node.node_id: counts.get(node.node_id, 0) for node in live}


def lease(database_url: str, job: str) -> tuple[int, str, datetime]:
    """The job's token, owner and lease expiry, straight from its row."""
    [(token, owner, expires)] = sql(
        database_url, "SELECT token, owner, lease_expires_at FROM jobs WHERE name = %s", (job,)
    )
    return int(token), str(owner), expires
