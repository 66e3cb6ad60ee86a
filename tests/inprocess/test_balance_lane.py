"""The balance route's two entries answer alike: the fast lane (the canonical path, before
Litestar's router) and Litestar's handler (the spellings only the router matches).

Each request below goes once to ``/users/{id}/balance`` (the lane) and once to
``/users/{id}/balance/`` (Litestar), on two apps over the same database state, and the
two answers must be the same: status, every header, and the body byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

import balancectl.api.balance_routes as balance_routes
from balancectl.api import create_app
from balancectl.api.balance_lane import lane_user
from balancectl.config import NodeSettings, SchedulerSettings
from tests.conftest import sql
from tests.inprocess.conftest import Client

TOKEN = "s3cret"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json", **BEARER}


@pytest.fixture
async def guarded(database_url: str) -> AsyncIterator[Client]:
    """A node with a token and a 64-byte body bound."""
    settings = NodeSettings(
        database_url,
        api_token=TOKEN,
        max_body_bytes=64,
        scheduler=SchedulerSettings(enabled=False),
    )
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        yield test_client


# (what the request is, its headers, its body): none of them changes the balance.
UNCHANGING: list[tuple[str, dict[str, str], bytes]] = [
    ("insufficient funds", JSON, b'{"amount": -10001}'),
    ("no such user", JSON, b'{"amount": 5}'),
    ("no token", {"Content-Type": "application/json"}, b'{"amount": 5}'),
    ("a wrong token", {"Content-Type": "application/json", "Authorization": "Bearer x"}, b"{}"),
    ("not JSON", {"Content-Type": "text/plain", **BEARER}, b'{"amount": 5}'),
    ("no content type", BEARER, b'{"amount": 5}'),
    ("a zero amount", JSON, b'{"amount": 0}'),
    ("a float amount", JSON, b'{"amount": 1.5}'),
    ("an unknown member", JSON, b'{"amount": 1, "x": 1}'),
    ("a repeated member", JSON, b'{"amount": 1, "amount": -1}'),
    ("broken JSON", JSON, b'{"amount": '),
    ("an empty body", JSON, b""),
    ("a body over the bound", JSON, b'{"amount": 1' + b" " * 80 + b"}"),
    ("a bad key", {**JSON, "Idempotency-Key": "a key with spaces"}, b'{"amount": 1}'),
]


@pytest.mark.parametrize(("case", "headers", "body"), UNCHANGING, ids=[c[0] for c in UNCHANGING])
async def test_both_entries_refuse_alike(
    guarded: Client, database_url: str, case: str, headers: dict[str, str], body: bytes
) -> None:
    user = 2 if case == "no such user" else 1
    lane = await guarded.post(f"/users/{user}/balance", content=body, headers=headers)
    router = await guarded.post(f"/users/{user}/balance/", content=body, headers=headers)
    assert lane.status_code >= 400, lane.text
    assert answer(lane) == answer(router)
    assert sql(database_url, "SELECT balance FROM users WHERE id = 1") == [(10000,)]


async def test_both_entries_change_and_replay_alike(guarded: Client, database_url: str) -> None:
    lane = await guarded.post("/users/1/balance", json={"amount": -3}, headers=BEARER)
    router = await guarded.post("/users/1/balance/", json={"amount": 3}, headers=BEARER)
    assert (lane.status_code, router.status_code) == (200, 200)
    assert lane.json() == {"userId": 1, "balance": 9997, "amount": -3}
    assert router.json() == {"userId": 1, "balance": 10000, "amount": 3}
    for reply in (lane, router):  # the bodies differ by the amount's sign: so do their lengths
        assert reply.headers["content-length"] == str(len(reply.content))
    assert dict(lane.headers).keys() == dict(router.headers).keys()
    assert lane.headers["content-type"] == router.headers["content-type"] == "application/json"

    keyed = {**BEARER, "Idempotency-Key": "k-1"}
    first = await guarded.post("/users/1/balance", json={"amount": -3}, headers=keyed)
    by_lane = await guarded.post("/users/1/balance", json={"amount": -3}, headers=keyed)
    by_router = await guarded.post("/users/1/balance/", json={"amount": -3}, headers=keyed)
    assert first.headers.get("idempotent-replayed") is None
    assert answer(by_lane) == answer(by_router)
    assert by_lane.headers["idempotent-replayed"] == "true"
    assert by_lane.json() == first.json() == {"userId": 1, "balance": 9997, "amount": -3}
    reused = {**BEARER, "Idempotency-Key": "k-1"}
    assert answer(
        await guarded.post("/users/1/balance", json={"amount": -4}, headers=reused)
    ) == answer(await guarded.post("/users/1/balance/", json={"amount": -4}, headers=reused))
    assert sql(database_url, "SELECT balance FROM users WHERE id = 1") == [(9997,)]


async def test_both_entries_are_counted_under_one_route(guarded: Client) -> None:
    await guarded.post("/users/1/balance", json={"amount": 1}, headers=BEARER)
    await guarded.post("/users/1/balance/", json={"amount": 1}, headers=BEARER)
    metrics = (await guarded.get("/metrics")).text
    line = (
        'balancectl_http_requests_total{method="POST",route="/users/{userId}/balance",status="200"}'
    )
    assert f"{line} 2.0" in metrics, metrics


async def test_the_lane_answers_without_litestars_handler(
    guarded: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The canonical path is answered by the lane's own ``change_for`` call, never by the
    router's handler: a recorder on the lane's name sees the one and not the other."""
    calls: list[str] = []
    original = balance_routes.change_for

    async def recorded(*args: Any) -> Any:
        calls.append("change_for")
        return await original(*args)

    monkeypatch.setattr("balancectl.api.balance_lane.change_for", recorded)
    ok = await guarded.post("/users/1/balance", json={"amount": 1}, headers=BEARER)
    assert ok.status_code == 200 and calls == ["change_for"]
    await guarded.post("/users/1/balance/", json={"amount": 1}, headers=BEARER)
    assert calls == ["change_for"]  # the router's spelling went through Litestar's handler


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/users/1/balance", "1"),
        ("POST", "/users/007/balance", "007"),
        ("POST", "/users/abc/balance", "abc"),  # refused by the route itself, with a 422
        ("POST", "/users//balance", None),
        ("POST", "/users/1/balance/", None),
        ("POST", "/users/1/2/balance", None),
        ("POST", "//users/1/balance", None),
        ("GET", "/users/1/balance", None),
        ("PUT", "/users/1/balance", None),
        ("POST", "/users/1", None),
    ],
)
def test_the_lane_takes_only_the_canonical_post(
    method: str, path: str, expected: str | None
) -> None:
    scope: Any = {"type": "http", "method": method, "path": path}
    assert lane_user(scope) == expected


async def test_other_methods_on_the_path_are_litestars(guarded: Client) -> None:
    reply = await guarded.get("/users/1/balance")
    assert reply.status_code == 405
    assert reply.headers["content-type"] == "application/problem+json"


def answer(reply: Any) -> tuple[int, dict[str, str], bytes]:
    return reply.status_code, dict(reply.headers), reply.content


async def test_a_streamed_body_over_the_bound_is_refused_alike(database_url: str) -> None:
    """No ``Content-Length``: the bound is counted on the chunks as they arrive (plain ASGI
    calls, since the test client hands a body over in one piece)."""
    settings = NodeSettings(database_url, max_body_bytes=64)
    app = create_app(settings)
    answers = [await asgi_post(app, path) for path in ("/users/1/balance", "/users/1/balance/")]
    assert answers[0] == answers[1]
    status, headers, body = answers[0]
    assert status == 413 and headers[b"content-type"] == b"application/problem+json"
    assert json.loads(body)["type"] == "urn:balancectl:problem:payload-too-large"


async def asgi_post(app: Any, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    """A POST whose body comes in two chunks of 40 bytes, with no ``Content-Length``."""
    chunks = [(b'{"amount": 1' + b" " * 28, True), (b" " * 39 + b"}", False)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        body, more = chunks.pop(0)
        return {"type": "http.request", "body": body, "more_body": more}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
    }  # fmt: skip
    await app(scope, receive, send)
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body
