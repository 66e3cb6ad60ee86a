"""The in-process layer's client: Litestar's test client on ``create_app`` for the test's
own database (no token, no scheduler), through the whole ASGI stack, no process spawned."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from balancectl.api import create_app
from balancectl.config import NodeSettings, SchedulerSettings

Client = AsyncTestClient[Litestar]


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[Client]:
    settings = NodeSettings(database_url, scheduler=SchedulerSettings(enabled=False))
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        yield test_client
