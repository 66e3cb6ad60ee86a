"""The scheduler's rows: node presence, job leases and run history, each change one statement."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from balancectl.db import Database, Row
from balancectl.scheduler.registry import JobSpec


@dataclass(frozen=True)
class Claim:
    """A lease this node won: run ``job`` under ``token``."""

    job: str
    function: str
    token: int
    started_at: datetime
    min_duration: float
    due_at: datetime | None = None  # when it became claimable: due, or its lease expired
    took_over: bool = False  # the claim took an expired lease of another run over


@dataclass(frozen=True)
class Renewal:
    """One renewal's answer: the database's clock, the leases extended, unknown ones freed,
    and the renewed runs an operator's pause asked to stop."""

    now: datetime
    renewed: set[str]
    released: int
    stop: set[str] = field(default_factory=set)


class SchedulerStore:
    """Every database call the scheduler makes, on the database clock."""

    def __init__(self, db: Database, node: str, lease_ttl: float) -> None:
        self.db, self.node, self.lease_ttl = db, node, lease_ttl

    async def register_node(self) -> None:
        params = {"node": self.node, "host": socket.gethostname(), "pid": os.getpid()}
        await self.db.fetch_one("register_node", params)

    async def stop_node(self) -> None:
        await self.db.execute("stop_node", {"node": self.node})

    async def register_jobs(self, specs: Sequence[JobSpec]) -> None:
        """Add or update every job's definition in one statement (no lock held across trips)."""
        await self.db.execute(
            "register_jobs",
            {
                "names": [spec.name for spec in specs],
                "functions": [spec.function for spec in specs],
                "intervals": [spec.interval for spec in specs],
                "min_durations": [spec.min_duration for spec in specs],
            },
        )

    async def claim(
        self,
        names: Sequence[str],
        settle: float,
        starve_after: float,
        may_starve: bool,
        alive_at: datetime | None = None,
    ) -> Claim | None:
        """Claim one due job, or ``None``; see ``claim_job`` for the spreading rule."""
        row = await self.db.fetch_one(
            "claim_job",
            {
                "node": self.node,
                "names": list(names),
                "lease_ttl": self.lease_ttl,
                "settle": settle,
                "starve_after": starve_after,
                "may_starve": may_starve,
                "alive_at": alive_at,
            },
        )
        return None if row is None else claim_of(row)

    async def renew(
        self, held: dict[str, int], known: Sequence[str], claim_deadline: float
    ) -> Renewal:
        """Extend the leases still held under these tokens and heartbeat, in one statement;
        free a lease of this node older than ``claim_deadline`` that is not ``known``."""
        row = await self.db.fetch_one(
            "renew_leases",
            {
                "node": self.node,
                "names": list(held),
                "tokens": list(held.values()),
                "known": list(known),
                "lease_ttl": self.lease_ttl,
                "claim_deadline": claim_deadline,
            },
        )
        assert row is not None  # an aggregate query: always one row
        return Renewal(
            row["now"],
            {str(name) for name in row["renewed"]},
            int(row["released"]),
            {str(name) for name in row["stop"]},
        )

    async def finish(
        self, job: str, token: int, status: str, error: str | None, work_done: bool = False
    ) -> str | None:
        """Record the run of ``token`` and release the job; the status written, if any."""
        row = await self.db.fetch_one(
            "finish_run",
            {
                "node": self.node,
                "job": job,
                "token": token,
                "status": status,
                "error": error,
                "work_done": work_done,
            },
        )
        return None if row is None else str(row["status"])


def claim_of(row: Row) -> Claim:
    return Claim(
        job=row["name"],
        function=row["function"],
        token=int(row["token"]),
        started_at=row["started_at"],
        min_duration=float(row["min_duration_seconds"]),
        due_at=row.get("due_at"),
        took_over=bool(row.get("took_over")),
    )
