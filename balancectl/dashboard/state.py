"""What ``GET /dashboard`` answers: jobs, nodes, the timeline and the money, at one instant.

Every statement runs in one transaction on one connection, so every time in the document
comes from the same database ``now()`` (a transaction's ``now()`` does not move), whichever
node answers. The jobs and the nodes are the documents of ``GET /jobs`` and ``GET /nodes``,
read by their store (``balancectl.scheduler.listing.ListingStore``) inside that transaction
and extended by the counts the dashboard adds.
"""

from __future__ import annotations

from typing import Any

import msgspec

from balancectl import outcomes
from balancectl.dashboard.documents import DashboardJob, DashboardNode, RunCounts
from balancectl.db import Database, Row, Session
from balancectl.scheduler import listing
from balancectl.scheduler.listing import JobDocument, ListingStore, NodeDocument

AUDIT_FUNCTION = "balancectl.jobs.builtin:ledger_audit"
TIMELINE_LIMIT = 2000  # finished runs drawn at most; the document says when more were left off
# Every status history may hold (job_runs_status); a count of 0 is listed too.
STATUSES = ("succeeded", "failed", "lost", "cancelled", "timed_out", "unresponsive", "crashed")


async def dashboard_document(
    db: Database, node_id: str, lease_ttl: float, minutes: int
) -> dict[str, Any]:
    """The dashboard's document, JSON-ready (see ``DashboardDocument``)."""
    async with db.transaction() as session:
        store = ListingStore(session)
        jobs = (await store.jobs()).jobs
        nodes = (await store.nodes(lease_ttl)).nodes
        timeline = await timeline_rows(session, minutes)
        summary = await session.fetch_one("dashboard_summary", {"audit_function": AUDIT_FUNCTION})
        requests = await session.fetch_all("dashboard_requests", {"seconds": outcomes.WINDOW})
    assert summary is not None, "dashboard_summary always answers one row"
    finished = [row for row in timeline if row["finished_at"] is not None]
    return {
        "now": listing.iso(summary["now"]),
        "served_by": node_id,
        "minutes": minutes,
        "lease_ttl_seconds": lease_ttl,
        "jobs": [job_entry(job, summary["last_hour"]) for job in jobs],
        "nodes": [node_entry(node, jobs) for node in nodes],
        "timeline": [timeline_entry(row) for row in timeline],
        "timeline_truncated": len(finished) >= TIMELINE_LIMIT,
        "money": money_entry(summary, requests),
    }


async def timeline_rows(session: Session, minutes: int) -> list[Row]:
    params = {"minutes": minutes, "limit": TIMELINE_LIMIT}
    return await session.fetch_all("dashboard_timeline", params)


def job_entry(job: JobDocument, last_hour: dict[str, dict[str, int]]) -> DashboardJob:
    counts = last_hour.get(job.name, {})
    runs = RunCounts(**{status: int(counts.get(status, 0)) for status in STATUSES})
    return DashboardJob(**msgspec.structs.asdict(job), last_hour=runs)


def node_entry(node: NodeDocument, jobs: list[JobDocument]) -> DashboardNode:
    """A node of ``GET /nodes`` and how many leases it holds now (running jobs it owns)."""
    held = sum(1 for job in jobs if job.state == "running" and job.node == node.id)
    return DashboardNode(**msgspec.structs.asdict(node), jobs_held=held)


def timeline_entry(row: Row) -> dict[str, Any]:
    return {
        "job": row["job"],
        "node": row["node"],
        "token": int(row["token"]),
        "started_at": listing.iso(row["started_at"]),
        "finished_at": listing.iso(row["finished_at"]),
        "status": row["status"],
        "error": row["error"],
    }


def requests_entry(rows: list[Row]) -> dict[str, int]:
    """The balance route's answers of the last minute, cluster-wide, by every outcome."""
    counted = {row["outcome"]: int(row["requests"]) for row in rows}
    return {name: counted.get(name, 0) for name in outcomes.OUTCOMES}


def money_entry(summary: Row, requests: list[Row]) -> dict[str, Any]:
    audit = None
    if summary["audit_job"] is not None:
        audit = {
            "job": summary["audit_job"],
            "status": summary["audit_status"],
            "finished_at": listing.iso(summary["audit_finished_at"]),
            "error": summary["audit_error"],
        }
    total, ledger = summary["total_balance"], summary["ledger_sum"]
    return {
        "users": int(summary["users"]),
        "total_balance": total,
        "ledger_sum": ledger,
        "balanced": int(total) == int(ledger),
        "audit": audit,
        "requests_last_minute": requests_entry(requests),
    }
