"""The HTTP API in-process: Litestar's test client on ``create_app``, a real PostgreSQL.

No process is spawned: the app's lifespan opens its pool on the test's own database,
and requests go through the whole ASGI stack (routing, parsing, problem details,
metrics). What needs processes (crashes, signals, several nodes) is in tests/integration.
"""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient

from balancectl.api import create_app
from balancectl.config import NodeSettings, SchedulerSettings
from tests.conftest import sql
from tests.inprocess.conftest import Client

J = {"Content-Type": "application/json"}


async def test_a_debit_applies_and_is_in_the_ledger(
    client: Client,
    database_url: str,
) -> None:
    reply = await client.post("/users/1/balance", json={"amount": -2})
    assert reply.status_code == 200
    assert reply.json() == {"userId": 1, "balance": 9998, "amount": -2}
    assert sql(
        database_url, "SELECT amount, balance_after FROM ledger ORDER BY id DESC LIMIT 1"
    ) == [(-2, 9998)]


async def test_a_refusal_is_a_409_problem_with_the_balance_it_was_refused_against(
    client: Client,
    database_url: str,
) -> None:
    reply = await client.post("/users/1/balance", json={"amount": -10001})
    assert reply.status_code == 409
    assert reply.headers["content-type"].startswith("application/problem+json")
    body = reply.json()
    assert body["type"] == "urn:balancectl:problem:insufficient-funds"
    assert (body["balance"], body["amount"]) == (10000, -10001)
    assert sql(database_url, "SELECT balance FROM users WHERE id = 1") == [(10000,)]


@pytest.mark.parametrize(
    ("path", "body", "status", "slug"),
    [
        ("/users/2/balance", {"amount": 5}, 404, "user-not-found"),
        ("/users/0/balance", {"amount": 5}, 422, "invalid-request"),
        ("/users/1/balance", {"amount": 0}, 422, "invalid-request"),
        ("/users/1/balance", {"amount": 1.5}, 422, "invalid-request"),
        ("/users/1/balance", {"amount": 1, "extra": 1}, 422, "invalid-request"),
    ],
)
async def test_bad_requests_are_problems_and_change_nothing(
    client: Client,
    database_url: str,
    path: str,
    body: dict[str, object],
    status: int,
    slug: str,
) -> None:
    reply = await client.post(path, json=body)
    assert (reply.status_code, reply.json()["type"]) == (status, f"urn:balancectl:problem:{slug}")
    assert sql(database_url, "SELECT count(*) FROM ledger") == [(1,)]


async def test_a_keyed_change_applies_once_and_replays(
    client: Client,
    database_url: str,
) -> None:
    headers = {**J, "Idempotency-Key": "in-process-1"}
    first = await client.post("/users/1/balance", json={"amount": -3}, headers=headers)
    again = await client.post("/users/1/balance", json={"amount": -3}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json() == {"userId": 1, "balance": 9997, "amount": -3}
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    other = await client.post("/users/1/balance", json={"amount": -4}, headers=headers)
    assert other.status_code == 422
    assert other.json()["type"] == "urn:balancectl:problem:idempotency-key-reused"
    assert sql(
        database_url, "SELECT count(*) FROM ledger WHERE idempotency_key = 'in-process-1'"
    ) == [(1,)]


async def test_a_keyed_refusal_is_stored_and_replayed_as_refused(
    client: Client,
) -> None:
    headers = {**J, "Idempotency-Key": "in-process-2"}
    first = await client.post("/users/1/balance", json={"amount": -20000}, headers=headers)
    await client.post("/users/1/balance", json={"amount": 50000})  # now it would cover it
    again = await client.post("/users/1/balance", json={"amount": -20000}, headers=headers)
    assert first.status_code == again.status_code == 409
    assert first.json() == again.json()
    assert again.json()["balance"] == 10000


async def test_reads_and_operations_routes(client: Client) -> None:
    assert (await client.get("/users/1")).json() == {"userId": 1, "balance": 10000}
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    jobs = await client.get("/jobs")
    assert jobs.status_code == 200 and jobs.json()["jobs"] == []
    await client.get("/users/1")
    metrics = (await client.get("/metrics")).text
    assert 'route="/users/{userId}"' in metrics and 'status="200"' in metrics


async def test_a_token_guards_the_change(database_url: str) -> None:
    settings = NodeSettings(
        database_url, api_token="s3cret", scheduler=SchedulerSettings(enabled=False)
    )
    async with AsyncTestClient(app=create_app(settings)) as client:
        refused = await client.post("/users/1/balance", json={"amount": 1})
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        allowed = await client.post(
            "/users/1/balance", json={"amount": 1}, headers={"Authorization": "Bearer s3cret"}
        )
        assert allowed.status_code == 200
