"""No row lock outlives a stalled node (issue 7, "No lock outlives a stall").

Node A serves a stream of keyed debits of user 1 (each one a transaction that holds the
user's row lock across round trips); then A is paused with SIGSTOP, or its link to
PostgreSQL is cut like a DROP rule, at a moment when one of its sessions sits ``idle in
transaction``. A change to user 1 on node B must still answer 200 or 409 within 2 s:
the server ends A's stalled transaction (``idle_in_transaction_session_timeout``) and
releases the lock, whatever A does. Several trials each; the balance still equals the
start plus the ledger afterwards.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest

from balancectl.cluster import Node
from tests.conftest import sql
from tests.faults import TcpProxy, proxied
from tests.integration.test_faults_partition import Spawn, spawn, through
from tests.processes import ClusterFactory, http_json

pytestmark = pytest.mark.slow

__all__ = ["spawn"]  # the fixture, imported for the DROP test

LOCK_BOUND = 2.0  # seconds node B may wait behind a stalled node's lock
TRIALS = 3
STREAMS = 4  # concurrent keyed debits on A, so that a transaction is open at the pause
START = 10000


def keyed_debit(url: str, amount: int = -1) -> int:
    status, _ = http_json(
        f"{url}/users/1/balance",
        "POST",
        {"amount": amount},
        timeout=30,
        headers={"Idempotency-Key": f"stream-{uuid.uuid4()}"},
    )
    return status


@contextmanager
def keyed_stream(url: str) -> Iterator[None]:
    """``STREAMS`` threads sending keyed debits of user 1 to ``url`` until the block ends."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                keyed_debit(url)
            except OSError:
                time.sleep(0.05)  # the paused or cut node's answers time out; keep going

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(STREAMS)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=40)


def idle_in_transaction(database_url: str) -> int:
    """Sessions of this test's database sitting ``idle in transaction`` (only A opens any)."""
    [(count,)] = sql(
        database_url,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND state = 'idle in transaction'",
    )
    return int(count)


def stall_with_lock_held(database_url: str, stall: Callable[[], None], resume: Callable[[], None]) -> None:
    """Stall A at a moment when one of its transactions is open (retried until caught)."""
    for _ in range(100):
        time.sleep(0.05)
        stall()
        time.sleep(0.05)  # the statement just sent (if any) has been answered
        if idle_in_transaction(database_url):
            return
        resume()
    pytest.fail("never caught node A with a transaction open")


def change_on_b(b: Node, trial: int) -> tuple[int, float]:
    """A debit of user 1 on B, keyed on odd trials: its status and seconds to the answer."""
    headers = {"Idempotency-Key": f"b-{trial}-{uuid.uuid4()}"} if trial % 2 else {}
    began = time.monotonic()
    status, body = http_json(
        f"{b.url}/users/1/balance", "POST", {"amount": -1}, timeout=30, headers=headers
    )
    seconds = time.monotonic() - began
    assert status in (200, 409), (status, body)
    return status, seconds


def assert_ledger_explains_balance(database_url: str) -> None:
    [(balance,)] = sql(database_url, "SELECT balance FROM users WHERE id = 1")
    [(total,)] = sql(database_url, "SELECT coalesce(sum(amount), 0) FROM ledger WHERE user_id = 1")
    assert balance == START + total, (balance, total)


def run_trials(
    database_url: str, a_url: str, b: Node, stall: Callable[[], None], resume: Callable[[], None]
) -> list[float]:
    waits: list[float] = []
    with keyed_stream(a_url):
        for trial in range(TRIALS):
            time.sleep(0.5)  # the stream is flowing again
            stall_with_lock_held(database_url, stall, resume)
            try:
                _, seconds = change_on_b(b, trial)
            finally:
                resume()
            waits.append(seconds)
    return waits


def test_a_paused_node_holds_no_lock_that_blocks_another_node(
    cluster_factory: ClusterFactory, database_url: str
) -> None:
    a, b = cluster_factory(2, "--no-scheduler").members

    def stall() -> None:
        a.process.send_signal(signal.SIGSTOP)

    def resume() -> None:
        a.process.send_signal(signal.SIGCONT)

    waits = run_trials(database_url, a.url, b, stall, resume)
    print(f"\nSIGSTOP of A mid keyed stream: B answered in {', '.join(f'{w:.2f}' for w in waits)} s")
    assert max(waits) < LOCK_BOUND, waits
    assert_ledger_explains_balance(database_url)


def test_a_cut_off_node_holds_no_lock_that_blocks_another_node(
    database_url: str, spawn: Spawn
) -> None:
    target = urlsplit(database_url)
    with proxied(target.hostname or "127.0.0.1", target.port or 5432) as proxy:
        a = spawn("node-a", through(database_url, proxy), ["--no-scheduler"])
        b = spawn("node-b", database_url, ["--no-scheduler"])
        waits = run_trials(database_url, a.url, b, lambda: cut(proxy), proxy.restore)
    print(f"\nDROP of A's link mid keyed stream: B answered in {', '.join(f'{w:.2f}' for w in waits)} s")
    assert max(waits) < LOCK_BOUND, waits
    assert_ledger_explains_balance(database_url)


def cut(proxy: TcpProxy) -> None:
    proxy.cut("drop")
