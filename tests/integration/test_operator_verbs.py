"""The operator's verbs with real nodes: ``POST /jobs/{name}/run|pause|resume`` and the CLI
(``balancectl jobs run|pause|resume|history``, ``balancectl nodes``).

Run now starts a waiting job within a poll (plus slack) and never overlaps a running
copy; a paused job is listed paused and not claimed for many polls; pausing a running
job lets its run finish, or with ``--stop`` ends it ``cancelled``; the token is required
when the node has one; every CLI failure is one line and exit status 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from balancectl.toolkit.cluster import NodeProcess
from tests.processes import ClusterFactory, http_json, node_args
from tests.scheduling import (
    POLL,
    assert_no_overlap,
    history,
    jobs_listing,
    running,
    wait_for,
    write_jobs,
)

TTL = 3.0
SLACK = 2.0  # a claim poll is POLL * 1.2 at most; the rest is a loaded machine
TOKEN = "operator-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
REFUSED_NODE = "http://127.0.0.1:1"


def verb(node: NodeProcess, name: str, action: str, token: str | None = TOKEN) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, body = http_json(f"{node.url}/jobs/{name}/{action}", method="POST", headers=headers)
    assert status == 200, (status, body)
    return body


def start(cluster_factory: ClusterFactory, jobs: Path, nodes: int = 2) -> list[NodeProcess]:
    args = node_args(jobs_file=jobs, lease_ttl=TTL, poll=POLL, settle=1)
    return cluster_factory(nodes, *args, "--api-token", TOKEN).members


def state(node: NodeProcess, name: str) -> str:
    return str(jobs_listing(node)[name]["state"])


def test_run_now_starts_a_waiting_job_within_a_poll_and_never_overlaps(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", ["nightly"], min_duration="2s", interval="1h")
    first, _ = start(cluster_factory, jobs)
    wait_for("the first run", lambda: history(first, job="nightly"), timeout=30)
    assert state(first, "nightly") == "waiting"  # due again in an hour

    asked = time.monotonic()
    assert verb(first, "nightly", "run")["state"] == "waiting"
    wait_for("the run asked for", lambda: running(first).get("nightly"), timeout=10, every=0.02)
    started_after = time.monotonic() - asked
    print(f"run now: running after {started_after:.2f} s (poll {POLL} s)")
    assert started_after < POLL * 1.2 + SLACK

    # Asked again while it runs: no second copy, one more run right after this one.
    assert verb(first, "nightly", "run")["state"] == "running"
    wait_for("three runs", lambda: len(history(first, job="nightly")) >= 3, timeout=20)
    runs = sorted(history(first, job="nightly"), key=lambda run: run.started_at)
    assert_no_overlap(runs)
    assert [run.status for run in runs] == ["succeeded"] * 3
    gap = (runs[2].started_at - runs[1].finished_at).total_seconds()
    print(f"run now on a running job: the next run began {gap:.2f} s after it ended")
    assert 0 < gap < POLL * 1.2 + SLACK
    wait_for("it to wait again", lambda: state(first, "nightly") == "waiting", timeout=10)
    time.sleep(POLL * 10)
    assert len(history(first, job="nightly")) == 3  # a single request, a single extra run


def test_a_paused_job_is_listed_paused_and_not_claimed_until_resumed(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", ["tick"], min_duration="0.3s", interval="0.5s")
    nodes = start(cluster_factory, jobs)
    wait_for("two runs", lambda: len(history(nodes[0], job="tick")) >= 2, timeout=30)
    body = verb(nodes[0], "tick", "pause")
    assert body["paused"] is True
    wait_for("the run in progress to end", lambda: state(nodes[0], "tick") == "paused", timeout=5)
    count = len(history(nodes[0], job="tick"))

    time.sleep(POLL * 15)  # due every 0.5 s: several polls of both nodes
    assert len(history(nodes[1], job="tick")) == count
    for node in nodes:
        listed = jobs_listing(node)["tick"]
        assert (listed["state"], listed["paused"], listed["node"]) == ("paused", True, None)

    resumed_at = time.monotonic()
    assert verb(nodes[1], "tick", "resume")["paused"] is False
    wait_for("a run after the resume", lambda: len(history(nodes[0], job="tick")) > count,
             timeout=10, every=0.02)  # fmt: skip
    print(f"resume: a run ended {time.monotonic() - resumed_at:.2f} s after it")
    assert_no_overlap(history(nodes[0], job="tick"))


def running_long(
    cluster_factory: ClusterFactory, tmp_path: Path, min_duration: str
) -> tuple[list[NodeProcess], str]:
    """Two nodes with the one job ``long`` (every 0.5 s), once it runs; and its owner."""
    jobs = write_jobs(tmp_path / "jobs.toml", ["long"], min_duration=min_duration, interval="0.5s")
    nodes = start(cluster_factory, jobs)
    owner = wait_for("long to run", lambda: running(nodes[0]).get("long"), timeout=30)
    return nodes, owner


def assert_stays_paused_after_its_one_run(nodes: list[NodeProcess]) -> None:
    """Ten polls later, ``long`` is still paused (seen from the other node), never rerun."""
    time.sleep(POLL * 10)
    assert state(nodes[1], "long") == "paused"
    assert len(history(nodes[0], job="long")) == 1


def test_pausing_a_running_job_lets_its_run_finish(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    nodes, owner = running_long(cluster_factory, tmp_path, min_duration="3s")
    body = verb(nodes[0], "long", "pause")
    assert (body["state"], body["paused"], body["node"]) == ("running", True, owner)

    wait_for("the run to end", lambda: history(nodes[0], job="long"), timeout=10)
    (run,) = history(nodes[0], job="long")
    assert (run.status, run.node) == ("succeeded", owner)
    assert run.duration_seconds >= 3.0  # not cut short
    assert_stays_paused_after_its_one_run(nodes)


def test_pausing_with_stop_ends_the_run_cancelled(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    nodes, owner = running_long(cluster_factory, tmp_path, min_duration="60s")
    asked = time.monotonic()
    status, body = http_json(f"{nodes[0].url}/jobs/long/pause?stop=true", method="POST",
                             headers=BEARER)  # fmt: skip
    assert (status, body["state"]) == (200, "running")

    wait_for("the run to be stopped", lambda: history(nodes[0], job="long"), timeout=10)
    stopped_after = time.monotonic() - asked
    (run,) = history(nodes[0], job="long")
    print(f"pause --stop: recorded {run.status} {stopped_after:.2f} s after (TTL {TTL} s)")
    assert (run.status, run.node) == ("cancelled", owner)
    assert run.error and "pause" in run.error
    assert stopped_after < TTL / 3 + SLACK  # at the owner's next renewal
    assert_stays_paused_after_its_one_run(nodes)


def test_the_verbs_need_the_token_when_the_node_has_one(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", ["nightly"], min_duration="0s", interval="1h")
    (node,) = start(cluster_factory, jobs, nodes=1)
    for action in ("run", "pause", "resume", "pause?stop=true"):
        for headers in ({}, {"Authorization": "Bearer not-it"}):
            status, body = http_json(f"{node.url}/jobs/nightly/{action}", "POST", headers=headers)
            assert (status, body["type"]) == (401, "urn:balancectl:problem:unauthorized"), body
        assert jobs_listing(node)["nightly"]["paused"] is False
        status, body = http_json(f"{node.url}/jobs/absent/{action}", "POST", headers=BEARER)
        assert (status, body["type"]) == (404, "urn:balancectl:problem:job-not-found"), body
    assert http_json(f"{node.url}/jobs/nightly")[0] == 200  # reads need no token
    assert verb(node, "nightly", "pause")["state"] == "paused"


def cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCECTL_")}
    env |= {"COLUMNS": "200"} | ({"BALANCECTL_API_TOKEN": token} if token else {})
    return subprocess.run([sys.executable, "-m", "balancectl", *args], capture_output=True,
                          text=True, timeout=60, env=env)  # fmt: skip


def one_line(done: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("balancectl: "), done.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_the_cli_verbs_end_to_end(cluster_factory: ClusterFactory, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", ["nightly"], min_duration="0.3s", interval="1h")
    first, _ = start(cluster_factory, jobs)
    url = first.url
    wait_for("the first run", lambda: history(first, job="nightly"), timeout=30)

    one_line(cli("jobs", "pause", "nightly", "--url", url), "HTTP 401", "--api-token")
    paused = cli("jobs", "pause", "nightly", "--url", url, token=TOKEN)
    assert (paused.returncode, paused.stdout.strip()) == (0, "nightly: paused"), paused
    listed = cli("jobs", "--url", url, "--json")
    assert listed.returncode == 0 and '"state": "paused"' in listed.stdout, listed
    one_line(cli("jobs", "run", "nightly", "--url", url, token=TOKEN), "paused", "HTTP 409")
    resumed = cli("jobs", "resume", "nightly", "--url", url, token=TOKEN)
    assert (resumed.returncode, resumed.stdout.strip()) == (0, "nightly: resumed (waiting)")
    ran = cli("jobs", "--url", url, "run", "nightly", token=TOKEN)  # the group's --url
    assert (ran.returncode, ran.stdout.strip()) == (0, "nightly: due now"), ran
    wait_for("the second run", lambda: len(history(first, job="nightly")) >= 2, timeout=10)

    shown = cli("jobs", "history", "nightly", "--url", url, "--limit", "1", "--json")
    assert shown.returncode == 0, shown
    assert shown.stdout.count('"token"') == 1
    table = cli("jobs", "history", "nightly", "--url", url)
    assert table.returncode == 0 and table.stdout.count("succeeded") == 2, table.stdout
    nodes = cli("nodes", "--url", url)
    assert nodes.returncode == 0 and "node-1" in nodes.stdout and "node-2" in nodes.stdout
    assert nodes.stdout.count("alive") == 3, nodes.stdout  # the header and two nodes

    one_line(cli("jobs", "run", "no-such-job", "--url", url, token=TOKEN), "no job is named")
    for args in (("jobs", "run", "x"), ("jobs", "pause", "x", "--stop"), ("jobs", "resume", "x"),
                 ("jobs", "history", "x"), ("nodes",), ("jobs",)):  # fmt: skip
        one_line(cli(*args, "--url", REFUSED_NODE, token=TOKEN), "cannot reach the node")
