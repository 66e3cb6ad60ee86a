"""The admission gate in front of the request pool: order, capacity, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from balancectl.admission import Admission, AdmissionFull, AdmissionTimeout


async def test_admits_up_to_capacity_then_first_come_first_in() -> None:
    gate = Admission(capacity=2, max_waiting=10)
    order: list[int] = []
    release = asyncio.Event()

    async def holder(number: int) -> None:
        async with gate.place(timeout=5):
            order.append(number)
            await release.wait()

    tasks = [asyncio.create_task(holder(n)) for n in range(6)]
    await asyncio.sleep(0.05)
    assert order == [0, 1] and gate.waiting == 4
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4, 5]
    assert gate.free == 2 and gate.waiting == 0


async def held_gate() -> Admission:
    """A gate of one place (ten may wait), that place taken."""
    gate = Admission(capacity=1, max_waiting=10)
    await gate.acquire(timeout=5)
    return gate


async def test_a_waiter_past_its_deadline_fails_and_gives_nothing_away() -> None:
    gate = await held_gate()
    began = time.monotonic()
    with pytest.raises(AdmissionTimeout):
        await gate.acquire(timeout=0.3)
    assert 0.3 <= time.monotonic() - began < 1.0
    gate.release()
    assert gate.free == 1


async def test_too_many_waiters_are_refused_at_once() -> None:
    gate = Admission(capacity=1, max_waiting=2)
    await gate.acquire(timeout=5)
    waiting = [asyncio.create_task(gate.acquire(timeout=5)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(AdmissionFull):
        await gate.acquire(timeout=5)
    for task in waiting:  # each holder in turn hands its place to the next waiter
        gate.release()
        await asyncio.wait_for(task, timeout=1)
    gate.release()
    assert gate.free == 1 and gate.waiting == 0


async def test_a_cancelled_waiter_leaves_its_place_to_the_next() -> None:
    gate = await held_gate()
    cancelled = asyncio.create_task(gate.acquire(timeout=5))
    after = asyncio.create_task(gate.acquire(timeout=5))
    await asyncio.sleep(0)
    cancelled.cancel()
    gate.release()
    await asyncio.wait_for(after, timeout=1)
    assert cancelled.cancelled()
    gate.release()
    assert gate.free == 1 and gate.waiting == 0


async def test_a_shorter_deadline_behind_a_longer_one_still_expires_in_time() -> None:
    gate = await held_gate()
    patient = asyncio.create_task(gate.acquire(timeout=30))
    await asyncio.sleep(0)
    began = time.monotonic()
    with pytest.raises(AdmissionTimeout):
        await gate.acquire(timeout=0.3)
    assert time.monotonic() - began < 1.0
    gate.release()
    await asyncio.wait_for(patient, timeout=1)
    gate.release()
    assert gate.free == 1
