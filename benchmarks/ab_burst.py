"""Two checkouts of balancectl, paired: one node each, the 10,000 burst, turns alternated.

For a change to the hot path: each pair runs one burst against a node of ``--a`` and
one against a node of ``--b`` (the order swapped every other pair, so a drift of the
machine hits both alike), on one scratch database, with the same client as
benchmarks/burst.py. It prints each run's wall time, the node's CPU seconds (all its
processes) and the client's, checks every burst exact (N/2 ok, N/2 refused, balance 0,
N/2 ledger debits) and ends with the medians and their ratio B/A.

    git worktree add /tmp/before HEAD~1
    .venv/bin/python benchmarks/ab_burst.py \\
        --database-url postgresql://postgres@127.0.0.1:5432/postgres --a /tmp/before --b . --pairs 6

A checkout is any folder holding the ``balancectl`` package; its code runs from there
(``PYTHONPATH``), with this environment's libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.balance import free_base_port, log, scratch_database  # noqa: E402
from benchmarks.burst import (  # noqa: E402
    cpu_seconds,
    descendants,
    exact_outcome,
    raise_nofile,
    reset_balance,
)


@dataclass(frozen=True)
class Run:
    wall: float
    node_cpu: float
    client_cpu: float
    exact: bool


def serve(
    checkout: Path, database_url: str, port: int, workers: int | None
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "balancectl", "serve", "--no-scheduler", "--log-level",
               "WARNING", "--port", str(port), "--database-url", database_url]  # fmt: skip
    if workers is not None:
        command += ["--workers", str(workers)]
    env = dict(os.environ, PYTHONPATH=str(checkout))
    node = subprocess.Popen(
        command, cwd=checkout, env=env, stdin=subprocess.DEVNULL, preexec_fn=raise_nofile
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
                if answer.status == 200:
                    return node
        except OSError:
            time.sleep(0.1)
    node.kill()
    raise RuntimeError(f"the node of {checkout} was not ready in 60 s")


def burst(checkout: Path, database_url: str, requests: int, workers: int | None) -> Run:
    port = free_base_port(1, start=26000)
    node = serve(checkout, database_url, port, workers)
    try:
        url = f"http://127.0.0.1:{port}"
        time.sleep(1.0)  # the workers' start is over
        pids = descendants(node.pid)
        since = reset_balance(database_url, requests)
        before = cpu_seconds(pids)
        client = [sys.executable, str(HERE / "burst_client.py"), "--url", url,
                  "--requests", str(requests)]  # fmt: skip
        output = subprocess.run(
            client, capture_output=True, text=True, check=True, preexec_fn=raise_nofile
        ).stdout
        node_cpu = cpu_seconds(pids) - before
    finally:
        node.terminate()
        node.wait(30)
    data = json.loads(output.strip().splitlines()[-1])
    exact = exact_outcome(database_url, since, requests, data["outcomes"])
    return Run(data["wall_seconds"], node_cpu, data["client_cpu_seconds"], exact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("BALANCECTL_DATABASE_URL"))
    parser.add_argument("--a", type=Path, required=True, help="the checkout before")
    parser.add_argument("--b", type=Path, required=True, help="the checkout after")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=None, help="the node's --workers")
    args = parser.parse_args()
    if not args.database_url:
        parser.error("--database-url (or BALANCECTL_DATABASE_URL) is required")
    checkouts = {"A": args.a.resolve(), "B": args.b.resolve()}
    runs: dict[str, list[Run]] = {"A": [], "B": []}
    with scratch_database(args.database_url) as url:
        for pair in range(args.pairs):
            for side in "AB" if pair % 2 == 0 else "BA":
                run = burst(checkouts[side], url, args.requests, args.workers)
                runs[side].append(run)
                log(f"pair {pair + 1} {side}: wall {run.wall:.2f} s, node CPU {run.node_cpu:.2f} s,"
                    f" client CPU {run.client_cpu:.2f} s, exact {run.exact}")  # fmt: skip
    for side in "AB":
        walls, cpus = [r.wall for r in runs[side]], [r.node_cpu for r in runs[side]]
        print(f"{side} {checkouts[side]}: wall {statistics.median(walls):.2f} s "
              f"({min(walls):.2f}-{max(walls):.2f}), node CPU {statistics.median(cpus):.2f} s "
              f"({min(cpus):.2f}-{max(cpus):.2f})")  # fmt: skip
    ratio = {
        name: statistics.median(getattr(r, field) for r in runs["B"])
        / statistics.median(getattr(r, field) for r in runs["A"])
        for name, field in (("wall", "wall"), ("node CPU", "node_cpu"))
    }
    print(f"B/A: wall {ratio['wall']:.2f}x, node CPU {ratio['node CPU']:.2f}x")
    if not all(run.exact for side in runs.values() for run in side):
        sys.exit("a burst was not exact")


if __name__ == "__main__":
    main()
