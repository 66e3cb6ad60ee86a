"""What a job function receives: who runs it, under which fencing token, and when to stop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime

from balancectl.db import Database


@dataclass
class JobContext:
    """Passed to every job function.

    ``stopping`` is set when the run must end (shutdown, or the lease is lost);
    the scheduler also cancels the function's task. Database writes a job makes
    should be fenced by ``token`` (see ``sql/queries.sql``: ``snapshot_totals``).
    """

    job: str
    node: str
    token: int
    started_at: datetime
    db: Database
    retention_seconds: float = 30 * 24 * 3600.0
    idempotency_retention_seconds: float = 24 * 3600.0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def fence(self) -> dict[str, object]:
        """Query parameters that make a write conditional on this run's lease."""
        return {"job": self.job, "token": self.token}

    async def lease_valid(self) -> bool:
        row = await self.db.fetch_one("lease_valid", self.fence)
        return bool(row and row["valid"])

    async def sleep(self, seconds: float) -> bool:
        """Wait, waking at once when the run must stop; ``False`` when it must."""
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=max(seconds, 0))
        except TimeoutError:
            return True
        return False
