"""The dashboard's job and node entries (msgspec), as ``GET /dashboard`` sends them."""

from __future__ import annotations

from typing import Literal

import msgspec

from balancectl.scheduler.listing import RunDocument


class RunCounts(msgspec.Struct):
    """Runs of one job that finished in the last hour, by status."""

    succeeded: int
    failed: int
    lost: int
    cancelled: int
    timed_out: int
    unresponsive: int
    crashed: int


class DashboardJob(msgspec.Struct):
    """A job as ``GET /jobs`` lists it, with its last hour of runs counted."""

    name: str
    function: str
    interval_seconds: float
    state: Literal["running", "waiting", "paused"]
    node: str | None
    started_at: str | None
    elapsed_seconds: float | None
    next_run_at: str | None
    last_run: RunDocument | None
    paused: bool
    last_hour: RunCounts


class DashboardNode(msgspec.Struct):
    """A node as ``GET /nodes`` lists it, with the number of leases it holds now."""

    id: str
    host: str
    pid: int
    started_at: str
    last_seen_at: str
    alive: bool
    jobs_held: int
