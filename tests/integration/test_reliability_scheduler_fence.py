"""The fence of a job's writes holds until they commit; a clock step doubles no write.

1. A job's write is held inside its statement (the test's open transaction holds the
   primary key the job's next insert draws). Its node is paused (SIGSTOP) past the lease
   TTL, then the statement is let go. No row written under the old token may commit
   after the next claim's ``started_at``: the fence (a ``FOR KEY SHARE`` lock on the job
   row, taken in the write's own transaction) keeps the claim off until the write's
   transaction ends, and a paused client loses that transaction on the server within 1 s.
2. A forward step of the database clock, simulated by stepping the lease's expiry back
   into the past: another node claims the job at once, and from the step's commit on
   the first node writes nothing under its token (every write of a job is fenced).
"""

from __future__ import annotations

import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from balancectl.config import PoolSettings
from balancectl.toolkit.cluster import LocalCluster, NodeProcess
from tests.conftest import sql
from tests.processes import ClusterFactory, node_args
from tests.scheduling import (
    POLL,
    assert_no_overlap,
    history,
    running,
    wait_for,
    write_jobs,
)

pytestmark = pytest.mark.slow

TTL, SETTLE = 3.0, 0.5
JOB = "snap"
SLACK = 2.0
LOCK_TIMEOUT = PoolSettings().lock_timeout  # what ends a held statement on its own
LOCK_MARGIN = 0.5


def lease(url: str) -> tuple[int, datetime]:
    [(token, started)] = sql(url, "SELECT token, started_at FROM jobs WHERE name = %s", (JOB,))
    return int(token), started


def newer(url: str, token: int) -> int | None:
    """The job's token once a claim newer than ``token`` is in its row."""
    current = lease(url)[0]
    return current if current > token else None


def watch_claim(url: str, token: int, seconds: float) -> tuple[int, int] | None:
    """For ``seconds``: the first newer token seen, and the old token's rows at that moment."""
    deadline = time.monotonic() + seconds
    while True:
        current = newer(url, token)
        if current is not None:
            return current, rows_of(url, token)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def rows_of(url: str, token: int) -> int:
    [(count,)] = sql(url, "SELECT count(*) FROM balance_snapshots WHERE job_token = %s", (token,))
    return int(count)


def holder(cluster: LocalCluster) -> NodeProcess:
    owner = wait_for("the job to run", lambda: running(cluster.members[0]).get(JOB), timeout=30)
    return cluster.node(owner)


def hold_next_write(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    """An open transaction holding the snapshot id the job's next insert will draw.

    The job writes every 0.2 s, so the id is taken the moment the job has not drawn it
    yet: an id the job drew first fails here (its row exists, or its insert commits
    while ours waits) and the next one is tried.
    """
    lock = psycopg.connect(url)
    for _ in range(200):
        [(drawn,)] = lock.execute(
            "SELECT last_value FROM pg_sequences WHERE sequencename LIKE 'balance_snapshots_%'"
        ).fetchall()
        try:
            lock.execute(
                "INSERT INTO balance_snapshots (id, taken_at, users, total_balance, "
                "ledger_entries, job_token) OVERRIDING SYSTEM VALUE "
                "VALUES (%s, now(), 0, 0, 0, 0)",
                ((drawn or 0) + 1,),
            )
            return lock
        except psycopg.errors.UniqueViolation:
            lock.rollback()
    lock.close()
    raise AssertionError("the job drew every id before the test could hold one")


def waiting_write_age(url: str) -> float | None:
    """Seconds the job's snapshot insert has waited for the test's transaction (DB clock)."""
    rows = sql(
        url,
        "SELECT extract(epoch FROM now() - query_start) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND query LIKE '%%INSERT INTO balance_snapshots%%' "
        "AND pid <> pg_backend_pid()",
    )
    return float(rows[0][0]) if rows else None


def test_a_write_held_in_its_statement_never_commits_after_the_next_claim(
    cluster_factory: ClusterFactory,
    database_url: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The job writes a fenced snapshot every 0.2 s. Once both nodes serve, the test holds
    the id of the job's next insert in an open transaction, so that insert waits inside
    its statement, and pauses the job's node at once: the statement is fresh, and the
    watch below ends before the node's 5 s lock_timeout would end it."""
    jobs = write_jobs(tmp_path / "jobs.toml", [JOB], "30s", "10m", function="tests.jobs:snapshots")
    cluster = cluster_factory(
        2, *node_args(jobs_file=jobs, lease_ttl=TTL, poll=POLL, settle=SETTLE)
    )
    paused = holder(cluster)
    old_token, _ = lease(database_url)
    wait_for("a first snapshot", lambda: rows_of(database_url, old_token), 15)
    lock = hold_next_write(database_url)
    request.addfinalizer(lock.close)
    wait_for("the write to wait inside its statement", lambda: waiting_write_age(database_url), 5)

    paused.process.send_signal(signal.SIGSTOP)
    try:
        age = waiting_write_age(database_url)
        assert age is not None, "the held write ended before its node was paused"
        before = rows_of(database_url, old_token)
        # Watch past the lease's expiry: a claim seen now was made while the write was
        # held. The watch ends LOCK_MARGIN before the lock_timeout would end the write.
        watch = LOCK_TIMEOUT - age - LOCK_MARGIN
        assert watch >= TTL + POLL * 1.2, f"the held write was {age:.2f} s old at the pause"
        held_claim = watch_claim(database_url, old_token, seconds=watch)
        lock.rollback()  # the held insert runs to its end now
        released = time.monotonic()
        lock.close()
        new_token, at_claim = held_claim or wait_for(
            "another node to claim the job",
            lambda: watch_claim(database_url, old_token, seconds=0.02),
            timeout=TTL + 10,
            every=0.0,
        )
        took = 0.0 if held_claim else time.monotonic() - released
        time.sleep(1.0)
    finally:
        paused.process.send_signal(signal.SIGCONT)
    later = rows_of(database_url, old_token)
    claimed_while_held = held_claim is not None

    print(
        f"\nwrite held {age:.2f} s at the pause, watched {watch:.2f} s; claimed while the "
        f"write was held: {claimed_while_held}; claimed {took:.2f} s after the write was let "
        f"go; rows under token {old_token}: {before} at the pause, {at_claim} then {later}"
    )
    assert later == at_claim, f"a row under token {old_token} committed after the new claim"
    assert later == before, f"the held write under the old token {old_token} committed"
    assert not claimed_while_held, "the job was claimed while its write was still running"
    assert took <= 1.0 + POLL * 1.2 + SLACK, f"the paused write held the job {took:.2f} s"
    wait_for("the new run's snapshot", lambda: rows_of(database_url, new_token), timeout=10)
    assert_no_overlap(history(cluster.members[0]))


def test_a_forward_clock_step_doubles_no_write(
    cluster_factory: ClusterFactory, database_url: str, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", [JOB], "30s", "10m", function="tests.jobs:snapshots")
    cluster = cluster_factory(
        2, *node_args(jobs_file=jobs, lease_ttl=TTL, poll=POLL, settle=SETTLE)
    )
    first = holder(cluster)
    wait_for("a few snapshots", lambda: rows_of(database_url, lease(database_url)[0]) >= 3, 15)
    old_token, _ = lease(database_url)

    sql(
        database_url,
        "UPDATE jobs SET lease_expires_at = now() - interval '1 ms' WHERE name = %s",
        (JOB,),
    )
    # The step's moment is read after its commit: a write whose transaction began between
    # the UPDATE's start and its commit still saw the old lease, and was fenced before
    # the step (the takeover's claim waits for its lock). From this moment on, every
    # fence sees the stepped lease.
    [(stepped_at,)] = sql(database_url, "SELECT now()")
    observer = next(node for node in cluster.members if node is not first)
    taker = wait_for(
        "the other node to take the job",
        lambda: (owner := running(observer).get(JOB)) != first.node_id and owner,
        timeout=TTL + 5,
    )
    new_token, new_started = lease(database_url)
    time.sleep(1.5)
    [(late,)] = sql(
        database_url,
        "SELECT count(*) FROM balance_snapshots WHERE job_token = %s AND taken_at >= %s",
        (old_token, stepped_at),
    )
    [(newest_old,)] = sql(
        database_url, "SELECT max(taken_at) FROM balance_snapshots WHERE job_token = %s",
        (old_token,),
    )  # fmt: skip
    runs = [run for run in history(observer, job=JOB) if run.token == old_token]

    print(f"\nstep at {stepped_at}; taken over by {taker} under token {new_token} at "
          f"{new_started}; last write under token {old_token} at {newest_old}; "
          f"writes after the step: {late}; old run {runs}")  # fmt: skip
    assert late == 0, f"{late} write(s) under token {old_token} after the clock step"
    assert newest_old < new_started
    assert [run.status for run in runs] == ["lost"], runs
    assert_no_overlap(history(observer))
