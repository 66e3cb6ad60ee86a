"""The 10,000-request burst and sustained throughput, each against its floor in the same run.

Setups, interleaved over ``--rounds`` (the order reversed every other round):
- ``floor``: benchmarks/floor_server.py, a raw asyncio protocol on uvloop that answers
  every request with a fixed 200 and touches no database;
- ``litestar``: benchmarks/minimal_litestar.py, the framework alone under uvicorn;
- ``1 node`` / ``5 nodes``: ``balancectl serve --no-scheduler`` with its defaults;
- ``1 node, keyed``: the same burst with an ``Idempotency-Key`` on every request.

Each is hit by the same client (benchmarks/burst_client.py, which is ``balancectl
loadtest``'s burst) and by ``ab -n N -c N``. Node figures: CPU seconds of the node's
processes per 1,000 requests and their peak RSS during the burst; the outcomes are
checked in the database after every node burst (exactly N/2 ok, final balance 0, N/2
ledger debits). Sustained: ``wrk`` keep-alive credits against ``pgbench`` running the
route's own statement, on one hot row and over 10,000 users chosen at random.

    .venv/bin/python benchmarks/burst.py --database-url postgresql://postgres@127.0.0.1:5432/postgres

It needs ``ab`` (Debian apache2-utils), ``wrk`` and ``pgbench``; it creates a scratch
database on that server and drops it at the end. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from balancectl.sql.loader import query  # noqa: E402
from balancectl.toolkit.cluster import LocalCluster  # noqa: E402
from benchmarks.balance import (  # noqa: E402
    Options,
    admin,
    alternating,
    await_quiet,
    free_base_port,
    log,
    parse_wrk,
    run_pgbench,
    scratch_database,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
RESULTS = HERE / "results"
USERS = 10000  # the many-users measurement's row count
WRK_CLIENTS = 50


# --- servers and their processes ------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux /proc)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                queue.extend(int(child) for child in children)
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except OSError:
        return 0


@dataclass
class Server:
    """Something listening: its URLs and the root pid of each of its nodes."""

    name: str
    urls: list[str]
    roots: list[int]
    database: bool

    def pids(self) -> list[int]:
        return [pid for root in self.roots for pid in descendants(root)]


def wait_listening(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f} s")


@contextlib.contextmanager
def script_server(name: str, script: str) -> Iterator[Server]:
    port = free_base_port(1, start=24000)
    command = [sys.executable, str(HERE / script), "--port", str(port)]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, preexec_fn=raise_nofile)
    try:
        wait_listening(port)
        yield Server(name, [f"http://127.0.0.1:{port}"], [process.pid], database=False)
    finally:
        process.terminate()
        process.wait(timeout=20)


@contextlib.contextmanager
def nodes(name: str, database_url: str, count: int, extra: Sequence[str] = ()) -> Iterator[Server]:
    args = ["--no-scheduler", "--log-level", "WARNING", *extra]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cluster = LocalCluster(
        database_url, count, free_base_port(count, start=25000), args, env=env, log=sys.stderr
    )
    try:
        cluster.start()
        cluster.wait_ready(timeout=120)
        roots = [node.process.pid for node in cluster.members]
        yield Server(name, cluster.urls, roots, database=True)
    finally:
        cluster.stop()


def raise_nofile() -> None:
    """In a child: an open-files limit that fits 10,000 sockets and more."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- one burst ------------------------------------------------------------------------------


@dataclass
class Sampler:
    """Peak RSS of each node (all its processes together) while a burst runs."""

    server: Server
    peaks: list[int] = field(default_factory=list)

    def sample(self) -> None:
        totals = [sum(rss_bytes(pid) for pid in descendants(root)) for root in self.server.roots]
        self.peaks = [max(a, b) for a, b in zip(self.peaks or totals, totals, strict=True)]


def run_sampled(command: list[str], server: Server, timeout: float) -> tuple[str, float, Sampler]:
    """Run ``command`` while sampling the server; its stdout, server CPU seconds, samples."""
    pids, sampler = server.pids(), Sampler(server)
    before = cpu_seconds(pids)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=raise_nofile
    )
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        sampler.sample()
        time.sleep(0.1)
    try:
        stdout, stderr = process.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({process.returncode}): {stderr[-2000:]}")
    return stdout, cpu_seconds(pids) - before, sampler


@dataclass(frozen=True)
class BurstRun:
    setup: str
    client: str
    wall_seconds: float
    client_cpu_seconds: float | None
    server_cpu_seconds: float
    peak_rss_mib: list[float]
    outcomes: dict[str, int]
    exact: bool | None

    def cpu_per_1000(self, requests: int) -> float:
        return self.server_cpu_seconds * 1000 / requests


def reset_balance(database_url: str, balance: int) -> int:
    """User 1 at ``balance``, the ledger kept whole; the ledger's last id before the burst."""
    rows = admin(
        database_url,
        "WITH now AS (SELECT balance FROM users WHERE id = 1), "
        "moved AS (UPDATE users SET balance = " + str(balance) + " WHERE id = 1 RETURNING 1), "
        "entry AS (INSERT INTO ledger (user_id, amount, balance_after) "
        "SELECT 1, " + str(balance) + " - balance, " + str(balance) + " FROM now "
        "WHERE balance <> " + str(balance) + " RETURNING id) "
        "SELECT coalesce((SELECT max(id) FROM entry), (SELECT max(id) FROM ledger))",
    )
    return int(rows[0][0])


def exact_outcome(database_url: str, since: int, requests: int, outcomes: dict[str, int]) -> bool:
    """N/2 ok and N/2 refused, the balance at 0, and N/2 new ledger debits of 2."""
    half = requests // 2
    balance = admin(database_url, "SELECT balance FROM users WHERE id = 1")[0][0]
    debits = admin(
        database_url,
        f"SELECT count(*) FROM ledger WHERE user_id = 1 AND id > {since} AND amount = -2",
    )[0][0]
    expected = {"ok": half, "insufficient": requests - half}
    return outcomes == expected and balance == 0 and debits == half


def client_burst(server: Server, requests: int, keyed: bool, database_url: str) -> BurstRun:
    since = reset_balance(database_url, requests) if server.database else 0
    command = [sys.executable, str(HERE / "burst_client.py"), "--requests", str(requests)]
    command += [arg for url in server.urls for arg in ("--url", url)] + (["--keyed"] * keyed)
    stdout, server_cpu, sampler = run_sampled(command, server, timeout=300)
    data = json.loads(stdout.strip().splitlines()[-1])
    outcomes = data["outcomes"]
    exact = exact_outcome(database_url, since, requests, outcomes) if server.database else None
    return BurstRun(
        server.name, "aiohttp", data["wall_seconds"], data["client_cpu_seconds"], server_cpu,
        [round(p / 2**20, 1) for p in sampler.peaks], outcomes, exact,
    )  # fmt: skip


def ab_burst(server: Server, requests: int, database_url: str, folder: Path) -> BurstRun:
    since = reset_balance(database_url, requests) if server.database else 0
    body = folder / "debit.json"
    body.write_text('{"amount": -2}')
    command = [
        "ab", "-q", "-n", str(requests), "-c", str(requests), "-s", "120", "-p", str(body),
        "-T", "application/json", f"{server.urls[0]}/users/1/balance",
    ]  # fmt: skip
    stdout, server_cpu, sampler = run_sampled(command, server, timeout=300)
    wall = float(re.search(r"Time taken for tests:\s+([\d.]+)", stdout).group(1))  # type: ignore[union-attr]
    failed = int(re.search(r"Failed requests:\s+(\d+)", stdout).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx responses:\s+(\d+)", stdout)
    refused = int(non_2xx.group(1)) if non_2xx else 0
    # ab counts a body length unlike the first answer's as "failed": that is how 409s
    # differ from 200s here; the database check below is what decides exactness.
    outcomes = {"ok": requests - refused, "insufficient": refused} if server.database else {}
    exact = exact_outcome(database_url, since, requests, outcomes) if server.database else None
    if not server.database:
        outcomes = {"answered": requests - failed}
    return BurstRun(
        server.name, "ab", wall, None, server_cpu, [round(p / 2**20, 1) for p in sampler.peaks],
        outcomes, exact,
    )  # fmt: skip


# --- sustained: wrk against pgbench ---------------------------------------------------------

WRK_LUA = """
wrk.method = "POST"
wrk.body = '{"amount": 1}'
wrk.headers["Content-Type"] = "application/json"
math.randomseed(os.time())
request = function()
  local user = %s
  return wrk.format(nil, "/users/" .. user .. "/balance")
end
"""
DONE_LUA = (HERE / "balance_post.lua").read_text().split("-- One machine-readable line")[1]


def wrk_rate(server: Server, seconds: int, many_users: bool, folder: Path) -> float:
    """Requests per second of keep-alive credits, WRK_CLIENTS connections over the nodes."""
    script = folder / ("many.lua" if many_users else "one.lua")
    user = f"math.random(1, {USERS})" if many_users else "1"
    script.write_text(WRK_LUA % user + "\n-- One machine-readable line" + DONE_LUA)
    per_node = max(WRK_CLIENTS // len(server.urls), 1)
    processes = [
        subprocess.Popen(
            wrk_command(url, per_node, seconds, script), stdout=subprocess.PIPE, text=True
        )
        for url in server.urls
    ]
    runs = [parse_wrk(p.communicate(timeout=seconds + 60)[0]) for p in processes]
    if any(run.errors for run in runs):
        log(f"  wrk saw {sum(r.errors for r in runs)} errors")
    return sum(r.requests for r in runs) / max(r.duration_s for r in runs)


def wrk_command(url: str, connections: int, seconds: int, script: Path) -> list[str]:
    return [
        "wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s",
        "-s", str(script), url,
    ]  # fmt: skip


def pgbench_rate(database_url: str, clients: int, seconds: int, many_users: bool) -> float:
    values = {"user_id": ":uid" if many_users else "1", "amount": "1", "key": "NULL"}
    statement = re.sub(r"%\((\w+)\)s", lambda m: values[m.group(1)], query("change_balance"))
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        if many_users:
            script.write(f"\\set uid random(1, {USERS})\n")
        script.write(statement + ";\n")
    try:
        run = run_pgbench(database_url, Path(script.name), clients, seconds)
    finally:
        os.unlink(script.name)
    return run.tps or 0.0


def add_users(database_url: str) -> None:
    admin(
        database_url,
        f"WITH added AS (INSERT INTO users (id, balance) SELECT g, 1000 "
        f"FROM generate_series(2, {USERS}) g ON CONFLICT DO NOTHING RETURNING id) "
        "INSERT INTO ledger (user_id, amount, balance_after) SELECT id, 1000, 1000 FROM added",
    )


# --- the run --------------------------------------------------------------------------------


@dataclass
class Arguments:
    database_url: str
    rounds: int
    requests: int
    duration: int
    skip_sustained: bool


def parse(argv: Sequence[str] | None) -> Arguments:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("BALANCECTL_DATABASE_URL"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk/pgbench run")
    parser.add_argument("--skip-sustained", action="store_true")
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("--database-url (or BALANCECTL_DATABASE_URL) is required")
    return Arguments(**vars(args))


Setup = tuple[str, Callable[[], contextlib.AbstractContextManager[Server]], bool, bool]


def setups(database_url: str) -> list[Setup]:
    """(name, server, keyed, also with ab)."""
    return [
        ("floor", lambda: script_server("floor", "floor_server.py"), False, True),
        ("litestar", lambda: script_server("litestar", "minimal_litestar.py"), False, True),
        ("1 node", lambda: nodes("1 node", database_url, 1), False, True),
        ("5 nodes", lambda: nodes("5 nodes", database_url, 5), False, False),
        ("1 node, keyed", lambda: nodes("1 node, keyed", database_url, 1), True, False),
    ]


def burst_rounds(args: Arguments, database_url: str, folder: Path) -> list[BurstRun]:
    runs: list[BurstRun] = []
    quiet = Options(database_url=database_url)
    for index, ordered in enumerate(alternating(setups(database_url), args.rounds)):
        log(f"burst, round {index + 1}/{args.rounds}")
        for name, server_of, keyed, with_ab in ordered:
            await_quiet(quiet, database_url, 20)
            with server_of() as server:
                runs.append(client_burst(server, args.requests, keyed, database_url))
                log(f"  {name}: {runs[-1].wall_seconds:.2f} s (aiohttp) exact={runs[-1].exact}")
                if with_ab:
                    time.sleep(1)
                    runs.append(ab_burst(server, args.requests, database_url, folder))
                    log(f"  {name}: {runs[-1].wall_seconds:.2f} s (ab) exact={runs[-1].exact}")
    return runs


def sustained(args: Arguments, database_url: str, folder: Path) -> list[dict[str, Any]]:
    add_users(database_url)
    rows = []
    for index in range(args.rounds):
        for count in (1, 5):
            with nodes(f"{count} nodes", database_url, count) as server:
                for many in (False, True):
                    wrk_rate(server, 2, many, folder)  # warm-up: pools full, statements prepared
                    rate = wrk_rate(server, args.duration, many, folder)
                    connections = pool_connections(server)
                    rows.append({"round": index, "nodes": count, "many_users": many,
                                 "route_rps": rate, "db_connections": connections})  # fmt: skip
            for row in rows[-2:]:
                row["pgbench_tps"] = pgbench_rate(
                    database_url, row["db_connections"], args.duration, row["many_users"]
                )
                log(f"  sustained {row}")
    return rows


def pool_connections(server: Server) -> int:
    """How many statements the nodes can run at once: their request connections, the
    pool size split over each node's workers (a local node gets CPUs // nodes of them)."""
    from balancectl.config import PoolSettings

    nodes = len(server.roots)
    workers = max(1, (os.cpu_count() or 1) // nodes)
    return nodes * workers * math.ceil(PoolSettings().max_size / workers)


def median_ratio(runs: list[BurstRun], setup: str, client: str, requests: int) -> dict[str, Any]:
    mine = [r for r in runs if r.setup == setup and r.client == client]
    floor = [r for r in runs if r.setup == "floor" and r.client == client]
    ratios = [a.wall_seconds / b.wall_seconds for a, b in zip(mine, floor, strict=False)]
    walls = [r.wall_seconds for r in mine]
    return {
        "setup": setup, "client": client, "runs": len(mine),
        "wall_median": statistics.median(walls) if walls else None,
        "ratio_median": statistics.median(ratios) if ratios else None,
        "ratio_range": (min(ratios), max(ratios)) if ratios else None,
        "exact": all(r.exact is not False for r in mine),
        "cpu_per_1000": statistics.median(r.cpu_per_1000(requests) for r in mine) if mine else None,
        "peak_rss_mib": max((max(r.peak_rss_mib) for r in mine), default=None),
        "client_cpu": statistics.median(
            r.client_cpu_seconds for r in mine if r.client_cpu_seconds is not None
        ) if client == "aiohttp" and mine else None,
    }  # fmt: skip


def markdown(runs: list[BurstRun], rows: list[dict[str, Any]], args: Arguments) -> str:
    lines = [
        f"Burst: {args.requests} debits of 2 at once, {args.rounds} rounds; ratio = wall time "
        "over the floor's in the same round (median, min-max).",
        "",
        "| setup | client | wall (median) | ratio to floor | exact | node CPU s / 1,000 req "
        "| peak RSS per node | client CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setup in dict.fromkeys(r.setup for r in runs):
        for client in ("aiohttp", "ab"):
            m = median_ratio(runs, setup, client, args.requests)
            if not m["runs"]:
                continue
            low, high = m["ratio_range"]
            cpu = "" if m["client_cpu"] is None else f"{m['client_cpu']:.2f} s"
            lines.append(
                f"| {setup} | {client} | {m['wall_median']:.2f} s | {m['ratio_median']:.2f} "
                f"({low:.2f}-{high:.2f}) | {m['exact']} | {m['cpu_per_1000']:.2f} "
                f"| {m['peak_rss_mib']:.0f} MiB | {cpu} |"
            )
    keyed = [
        a.wall_seconds / b.wall_seconds
        for a, b in zip(
            [r for r in runs if r.setup == "1 node, keyed"],
            [r for r in runs if r.setup == "1 node" and r.client == "aiohttp"],
            strict=False,
        )
    ]
    if keyed:
        lines += ["", f"Keyed over unkeyed (1 node): median {statistics.median(keyed):.2f}"]
    if rows:
        lines += ["", "| nodes | users | route req/s | pgbench tps (same connections) | ratio |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for nodes_count in (1, 5):
            for many in (False, True):
                mine = [r for r in rows if r["nodes"] == nodes_count and r["many_users"] == many]
                ratios = [r["route_rps"] / r["pgbench_tps"] for r in mine if r.get("pgbench_tps")]
                if not ratios:
                    continue
                rps = statistics.median(r["route_rps"] for r in mine)
                tps = statistics.median(r["pgbench_tps"] for r in mine)
                users = f"{USERS} random" if many else "1 (hot row)"
                lines.append(
                    f"| {nodes_count} | {users} | {rps:,.0f} | {tps:,.0f} "
                    f"(-c {mine[0]['db_connections']}) | {statistics.median(ratios):.2f} |"
                )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    started = time.time()
    with scratch_database(args.database_url) as url, tempfile.TemporaryDirectory() as folder:
        runs = burst_rounds(args, url, Path(folder))
        rows = [] if args.skip_sustained else sustained(args, url, Path(folder))
    text = markdown(runs, rows, args)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"burst-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(started))}.json"
    out.write_text(
        json.dumps({"runs": [r.__dict__ for r in runs], "sustained": rows}, indent=2, default=str)
    )
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
