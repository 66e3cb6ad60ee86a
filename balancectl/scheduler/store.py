"""The scheduler's rows: node presence, job leases and run history, each change one statement."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
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


class SchedulerStore:
    """Every database call the scheduler makes, on the database clock."""

    def __init__(self, db: Database, node: str, lease_ttl: float) -> None:
        self.db, self.node, self.lease_ttl = db, node, lease_ttl

    async def register_node(self) -> None:
        params = {"node": self.node, "host": socket.gethostname(), "pid": os.getpid()}
        await self.db.fetch_one("register_node", params)

    async def touch_node(self) -> None:
        await self.db.execute("touch_node", {"node": self.node})

    async def stop_node(self) -> None:
        await self.db.execute("stop_node", {"node": self.node})

    async def register_jobs(self, specs: Sequence[JobSpec]) -> None:
        async with self.db.transaction() as tx:
            for spec in specs:
                await tx.execute(
                    "register_job",
                    {
                        "name": spec.name,
                        "function": spec.function,
                        "interval_seconds": spec.interval,
                        "min_duration_seconds": spec.min_duration,
                    },
                )

    async def claim(self, names: Sequence[str], settle: float, starve_after: float) -> Claim | None:
        """Claim one due job, or ``None``; see ``claim_job`` for the spreading rule."""
        row = await self.db.fetch_one(
            "claim_job",
            {
                "node": self.node,
                "names": list(names),
                "lease_ttl": self.lease_ttl,
                "settle": settle,
                "starve_after": starve_after,
            },
        )
        return None if row is None else claim_of(row)

    async def renew(self, held: dict[str, int]) -> set[str]:
        """Extend the leases still held under these tokens; the names renewed."""
        if not held:
            return set()
        rows = await self.db.fetch_all(
            "renew_leases",
            {
                "node": self.node,
                "names": list(held),
                "tokens": list(held.values()),
                "lease_ttl": self.lease_ttl,
            },
        )
        return {str(row["name"]) for row in rows}

    async def finish(self, job: str, token: int, status: str, error: str | None) -> str | None:
        """Record the run of ``token`` and release the job; the status written, if any."""
        row = await self.db.fetch_one(
            "finish_run",
            {"node": self.node, "job": job, "token": token, "status": status, "error": error},
        )
        return None if row is None else str(row["status"])


def claim_of(row: Row) -> Claim:
    return Claim(
        job=row["name"],
        function=row["function"],
        token=int(row["token"]),
        started_at=row["started_at"],
        min_duration=float(row["min_duration_seconds"]),
    )
