"""The cluster's jobs as rich tables, from a node's API or straight from the database, and
the operator's verbs (run, pause, resume) sent to a node; every failure is one line
(``ConfigError``).

A node's answer is decoded into the listing's own Structs (``balancectl.scheduler.listing``,
the shape the routes encode), and every table is built from them by a pure ``build_*``.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

import msgspec
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from balancectl.errors import ConfigError
from balancectl.scheduler.listing import (
    HistoryDocument,
    JobDocument,
    JobsDocument,
    NodesDocument,
    RunDocument,
)

STATE_STYLE = {"running": "bold green", "waiting": "yellow", "paused": "cyan"}
RESULT_STYLE = {"succeeded": "green", "failed": "red", "lost": "magenta", "cancelled": "dim"}
Answer = TypeVar("Answer", JobsDocument, JobDocument, HistoryDocument, NodesDocument)


def seconds_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    minutes, rest = divmod(int(seconds), 60)
    return f"{sign}{minutes}m{rest:02d}s" if minutes else f"{sign}{seconds:.1f}s"


def due_in(job: JobDocument, now: datetime) -> float | None:
    if job.next_run_at is None:
        return None
    return (datetime.fromisoformat(job.next_run_at) - now).total_seconds()


def last_result(run: RunDocument | None) -> Text:
    if run is None:
        return Text("never run", style="dim")
    text = Text(run.status, style=RESULT_STYLE.get(run.status, ""))
    text.append(f" on {run.node} ({seconds_text(run.duration_seconds)})", style="dim")
    return text


def state_text(job: JobDocument) -> Text:
    """The job's state; a paused job's run in progress shows that it will not run again."""
    text = Text(job.state, style=STATE_STYLE.get(job.state, ""))
    if job.paused and job.state == "running":
        text.append(" (paused)", style=STATE_STYLE["paused"])
    return text


def build_jobs_table(document: JobsDocument) -> Table:
    """One row per job: state, node, elapsed or due-in, interval, last result."""
    now = datetime.fromisoformat(document.now)
    table = Table(title=f"balancectl jobs at {now:%H:%M:%S} (database clock)")
    for column in ("job", "state", "node", "elapsed", "due in", "interval", "last run"):
        table.add_column(column)
    for job in document.jobs:
        table.add_row(
            job.name,
            state_text(job),
            job.node or "",
            seconds_text(job.elapsed_seconds),
            seconds_text(due_in(job, now)),
            seconds_text(job.interval_seconds),
            last_result(job.last_run),
        )
    return table


def build_history_table(document: HistoryDocument, job: str) -> Table:
    """A job's finished runs, newest first: when, where, how long, how it ended."""
    table = Table(title=f"runs of {job}, newest first")
    for column in ("started", "node", "token", "duration", "status", "error"):
        table.add_column(column)
    for run in document.runs:
        table.add_row(
            f"{datetime.fromisoformat(run.started_at):%Y-%m-%d %H:%M:%S}",
            run.node,
            str(run.token),
            seconds_text(run.duration_seconds),
            Text(run.status, style=RESULT_STYLE.get(run.status, "")),
            run.error or "",
        )
    return table


def build_nodes_table(document: NodesDocument) -> Table:
    """Every node that has run: alive or gone, where, since when, last seen."""
    table = Table(title="balancectl nodes")
    for column in ("node", "alive", "host", "pid", "started", "last seen"):
        table.add_column(column)
    for node in document.nodes:
        table.add_row(
            node.id,
            Text("alive", style="green") if node.alive else Text("gone", style="red"),
            node.host,
            str(node.pid),
            f"{datetime.fromisoformat(node.started_at):%Y-%m-%d %H:%M:%S}",
            f"{datetime.fromisoformat(node.last_seen_at):%Y-%m-%d %H:%M:%S}",
        )
    return table


def verb_summary(verb: str, job: JobDocument) -> str:
    """One line saying what ``verb`` did to ``job`` (the Job document it answered)."""
    name, node, running = job.name, job.node, job.state == "running"
    if verb == "run" and running:
        return f"{name}: running on {node}; due again as soon as that run ends"
    if verb == "run":
        return f"{name}: due now"
    if verb == "pause-stop" and running:
        return f"{name}: paused; its run on {node} is being stopped (recorded cancelled)"
    if verb == "pause" and running:
        return f"{name}: paused; its run on {node} finishes, then it is not claimed"
    if verb in ("pause", "pause-stop"):
        return f"{name}: paused"
    return f"{name}: resumed ({job.state})"


def build_spread_table(document: JobsDocument) -> Table:
    """How many jobs each node runs right now."""
    counts: dict[str, int] = {}
    for job in document.jobs:
        if job.node:
            counts[job.node] = counts.get(job.node, 0) + 1
    table = Table(title="jobs per node")
    table.add_column("node")
    table.add_column("jobs", justify="right")
    for node, count in sorted(counts.items()):
        table.add_row(node, str(count))
    return table


def watch_jobs(
    fetch: Callable[[], JobsDocument],
    console: Console,
    interval: float,
    seconds: float | None = None,
) -> None:
    """``jobs --watch`` (and the demo's last step): the jobs and how many each node runs,
    fetched again every ``interval`` seconds, for ``seconds`` (``None``: until interrupted)."""
    deadline = None if seconds is None else time.monotonic() + seconds
    try:
        with Live(watch_view(fetch()), console=console, refresh_per_second=4) as live:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(interval)
                live.update(watch_view(fetch()))
    finally:
        if not console.is_terminal:
            console.line()  # a live display ends its last frame without a newline off a terminal


def watch_view(document: JobsDocument) -> Group:
    """One frame of ``watch_jobs``: the jobs table over the jobs-per-node table."""
    return Group(build_jobs_table(document), build_spread_table(document))


def fetch_jobs(url: str) -> JobsDocument:
    """``GET /jobs`` of one node; ``ConfigError`` (one line) when it cannot be had."""
    return call_node(url, "GET", "/jobs", JobsDocument)


def fetch_history(url: str, job: str, limit: int, token: str | None = None) -> HistoryDocument:
    """``GET /jobs/history?job=...&limit=...`` of one node."""
    query = urllib.parse.urlencode({"job": job, "limit": limit})
    return call_node(url, "GET", f"/jobs/history?{query}", HistoryDocument, token)


def fetch_nodes(url: str, token: str | None = None) -> NodesDocument:
    return call_node(url, "GET", "/nodes", NodesDocument, token)


def control(url: str, verb: str, job: str, token: str | None) -> JobDocument:
    """``POST /jobs/{job}/{verb}``: the Job document after the change."""
    path = f"/jobs/{urllib.parse.quote(job, safe='')}/"
    path += "pause?stop=true" if verb == "pause-stop" else verb
    return call_node(url, "POST", path, JobDocument, token)


def call_node(
    url: str,
    method: str,
    path: str,
    shape: type[Answer],
    token: str | None = None,
    timeout: float = 5.0,
) -> Answer:
    """One request to a node, its answer decoded into ``shape``; ``ConfigError`` (one line)
    when it cannot be had: the node unreachable, not a balancectl node, or a problem it
    answered."""
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ConfigError(f"--url must start with http:// or https:// (got {url!r})")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = _send(f"{base}{path}", method, headers, timeout)
    try:
        return msgspec.json.decode(body, type=shape)
    except msgspec.ValidationError as error:
        raise ConfigError(
            f"{base}{path} answered JSON that is not a {shape.__name__} ({error}): "
            "is it a balancectl node?"
        ) from error
    except msgspec.DecodeError as error:
        raise ConfigError(f"{base}{path} did not answer JSON: is it a balancectl node?") from error


def _send(url: str, method: str, headers: dict[str, str], timeout: float) -> bytes:
    try:
        request = urllib.request.Request(url, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as error:
        raise ConfigError(refusal(url, error)) from error
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(f"cannot reach the node at {url}: {reason}") from error
    except ValueError as error:  # urllib refuses the URL itself
        raise ConfigError(f"--url is not a valid URL: {url!r} ({error})") from error
    return body


def refusal(url: str, error: urllib.error.HTTPError) -> str:
    """A node's error answer in one line: its problem's detail, else the status alone."""
    try:
        problem = json.loads(error.read())
        detail = f"{problem['detail']} (HTTP {error.code} {problem['title']})"
    except (ValueError, TypeError, KeyError, OSError):
        return f"{url} answered HTTP {error.code}: is it a balancectl node?"
    if error.code == 401:
        detail += "; give --api-token or set BALANCECTL_API_TOKEN"
    return " ".join(str(detail).split())
