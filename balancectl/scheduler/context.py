"""What a job function receives: who runs it, under which fencing token, and its fenced session.

A job never sees a connection pool. Every statement it runs goes through
``JobContext.execute`` / ``fetch_one`` / ``fetch_all`` (one fenced transaction each) or
``JobContext.transaction()`` (several statements in one fenced transaction). A fenced
transaction starts with ``fence_job``: it locks the job row ``FOR KEY SHARE`` while the
lease is still this run's, so no other node can claim the job (the claim's ``FOR UPDATE
SKIP LOCKED`` skips the row) until the transaction commits or rolls back. Before each
statement and before ``COMMIT`` the node's local deadline is checked too: a run that was
stopped, or whose lease the node can no longer vouch for, sends nothing more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from balancectl.config import HISTORY_RETENTION, IDEMPOTENCY_RETENTION
from balancectl.db import Database, Params, Row, Session
from balancectl.errors import BalancectlError

# A fenced transaction whose client stops talking (a pause, a cut link) loses its lock
# after this long on the server, so it never blocks a takeover for longer.
IDLE_IN_FENCE_MS = 1000


class LeaseLost(BalancectlError):
    """The run no longer holds its lease (or was told to stop): nothing was written."""

    slug, status, title = "lease-lost", 409, "Lease lost"


@dataclass
class JobContext:
    """Passed to every job function.

    ``stopping`` is set when the run must end (shutdown, lease lost, ``max_duration``);
    the scheduler also cancels the function's task. ``deadline`` returns the monotonic
    time until which the node vouches for the lease.
    """

    job: str
    node: str
    token: int
    started_at: datetime
    database: Database
    deadline: Callable[[], float]
    retention_seconds: float = HISTORY_RETENTION
    idempotency_retention_seconds: float = IDEMPOTENCY_RETENTION
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def fence(self) -> dict[str, object]:
        """This run's job and token, merged into every statement's parameters."""
        return {"job": self.job, "token": self.token}

    def check(self) -> None:
        """Raise ``LeaseLost`` unless the run may still send a write."""
        if self.stopping.is_set():
            raise LeaseLost(f"the run of {self.job} (token {self.token}) was stopped")
        if time.monotonic() >= self.deadline():
            raise LeaseLost(f"the lease of {self.job} (token {self.token}) may have expired")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[FencedSession]:
        """One fenced transaction: committed on a clean exit, only while the lease holds."""
        self.check()
        async with self.database.transaction() as session:
            fenced = FencedSession(self, session)
            row = await session.fetch_one(
                "fence_job", {**self.fence, "idle_timeout": str(IDLE_IN_FENCE_MS)}
            )
            if row is None:
                raise LeaseLost(f"the lease of {self.job} (token {self.token}) is gone")
            yield fenced
            self.check()  # the commit is sent only while the node vouches for the lease

    async def execute(self, name: str, params: Params | None = None) -> int:
        """Run one named statement in its own fenced transaction; the row count."""
        async with self.transaction() as session:
            return await session.execute(name, params)

    async def fetch_one(self, name: str, params: Params | None = None) -> Row | None:
        async with self.transaction() as session:
            return await session.fetch_one(name, params)

    async def fetch_all(self, name: str, params: Params | None = None) -> list[Row]:
        async with self.transaction() as session:
            return await session.fetch_all(name, params)


class FencedSession:
    """Named statements inside one fenced transaction; each checks the deadline first."""

    def __init__(self, context: JobContext, session: Session) -> None:
        self._context, self._session = context, session

    def _params(self, params: Params | None) -> dict[str, Any]:
        self._context.check()
        return {**self._context.fence, **(params or {})}

    async def execute(self, name: str, params: Params | None = None) -> int:
        return await self._session.execute(name, self._params(params))

    async def fetch_one(self, name: str, params: Params | None = None) -> Row | None:
        return await self._session.fetch_one(name, self._params(params))

    async def fetch_all(self, name: str, params: Params | None = None) -> list[Row]:
        return await self._session.fetch_all(name, self._params(params))
