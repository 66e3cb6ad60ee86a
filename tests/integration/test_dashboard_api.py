"""``GET /dashboard`` (the dashboard's document), ``GET /ui`` and its files, from real nodes.

The document must agree with ``GET /jobs`` and ``GET /nodes``, take its times from the
database clock, count runs by status over the last hour, draw the window's runs (claims in
progress open-ended), and set the money against the ledger; the page must ship in the
wheel and load nothing from elsewhere.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

from balancectl.dashboard import AUDIT_FUNCTION
from tests.conftest import sql
from tests.faults import proxied, through
from tests.processes import ClusterFactory, http_json, node_args, raw_get
from tests.scheduling import (
    POLL,
    jobs_listing,
    wait_for,
    write_jobs,
)

ROOT = Path(__file__).resolve().parents[2]
STATIC = ("index.html", "dashboard.css", "dashboard.js")
GIVEN_UP = ("timed_out", "unresponsive", "crashed")


def dashboard(url: str, minutes: int | None = None) -> dict[str, Any]:
    query = "" if minutes is None else f"?minutes={minutes}"
    status, body = http_json(f"{url}/dashboard{query}")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def database_now(url: str) -> datetime:
    return sql(url, "SELECT now()")[0][0]  # type: ignore[no-any-return]


def all_running(url: str, names: list[str]) -> dict[str, Any] | None:
    document = dashboard(url)
    states = {job["name"]: job["state"] for job in document["jobs"]}
    return document if all(states.get(name) == "running" for name in names) else None


def test_document_agrees_with_the_listing_on_every_node(
    cluster_factory: ClusterFactory, database_url: str, tmp_path: Path
) -> None:
    names = ["alpha", "beta", "gamma"]
    jobs = write_jobs(tmp_path / "jobs.toml", names, min_duration="20s", interval="30s")
    cluster = cluster_factory(2, *node_args(jobs_file=jobs, lease_ttl=3, poll=POLL, settle=0.5))
    first, second = (node.url for node in cluster.members)
    wait_for("every job running", lambda: all_running(first, names), timeout=30, every=0.3)

    before = database_now(database_url)
    document = dashboard(first)
    after = database_now(database_url)
    other = dashboard(second)

    assert before <= datetime.fromisoformat(document["now"]) <= after
    assert document["served_by"] == "node-1" and other["served_by"] == "node-2"
    assert document["minutes"] == 15 and document["lease_ttl_seconds"] == 3.0
    listing = jobs_listing(cluster.members[0])
    for job in document["jobs"]:
        assert job["state"] == listing[job["name"]]["state"] == "running", job
        assert job["node"] == listing[job["name"]]["node"], job
        assert set(job["last_hour"].values()) == {0}, job
    assert [job["name"] for job in document["jobs"]] == names
    nodes = {node["id"]: node for node in document["nodes"]}
    assert set(nodes) == {"node-1", "node-2"} and all(n["alive"] for n in nodes.values())
    assert sum(node["jobs_held"] for node in nodes.values()) == 3
    for node_id, node in nodes.items():
        held = [job for job in document["jobs"] if job["node"] == node_id]
        assert node["jobs_held"] == len(held), (node, held)
    bars = {run["job"]: run for run in document["timeline"]}
    for job in document["jobs"]:
        bar = bars[job["name"]]
        assert (bar["status"], bar["finished_at"], bar["node"]) == ("running", None, job["node"])
        assert bar["started_at"] == job["started_at"]
    owners = {job["name"]: job["node"] for job in document["jobs"]}
    assert {job["name"]: job["node"] for job in other["jobs"]} == owners
    assert [node["id"] for node in other["nodes"]] == ["node-1", "node-2"]


def insert_run(url: str, job: str, node: str, token: int, started: str, finished: str,
               status: str, error: str | None = None) -> None:  # fmt: skip
    sql(
        url,
        "INSERT INTO job_runs (job, node, token, started_at, finished_at, status, error)"
        " VALUES (%s, %s, %s, now() - %s::interval, now() - %s::interval, %s, %s)",
        (job, node, token, started, finished, status, error),
    )


def seed_history(url: str) -> None:
    """Two jobs with runs of every status, inside and outside the windows asked for."""
    sql(
        url,
        "INSERT INTO jobs (name, function, interval_seconds, min_duration_seconds, next_run_at,"
        " owner, token, started_at, lease_expires_at) VALUES"
        " ('audit', %s, 60, 0, now(), 'node-a', 9, now() - interval '5 s',"
        "  now() + interval '10 min'),"  # held past the node's start, however slow
        " ('sweep', 'x:y', 60, 0, now(), 'node-b', 4, now() - interval '30 s',"
        "  now() - interval '2 s')",
        (AUDIT_FUNCTION,),
    )
    insert_run(url, "audit", "node-a", 1, "2 hours", "119 minutes", "failed", "old")
    insert_run(url, "audit", "node-a", 2, "40 minutes", "39 minutes", "succeeded")
    insert_run(url, "audit", "node-b", 3, "10 minutes", "9 minutes", "failed", "mismatch")
    insert_run(url, "audit", "node-a", 8, "2 minutes", "1 minute", "succeeded")
    insert_run(url, "sweep", "node-b", 1, "50 minutes", "49 minutes", "lost", "lease expired")
    insert_run(url, "sweep", "node-a", 2, "3 minutes", "170 seconds", "cancelled")
    insert_run(url, "sweep", "node-a", 3, "60 seconds", "50 seconds", "lost", "lease expired")


def test_counts_timeline_and_money_come_from_the_database(
    cluster_factory: ClusterFactory, database_url: str
) -> None:
    seed_history(database_url)
    url = cluster_factory(1, "--no-scheduler").urls[0]

    document = dashboard(url)
    wide = dashboard(url, minutes=45)

    jobs = {job["name"]: job for job in document["jobs"]}
    assert nonzero(jobs["audit"]["last_hour"]) == {"succeeded": 2, "failed": 1}
    assert nonzero(jobs["sweep"]["last_hour"]) == {"lost": 2, "cancelled": 1}
    assert (jobs["audit"]["state"], jobs["audit"]["node"]) == ("running", "node-a")
    assert jobs["sweep"]["state"] == "waiting"  # its lease ran out: nobody holds it
    bars = sorted((r["job"], r["token"], r["status"], r["finished_at"] is None)
                  for r in document["timeline"])  # fmt: skip
    assert bars == [
        ("audit", 3, "failed", False),
        ("audit", 8, "succeeded", False),
        ("audit", 9, "running", True),
        ("sweep", 2, "cancelled", False),
        ("sweep", 3, "lost", False),
        ("sweep", 4, "expired", True),
    ]
    assert {(r["job"], r["token"]) for r in wide["timeline"]} == {(j, t) for j, t, *_ in bars} | {
        ("audit", 2)
    }
    assert document["timeline_truncated"] is False
    money = document["money"]
    assert money == {
        "users": 1,
        "total_balance": "10000",
        "ledger_sum": "10000",
        "balanced": True,
        "audit": {
            "job": "audit",
            "status": "succeeded",
            "finished_at": money["audit"]["finished_at"],
            "error": None,
        },
        "requests_last_minute": dict.fromkeys(OUTCOMES, 0),  # no balance request was made
    }
    sql(database_url, "UPDATE users SET balance = balance + 5 WHERE id = 1")
    money = dashboard(url)["money"]
    assert (money["total_balance"], money["ledger_sum"], money["balanced"]) == (
        "10005",
        "10000",
        False,
    )


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    assert len(counts) == 7, counts  # every status history may hold, 0 included
    return {status: count for status, count in counts.items() if count}


def test_minutes_out_of_range_is_a_problem(cluster_factory: ClusterFactory) -> None:
    url = cluster_factory(1, "--no-scheduler").urls[0]
    for minutes in ("0", "181", "-5", "ten", "1.5"):
        status, content_type, body = raw_get(f"{url}/dashboard?minutes={minutes}")
        assert status == 422, (minutes, body)
        assert content_type.startswith("application/problem+json"), content_type
        assert body["type"] == "urn:balancectl:problem:invalid-request", body
    assert dashboard(url, minutes=180)["minutes"] == 180
    assert dashboard(url, minutes=1)["timeline"] == []


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        headers = {name.lower(): value for name, value in response.headers.items()}
        return response.status, headers, response.read()


def test_the_page_and_its_files_are_served_by_every_node_and_load_nothing_else(
    cluster_factory: ClusterFactory,
) -> None:
    url = cluster_factory(1, "--no-scheduler").urls[0]

    redirect = urllib.request.Request(f"{url}/")
    opener = urllib.request.build_opener(NoRedirect())
    try:
        opener.open(redirect, timeout=10)
        raise AssertionError("GET / did not redirect")
    except urllib.error.HTTPError as error:
        assert error.code == 302 and error.headers["Location"] == "/ui"
    status, headers, page = fetch(f"{url}/ui")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["cache-control"] == "no-store"
    references = re.findall(rb'(?:src|href)="([^"]+)"', page)
    assert sorted(references) == [b"/ui/dashboard.css", b"/ui/dashboard.js"]
    for name, media_type in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        status, headers, body = fetch(f"{url}/ui/{name}")
        assert status == 200 and headers["content-type"].startswith(media_type), headers
        assert body == (ROOT / "balancectl" / "dashboard" / "static" / name).read_bytes()
        assert b"https://" not in body and b"import(" not in body  # nothing from elsewhere
    status, document = http_json(f"{url}/schema/openapi.json")
    paths = document["paths"]
    assert "text/html" in paths["/ui"]["get"]["responses"]["200"]["content"]
    schema = paths["/dashboard"]["get"]["responses"]["200"]["content"]["application/json"]
    assert schema["schema"]["$ref"].endswith("DashboardDocument")
    assert "/" not in paths and "/ui/dashboard.js" not in paths


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_the_wheel_ships_the_page(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, timeout=300,
    )  # fmt: skip
    names = set(zipfile.ZipFile(next(tmp_path.glob("balancectl-*.whl"))).namelist())
    for name in STATIC:
        assert f"balancectl/dashboard/static/{name}" in names, sorted(names)


def test_a_cut_database_link_is_a_503_problem_not_a_hang(
    cluster_factory: ClusterFactory, database_url: str
) -> None:
    """The page reads a 503 as "not answering"; a hang would freeze it until its own timeout."""
    with proxied(database_url) as proxy:
        url = cluster_factory(1, "--no-scheduler", url=through(database_url, proxy)).urls[0]
        assert dashboard(url)["nodes"] == []
        for mode in ("drop", "reject"):
            proxy.cut(mode)
            asked = time.monotonic()
            status, body = http_json(f"{url}/dashboard", timeout=60)
            waited = time.monotonic() - asked
            print(f"link cut ({mode}): {status} after {waited:.2f} s")
            assert status == 503, body
            assert body["type"] == "urn:balancectl:problem:unavailable", body
            proxy.restore()
            wait_for("the dashboard again", lambda: http_json(f"{url}/dashboard")[0] == 200, 30)


def test_every_status_history_may_hold_is_counted_and_drawn(
    cluster_factory: ClusterFactory, database_url: str
) -> None:
    """The statuses of runs the scheduler gave up (migration 0004) too, never a 500."""
    sql(
        database_url,
        "INSERT INTO jobs (name, function, interval_seconds, min_duration_seconds, next_run_at)"
        " VALUES ('stuck', 'x:y', 60, 0, now())",
    )
    for token, status in enumerate(GIVEN_UP, start=1):
        insert_run(database_url, "stuck", "node-a", token, f"{token + 1} min", f"{token} min",
                   status, "gave up")  # fmt: skip
    url = cluster_factory(1, "--no-scheduler").urls[0]

    document = dashboard(url)

    (job,) = document["jobs"]
    assert job["last_hour"] == {
        "succeeded": 0, "failed": 0, "lost": 0, "cancelled": 0,
        "timed_out": 1, "unresponsive": 1, "crashed": 1,
    }  # fmt: skip
    assert sorted(run["status"] for run in document["timeline"]) == sorted(GIVEN_UP)


OUTCOMES = ("changed", "replayed", "refused", "not_found", "invalid", "unauthorized",
            "unavailable", "failed")  # fmt: skip


def change(url: str, amount: int, user: int = 1) -> int:
    return http_json(f"{url}/users/{user}/balance", "POST", {"amount": amount}, timeout=30)[0]


def counts_are(url: str, **counts: int) -> dict[str, int] | None:
    """The counts if ``url``'s dashboard shows exactly these; ``None`` while it does not, or
    while it answers 503 (a pool's connection the cut link left dead, once the link is back)."""
    want = {name: counts.get(name, 0) for name in OUTCOMES}
    status, body = http_json(f"{url}/dashboard")
    if status == 503:
        return None
    assert status == 200, body
    got: dict[str, int] = body["money"]["requests_last_minute"]
    return got if got == want else None


def test_request_counts_add_up_over_nodes_and_workers_and_outlive_a_cut_link(
    cluster_factory: ClusterFactory, database_url: str
) -> None:
    """Two nodes of two workers each: every answer counted once, in either node's document;
    the 503s of an outage are counted too, recorded once the link is back (kept, not lost),
    and the workers go on serving while their records fail."""
    with proxied(database_url) as proxy:
        args = ("--no-scheduler", "--workers", "2", "--pool-timeout", "2")
        cluster = cluster_factory(2, *args, url=through(database_url, proxy))
        first, second = cluster.urls
        sent = [change(first, -1) for _ in range(4)] + [change(first, -(10**9))]
        sent += [change(second, 2) for _ in range(2)] + [change(second, 0)]
        assert sent == [200] * 4 + [409] + [200, 200, 422], sent
        wait_for("the counts", lambda: counts_are(second, changed=6, refused=1, invalid=1), 10)
        assert counts_are(first, changed=6, refused=1, invalid=1)

        proxy.cut("reject")
        during = [change(first, -1) for _ in range(3)] + [change(second, 0)]
        assert during == [503, 503, 503, 422], during
        time.sleep(3)  # every worker's record fails at least twice
        proxy.restore()
        wait_for(
            "the outage's counts, recorded once the link is back",
            lambda: counts_are(first, changed=6, refused=1, invalid=2, unavailable=3),
            timeout=30,
            every=0.5,
        )
        cluster.stop()  # before the proxy: no node reconnects while it shuts down
    workers = sql(database_url, "SELECT DISTINCT node_id, worker FROM request_outcomes")
    assert {node for node, _ in workers} == {"node-1", "node-2"}
