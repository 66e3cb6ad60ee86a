"""The in-process scheduler of one node: claim due jobs, keep their leases, run them, record them.

Three small loops share one node's state:
- ``_claim_loop`` claims due jobs (one statement each) every poll, with jitter;
- ``_renew_loop`` renews every held lease in one statement and heartbeats the node;
- ``_watchdog_loop`` stops a run whose local deadline passed, before its lease can
  expire for the other nodes. The deadline runs on the monotonic clock from when
  the last successful renewal was *sent*, minus a margin, so a paused or cut-off
  node gives up before anyone else may start the job.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from balancectl.config import SchedulerSettings
from balancectl.db import Database, first_line
from balancectl.scheduler.context import JobContext
from balancectl.scheduler.registry import JobSpec
from balancectl.scheduler.store import Claim, SchedulerStore

log = logging.getLogger("balancectl.scheduler")
T = TypeVar("T")


@dataclass
class Run:
    """A job this node runs under ``claim.token`` until ``deadline`` (monotonic)."""

    claim: Claim
    spec: JobSpec
    context: JobContext
    deadline: float
    task: asyncio.Task[None] | None = None
    stop_reason: str | None = None
    recording: bool = False
    started: float = field(default_factory=time.monotonic)

    def stop(self, reason: str) -> None:
        """End the run: ``lost`` (lease gone) or ``cancelled`` (shutdown); the first reason wins."""
        if self.stop_reason is not None or self.recording:
            return
        self.stop_reason = reason
        self.context.stopping.set()
        if self.task is not None:
            self.task.cancel()


@dataclass(frozen=True)
class JobRetention:
    """How long the pruning jobs keep history and idempotency keys."""

    history_seconds: float = 30 * 24 * 3600.0
    idempotency_seconds: float = 24 * 3600.0


class Scheduler:
    """One node's scheduler; ``start`` in the app's lifespan, ``stop`` on the way out."""

    def __init__(
        self,
        store: SchedulerStore,
        specs: Sequence[JobSpec],
        settings: SchedulerSettings,
        job_db: Database,
        retention: JobRetention | None = None,
    ) -> None:
        self.store, self.settings, self.job_db = store, settings, job_db
        self.specs = {spec.name: spec for spec in specs}
        self.retention = retention or JobRetention()
        self.runs: dict[str, Run] = {}
        self._stopping = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []

    @property
    def margin(self) -> float:
        """How long before its lease expires a node gives a run up without a renewal."""
        return max(self.settings.lease_ttl * 0.2, min(1.0, self.settings.lease_ttl / 3))

    async def start(self) -> None:
        await self.store.register_node()
        await self.store.register_jobs(list(self.specs.values()))
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="scheduler-claim"),
            asyncio.create_task(self._renew_loop(), name="scheduler-renew"),
            asyncio.create_task(self._watchdog_loop(), name="scheduler-watchdog"),
        ]

    async def stop(self) -> None:
        """Stop claiming, cancel every run (recorded ``cancelled``, leases released)."""
        self._stopping.set()
        if self._loops:
            # A claim in flight may still win a job: let the claim loop end first, so that
            # run is in self.runs (and has started) and gets cancelled and recorded too.
            await asyncio.gather(self._loops[0], return_exceptions=True)
            await asyncio.sleep(0)
        runs = list(self.runs.values())
        for run in runs:
            run.stop("cancelled")
        await asyncio.gather(*(run.task for run in runs if run.task), return_exceptions=True)
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self._bounded("mark node stopped", self.store.stop_node())

    async def _claim_loop(self) -> None:
        if not await self._pause(self.settings.settle):
            return
        while True:
            await self._claim_due()
            if not await self._pause(self.settings.poll_interval * random.uniform(0.8, 1.2)):
                return

    async def _claim_due(self) -> None:
        while not self._stopping.is_set():
            sent = time.monotonic()
            claim = await self._bounded(
                "claim",
                self.store.claim(
                    list(self.specs), self.settings.settle, self.settings.starve_after
                ),
            )
            if claim is None:
                return
            self._start(claim, sent)

    def _start(self, claim: Claim, sent: float) -> None:
        context = JobContext(
            job=claim.job,
            node=self.store.node,
            token=claim.token,
            started_at=claim.started_at,
            db=self.job_db,
            retention_seconds=self.retention.history_seconds,
            idempotency_retention_seconds=self.retention.idempotency_seconds,
        )
        deadline = sent + self.settings.lease_ttl - self.margin
        run = Run(claim, self.specs[claim.job], context, deadline)
        self.runs[claim.job] = run
        run.task = asyncio.create_task(self._execute(run), name=f"job-{claim.job}")
        log.info("claimed %s (token %d)", claim.job, claim.token)

    async def _execute(self, run: Run) -> None:
        status, error = "succeeded", None
        try:
            await run.spec.call(run.context)
            await self._wait_out(run)
        except asyncio.CancelledError:
            status = run.stop_reason or "cancelled"
        except Exception as failure:
            status, error = "failed", f"{type(failure).__name__}: {failure}"
            log.warning("job %s failed: %s", run.claim.job, error)
        await self._record(run, run.stop_reason or status, error)

    async def _wait_out(self, run: Run) -> None:
        """Keep the run going until its minimum duration has passed (interruptible)."""
        remaining = run.claim.min_duration - (time.monotonic() - run.started)
        if remaining > 0:
            await asyncio.sleep(remaining)

    async def _record(self, run: Run, status: str, error: str | None) -> None:
        run.recording = True  # a later stop() must not interrupt the write
        written = await self._bounded(
            f"record {run.claim.job}",
            self.store.finish(run.claim.job, run.claim.token, status, error),
        )
        if self.runs.get(run.claim.job) is run:
            del self.runs[run.claim.job]
        log.info(
            "%s (token %d) ended %s; recorded %s", run.claim.job, run.claim.token, status, written
        )

    async def _renew_loop(self) -> None:
        while await self._pause(self.settings.renew_every):
            await self._renew()
            await self._bounded("heartbeat", self.store.touch_node())

    async def _renew(self) -> None:
        held = {name: run.claim.token for name, run in self.runs.items() if not run.stop_reason}
        if not held:
            return
        sent = time.monotonic()
        renewed = await self._bounded("renew", self.store.renew(held))
        if renewed is None:
            return
        for name, token in held.items():
            run = self.runs.get(name)
            if run is None or run.claim.token != token:
                continue
            if name in renewed:
                run.deadline = sent + self.settings.lease_ttl - self.margin
            else:
                log.warning("lease of %s (token %d) is gone; stopping it", name, token)
                run.stop("lost")

    async def _watchdog_loop(self) -> None:
        while await self._pause(min(0.25, self.settings.lease_ttl / 20)):
            now = time.monotonic()
            for run in list(self.runs.values()):
                if now >= run.deadline and not run.stop_reason:
                    log.warning("no lease renewal for %s in time; stopping it", run.claim.job)
                    run.stop("lost")

    async def _pause(self, seconds: float) -> bool:
        """Sleep, waking at once on shutdown; ``False`` when the scheduler is stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return True
        return False

    async def _bounded(self, what: str, call: Awaitable[T]) -> T | None:
        """Run one database call within a renewal period; log and return ``None`` on failure."""
        try:
            return await asyncio.wait_for(call, timeout=max(self.settings.renew_every, 1.0))
        except Exception as failure:
            log.warning("%s failed: %s", what, first_line(failure))
            return None
