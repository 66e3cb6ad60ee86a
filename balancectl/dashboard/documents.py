"""The dashboard's job and node entries (msgspec), as ``GET /dashboard`` sends them."""

from __future__ import annotations

import msgspec

from balancectl.scheduler.listing import JobDocument, NodeDocument


class RunCounts(msgspec.Struct):
    """Runs of one job that finished in the last hour, by status."""

    succeeded: int
    failed: int
    lost: int
    cancelled: int
    timed_out: int
    unresponsive: int
    crashed: int


class DashboardJob(JobDocument, kw_only=True):
    """A job as ``GET /jobs`` lists it, with its last hour of runs counted."""

    last_hour: RunCounts


class DashboardNode(NodeDocument, kw_only=True):
    """A node as ``GET /nodes`` lists it, with the number of leases it holds now."""

    jobs_held: int
