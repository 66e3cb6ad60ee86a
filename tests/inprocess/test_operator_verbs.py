"""The operator's verbs in-process: the routes through Litestar's test client, and their
statements against the scheduler's own claim and finish (``SchedulerStore``), on a real
PostgreSQL. The same verbs with real nodes are in tests/integration/test_operator_verbs.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from balancectl.api import create_app
from balancectl.config import NodeSettings, PoolSettings, SchedulerSettings
from balancectl.db import Database
from balancectl.scheduler import Claim, SchedulerStore
from tests.conftest import sql

Client = AsyncTestClient[Litestar]
TOKEN = "s3cret-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def add_job(url: str, name: str, due_in: float = 3600.0) -> None:
    sql(
        url,
        "INSERT INTO jobs (name, function, interval_seconds, min_duration_seconds, next_run_at) "
        "VALUES (%(name)s, 'balancectl.jobs.builtin:idle', 600, 0, "
        "now() + make_interval(secs => %(due_in)s))",
        {"name": name, "due_in": due_in},
    )


def next_run_at(url: str, name: str) -> datetime:
    rows = sql(url, "SELECT next_run_at FROM jobs WHERE name = %(n)s", {"n": name})
    value: datetime = rows[0][0]
    return value


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[Client]:
    settings = NodeSettings(
        database_url, api_token=TOKEN, scheduler=SchedulerSettings(enabled=False)
    )
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SchedulerStore]:
    db = Database(database_url, PoolSettings(min_size=1, max_size=2))
    await db.open()
    store = SchedulerStore(db, "node-x", lease_ttl=30.0)
    await store.register_node()
    try:
        yield store
    finally:
        await db.close()


async def claim(store: SchedulerStore, name: str) -> Claim | None:
    return await store.claim([name], settle=0.0, starve_after=3600.0, may_starve=False)


async def running(store: SchedulerStore, url: str, name: str) -> Claim:
    """A job due now, claimed by ``store``'s node: its run in progress."""
    add_job(url, name, due_in=-1)
    first = await store.claim([name], 0.0, 3600.0, False)
    assert first is not None
    return first


async def test_run_makes_a_waiting_job_due_now(client: Client, database_url: str) -> None:
    add_job(database_url, "later")
    reply = await client.post("/jobs/later/run", headers=BEARER)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["name"], body["state"], body["paused"]) == ("later", "waiting", False)
    (now,) = sql(database_url, "SELECT now()")[0]
    assert next_run_at(database_url, "later") <= now


async def test_pause_lists_paused_and_resume_lists_waiting(
    client: Client, database_url: str
) -> None:
    add_job(database_url, "nightly")
    reply = await client.post("/jobs/nightly/pause", headers=BEARER)
    assert reply.status_code == 200, reply.text
    assert (reply.json()["state"], reply.json()["paused"]) == ("paused", True)
    listed = {job["name"]: job for job in (await client.get("/jobs")).json()["jobs"]}
    assert listed["nightly"]["state"] == "paused"
    assert (await client.get("/jobs/nightly")).json()["state"] == "paused"
    run = await client.post("/jobs/nightly/run", headers=BEARER)
    assert run.status_code == 409
    assert run.json()["type"] == "urn:balancectl:problem:job-paused"
    resumed = await client.post("/jobs/nightly/resume", headers=BEARER)
    assert (resumed.status_code, resumed.json()["state"]) == (200, "waiting")


@pytest.mark.parametrize("verb", ["run", "pause", "resume"])
async def test_each_verb_needs_the_token_and_a_known_job(
    client: Client, database_url: str, verb: str
) -> None:
    add_job(database_url, "known")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = await client.post(f"/jobs/known/{verb}", headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.headers["www-authenticate"].startswith("Bearer")
    assert sql(database_url, "SELECT paused_at FROM jobs WHERE name = 'known'") == [(None,)]
    missing = await client.post(f"/jobs/unknown/{verb}", headers=BEARER)
    assert missing.status_code == 404
    assert missing.json()["type"] == "urn:balancectl:problem:job-not-found"
    assert (await client.get("/jobs/unknown")).status_code == 404
    assert (await client.post(f"/jobs/a%00b/{verb}", headers=BEARER)).status_code == 404


async def test_a_paused_job_is_not_claimed_until_resumed(
    client: Client, store: SchedulerStore, database_url: str
) -> None:
    add_job(database_url, "due", due_in=-1)
    await client.post("/jobs/due/pause", headers=BEARER)
    assert await claim(store, "due") is None
    await client.post("/jobs/due/resume", headers=BEARER)
    assert await claim(store, "due") is not None


async def test_run_on_a_running_job_is_due_when_its_run_ends_not_before(
    client: Client, store: SchedulerStore, database_url: str
) -> None:
    first = await running(store, database_url, "busy")
    reply = await client.post("/jobs/busy/run", headers=BEARER)
    assert (reply.status_code, reply.json()["state"]) == (200, "running")
    assert await claim(store, "busy") is None  # its lease is held: no second copy
    assert await store.finish("busy", first.token, "succeeded", None) == "succeeded"
    (now,) = sql(database_url, "SELECT now()")[0]
    # Without the request it would be due after its 600 s interval.
    assert next_run_at(database_url, "busy") <= now
    second = await claim(store, "busy")
    assert second is not None


async def test_a_run_without_a_request_keeps_its_interval(
    store: SchedulerStore, database_url: str
) -> None:
    first = await running(store, database_url, "steady")
    await store.finish("steady", first.token, "succeeded", None)
    assert next_run_at(database_url, "steady") >= first.started_at + timedelta(seconds=599)


async def test_pausing_a_running_job_lets_its_run_finish(
    client: Client, store: SchedulerStore, database_url: str
) -> None:
    first = await running(store, database_url, "long")
    paused = (await client.post("/jobs/long/pause", headers=BEARER)).json()
    assert (paused["state"], paused["paused"]) == ("running", True)
    renewal = await store.renew({"long": first.token}, ["long"], claim_deadline=10.0)
    assert renewal.renewed == {"long"}
    assert await store.finish("long", first.token, "succeeded", None) == "succeeded"
    assert (await client.get("/jobs/long")).json()["state"] == "paused"
    await client.post("/jobs/long/run", headers=BEARER)
    assert await claim(store, "long") is None


async def test_pause_with_stop_tells_the_owner_at_its_renewal_to_stop_that_run(
    client: Client, store: SchedulerStore, database_url: str
) -> None:
    first = await running(store, database_url, "long")
    plain = await store.renew({"long": first.token}, ["long"], claim_deadline=10.0)
    assert plain.stop == set()
    reply = await client.post("/jobs/long/pause?stop=true", headers=BEARER)
    assert (reply.status_code, reply.json()["state"]) == (200, "running")
    renewal = await store.renew({"long": first.token}, ["long"], claim_deadline=10.0)
    # Still renewed (no one else may take it while it stops), and told to stop.
    assert (renewal.renewed, renewal.stop) == ({"long"}, {"long"})
    assert await store.finish("long", first.token, "cancelled", "stopped") == "cancelled"
    assert (await client.get("/jobs/long")).json()["state"] == "paused"
    await client.post("/jobs/long/resume", headers=BEARER)
    second = await claim(store, "long")
    assert second is not None
    again = await store.renew({"long": second.token}, ["long"], claim_deadline=10.0)
    assert again.stop == set()  # the stop was for the earlier run only


async def test_resume_calls_off_a_stop_not_yet_carried_out(
    client: Client, store: SchedulerStore, database_url: str
) -> None:
    first = await running(store, database_url, "long")
    await client.post("/jobs/long/pause?stop=true", headers=BEARER)
    await client.post("/jobs/long/resume", headers=BEARER)
    renewal = await store.renew({"long": first.token}, ["long"], claim_deadline=10.0)
    assert (renewal.renewed, renewal.stop) == ({"long"}, set())


async def test_the_dashboard_lists_a_paused_job_as_get_jobs_does(
    client: Client, database_url: str
) -> None:
    add_job(database_url, "nightly")
    await client.post("/jobs/nightly/pause", headers=BEARER)
    reply = await client.get("/dashboard")
    assert reply.status_code == 200, reply.text
    (listed,) = (await client.get("/jobs")).json()["jobs"]
    (shown,) = reply.json()["jobs"]
    assert (shown["state"], shown["paused"]) == ("paused", True)
    assert {key: shown[key] for key in listed} == listed


async def test_the_dashboard_lists_a_paused_job_as_paused(
    client: Client, store: SchedulerStore, database_url: str
) -> None:
    add_job(database_url, "idle")
    add_job(database_url, "long", due_in=-1)
    assert await claim(store, "long") is not None
    await client.post("/jobs/idle/pause", headers=BEARER)
    await client.post("/jobs/long/pause", headers=BEARER)  # its run goes on
    reply = await client.get("/dashboard")
    assert reply.status_code == 200, reply.text
    assert reply.json()["token_required"] is True and TOKEN not in reply.text
    jobs = {job["name"]: job for job in reply.json()["jobs"]}
    assert (jobs["idle"]["state"], jobs["idle"]["paused"]) == ("paused", True)
    assert (jobs["long"]["state"], jobs["long"]["paused"]) == ("running", True)
    await client.post("/jobs/idle/resume", headers=BEARER)
    jobs = {job["name"]: job for job in (await client.get("/dashboard")).json()["jobs"]}
    assert (jobs["idle"]["state"], jobs["idle"]["paused"]) == ("waiting", False)
