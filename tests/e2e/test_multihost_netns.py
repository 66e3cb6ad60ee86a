"""Three hosts in their own network namespaces, one node each, and a real partition.

Each "host" is a network namespace joined to the root namespace by a veth pair on its
own /30 (``tests/netns.py``). Its node listens on the host's address (with an API token:
it is not loopback) and reaches PostgreSQL, which listens on 127.0.0.1 only, through a
forwarder on the root side of its own link. The test reaches the nodes over those links.

Three short jobs (lease TTL 3 s) spread one per host. When the host running the fenced
``snapshot`` job (``balance_snapshot``: its write carries the run's token) is mid-run,
its link fails, one of three ways:

- ``link-down``: ``ip link set ... down`` on its veth, a pulled cable;
- ``netem-delay``: ``tc qdisc add dev ... root netem delay 2000ms`` on both ends of the
  link (skipped where the kernel has no netem qdisc);
- ``forwarder-delay``: the same 2 s each way on its database link only, held in the
  forwarder, for kernels without netem.

Under each, every rule holds: runs of a job never overlap; another host takes the job
within TTL + poll + slack of the host's last renewal; every run of that host that the
fault caught ends ``lost``, none of its fenced snapshots was written after its lease
expired, and after healing it writes nothing under those tokens; it serves again by
itself, and the spread comes back to one job per host.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import pytest

from balancectl.toolkit.cluster import pump
from tests.conftest import sql
from tests.faults import log_line, logged_at, server_address, through
from tests.netns import Forwarder, Host, KernelRefused, hosts, netem_refusal
from tests.processes import node_args, wait_or_kill
from tests.scheduling import Run, assert_no_overlap, parse_run, wait_for

pytestmark = pytest.mark.slow

HOSTS = 3
TTL, POLL, SETTLE = 3.0, 0.2, 1.0
SLACK = 2.0  # claim latency, an HTTP poll and a busy 2-core machine
DELAY = 2.0  # seconds each way in the delay modes
HOLD = 8.0  # seconds the fault lasts at least
PORT = 8000  # every host has its own network stack: the same port on each
TOKEN = "multihost-test-token"
SNAPSHOT = "snapshot"
JOBS = {SNAPSHOT: "balance_snapshot", "idle-2": "idle", "idle-3": "idle"}
# Direct connections only: an HTTP proxy from the environment must not see this traffic.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class HostNode:
    """A ``balancectl serve`` process running inside ``host``."""

    node_id: str
    host: Host
    forwarder: Forwarder
    process: subprocess.Popen[bytes]
    pump: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host.addr}:{PORT}"


def get(url: str, timeout: float = 15.0) -> tuple[int, Any]:
    """A GET with the token; (status, JSON body), or (0, None) when nothing answered."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with OPENER.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None
    except (urllib.error.URLError, OSError):
        return 0, None


def ready(node: HostNode) -> bool:
    return get(f"{node.url}/readyz", timeout=3)[0] == 200


def listing(node: HostNode) -> dict[str, dict[str, Any]]:
    status, body = get(f"{node.url}/jobs")
    assert status == 200, (node.node_id, status)
    return {job["name"]: job for job in body["jobs"]}


def history(node: HostNode) -> list[Run]:
    status, body = get(f"{node.url}/jobs/history?limit=1000")
    assert status == 200, (node.node_id, status)
    return [parse_run(run) for run in body["runs"]]


def write_jobs(path: Path) -> Path:
    path.write_text(
        "\n".join(
            f'[[jobs]]\nname = "{name}"\nfunction = "balancectl.jobs.builtin:{function}"\n'
            'interval = "1s"\nmin_duration = "4s"\n'
            for name, function in JOBS.items()
        )
    )
    return path


def start_node(index: int, host: Host, database_url: str, jobs: Path, log: IO[str]) -> HostNode:
    forwarder = Forwarder(server_address(database_url), host.root_addr)
    forwarder.start()
    node_id = f"host-{index + 1}"
    command = [
        sys.executable, "-m", "balancectl", "serve", "--node-id", node_id,
        "--host", host.addr, "--port", str(PORT), "--api-token", TOKEN,
        "--database-url", through(database_url, forwarder), "--workers", "1", "--pool-size", "2",
        *node_args(jobs_file=jobs, lease_ttl=TTL, poll=POLL, settle=SETTLE),
    ]  # fmt: skip
    process = subprocess.Popen(
        host.command(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    node = HostNode(node_id, host, forwarder, process)
    assert process.stdout is not None
    node.pump = threading.Thread(target=pump, args=(process.stdout, f"[{node_id}]", log))
    node.pump.daemon = True
    node.pump.start()
    return node


def stop(node: HostNode) -> None:
    """SIGTERM (SIGKILL after 20 s), then the forwarder; safe to call twice."""
    if node.process.poll() is None:
        node.process.terminate()
        wait_or_kill(node.process, 20)
    if node.pump is not None:
        node.pump.join(timeout=5)
        node.pump = None
        if node.process.stdout is not None:
            node.process.stdout.close()
        node.forwarder.stop()


def wait_ready(node: HostNode) -> None:
    def settled() -> bool:
        return ready(node) or node.process.poll() is not None

    wait_for(f"{node.node_id} ready", settled, timeout=90, every=0.2)
    assert node.process.poll() is None, f"{node.node_id} exited with {node.process.returncode}"


@pytest.fixture
def cluster(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[list[HostNode]]:
    """Three hosts, one node each, all ready; everything removed afterwards."""
    jobs = write_jobs(tmp_path / "jobs.toml")
    log_path = tmp_path / "nodes.log"
    with log_path.open("w") as log:
        try:
            with hosts(HOSTS) as made:
                nodes: list[HostNode] = []
                try:
                    for index, host in enumerate(made):
                        nodes.append(start_node(index, host, database_url, jobs, log))
                    for node in nodes:
                        wait_ready(node)
                    yield nodes
                finally:
                    for node in nodes:
                        stop(node)
        except KernelRefused as refused:
            pytest.skip(f"the kernel refused a network namespace or veth pair: {refused}")
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print("===== nodes.log (last 150 lines)")
        print("\n".join(log_path.read_text().splitlines()[-150:]))


# ---------------------------------------------------------------- what the test reads


def db_now(database_url: str) -> datetime:
    [(now,)] = sql(database_url, "SELECT now()")
    return now  # type: ignore[no-any-return]


def lease(database_url: str) -> tuple[int, str | None]:
    [(token, owner)] = sql(
        database_url, "SELECT token, owner FROM jobs WHERE name = %s", (SNAPSHOT,)
    )
    return int(token), owner


def one_per_host(observer: HostNode, nodes: list[HostNode]) -> dict[str, str] | None:
    """job -> host, when every job runs and each host runs one of them."""
    jobs = listing(observer)
    owners = {name: job["node"] for name, job in jobs.items() if job["state"] == "running"}
    if sorted(owners.values()) == sorted(node.node_id for node in nodes):
        return owners
    return None


def snapshot_mid_run(observer: HostNode, nodes: list[HostNode]) -> str | None:
    """The host that has just started the snapshot job, while each host runs one job."""
    job = listing(observer)[SNAPSHOT]
    started = job["state"] == "running" and job["elapsed_seconds"] < 1.5
    return str(job["node"]) if started and one_per_host(observer, nodes) else None


def taken_over(database_url: str, token: int, victim: str) -> bool:
    later, owner = lease(database_url)
    return later > token and owner not in (None, victim)


@contextlib.contextmanager
def fault(mode: str, node: HostNode) -> Iterator[None]:
    """The host's link fails as ``mode`` says until the block ends."""
    if mode == "link-down":
        node.host.link(up=False)
        try:
            yield
        finally:
            node.host.link(up=True)
    elif mode == "netem-delay":
        node.host.add_delay(int(DELAY * 1000))
        try:
            yield
        finally:
            node.host.remove_delay()
    else:
        node.forwarder.delay = DELAY
        try:
            yield
        finally:
            node.forwarder.delay = 0.0


@pytest.fixture
def mode(request: pytest.FixtureRequest) -> str:
    """The fault; ``netem-delay`` is skipped where the kernel has no netem qdisc."""
    chosen = str(request.param)
    if chosen == "netem-delay" and (refusal := netem_refusal()) is not None:
        pytest.skip(f"no tc netem here ({refusal}); forwarder-delay covers 2 s of latency")
    return chosen


# ---------------------------------------------------------------- the test


@dataclass
class Outage:
    """When the fault began and ended (database clock), and what the test saw (seconds)."""

    began_at: datetime
    healed_at: datetime
    held: float
    seen_taken: float
    ready_again: float = 0.0
    spread_back: float = 0.0


def partition(mode: str, database_url: str, victim: HostNode, token: int) -> Outage:
    """Fail the victim's link until another host runs its job and ``HOLD`` has passed."""
    began_at, began = db_now(database_url), time.monotonic()
    with fault(mode, victim):
        wait_for(
            "another host to take the snapshot job",
            lambda: taken_over(database_url, token, victim.node_id),
            timeout=TTL + DELAY + 20,
        )
        seen = time.monotonic() - began
        # Long enough for the host's connections to fail (tcp_user_timeout 5 s) and for
        # its statements to wait in retransmission queues (or the forwarder) until healing.
        time.sleep(max(HOLD - (time.monotonic() - began), 1.0))
        healed_at = db_now(database_url)
    return Outage(began_at, healed_at, time.monotonic() - began, seen)


def heal(outage: Outage, victim: HostNode, observer: HostNode, nodes: list[HostNode]) -> None:
    """Wait until the victim serves again by itself, and until each host runs one job."""
    healed = time.monotonic()
    wait_for(f"{victim.node_id} ready again", lambda: ready(victim), timeout=60, every=0.1)
    outage.ready_again = time.monotonic() - healed
    wait_for("one job per host again", lambda: one_per_host(observer, nodes), 60, every=0.1)
    outage.spread_back = time.monotonic() - healed


def caught_runs(runs: list[Run], victim: str, token: int, outage: Outage) -> list[Run]:
    """The victim's runs the fault caught: the one it had, and any it began before healing."""
    return [
        run
        for run in runs
        if run.node == victim
        and run.started_at < outage.healed_at
        and (run.token >= token if run.job == SNAPSHOT else run.started_at >= outage.began_at)
    ]


def fenced_snapshots(database_url: str, caught: list[Run]) -> int:
    """Snapshots written under the tokens of ``caught`` runs; each inside its lease."""
    count = 0
    for run in caught:
        rows = sql(
            database_url,
            "SELECT taken_at FROM balance_snapshots WHERE job_token = %s",
            (run.token,),
        )
        assert len(rows) <= 1, (run, rows)
        for (taken_at,) in rows:
            assert run.started_at <= taken_at < run.finished_at, (run, taken_at)
        count += len(rows)
    return count


@pytest.mark.parametrize("mode", ["link-down", "netem-delay", "forwarder-delay"], indirect=True)
def test_partitioned_host_gives_its_job_up_and_writes_nothing_after(
    mode: str, database_url: str, cluster: list[HostNode], tmp_path: Path
) -> None:
    nodes = cluster
    wait_for("one job per host", lambda: one_per_host(nodes[0], nodes), timeout=60, every=0.1)
    victim_id = wait_for(
        "the snapshot job to start", lambda: snapshot_mid_run(nodes[0], nodes), 60, every=0.05
    )
    victim = next(node for node in nodes if node.node_id == victim_id)
    observer = next(node for node in nodes if node is not victim)
    token, owner = lease(database_url)
    assert owner == victim_id, (owner, victim_id)

    outage = partition(mode, database_url, victim, token)
    heal(outage, victim, observer, nodes)
    time.sleep(DELAY + 1.0)  # whatever was still on its way has landed
    runs = history(observer)

    assert_no_overlap(runs)
    caught = caught_runs(runs, victim_id, token, outage)
    [cut] = [run for run in runs if run.job == SNAPSHOT and run.token == token]
    assert cut in caught and cut.status == "lost", cut
    assert all(run.status == "lost" for run in caught), caught
    # The host stopped its own run (its watchdog) before the lease it had ran out.
    stopped = log_line(tmp_path / "nodes.log", victim_id, f"renewal for {SNAPSHOT} in time")
    assert stopped is not None and logged_at(stopped) < cut.finished_at, (stopped, cut)
    margin = (cut.finished_at - logged_at(stopped)).total_seconds()
    snapshots = fenced_snapshots(database_url, [run for run in caught if run.job == SNAPSHOT])
    assert sql(database_url, "SELECT count(*) FROM balance_snapshots")[0][0] > 0
    takeover = min((run for run in runs if run.job == SNAPSHOT and run.token > token
                    and run.node != victim_id), key=lambda run: run.token)  # fmt: skip
    after_fault = (takeover.started_at - outage.began_at).total_seconds()
    # The lease ends TTL after the last renewal the database accepted.
    after_renewal = (takeover.started_at - cut.finished_at).total_seconds() + TTL
    print(f"\n{mode}: {victim_id} cut for {outage.held:.1f} s; {takeover.node} took its job "
          f"{after_fault:.2f} s after the fault, {after_renewal:.2f} s after its lease's last "
          f"renewal (the test saw it after {outage.seen_taken:.2f} s); {victim_id} stopped its run "
          f"{margin:.2f} s before its lease expired; the lost row: "
          f"{cut.error!r}; {victim_id} ready {outage.ready_again:.2f} s and one job per host "
          f"{outage.spread_back:.2f} s after healing; {len(caught)} run(s) of {victim_id} "
          f"caught, all lost; {snapshots} snapshot(s) under their tokens, all inside their "
          f"leases; {len(runs)} runs, no overlap")  # fmt: skip
    assert after_renewal <= TTL + POLL * 1.2 + SLACK, after_renewal
    in_flight = 0.0 if mode == "link-down" else DELAY  # a renewal on the wire lands late
    assert after_fault <= TTL + in_flight + POLL * 1.2 + SLACK, after_fault
