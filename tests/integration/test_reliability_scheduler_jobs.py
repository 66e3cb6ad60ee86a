"""Misbehaving jobs are caught, their leases end, and history says what happened.

One node runs three jobs, each once (interval 1 h, TTL 3 s):
- ``stubborn`` swallows every cancellation; ``max_duration`` 2 s. It is stopped at 2 s,
  ignores it, and is given up: recorded ``unresponsive`` and its lease not renewed;
- ``dying``: its task dies with an exception the runner does not catch: ``crashed``;
- ``slow`` works for 60 s with ``max_duration`` 2 s; it stops when told: ``timed_out``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import sql
from tests.processes import ClusterFactory, node_args
from tests.scheduling import (
    POLL,
    Run,
    assert_no_overlap,
    history,
    wait_for,
    write_jobs,
)

pytestmark = pytest.mark.slow

TTL = 3.0


def jobs_file(path: Path) -> Path:
    parts = [
        write_jobs(path / f"{name}.toml", [name], "0s", "1h", f"tests.jobs:{fn}", longest)
        .read_text()
        for name, fn, longest in [
            ("stubborn", "ignores_stop", "2s"),
            ("dying", "dies", None),
            ("slow", "busy", "2s"),
        ]
    ]  # fmt: skip
    target = path / "jobs.toml"
    target.write_text("\n".join(parts))
    return target


def first_runs(runs: list[Run]) -> dict[str, Run] | None:
    by_job = {run.job: run for run in runs}
    return by_job if len(by_job) == 3 else None


def test_a_job_that_ignores_its_stop_dies_or_overruns_is_recorded_and_its_lease_ends(
    cluster_factory: ClusterFactory, database_url: str, tmp_path: Path
) -> None:
    cluster = cluster_factory(
        1, *node_args(jobs_file=jobs_file(tmp_path), lease_ttl=TTL, poll=POLL, settle=0)
    )
    began = time.monotonic()
    node = cluster.members[0]
    runs = wait_for("a record of each job", lambda: first_runs(history(node)), timeout=30)
    took = time.monotonic() - began
    time.sleep(TTL)  # a lease still renewed would now show in the row
    leases = dict(sql(database_url, "SELECT name, lease_expires_at > now() FROM jobs"))

    print(f"\nall three recorded within {took:.2f} s of the node's start: "
          + "; ".join(f"{r.job} {r.status} after {r.duration_seconds} s ({r.error})"
                      for r in runs.values()))  # fmt: skip
    stubborn, dying, slow = runs["stubborn"], runs["dying"], runs["slow"]
    assert stubborn.status == "unresponsive", stubborn
    assert stubborn.error is not None and "timed_out" in stubborn.error, stubborn
    assert 2.0 <= stubborn.duration_seconds <= 2.0 + TTL + 1.0, stubborn
    assert dying.status == "crashed", dying
    assert dying.error is not None and "Died: gone" in dying.error, dying
    assert slow.status == "timed_out", slow
    assert 2.0 <= slow.duration_seconds <= 3.0, slow
    assert leases == {"stubborn": None, "dying": None, "slow": None}, leases
    assert_no_overlap(history(node))
