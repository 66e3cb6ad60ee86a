"""The balance route's outcomes, counted per worker and recorded per second, cluster-wide.

The route counts each answer in memory (one dict increment on the hot path); a task of
the worker records the counts once a second (``FLUSH_EVERY``) in ``request_outcomes``,
one row per (second, node, worker, outcome), the second taken from the database clock.
``GET /dashboard`` sums the rows of the last minute, so any node shows the whole cluster.

A record that fails (the database down or slow) never reaches a request: the counts
are kept and added to the next record, for at most ``KEEP_UNRECORDED`` seconds; older
ones are dropped (and logged), so an outage never shows as a burst of old requests
once the database is back. A record whose answer was lost after it was sent (a link cut
mid-statement) may have been applied; it is retried all the same, so such a second can
be counted twice: the counts are for the eye, never for the money. Rows older than
``RETENTION`` are pruned by the records themselves (every ``PRUNE_EVERY``-th), whichever
node makes them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from balancectl.db import Database

# What the route answered, by name: every key of ``GET /dashboard``'s requests_last_minute.
OUTCOMES = (
    "changed",  # 200: the balance changed now
    "replayed",  # the stored answer of an Idempotency-Key already used (any status)
    "refused",  # 409: insufficient funds, or the balance limit; nothing changed
    "not_found",  # 404: no such user
    "invalid",  # 413, 415, 422 (and 400): the request itself was wrong, or its key reused
    "unauthorized",  # 401: the node has a token and the request did not carry it
    "unavailable",  # 503: no database answer in time
    "failed",  # 500, or any other status: a bug; the node's log has it
)
BY_STATUS = {
    200: "changed",
    400: "invalid",
    401: "unauthorized",
    404: "not_found",
    409: "refused",
    413: "invalid",
    415: "invalid",
    422: "invalid",
    503: "unavailable",
}
FLUSH_EVERY = 1.0  # seconds between records
KEEP_UNRECORDED = 60.0  # seconds counts wait for a record before they are dropped
RETENTION = 300.0  # seconds of rows kept (the dashboard reads the last 60)
PRUNE_EVERY = 60  # records between prunes
WINDOW = 60  # seconds summed by the dashboard
log = logging.getLogger("balancectl.outcomes")


def outcome_of(status: int, replayed: bool = False) -> str:
    """The outcome's name for an answer's status (``replayed``: a stored answer)."""
    return "replayed" if replayed else BY_STATUS.get(status, "failed")


def zeros() -> dict[str, int]:
    return dict.fromkeys(OUTCOMES, 0)


class OutcomeCounts:
    """This worker's counts since its last record, and the record itself."""

    def __init__(self, node_id: str, worker: int | None = None) -> None:
        self.node_id, self.worker = node_id, os.getpid() if worker is None else worker
        self.counts = zeros()
        self.pending = zeros()  # counts a failed record left, with the time of the oldest
        self.pending_since: float | None = None
        self.records = 0
        self.failures = 0  # records failed in a row: only the first is logged as a warning

    def count(self, outcome: str) -> None:
        """One answer of the route (the hot path: a dict increment, nothing else)."""
        self.counts[outcome] += 1

    async def record(self, db: Database) -> bool:
        """Record the counts since the last record; ``False`` when the database failed."""
        self._take()
        names = [name for name, value in self.pending.items() if value]
        try:
            if names:
                await db.execute("record_request_outcomes", self._params(names))
        except Exception as error:  # never let the record end the worker's task
            self.failures += 1
            self._drop_old(error)
            return False
        if self.failures:
            log.info("request counts recorded again after %d failed records", self.failures)
        self.pending, self.pending_since, self.failures = zeros(), None, 0
        self.records += 1
        if self.records % PRUNE_EVERY == 0:
            await prune_quietly(db)
        return True

    def _take(self) -> None:
        taken, self.counts = self.counts, zeros()
        if any(taken.values()) and self.pending_since is None:
            self.pending_since = time.monotonic()
        for name, value in taken.items():
            self.pending[name] += value

    def _params(self, names: list[str]) -> dict[str, object]:
        return {
            "node_id": self.node_id,
            "worker": self.worker,
            "outcomes": names,
            "counts": [self.pending[name] for name in names],
        }

    def _drop_old(self, error: Exception) -> None:
        held = sum(self.pending.values())
        if self.pending_since is None or time.monotonic() - self.pending_since < KEEP_UNRECORDED:
            level = logging.WARNING if self.failures == 1 else logging.DEBUG
            log.log(level, "request counts not recorded (%d kept for the next try): %s",
                    held, error)  # fmt: skip
            return
        log.warning("request counts not recorded for %g s, %d dropped: %s",
                    KEEP_UNRECORDED, held, error)  # fmt: skip
        self.pending, self.pending_since = zeros(), None


async def prune(db: Database) -> int:
    """Delete the rows past ``RETENTION`` (every node's: a node gone for good has some)."""
    return await db.execute("prune_request_outcomes", {"retention_seconds": RETENTION})


async def prune_quietly(db: Database) -> None:
    """A prune that fails is left to the next one (a minute later, or another node's)."""
    try:
        await prune(db)
    except Exception as error:
        log.debug("request counts not pruned: %s", error)


async def record_every_second(counts: OutcomeCounts, db: Database) -> None:
    """The worker's task: a record a second, until cancelled."""
    while True:
        await asyncio.sleep(FLUSH_EVERY)
        await counts.record(db)


async def last_record(counts: OutcomeCounts, db: Database, bound: float = 2.0) -> None:
    """On the way out, record what is left, waiting at most ``bound`` seconds."""
    try:
        await asyncio.wait_for(counts.record(db), bound)
    except TimeoutError:
        log.warning("the last request counts were not recorded within %g s", bound)
