"""What ``GET /jobs``, ``/jobs/history`` and ``/nodes`` show: the listing's one shape.

The documents are msgspec Structs, built from rows here and nowhere else; the routes return
them as they are, the dashboard extends them, and ``balancectl jobs`` decodes a node's
answer into them. ``ListingStore`` is the only caller of the queries behind them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from balancectl.db import Reader, Row
from balancectl.errors import JobNotFound

# ``running`` (a paused job's run in progress finishes), else ``paused`` or ``waiting``.
JobState = Literal["running", "waiting", "paused"]


class RunDocument(msgspec.Struct):
    id: int
    job: str
    node: str
    token: int
    started_at: str
    finished_at: str
    duration_seconds: float
    status: str
    error: str | None


class JobDocument(msgspec.Struct):
    name: str
    function: str
    interval_seconds: float
    state: JobState
    node: str | None
    started_at: str | None
    elapsed_seconds: float | None
    next_run_at: str | None
    last_run: RunDocument | None
    paused: bool = False


class JobsDocument(msgspec.Struct):
    now: str
    jobs: list[JobDocument]


class HistoryDocument(msgspec.Struct):
    runs: list[RunDocument]


class NodeDocument(msgspec.Struct):
    id: str
    host: str
    pid: int
    started_at: str
    last_seen_at: str
    alive: bool


class NodesDocument(msgspec.Struct):
    nodes: list[NodeDocument]


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def run_of(row: Row, prefix: str = "") -> RunDocument:
    """A run row (or, with ``prefix``, the ``run_*`` columns of a job row) as the contract's Run."""
    started, finished = row[f"{prefix}started_at"], row[f"{prefix}finished_at"]
    return RunDocument(
        id=int(row[f"{prefix}id"]),
        job=row.get(f"{prefix}job") or row["name"],
        node=row[f"{prefix}node"],
        token=int(row[f"{prefix}token"]),
        started_at=started.isoformat(),
        finished_at=finished.isoformat(),
        duration_seconds=round((finished - started).total_seconds(), 3),
        status=row[f"{prefix}status"],
        error=row[f"{prefix}error"],
    )


def last_run_of(row: Row) -> RunDocument | None:
    """A job row's newest finished run, if it has one."""
    return None if row["run_id"] is None else run_of(row, "run_")


def job_state(running: bool, paused: bool) -> JobState:
    if running:
        return "running"
    return "paused" if paused else "waiting"


def job_of(row: Row) -> JobDocument:
    running, paused = bool(row["running"]), row["paused_at"] is not None
    return JobDocument(
        name=row["name"],
        function=row["function"],
        interval_seconds=float(row["interval_seconds"]),
        state=job_state(running, paused),
        node=row["owner"] if running else None,
        started_at=iso(row["started_at"]) if running else None,
        elapsed_seconds=round(float(row["elapsed_seconds"]), 3) if running else None,
        next_run_at=None if running else iso(row["next_run_at"]),
        last_run=last_run_of(row),
        paused=paused,
    )


def node_of(row: Row) -> NodeDocument:
    return NodeDocument(
        id=row["id"],
        host=row["host"],
        pid=int(row["pid"]),
        started_at=row["started_at"].isoformat(),
        last_seen_at=row["last_seen_at"].isoformat(),
        alive=bool(row["alive"]),
    )


class ListingStore:
    """The listing's reads, on a ``Database`` (each its own statement) or on a ``Session``
    (inside the caller's transaction, as the dashboard reads everything at one instant)."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader

    async def jobs(self) -> JobsDocument:
        """Every configured job, running, waiting or paused, read at one database instant."""
        rows = await self.reader.fetch_all("list_jobs")
        now = rows[0]["now"] if rows else await self.now()
        return JobsDocument(now=now.isoformat(), jobs=[job_of(row) for row in rows])

    async def now(self) -> datetime:
        row = await self.reader.fetch_one("database_now")
        assert row is not None, "database_now always answers one row"
        value: datetime = row["now"]
        return value

    async def job(self, name: str) -> JobDocument:
        """One job as ``jobs()`` lists it; ``JobNotFound`` if none has that name."""
        for job in (await self.jobs()).jobs:
            if job.name == name:
                return job
        raise JobNotFound(f"no job is named {name!r}")

    async def history(self, job: str | None, node: str | None, limit: int) -> HistoryDocument:
        """Finished runs, newest first (custom plans, so each filter uses its index)."""
        params = {"job": job, "node": node, "limit": limit}
        rows = await self.reader.fetch_all("job_history", params, prepare=False)
        return HistoryDocument(runs=[run_of(row) for row in rows])

    async def nodes(self, lease_ttl: float) -> NodesDocument:
        """Every node that has run; ``alive`` when seen within ``lease_ttl``."""
        rows = await self.reader.fetch_all("list_nodes", {"lease_ttl": lease_ttl})
        return NodesDocument(nodes=[node_of(row) for row in rows])
