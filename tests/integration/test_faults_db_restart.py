"""PostgreSQL restarted under load, with real node processes and a private server.

The test starts its own embedded PostgreSQL (so the server every other test shares is
never restarted), migrates it, and runs three nodes with a short job against it while
two client threads send keyed debits without pause. Then it stops the server, probes
every node while it is down, and starts it again:

- while it is down every ``POST`` is ``503 unavailable`` (problem+json) within 3 s and
  every ``/readyz`` is 503;
- once it is back, every node serves again without a restart (recovery measured per node)
  and the scheduler runs the job again;
- every key sent during the outage, retried after it, changed the balance exactly once;
  the ledger adds up to the balance; no two runs of the job overlap.
"""

from __future__ import annotations

import itertools
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from balancectl.migrations import upgrade
from balancectl.toolkit.cluster import LocalCluster, NodeProcess, ready
from balancectl.toolkit.embedded import embedded_database_url, stop_embedded
from tests.conftest import sql
from tests.processes import ClusterFactory, node_args, post_debit
from tests.scheduling import (
    assert_no_overlap,
    history,
    jobs_listing,
    wait_for,
    write_jobs,
)

pytestmark = pytest.mark.slow

NODES = 3
TTL, POLL = 3.0, 0.2
JOB = "tick"
DOWN_FOR = 5.0  # seconds the server stays down (at least)
FAST = 3.0  # a 503 while the database is down must come quicker than this
RETRYABLE = {None, 502, 503, 504}


def get_status(url: str, timeout: float = 30.0) -> tuple[int | None, float]:
    began = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int | None = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError:
        status = None
    return status, time.monotonic() - began


@dataclass
class Load:
    """Client threads sending keyed debits round-robin; every key and its last answer."""

    urls: list[str]
    answers: dict[str, int | None] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, clients: int = 2) -> Load:
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(clients)]
        for thread in self.threads:
            thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _run(self, offset: int) -> None:
        for url in itertools.islice(itertools.cycle(self.urls), offset, None):
            if self.stop.is_set():
                return
            key = f"load-{uuid.uuid4()}"
            self.answers[key] = post_debit(url, key, -1).status
            time.sleep(0.02)

    def unsettled(self) -> list[str]:
        return [key for key, status in self.answers.items() if status in RETRYABLE]


def settle(urls: list[str], keys: list[str], answers: dict[str, int | None]) -> None:
    """Retry every unsettled key, on each node in turn, until it has a definite answer."""
    for key in keys:
        for attempt in range(20):
            answers[key] = post_debit(urls[attempt % len(urls)], key, -1).status
            if answers[key] not in RETRYABLE:
                break
            time.sleep(0.5)
        assert answers[key] == 200, (key, answers[key])


def probe_while_down(cluster: LocalCluster, answers: dict[str, int | None]) -> list[float]:
    """Every node: a keyed POST is a quick 503 problem, /readyz a quick 503."""
    seconds: list[float] = []
    for node in cluster.members:
        key = f"outage-{node.node_id}-{uuid.uuid4()}"
        answer = post_debit(node.url, key, -1)
        answers[key] = answer.status
        assert answer.status == 503, (node.node_id, answer)
        assert answer.content_type.startswith("application/problem+json"), answer
        assert answer.body["type"] == "urn:balancectl:problem:unavailable", answer
        assert answer.body["outcome"] in ("not-applied", "unknown"), answer
        status, ready_seconds = get_status(f"{node.url}/readyz")
        assert status == 503, (node.node_id, status)
        seconds += [answer.seconds, ready_seconds]
    assert max(seconds) < FAST, f"503 took up to {max(seconds):.2f} s"
    return seconds


def recovery_seconds(
    cluster: LocalCluster, up: float, answers: dict[str, int | None]
) -> dict[str, float]:
    """Seconds from the server's return until each node answers /readyz and a POST again."""
    recovered: dict[str, float] = {}
    deadline = up + 60
    while len(recovered) < len(cluster.members):
        assert time.monotonic() < deadline, f"only {sorted(recovered)} recovered"
        for node in cluster.members:
            if node.node_id in recovered or not ready(node.url):
                continue
            key = f"after-{node.node_id}-{uuid.uuid4()}"
            answers[key] = post_debit(node.url, key, -1).status
            if answers[key] == 200:
                recovered[node.node_id] = time.monotonic() - up
        time.sleep(0.1)
    return recovered


def restarted_at(url: str) -> datetime:
    [(started,)] = sql(url, "SELECT pg_postmaster_start_time()")
    assert isinstance(started, datetime)
    return started


def just_started(node: NodeProcess) -> bool:
    """The job runs, and has more than 2.5 s to go: the outage will catch this very run."""
    job = jobs_listing(node)[JOB]
    return bool(job["state"] == "running" and job["elapsed_seconds"] < 1.5)


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[Path]:
    """The data folder of this test's own embedded PostgreSQL; stopped afterwards."""
    pgdata = tmp_path / "pg"
    yield pgdata
    stop_embedded(pgdata)


def test_postgres_restart_under_load_nodes_recover_and_nothing_applies_twice(
    cluster_factory: ClusterFactory, private_server: Path, tmp_path: Path
) -> None:
    url = embedded_database_url(private_server)
    upgrade(url)
    # A run is nearly always in progress: the outage catches one, whose lease it outlasts.
    jobs = write_jobs(tmp_path / "jobs.toml", [JOB], min_duration="4s", interval="1s")
    cluster = cluster_factory(NODES, *node_args(jobs_file=jobs, lease_ttl=TTL, poll=POLL), url=url)
    pids = [node.process.pid for node in cluster.members]
    observer = cluster.members[0]
    wait_for("a first run of the job", lambda: history(observer, job=JOB), timeout=30)
    load = Load(cluster.urls).start()
    time.sleep(2.0)
    wait_for("a run of the job just started", lambda: just_started(observer), timeout=15)
    [(caught,)] = sql(url, "SELECT token FROM jobs WHERE name = %s", (JOB,))

    assert stop_embedded(private_server)
    down = time.monotonic()
    seconds = probe_while_down(cluster, load.answers)
    time.sleep(max(0.0, DOWN_FOR - (time.monotonic() - down)))
    assert embedded_database_url(private_server) == url
    up = time.monotonic()
    recovered = recovery_seconds(cluster, up, load.answers)
    resumed = wait_for(
        "a run that started after the restart",
        lambda: [r for r in history(observer, job=JOB) if r.started_at > restarted_at(url)],
        timeout=30,
    )
    load.finish()
    resumed_after = (resumed[-1].started_at - restarted_at(url)).total_seconds()
    unsettled = load.unsettled()
    settle(cluster.urls, unsettled, load.answers)

    print(
        f"\ndown {up - down:.1f} s; 503s while down in {min(seconds):.2f}..{max(seconds):.2f} s; "
        f"recovered after {', '.join(f'{n} {s:.2f} s' for n, s in recovered.items())}; "
        f"first run after the restart {resumed_after:.2f} s after the server started; "
        f"keys {len(load.answers)}, retried {len(unsettled)}"
    )
    assert [node.process.pid for node in cluster.members] == pids
    assert all(node.process.poll() is None for node in cluster.members)
    assert unsettled, "no request met the outage: it proved nothing"
    outage_keys = [key for key in load.answers if key.startswith("outage-")]
    assert len(outage_keys) == NODES and set(outage_keys) <= set(unsettled)
    assert set(load.answers.values()) == {200}, "a key was left without its change"
    applied = dict(sql(url, "SELECT idempotency_key, count(*) FROM ledger GROUP BY 1"))
    assert set(applied) == set(load.answers) | {None}, "a change without its key, or lost"
    assert {applied[key] for key in load.answers} == {1}, "a key applied twice"
    [(balance,)] = sql(url, "SELECT balance FROM users WHERE id = 1")
    assert balance == 10000 - len(load.answers)
    assert sql(url, "SELECT sum(amount) FROM ledger WHERE user_id = 1") == [(balance,)]
    runs = history(observer, job=JOB)
    [outlasted] = [run for run in runs if run.token == caught]
    assert outlasted.status == "lost" and outlasted.finished_at < restarted_at(url), outlasted
    assert any(run.status == "succeeded" for run in resumed), resumed
    assert_no_overlap(runs)
    print(f"job runs: {len(runs)} ({', '.join(sorted({r.status for r in runs}))}); overlaps: 0")
