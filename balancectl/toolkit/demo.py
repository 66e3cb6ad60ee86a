"""``balancectl demo``: the whole story on one machine, from nothing.

Free ports are picked unless ``--base-port`` fixes them. The caller runs this inside
``cluster.stop_signals()``: a SIGINT or SIGTERM at any step stops every node started.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from balancectl.toolkit.cluster import (
    LocalCluster,
    check_ports_free,
    in_thread,
    migrate,
    pick_free_ports,
)
from balancectl.toolkit.jobs_view import fetch_jobs, watch_jobs
from balancectl.toolkit.loadtest import (
    LoadtestConfig,
    LoadtestReport,
    build_verdict_table,
    run_loadtest,
)

out = Console()
err = Console(stderr=True)


def step(text: str) -> None:
    """One step line on stderr, never wrapped by rich (ports and URLs stay copyable)."""
    err.print(text, soft_wrap=True, highlight=False)


def run_demo(
    database_url: str, nodes: int, base_port: int | None, requests: int, watch_seconds: float
) -> bool:
    """Migrate, start local nodes, run the burst across them, show the jobs; the verdict."""
    step("[bold]1.[/bold] migrating the database")
    in_thread(lambda: migrate(database_url))
    first = choose_ports(nodes, base_port)
    cluster = LocalCluster(database_url, nodes, ports=range(first, first + nodes))
    how = "given by --base-port" if base_port is not None else "free ones, picked for you"
    step(f"[bold]2.[/bold] starting {nodes} nodes on ports {first}..{first + nodes - 1} ({how})")
    try:
        cluster.start()
        cluster.wait_ready()
        for node in cluster.members:
            step(f"   {node.node_id} {node.url}")
        report = burst(database_url, cluster, requests)
        out.print(build_verdict_table(report))
        step(f"[bold]4.[/bold] the cluster's jobs, live for {watch_seconds:.0f} s")
        watch_jobs(lambda: fetch_jobs(cluster.urls[0]), out, 1.0, watch_seconds)
        step("[bold]5.[/bold] stopping the nodes (their runs are recorded as cancelled)")
    finally:
        cluster.stop()
    return bool(report.passed)


def choose_ports(nodes: int, base_port: int | None) -> int:
    """The first port: ``base_port`` when given (every port checked free), else free ones."""
    if base_port is None:
        return pick_free_ports(nodes)
    check_ports_free(base_port, nodes)
    return base_port


def burst(database_url: str, cluster: LocalCluster, requests: int) -> LoadtestReport:
    """The load test across the cluster, one demo at a time on a database."""
    nodes = len(cluster.members)
    with one_burst_at_a_time(database_url):
        step(f"[bold]3.[/bold] {requests} simultaneous debits of 2 across {nodes} nodes")
        config = LoadtestConfig(urls=tuple(cluster.urls), requests=requests, reset=10000)
        return in_thread(lambda: asyncio.run(run_loadtest(config)))


@contextmanager
def one_burst_at_a_time(database_url: str) -> Iterator[None]:
    """Two demos on one database take turns for the burst, so both verdicts stay exact
    (both debit user 1); the lock is a file, keyed by the URL, gone with the process."""
    digest = hashlib.sha256(database_url.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"balancectl-demo-{digest}.lock"
    with path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            step("   another demo is firing at this database; waiting for its burst to end")
            fcntl.flock(lock, fcntl.LOCK_EX)  # a signal interrupts the wait (PEP 475)
        yield
