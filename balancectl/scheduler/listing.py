"""What ``GET /jobs``, ``/jobs/history`` and ``/nodes`` show: their documents (msgspec) and
the JSON-ready dicts built from rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from balancectl.db import Database, Row
from balancectl.errors import JobNotFound


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
    state: str
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


def run_document(row: Row, prefix: str = "") -> dict[str, Any] | None:
    """A run row (or the ``run_*`` columns of a job row) as the contract's Run."""
    if row[f"{prefix}id"] is None:
        return None
    started, finished = row[f"{prefix}started_at"], row[f"{prefix}finished_at"]
    return {
        "id": int(row[f"{prefix}id"]),
        "job": row.get(f"{prefix}job") or row["name"],
        "node": row[f"{prefix}node"],
        "token": int(row[f"{prefix}token"]),
        "started_at": iso(started),
        "finished_at": iso(finished),
        "duration_seconds": round((finished - started).total_seconds(), 3),
        "status": row[f"{prefix}status"],
        "error": row[f"{prefix}error"],
    }


def job_state(running: bool, paused: bool) -> str:
    """``running`` (a paused job's run in progress finishes), else ``paused`` or ``waiting``."""
    if running:
        return "running"
    return "paused" if paused else "waiting"


def job_document(row: Row) -> dict[str, Any]:
    running, paused = bool(row["running"]), row["paused_at"] is not None
    return {
        "name": row["name"],
        "function": row["function"],
        "interval_seconds": float(row["interval_seconds"]),
        "state": job_state(running, paused),
        "paused": paused,
        "node": row["owner"] if running else None,
        "started_at": iso(row["started_at"]) if running else None,
        "elapsed_seconds": round(float(row["elapsed_seconds"]), 3) if running else None,
        "next_run_at": None if running else iso(row["next_run_at"]),
        "last_run": run_document(row, "run_"),
    }


async def jobs_document(db: Database) -> dict[str, Any]:
    """Every configured job, running or waiting, read at one database instant."""
    rows = await db.fetch_all("list_jobs")
    now = rows[0]["now"] if rows else (await db.fetch_one("database_now") or {}).get("now")
    return {"now": iso(now), "jobs": [job_document(row) for row in rows]}


async def job_named(db: Database, name: str) -> dict[str, Any]:
    """One job as ``GET /jobs`` lists it; ``JobNotFound`` if none has that name."""
    jobs: list[dict[str, Any]] = (await jobs_document(db))["jobs"]
    for job in jobs:
        if job["name"] == name:
            return job
    raise JobNotFound(f"no job is named {name!r}")


async def history_document(
    db: Database, job: str | None, node: str | None, limit: int
) -> dict[str, Any]:
    """Finished runs, newest first (custom plans, so each filter uses its index)."""
    rows = await db.fetch_all(
        "job_history", {"job": job, "node": node, "limit": limit}, prepare=False
    )
    return {"runs": [run_document(row) for row in rows]}


async def nodes_document(db: Database, lease_ttl: float) -> dict[str, Any]:
    rows = await db.fetch_all("list_nodes", {"lease_ttl": lease_ttl})
    return {
        "nodes": [
            {
                "id": row["id"],
                "host": row["host"],
                "pid": int(row["pid"]),
                "started_at": iso(row["started_at"]),
                "last_seen_at": iso(row["last_seen_at"]),
                "alive": bool(row["alive"]),
            }
            for row in rows
        ]
    }
