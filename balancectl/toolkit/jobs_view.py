"""The cluster's jobs as a rich table, from a node's ``GET /jobs`` or straight from the database."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any

from rich.table import Table
from rich.text import Text

from balancectl.errors import ConfigError

STATE_STYLE = {"running": "bold green", "waiting": "yellow"}
RESULT_STYLE = {"succeeded": "green", "failed": "red", "lost": "magenta", "cancelled": "dim"}


def seconds_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    minutes, rest = divmod(int(seconds), 60)
    return f"{sign}{minutes}m{rest:02d}s" if minutes else f"{sign}{seconds:.1f}s"


def due_in(job: dict[str, Any], now: datetime) -> float | None:
    if job["next_run_at"] is None:
        return None
    return (datetime.fromisoformat(job["next_run_at"]) - now).total_seconds()


def last_result(run: dict[str, Any] | None) -> Text:
    if run is None:
        return Text("never run", style="dim")
    text = Text(run["status"], style=RESULT_STYLE.get(run["status"], ""))
    text.append(f" on {run['node']} ({seconds_text(run['duration_seconds'])})", style="dim")
    return text


def build_jobs_table(document: dict[str, Any]) -> Table:
    """One row per job: state, node, elapsed or due-in, interval, last result."""
    now = datetime.fromisoformat(document["now"])
    table = Table(title=f"balancectl jobs at {now:%H:%M:%S} (database clock)")
    for column in ("job", "state", "node", "elapsed", "due in", "interval", "last run"):
        table.add_column(column)
    for job in document["jobs"]:
        table.add_row(
            job["name"],
            Text(job["state"], style=STATE_STYLE.get(job["state"], "")),
            job["node"] or "",
            seconds_text(job["elapsed_seconds"]),
            seconds_text(due_in(job, now)),
            seconds_text(job["interval_seconds"]),
            last_result(job["last_run"]),
        )
    return table


def build_spread_table(document: dict[str, Any]) -> Table:
    """How many jobs each node runs right now."""
    counts: dict[str, int] = {}
    for job in document["jobs"]:
        if job["node"]:
            counts[job["node"]] = counts.get(job["node"], 0) + 1
    table = Table(title="jobs per node")
    table.add_column("node")
    table.add_column("jobs", justify="right")
    for node, count in sorted(counts.items()):
        table.add_row(node, str(count))
    return table


def fetch_jobs(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """``GET /jobs`` of one node; ``ConfigError`` (one line) when it cannot be had."""
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ConfigError(f"--url must start with http:// or https:// (got {url!r})")
    try:
        document: dict[str, Any] = json.loads(_get(f"{base}/jobs", timeout))
    except ValueError as error:
        raise ConfigError(f"{base}/jobs did not answer JSON: is it a balancectl node?") from error
    return document


def _get(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as error:
        raise ConfigError(f"{url} answered HTTP {error.code}: is it a balancectl node?") from error
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(f"cannot reach the node at {url}: {reason}") from error
    except ValueError as error:  # urllib refuses the URL itself
        raise ConfigError(f"--url is not a valid URL: {url!r} ({error})") from error
    return body
