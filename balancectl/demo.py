"""``balancectl demo``: the whole story on one machine, from nothing."""

from __future__ import annotations

import asyncio
import time

from rich.console import Console, Group
from rich.live import Live

from balancectl import migrations
from balancectl.cluster import LocalCluster
from balancectl.jobs_view import build_jobs_table, build_spread_table, fetch_jobs
from balancectl.loadtest import LoadtestConfig, build_verdict_table, run_loadtest

out = Console()
err = Console(stderr=True)


def run_demo(
    database_url: str, nodes: int, base_port: int, requests: int, watch_seconds: float
) -> bool:
    """Migrate, start local nodes, run the burst across them, show the jobs; the verdict."""
    err.print("[bold]1.[/bold] migrating the database")
    migrations.upgrade(database_url)
    cluster = LocalCluster(database_url, nodes, base_port)
    err.print(
        f"[bold]2.[/bold] starting {nodes} nodes on ports {base_port}..{base_port + nodes - 1}"
    )
    with cluster:
        cluster.wait_ready()
        err.print(f"[bold]3.[/bold] {requests} simultaneous debits of 2 across {nodes} nodes")
        config = LoadtestConfig(urls=tuple(cluster.urls), requests=requests, reset=10000)
        report = asyncio.run(run_loadtest(config))
        out.print(build_verdict_table(report))
        err.print(f"[bold]4.[/bold] the cluster's jobs, live for {watch_seconds:.0f} s")
        watch_jobs(cluster.urls[0], watch_seconds)
        err.print("[bold]5.[/bold] stopping the nodes (their runs are recorded as cancelled)")
    return bool(report.passed)


def watch_jobs(url: str, seconds: float) -> None:
    """Show the jobs table, refreshed every second, for ``seconds``."""
    deadline = time.monotonic() + seconds
    document = fetch_jobs(url)
    with Live(Group(build_jobs_table(document), build_spread_table(document)), console=out) as live:
        while time.monotonic() < deadline:
            time.sleep(1.0)
            document = fetch_jobs(url)
            live.update(Group(build_jobs_table(document), build_spread_table(document)))
    if not out.is_terminal:
        out.line()  # a live display ends its last frame without a newline off a terminal
