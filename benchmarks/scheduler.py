"""Benchmark the scheduler, on one scratch database, in one run.

    .venv/bin/python benchmarks/scheduler.py --database-url postgresql://postgres@127.0.0.1/postgres

Measures, against baselines taken in the same run (see benchmarks/README.md):

- pickup: how long N nodes started together take until all J due jobs run, for
  J = 5, 10, 20 on 5 nodes; the baseline is one node picking up the same J jobs
  (ratio 5 nodes / 1 node), and the spread (jobs per node) is printed too;
- listing: the latency of ``GET /jobs`` and ``GET /jobs/history?job=..`` with 100,000
  history rows, against ``GET /healthz`` (no database) as the baseline, plus the
  query plans, which must use the job_runs indexes and not a sequential scan.

Writes ``benchmarks/results/scheduler-<timestamp>.json`` and prints markdown tables.
Nodes are stopped and the scratch database dropped on the way out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from balancectl.sql.loader import query  # noqa: E402
from balancectl.toolkit.cluster import LocalCluster  # noqa: E402
from benchmarks.balance import scratch_database  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HISTORY_ROWS = 100_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def jobs_file(folder: Path, count: int) -> Path:
    path = folder / f"jobs-{count}.toml"
    path.write_text(
        "".join(
            f'[[jobs]]\nname = "job-{i:02d}"\nfunction = "balancectl.jobs.builtin:idle"\n'
            'interval = "10m"\nmin_duration = "5m"\n\n'
            for i in range(count)
        )
    )
    return path


def reset_scheduler(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("TRUNCATE jobs, job_runs, nodes")


def running_per_node(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT owner, count(*) FROM jobs WHERE owner IS NOT NULL"
            " AND lease_expires_at > now() GROUP BY owner"
        ).fetchall()
    return {str(owner): int(count) for owner, count in rows}


def pickup(url: str, nodes: int, jobs: int, folder: Path, base_port: int) -> dict[str, Any]:
    """Seconds from every node ready to every job running (settle 2 s, poll 0.5 s)."""
    reset_scheduler(url)
    args = ["--jobs-file", str(jobs_file(folder, jobs)), "--settle", "2", "--poll-interval", "0.5"]
    cluster = LocalCluster(url, nodes, base_port, args)
    with cluster:
        started = time.monotonic()
        cluster.wait_ready(timeout=120)
        ready = time.monotonic()
        spread: dict[str, int] = {}
        while time.monotonic() - ready < 120:
            spread = running_per_node(url)
            if sum(spread.values()) == jobs:
                break
            time.sleep(0.05)
        done = time.monotonic()
    return {
        "nodes": nodes,
        "jobs": jobs,
        "start_to_ready_s": round(ready - started, 2),
        "ready_to_all_running_s": round(done - ready, 2),
        "start_to_all_running_s": round(done - started, 2),
        "spread": dict(sorted(spread.items())),
    }


def fill_history(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO job_runs (job, node, token, started_at, finished_at, status)"
            " SELECT 'job-' || lpad((i %% 10)::text, 2, '0'), 'node-' || (i %% 5 + 1), i,"
            "   now() - make_interval(secs => i * 60), now() - make_interval(secs => i * 60 - 30),"
            "   'succeeded'"
            " FROM generate_series(1, %s) AS i",
            (HISTORY_ROWS,),
        )
        connection.execute("ANALYZE job_runs")


def latency_ms(url: str, count: int = 300) -> dict[str, float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
        samples.append((time.perf_counter() - began) * 1000)
    samples.sort()
    return {
        "p50": round(statistics.median(samples), 2),
        "p99": round(samples[int(len(samples) * 0.99) - 1], 2),
    }


def plans(url: str) -> dict[str, str]:
    statements: dict[str, tuple[str, dict[str, Any]]] = {
        "list_jobs": (query("list_jobs"), {}),
        "job_history by job": (
            query("job_history"),
            {"job": "job-03", "node": None, "limit": 100},
        ),
        "job_history by node": (
            query("job_history"),
            {"job": None, "node": "node-2", "limit": 100},
        ),
        "job_history all": (query("job_history"), {"job": None, "node": None, "limit": 100}),
    }
    found: dict[str, str] = {}
    with psycopg.connect(url, autocommit=True) as connection:
        for name, (statement, params) in statements.items():
            explain = sql.SQL("EXPLAIN ") + sql.SQL(statement)
            rows = connection.execute(explain, params, prepare=False).fetchall()
            found[name] = "\n".join(str(row[0]) for row in rows)
    return found


def listing(url: str, folder: Path, base_port: int) -> dict[str, Any]:
    reset_scheduler(url)
    fill_history(url)
    args = ["--jobs-file", str(jobs_file(folder, 10)), "--settle", "0"]
    with LocalCluster(url, 1, base_port, args) as cluster:
        cluster.wait_ready(timeout=120)
        base = cluster.urls[0]
        result: dict[str, Any] = {
            "history_rows": HISTORY_ROWS,
            "healthz_ms": latency_ms(f"{base}/healthz"),
            "jobs_ms": latency_ms(f"{base}/jobs"),
            "history_by_job_ms": latency_ms(f"{base}/jobs/history?job=job-03&limit=100"),
            "history_all_ms": latency_ms(f"{base}/jobs/history?limit=100"),
        }
    result["plans"] = plans(url)
    result["seq_scan_on_job_runs"] = any(
        "Seq Scan on job_runs" in plan for plan in result["plans"].values()
    )
    return result


def report(pickups: list[dict[str, Any]], listed: dict[str, Any]) -> str:
    lines = [
        "| nodes | jobs | ready -> all running (s) | ratio to 1 node | spread |",
        "| --- | --- | --- | --- | --- |",
    ]
    single = {p["jobs"]: p["ready_to_all_running_s"] for p in pickups if p["nodes"] == 1}
    for p in pickups:
        ratio = p["ready_to_all_running_s"] / single[p["jobs"]] if single.get(p["jobs"]) else 0
        spread = ", ".join(str(v) for v in p["spread"].values())
        seconds = p["ready_to_all_running_s"]
        lines.append(f"| {p['nodes']} | {p['jobs']} | {seconds} | {ratio:.2f} | {spread} |")
    health = listed["healthz_ms"]["p50"]
    lines += [
        "",
        f"| route ({HISTORY_ROWS:,} history rows) | p50 ms | p99 ms | p50 / healthz p50 |",
        "| --- | --- | --- | --- |",
    ]
    for key, label in (
        ("healthz_ms", "GET /healthz (baseline)"),
        ("jobs_ms", "GET /jobs"),
        ("history_by_job_ms", "GET /jobs/history?job=..&limit=100"),
        ("history_all_ms", "GET /jobs/history?limit=100"),
    ):
        figures = listed[key]
        lines.append(
            f"| {label} | {figures['p50']} | {figures['p99']} | {figures['p50'] / health:.2f} |"
        )
    lines.append("")
    lines.append(f"sequential scan on job_runs in any plan: {listed['seq_scan_on_job_runs']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--base-port", type=int, default=18600)
    args = parser.parse_args()
    with scratch_database(args.database_url) as url, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pickups = []
        for jobs in (5, 10, 20):
            for nodes in (1, 5):
                log(f"pickup: {nodes} node(s), {jobs} jobs")
                pickups.append(pickup(url, nodes, jobs, folder, args.base_port))
        log("listing with 100,000 history rows")
        listed = listing(url, folder, args.base_port)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"scheduler-{stamp}.json"
    out.write_text(json.dumps({"pickup": pickups, "listing": listed}, indent=2) + "\n")
    print(report(pickups, listed))
    print(f"\n(raw figures: {out})")


if __name__ == "__main__":
    main()
