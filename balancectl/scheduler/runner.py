"""The in-process scheduler of one node: claim due jobs, keep their leases, run them, record them.

Three small loops share one node's state:
- ``_claim_loop`` claims due jobs (one statement each) every poll, with jitter, once the
  node has settled: after its start, and again after it was cut off from the database for
  longer than a lease (its peers counted it gone; they must all be back before it claims);
- ``_renew_loop`` renews every held lease and heartbeats the node in one statement, sent
  every ``renew_every`` from the previous send, so a slow answer never widens the gap;
- ``_watchdog_loop`` stops a run whose local deadline passed, before its lease can expire
  for the other nodes (the deadline runs on the monotonic clock from when the last
  successful renewal was *sent*, minus a margin); stops a run past its ``max_duration``;
  records a run whose task died without a record; and gives up a run that ignores its
  stop signal (recorded ``unresponsive``, its lease no longer renewed).

Every database call is bounded, and the node never waits for a cancelled call to wind
down (a silent link would hold it for minutes): the call is left to end in the background.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from balancectl.config import HISTORY_RETENTION, IDEMPOTENCY_RETENTION, SchedulerSettings
from balancectl.db import Database, first_line
from balancectl.errors import ConfigError, Unavailable
from balancectl.scheduler.context import JobContext, LeaseLost
from balancectl.scheduler.metrics import SchedulerMetrics
from balancectl.scheduler.registry import JobSpec
from balancectl.scheduler.store import Claim, Renewal, SchedulerStore

log = logging.getLogger("balancectl.scheduler")
# A node's start tries its registration again for this long (pausing between tries).
REGISTER_WITHIN, REGISTER_PAUSE = 60.0, 0.2
STOPPED_BY_PAUSE = "stopped by an operator's pause (pause --stop)"
T = TypeVar("T")


@dataclass
class Run:
    """A job this node runs under ``claim.token`` until ``deadline`` (monotonic)."""

    claim: Claim
    spec: JobSpec
    deadline: float
    hard_deadline: float
    context: JobContext | None = None
    task: asyncio.Task[None] | None = None
    stop_reason: str | None = None
    stop_error: str | None = None
    stopped_at: float | None = None
    recording: bool = False
    work_done: bool = False
    started: float = field(default_factory=time.monotonic)

    def stop(self, reason: str, error: str | None = None) -> None:
        """End the run: ``lost``, ``timed_out`` or ``cancelled``; the first reason wins."""
        if self.stop_reason is not None or self.recording:
            return
        self.stop_reason, self.stop_error, self.stopped_at = reason, error, time.monotonic()
        if self.context is not None:
            self.context.stopping.set()
        if self.task is not None:
            self.task.cancel()

    def renewable(self, now: float) -> bool:
        """Only a run still going, inside its ``max_duration`` and its local deadline (the
        node can still vouch for it: it was not paused past it), has its lease renewed."""
        going = self.stop_reason is None and not self.recording
        return going and now < min(self.deadline, self.hard_deadline)

    def lease_deadline(self) -> float:
        """Until when (monotonic) the node vouches for this run's lease: the fence's check."""
        return min(self.deadline, self.hard_deadline)


@dataclass(frozen=True)
class JobRetention:
    """How long the pruning jobs keep history and idempotency keys."""

    history_seconds: float = HISTORY_RETENTION
    idempotency_seconds: float = IDEMPOTENCY_RETENTION


class Scheduler:
    """One node's scheduler; ``start`` in the app's lifespan, ``stop`` on the way out."""

    def __init__(
        self,
        store: SchedulerStore,
        specs: Sequence[JobSpec],
        settings: SchedulerSettings,
        job_db: Database,
        retention: JobRetention | None = None,
        metrics: SchedulerMetrics | None = None,
    ) -> None:
        self.store, self.settings, self.job_db = store, settings, job_db
        self.metrics = metrics or SchedulerMetrics()
        self.specs = {spec.name: spec for spec in specs}
        self.retention = retention or JobRetention()
        self.runs: dict[str, Run] = {}
        self._stopping = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._claiming: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._connected_since = self._last_renewed = time.monotonic()
        self._clock: tuple[float, datetime] | None = None
        self._lost_touch_at: datetime | None = None
        self._recovered_by = 0.0
        # Monotonic time each job's last run here ended lost: left to the peers a while.
        self._lost_at: dict[str, float] = {}

    @property
    def margin(self) -> float:
        """How long before its lease expires a node gives a run up without a renewal."""
        return max(self.settings.lease_ttl * 0.2, min(1.0, self.settings.lease_ttl / 3))

    @property
    def call_timeout(self) -> float:
        """Every scheduler call ends within this, so renewals go out every ``renew_every``."""
        return self.settings.renew_every * 0.9

    @property
    def claim_deadline(self) -> float:
        """A lease of this node older than this that it does not know of, it never runs."""
        return 2 * self.call_timeout + 0.2

    @property
    def stop_grace(self) -> float:
        """How long a stopped job may take to end before it counts as unresponsive."""
        return self.margin

    async def start(self, claiming: bool = True) -> None:
        """Register the node (it joins: its peers count it) and keep it heartbeating.

        With ``claiming=False`` it claims nothing until ``start_claiming()``: a node joins
        before its HTTP workers' CPU-heavy start, so peers started with it wait for it,
        and it takes work once it serves.
        """
        await self._register()
        self._connected_since = self._last_renewed = time.monotonic()
        self.metrics.renewed()  # registering the node heartbeats it
        self._loops = [
            asyncio.create_task(self._renew_loop(), name="scheduler-renew"),
            asyncio.create_task(self._watchdog_loop(), name="scheduler-watchdog"),
        ]
        if claiming:
            self.start_claiming()

    def start_claiming(self) -> None:
        """Claim due jobs from now on, every poll (once the settle delay has passed)."""
        if self._claiming is None and not self._stopping.is_set():
            self._claiming = asyncio.create_task(self._claim_loop(), name="scheduler-claim")

    async def _register(self) -> None:
        """Register the node and its jobs, again while the database is too slow to answer.

        Both are upserts, so a try given up on and delivered late does no harm. A database
        slow at a node's start (a busy server, nodes starting together) is not a reason to
        die; one that has not answered within ``REGISTER_WITHIN`` s is, with one line.
        """
        deadline = time.monotonic() + REGISTER_WITHIN
        warned_at = float("-inf")
        while True:
            try:
                await self.store.register_node()
                await self.store.register_jobs(list(self.specs.values()))
                return
            except Unavailable as error:
                now = time.monotonic()
                if now >= deadline:
                    within = f"within {REGISTER_WITHIN:.0f} s: {first_line(error)}"
                    raise ConfigError(f"the scheduler could not register {within}") from error
                if now - warned_at >= 5.0:
                    log.warning("registering the node failed, trying again: %s", first_line(error))
                    warned_at = now
                await asyncio.sleep(REGISTER_PAUSE)

    async def stop(self) -> None:
        """Stop claiming, cancel every run (recorded ``cancelled``, leases released).

        Bounded whatever the link does: about three call timeouts plus the stop grace.
        A second call does nothing.
        """
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._claiming is not None:
            # A claim in flight may still win a job: let the claim loop end first, so that
            # run is in self.runs (and has started) and gets cancelled and recorded too.
            await asyncio.wait([self._claiming], timeout=self.call_timeout + 0.5)
            await asyncio.sleep(0)
        runs = list(self.runs.values())
        for run in runs:
            run.stop("cancelled")
        tasks = [run.task for run in runs if run.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.stop_grace)
        stuck = [run for run in runs if not run.recording]
        error = "the job did not end when the node stopped"
        await asyncio.gather(*(self._record(run, "unresponsive", error) for run in stuck))
        if tasks:
            await asyncio.wait(tasks, timeout=self.call_timeout + 0.5)
        loops = [*self._loops, *([self._claiming] if self._claiming is not None else [])]
        for loop in loops:
            loop.cancel()
        if loops:
            await asyncio.wait(loops, timeout=1.0)
        await self._bounded("mark node stopped", self.store.stop_node())

    # ------------------------------------------------------------------ claiming

    def _may_claim(self, now: float) -> bool:
        """Heartbeat fresh (the peers count this node) and settled since (re)connecting."""
        fresh = now - self._last_renewed < self.settings.lease_ttl - self.margin
        return fresh and now >= self._connected_since + self.settings.settle

    async def _claim_loop(self) -> None:
        while await self._pause(self.settings.poll_interval * random.uniform(0.8, 1.2)):
            await self._claim_due()

    async def _claim_due(self) -> None:
        while not self._stopping.is_set() and self._may_claim(sent := time.monotonic()):
            may_starve = sent - self._connected_since >= self.settings.starve_after
            alive_at = self._lost_touch_at if sent < self._recovered_by else None
            names = self._claimable(sent)
            settings = self.settings
            claim = await self._bounded(
                "claim",
                self.store.claim(
                    names, settings.settle, settings.starve_after, may_starve, alive_at
                ),
            )
            if claim is None:
                return
            self._start(claim, sent)

    def _claimable(self, now: float) -> list[str]:
        """The jobs this node may ask for: never one it still runs (a run told to stop may
        not have ended), nor one whose run here ended lost within ``settle``. A lost lease
        is evidence against this node (a pause, a cut link, a clock step), so a peer that
        polls meanwhile takes the job; alone, the node takes it back after ``settle``."""
        recent = now - self.settings.settle
        return [
            name
            for name in self.specs
            if name not in self.runs and self._lost_at.get(name, recent) <= recent
        ]

    def _start(self, claim: Claim, sent: float) -> None:
        spec = self.specs[claim.job]
        deadline = sent + self.settings.lease_ttl - self.margin
        run = Run(claim, spec, deadline, hard_deadline=sent + spec.max_duration)
        run.context = JobContext(
            job=claim.job,
            node=self.store.node,
            token=claim.token,
            started_at=claim.started_at,
            database=self.job_db,
            deadline=run.lease_deadline,
            retention_seconds=self.retention.history_seconds,
            idempotency_retention_seconds=self.retention.idempotency_seconds,
        )
        self.runs[claim.job] = run
        run.task = asyncio.create_task(self._execute(run), name=f"job-{claim.job}")
        self.metrics.claimed(claim.job, claim.started_at, claim.due_at, claim.took_over)
        self.metrics.held(len(self.runs))
        log.info("claimed %s (token %d)", claim.job, claim.token)

    # ------------------------------------------------------------------ running

    async def _execute(self, run: Run) -> None:
        assert run.context is not None
        status, error = "succeeded", None
        try:
            await run.spec.call(run.context)
            run.work_done = True
            await self._wait_out(run)
        except asyncio.CancelledError:
            status = run.stop_reason or "cancelled"
        except LeaseLost as refused:
            status, error = "lost", str(refused)
            log.warning("job %s stopped: %s", run.claim.job, error)
        except Exception as failure:
            status, error = "failed", f"{type(failure).__name__}: {failure}"
            log.warning("job %s failed: %s", run.claim.job, error)
        if not run.recording:
            await self._record(run, run.stop_reason or status, run.stop_error or error)

    async def _wait_out(self, run: Run) -> None:
        """Keep the run going until its minimum duration has passed, or it must stop."""
        assert run.context is not None
        remaining = run.claim.min_duration - (time.monotonic() - run.started)
        if remaining > 0 and not run.context.stopping.is_set():
            try:
                await asyncio.wait_for(run.context.stopping.wait(), timeout=remaining)
            except TimeoutError:
                return

    async def _record(self, run: Run, status: str, error: str | None) -> None:
        run.recording = True  # a later stop() must not interrupt the write
        written = await self._bounded(
            f"record {run.claim.job}",
            self.store.finish(run.claim.job, run.claim.token, status, error, run.work_done),
        )
        if self.runs.get(run.claim.job) is run:
            del self.runs[run.claim.job]
        decided = run.stop_reason or status  # "lost" even when given up as unresponsive
        if decided == "lost":
            self._lost_at[run.claim.job] = time.monotonic()
        self.metrics.recorded(run.claim.job, decided, written, time.monotonic() - run.started)
        self.metrics.held(len(self.runs))
        log.info(
            "%s (token %d) ended %s; recorded %s", run.claim.job, run.claim.token, status, written
        )

    # ------------------------------------------------------------------ leases

    async def _renew_loop(self) -> None:
        sent = time.monotonic()
        while await self._pause(max(0.0, sent + self.settings.renew_every - time.monotonic())):
            sent = time.monotonic()
            await self._renew(sent)

    async def _renew(self, sent: float) -> None:
        held = {name: run.claim.token for name, run in self.runs.items() if run.renewable(sent)}
        known = list(self.runs)
        renewal = await self._bounded("renew", self.store.renew(held, known, self.claim_deadline))
        if renewal is None:
            return
        self._heard_back(sent, renewal)
        for name, token in held.items():
            run = self.runs.get(name)
            if run is None or run.claim.token != token:
                continue
            if name in renewal.renewed:
                run.deadline = sent + self.settings.lease_ttl - self.margin
                if name in renewal.stop:
                    log.info("%s (token %d) is paused with a stop; stopping it", name, token)
                    run.stop("cancelled", STOPPED_BY_PAUSE)
            else:
                log.warning("lease of %s (token %d) is gone; stopping it", name, token)
                run.stop("lost", "the lease was gone at its renewal")

    def _heard_back(self, sent: float, renewal: Renewal) -> None:
        """A heartbeat went through: re-settle after a gap the peers took for a departure."""
        if sent - self._last_renewed >= self.settings.lease_ttl - self.margin:
            log.warning("back in touch with the database; settling before claiming again")
            self._connected_since = sent
            # Peers reconnect at their own pace (pool backoff): until then count as live
            # those that were live when this node lost touch.
            self._lost_touch_at = None if self._clock is None else self._clock[1]
            self._recovered_by = sent + self.settings.settle + self.settings.lease_ttl
        self._last_renewed = sent
        self.metrics.renewed()
        if renewal.released:
            log.warning("released %d lease(s) whose claim answer never arrived", renewal.released)
        if self._clock is not None:
            ahead = (renewal.now - self._clock[1]).total_seconds() - (sent - self._clock[0])
            if ahead > self.margin:
                log.warning("the database clock stepped forward by %.1f s", ahead)
        self._clock = (sent, renewal.now)

    # ------------------------------------------------------------------ watchdog

    async def _watchdog_loop(self) -> None:
        while await self._pause(min(0.25, self.settings.lease_ttl / 20)):
            now = time.monotonic()
            for run in list(self.runs.values()):
                self._watch(run, now)

    def _watch(self, run: Run, now: float) -> None:
        if run.recording:
            return
        if run.task is not None and run.task.done():
            self._in_background(self._record(run, "crashed", died(run.task)))
            return
        if run.stop_reason is None:
            if now >= run.deadline:
                log.warning("no lease renewal for %s in time; stopping it", run.claim.job)
                run.stop("lost", "no lease renewal in time")
            elif now >= run.hard_deadline:
                log.warning("%s ran past its max_duration; stopping it", run.claim.job)
                run.stop("timed_out", f"ran past its max_duration of {run.spec.max_duration:g} s")
        elif now >= max(run.deadline, (run.stopped_at or now) + self.stop_grace):
            log.error("%s ignores its stop signal; giving its run up", run.claim.job)
            error = f"stopped ({run.stop_reason}) but did not end: {run.stop_error or 'shutdown'}"
            self._in_background(self._record(run, "unresponsive", error))

    # ------------------------------------------------------------------ plumbing

    async def _pause(self, seconds: float) -> bool:
        """Sleep, waking at once on shutdown; ``False`` when the scheduler is stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return True
        return False

    def _in_background(self, call: Awaitable[Any]) -> asyncio.Future[Any]:
        """Keep a reference to a task nobody awaits; retrieve its outcome when it ends."""
        task = asyncio.ensure_future(call)
        self._background.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()

    async def _bounded(self, what: str, call: Awaitable[T]) -> T | None:
        """One database call within ``call_timeout``; log and return ``None`` on failure.

        On timeout the call is cancelled but not awaited: its cancellation may itself
        wait on a dead link, and it must not hold this loop (or the shutdown) up.
        """
        task = self._in_background(call)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.call_timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            log.warning("%s failed: no answer within %.1f s", what, self.call_timeout)
            return None
        try:
            result: T = task.result()
        except Exception as failure:
            log.warning("%s failed: %s", what, first_line(failure))
            return None
        return result


def died(task: asyncio.Task[None]) -> str:
    """What ended a job's task that left no record."""
    if task.cancelled():
        return "the job's task was cancelled before it could record its run"
    failure = task.exception()
    return f"the job's task ended without a record: {type(failure).__name__}: {failure}"
