"""Settings refuse what cannot work; the jobs table shows what GET /jobs says."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from rich.console import Console

from balancectl.config import NodeSettings, SchedulerSettings
from balancectl.errors import ConfigError
from balancectl.scheduler.listing import JobsDocument
from balancectl.toolkit.jobs_view import (
    build_jobs_table,
    build_spread_table,
    seconds_text,
    watch_jobs,
)

URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def test_database_url_must_be_postgresql() -> None:
    with pytest.raises(ConfigError, match="postgresql://"):
        NodeSettings(database_url="mysql://root@localhost/db")


def test_non_loopback_host_needs_a_token_or_insecure() -> None:
    with pytest.raises(ConfigError, match="api-token"):
        NodeSettings(database_url=URL, host="0.0.0.0")
    assert NodeSettings(database_url=URL, host="0.0.0.0", api_token="t").api_token == "t"
    assert NodeSettings(database_url=URL, host="0.0.0.0", insecure=True).insecure


def test_lease_ttl_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="lease-ttl"):
        NodeSettings(database_url=URL, scheduler=SchedulerSettings(lease_ttl=0))


def render(table: Any) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


DOCUMENT = msgspec.convert({
    "now": "2026-11-29T10:00:00+00:00",
    "jobs": [
        {
            "name": "ledger-audit", "function": "m:f", "interval_seconds": 180.0,
            "state": "running", "node": "node-3", "started_at": "2026-11-29T09:59:18+00:00",
            "elapsed_seconds": 42.0, "next_run_at": None, "last_run": None,
        },
        {
            "name": "prune-history", "function": "m:g", "interval_seconds": 300.0,
            "state": "waiting", "node": None, "started_at": None, "elapsed_seconds": None,
            "next_run_at": "2026-11-29T10:01:30+00:00",
            "last_run": {"id": 1, "job": "prune-history", "node": "node-1", "token": 7,
                         "started_at": "2026-11-29T09:55:00+00:00",
                         "finished_at": "2026-11-29T09:57:00+00:00",
                         "duration_seconds": 120.0, "status": "succeeded", "error": None},
        },
    ],
}, JobsDocument)  # fmt: skip


def test_jobs_table_shows_node_elapsed_due_and_last_run() -> None:
    text = render(build_jobs_table(DOCUMENT))
    running = next(line for line in text.splitlines() if "ledger-audit" in line)
    assert "running" in running and "node-3" in running and "42.0s" in running
    waiting = next(line for line in text.splitlines() if "prune-history" in line)
    assert "waiting" in waiting and "1m30s" in waiting and "succeeded on node-1" in waiting


def test_spread_table_counts_running_jobs_per_node() -> None:
    text = render(build_spread_table(DOCUMENT))
    assert "node-3" in text and "node-1" not in text


def test_watch_shows_the_jobs_and_the_spread_again_until_its_time_is_up() -> None:
    console = Console(width=200, record=True)
    fetched: list[JobsDocument] = []

    def fetch() -> JobsDocument:
        fetched.append(DOCUMENT)
        return DOCUMENT

    watch_jobs(fetch, console, interval=0.01, seconds=0.1)
    text = console.export_text()
    assert "ledger-audit" in text and "jobs per node" in text
    assert len(fetched) >= 2


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, ""), (4.25, "4.2s"), (90, "1m30s"), (-5, "-5.0s")]
)
def test_seconds_text(seconds: float | None, text: str) -> None:
    assert seconds_text(seconds) == text
