"""The scheduler's metrics on ``/metrics``, with real nodes: the supervisor (which runs
the scheduler) writes them to the node's metrics folder and a worker serves them, and
they agree with what ``GET /jobs`` and ``GET /jobs/history`` say of the same node.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from balancectl.toolkit.cluster import NodeProcess
from tests.processes import ClusterFactory, http_json, node_args
from tests.scheduling import (
    POLL,
    history,
    running,
    wait_for,
    write_jobs,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
TTL = 3.0


def scrape(node: NodeProcess) -> Samples:
    """``GET /metrics`` of one node: every sample by name and sorted labels."""
    with urllib.request.urlopen(f"{node.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (n, got), value in samples.items() if n == name and wanted <= set(got))


def runs_by_status(samples: Samples) -> Counter[tuple[str, str]]:
    found: Counter[tuple[str, str]] = Counter()
    for (name, labels), value in samples.items():
        if name == "balancectl_scheduler_runs_total" and value:
            label = dict(labels)
            found[(label["job"], label["status"])] = int(value)
    return found


def held_as_listed(node: NodeProcess) -> tuple[int, int]:
    """Jobs held by ``node`` per its /metrics, and per its GET /jobs, read back to back."""
    held = int(total(scrape(node), "balancectl_scheduler_jobs_held"))
    listed = sum(1 for owner in running(node).values() if owner == node.node_id)
    return held, listed


def held_if_agreeing(node: NodeProcess) -> tuple[int, int] | None:
    held, listed = held_as_listed(node)
    return (held, listed) if held == listed else None


def test_the_supervisor_imports_prometheus_client_only_after_its_folder_is_set() -> None:
    # prometheus_client picks its value store when first imported: importing the node
    # (as `balancectl serve` does before it makes the folder) must not import it.
    probe = (
        "import sys, balancectl.cli, balancectl.node; "
        "print(sorted(m for m in sys.modules if m.startswith('prometheus_client'))[:1])"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_metrics_agree_with_the_listing_and_the_history(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    names = ["alpha", "beta", "gamma", "delta"]
    jobs = write_jobs(tmp_path / "jobs.toml", names, min_duration="0.6s", interval="1s")
    cluster = cluster_factory(2, *node_args(jobs_file=jobs, lease_ttl=TTL, poll=POLL, settle=1))
    first = cluster.members[0]
    wait_for("three runs of every job", lambda: all(
        len(history(first, job=name)) >= 3 for name in names), timeout=40, every=0.5)  # fmt: skip

    # Held jobs change as runs start and end: a read of both that agrees comes soon.
    for node in cluster.members:
        agreeing = wait_for(
            f"{node.node_id}'s jobs_held to match GET /jobs",
            lambda node=node: held_if_agreeing(node),  # type: ignore[misc]
            timeout=10,
        )
        print(f"{node.node_id}: held {agreeing[0]} = listed {agreeing[1]}")
        age = total(scrape(node), "balancectl_scheduler_seconds_since_renewal")
        assert 0 <= age < TTL, age  # renewals go out every TTL/3

    # Pause every job and let the runs finish: the counts stop moving, then must match.
    for name in names:
        status, _ = http_json(f"{first.url}/jobs/{name}/pause", method="POST")
        assert status == 200
    wait_for("no job running", lambda: not running(first), timeout=10)
    time.sleep(POLL * 3)
    for node in cluster.members:
        samples = scrape(node)
        recorded = Counter((run.job, run.status) for run in history(node, node=node.node_id))
        print(f"{node.node_id}: {dict(sorted(recorded.items()))}")
        assert recorded, f"{node.node_id} ran nothing"
        assert runs_by_status(samples) == recorded
        runs = sum(recorded.values())
        assert total(samples, "balancectl_scheduler_run_seconds_count") == runs
        assert total(samples, "balancectl_scheduler_claim_latency_seconds_count") == runs
        assert total(samples, "balancectl_scheduler_jobs_held") == 0
        assert total(samples, "balancectl_scheduler_lease_losses_total") == 0
        assert total(samples, "balancectl_scheduler_takeovers_total") == 0
        # The shortest and longest runs lie within the histogram's range of buckets.
        assert total(samples, "balancectl_scheduler_run_seconds_bucket", le="0.5") == 0
        assert total(samples, "balancectl_scheduler_run_seconds_bucket", le="5.0") == runs


def test_a_takeover_and_a_lease_loss_are_counted(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", ["solo"], min_duration="60s", interval="60s")
    cluster = cluster_factory(2, *node_args(jobs_file=jobs, lease_ttl=TTL, poll=POLL, settle=1))
    owner = wait_for("solo to run", lambda: running(cluster.members[0]).get("solo"), timeout=30)
    victim = cluster.node(owner)
    survivor = next(node for node in cluster.members if node is not victim)
    victim.process.kill()

    wait_for("the takeover", lambda: running(survivor).get("solo") == survivor.node_id,
             timeout=TTL + 15)  # fmt: skip
    lost = [run for run in history(survivor, job="solo") if run.status == "lost"]
    assert [run.node for run in lost] == [victim.node_id]
    samples = scrape(survivor)
    assert total(samples, "balancectl_scheduler_takeovers_total", job="solo") == 1
    assert total(samples, "balancectl_scheduler_jobs_held") == 1
    # It became claimable when the lease expired; the claim came within a few polls.
    assert total(samples, "balancectl_scheduler_claim_latency_seconds_count") == 1
    assert total(samples, "balancectl_scheduler_claim_latency_seconds_bucket", le="5.0") == 1
