"""kill -9 of one of five nodes in the middle of a 10,000-debit burst.

The burst is the load test's: 10,000 debits of 2 on a balance of 10,000, fired at once
over five nodes. A process of its own watches the ledger and SIGKILLs node-3 once 1,000 debits have
been applied, so about 2,000 requests are queued on or in flight at node-3 when it dies.

- With idempotency keys, the load tester repeats every unseen outcome under the same key
  on the next node: every request ends with exactly one outcome, exactly 5,000 succeed,
  and the ledger holds exactly one debit per successful key.
- Without keys nothing can be retried safely: requests in flight at node-3 end as
  transport errors, and some of them may have been applied all the same (the database
  commits an autocommit statement whose client has died). The ledger is still the
  truth: the balance moved by exactly what the ledger shows, and the client saw no more
  successes than the ledger holds.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from multiprocessing.queues import Queue

import psycopg
import pytest
from psycopg.rows import TupleRow

from balancectl.toolkit.cluster import LocalCluster, NodeProcess
from balancectl.toolkit.loadtest import LoadtestConfig, LoadtestReport, run_loadtest
from tests.conftest import sql
from tests.ledger import assert_ledger_adds_up, balance_in_database
from tests.processes import ClusterFactory, http_json

pytestmark = pytest.mark.slow

NODES = 5
REQUESTS = 10000
AMOUNT = 2
START = 10000
KILL_AFTER_DEBITS = 1000
VICTIM = "node-3"
RETRIES = 20
# The scheduler is not under test here; without it five nodes hold 50 connections at most.
CLUSTER_ARGS = ("--no-scheduler",)


@dataclass
class Kill:
    """When the victim was killed: debits applied by then, seconds after the first one."""

    debits: int = -1
    after_first_debit: float = -1.0
    error: str | None = None


def debit_count(connection: psycopg.Connection[TupleRow]) -> int:
    row = connection.execute("SELECT count(*) FROM ledger WHERE amount = %s", (-AMOUNT,)).fetchone()
    assert row is not None
    return int(row[0])


def kill_mid_burst(url: str, victim_pid: int, found: Queue[Kill], timeout: float = 120.0) -> None:
    """SIGKILL ``victim_pid`` once ``KILL_AFTER_DEBITS`` debits are in the ledger.

    It runs in a process of its own: in a thread beside the load test's client, which
    holds the GIL for most of the burst, it looked at the ledger too seldom and once
    killed at 2,671 debits instead of about 1,000."""
    kill = Kill()
    deadline = time.monotonic() + timeout
    first: float | None = None
    with psycopg.connect(url, autocommit=True) as connection:
        while (debits := debit_count(connection)) < KILL_AFTER_DEBITS:
            if debits and first is None:
                first = time.monotonic()
            if time.monotonic() > deadline:
                kill.error = f"only {debits} debits after {timeout:.0f} s"
                found.put(kill)
                return
            time.sleep(0.01)
        os.kill(victim_pid, signal.SIGKILL)
        kill.after_first_debit = time.monotonic() - (first or time.monotonic())
        kill.debits = debits
    found.put(kill)


async def burst_with_kill(
    cluster_urls: list[str], victim: NodeProcess, database_url: str, idempotent: bool
) -> tuple[LoadtestReport, Kill]:
    config = LoadtestConfig(
        urls=tuple(cluster_urls),
        requests=REQUESTS,
        amount=AMOUNT,
        idempotent=idempotent,
        # Keyed repeats are safe. On a busy 2-core box a keyed burst queues past the pool
        # wait (30 s) and the survivors answer thousands of 503s, each repeated on the
        # next node: allow more than the default 5 repeats before a request gives up.
        retries=RETRIES,
        progress=False,
    )
    context = multiprocessing.get_context("spawn")
    found: Queue[Kill] = context.Queue()
    killer = context.Process(
        target=kill_mid_burst, args=(database_url, victim.process.pid, found), daemon=True
    )
    killer.start()
    try:
        report = await run_loadtest(config)
        kill = found.get(timeout=130)
    finally:
        killer.join(timeout=10)
        if killer.is_alive():
            killer.kill()
    assert kill.error is None, kill.error
    assert victim.process.wait(timeout=10) == -9
    verdict = report.verdict
    survivors_503 = answered_503(cluster_urls, victim)
    print(
        f"\nidempotent={idempotent}: killed {victim.node_id} at {kill.debits} debits, "
        f"{kill.after_first_debit:.2f} s after the first; 200: {verdict.successes}, "
        f"409: {verdict.insufficient}, other: {verdict.other_outcomes}, "
        f"retries: {report.retries}, replayed: {report.replayed}, "
        f"503s answered by the survivors: {survivors_503}, "
        f"final balance: {verdict.final_balance}, wall {report.wall_seconds:.1f} s"
    )
    return report, kill


def answered_503(urls: list[str], victim: NodeProcess) -> int:
    """503s the surviving nodes answered on the balance route (from ``/metrics``)."""
    total = 0
    for url in urls:
        if url == victim.url:
            continue
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            text = response.read().decode()
        total += sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines()
            if line.startswith("balancectl_http_requests_total{")
            and 'status="503"' in line
            and "balance" in line
        )
    return total


def ledger_debits(url: str) -> list[tuple[int, str | None]]:
    rows = sql(url, "SELECT amount, idempotency_key FROM ledger WHERE user_id = 1 AND amount < 0")
    return [(int(amount), key) for amount, key in rows]


def assert_every_node_but_the_victim_reads(
    urls: list[str], victim: NodeProcess, balance: int
) -> None:
    for url in urls:
        if url != victim.url:
            assert http_json(f"{url}/users/1") == (200, {"userId": 1, "balance": balance})


async def killed_mid_burst(
    cluster_factory: ClusterFactory, database_url: str, idempotent: bool
) -> tuple[LocalCluster, NodeProcess, LoadtestReport, Kill]:
    """The burst on ``NODES`` nodes, the victim killed during it."""
    cluster = cluster_factory(NODES, *CLUSTER_ARGS)
    victim = cluster.node(VICTIM)
    report, kill = await burst_with_kill(cluster.urls, victim, database_url, idempotent)
    return cluster, victim, report, kill


async def test_kill_9_mid_burst_with_keys_every_request_ends_once(
    cluster_factory: ClusterFactory, database_url: str
) -> None:
    cluster, victim, report, kill = await killed_mid_burst(cluster_factory, database_url, True)
    verdict = report.verdict
    assert kill.debits < REQUESTS // AMOUNT // 2, "the kill came too late to be mid-burst"
    assert report.retries > 0, "no request met the dead node: the fault proved nothing"
    assert verdict.other_outcomes == {}, verdict.failures
    assert (verdict.successes, verdict.insufficient) == (5000, 5000)
    assert verdict.final_balance == 0 and report.passed, verdict.failures
    assert balance_in_database(database_url) == 0
    debits = ledger_debits(database_url)
    assert Counter(amount for amount, _ in debits) == Counter({-AMOUNT: 5000})
    keys = [key for _, key in debits]
    assert None not in keys and len(set(keys)) == 5000, "a key applied twice, or a debit unkeyed"
    stored = dict(
        sql(database_url, "SELECT status_code, count(*) FROM idempotency_keys GROUP BY 1")
    )
    assert stored == {200: 5000, 409: 5000}, stored
    assert_ledger_adds_up(database_url)
    assert_every_node_but_the_victim_reads(cluster.urls, victim, 0)


async def test_kill_9_mid_burst_without_keys_the_ledger_explains_the_balance(
    cluster_factory: ClusterFactory, database_url: str
) -> None:
    cluster, victim, report, kill = await killed_mid_burst(cluster_factory, database_url, False)
    verdict = report.verdict
    debits = ledger_debits(database_url)
    applied = len(debits)
    unseen = sum(verdict.other_outcomes.values())
    print(f"ledger debits: {applied}; applied, answer lost: {applied - verdict.successes}")
    assert kill.debits < REQUESTS // AMOUNT // 2, "the kill came too late to be mid-burst"
    assert unseen > 0, "no request met the dead node: the fault proved nothing"
    # No node answered with an error: what lacks an answer met a broken connection.
    assert all(outcome.startswith("error:") for outcome in verdict.other_outcomes), verdict
    assert verdict.successes + verdict.insufficient + unseen == REQUESTS
    assert {amount for amount, _ in debits} <= {-AMOUNT}
    assert all(key is None for _, key in debits)
    # Nothing changed that the ledger does not show, and the ledger shows no more than
    # the client saw succeed plus the requests whose answer was lost.
    assert verdict.final_balance == START - AMOUNT * applied
    assert balance_in_database(database_url) == START - AMOUNT * applied
    assert verdict.successes <= applied <= verdict.successes + unseen
    assert applied <= START // AMOUNT
    assert_ledger_adds_up(database_url)
    assert_every_node_but_the_victim_reads(cluster.urls, victim, START - AMOUNT * applied)
