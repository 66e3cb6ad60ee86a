"""Job functions the scheduler tests run in real nodes (``tests.jobs:<name>`` in a jobs file)."""

from __future__ import annotations

import asyncio
import contextlib

from balancectl.scheduler.context import JobContext


class Died(BaseException):
    """Escapes every ``except Exception``: the job's task ends without a record."""


async def busy(ctx: JobContext) -> None:
    """Work that lasts 60 s (not a wait-out): a stop interrupts the work itself."""
    await asyncio.sleep(60)


async def snapshot(ctx: JobContext) -> None:
    """The shipped snapshot job's write (fenced), then nothing."""
    await ctx.fetch_one("snapshot_totals")


async def snapshots(ctx: JobContext) -> None:
    """A fenced snapshot every 0.2 s until stopped (a write refused ends the run)."""
    while True:
        await ctx.fetch_one("snapshot_totals")
        await asyncio.sleep(0.2)


async def ignores_stop(ctx: JobContext) -> None:
    """Swallows every cancellation and runs on (a misbehaving job)."""
    for _ in range(1000):
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.5)


async def dies(ctx: JobContext) -> None:
    """Its task dies with an exception the runner does not catch."""
    await asyncio.sleep(0.5)
    raise Died("gone")
