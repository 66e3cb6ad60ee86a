"""Admission to a connection pool: a FIFO of waiters, one timer for all of them.

A burst of 10,000 requests on a pool of a few connections makes 10,000 waiters. The
pool's own waiting costs a condition, a task and a timer per waiter; here a waiter is
one future in a queue, and one sweep (while anyone waits) fails those whose deadline
passed. A request admitted here finds a free connection in the pool at once, because
the gate admits no more requests than the pool has connections.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

SWEEP_EVERY = 0.1  # seconds between looks at the oldest waiter's deadline


class AdmissionTimeout(Exception):
    """No place was free within the caller's timeout."""


class AdmissionFull(Exception):
    """Too many callers wait already."""


@dataclass
class _Waiter:
    future: asyncio.Future[None]
    deadline: float

    def over(self, now: float) -> bool:
        """Served, cancelled or expired: no longer waiting."""
        return self.future.done() or self.deadline <= now


class Admission:
    """At most ``capacity`` holders at once; at most ``max_waiting`` queued, first come first in."""

    def __init__(self, capacity: int, max_waiting: int) -> None:
        self.free, self.max_waiting = capacity, max_waiting
        self._waiters: deque[_Waiter] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._in_order = True  # deadlines ascend along the queue (one timeout for all)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def place(self, timeout: float) -> AsyncIterator[None]:
        """Hold one place for the block; ``AdmissionTimeout`` or ``AdmissionFull`` if none."""
        await self.acquire(timeout)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, timeout: float) -> None:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise AdmissionFull(f"{len(self._waiters)} requests wait already")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), time.monotonic() + timeout)
        if self._waiters and waiter.deadline < self._waiters[-1].deadline:
            self._in_order = False
        self._waiters.append(waiter)
        self._arm(loop)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # handed a place just as the caller was cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(None)  # the place goes straight to the next waiter
                return
        self.free += 1

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sweeper is None:
            self._sweeper = loop.call_later(SWEEP_EVERY, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the waiters whose deadline passed: from the head while deadlines ascend (the
        usual case, one timeout for all), else over the whole queue."""
        self._sweeper = None
        now = time.monotonic()
        if self._in_order:
            while self._waiters and self._waiters[0].over(now):
                self._expire(self._waiters.popleft())
        else:
            for waiter in [w for w in self._waiters if w.over(now)]:
                self._expire(waiter)
            self._waiters = deque(w for w in self._waiters if not w.over(now))
            deadlines = [w.deadline for w in self._waiters]
            self._in_order = deadlines == sorted(deadlines)
        if self._waiters:
            self._arm(loop)

    @staticmethod
    def _expire(waiter: _Waiter) -> None:
        if not waiter.future.done():
            waiter.future.set_exception(AdmissionTimeout("no connection was free in time"))
