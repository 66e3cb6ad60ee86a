"""SIGTERM stops a node at once while it is still joining the cluster.

A node opens its scheduler's pools and registers before it starts its workers. Here the
database stops answering right after the node's migration check: a proxy lets the
node's first connection through and leaves every later one hanging (a DROP rule that
came up at that moment). The pools wait for their connections (up to 10 s each) and the
registration tries again for up to 60 s; a SIGTERM meanwhile must end the node within
``PROMPT`` s, as that signal would (status -15), leaving no process behind.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

from tests.conftest import free_port
from tests.faults import TcpProxy, server_address, through
from tests.processes import Launched
from tests.scheduling import wait_for, write_jobs

PROMPT = 3.0  # seconds from SIGTERM to the node's exit


class FirstThenHang(TcpProxy):
    """Forwards the first connection; every later one hangs, unanswered."""

    def __init__(self, database_url: str) -> None:
        super().__init__(server_address(database_url))
        self.connections = 0
        self.held = threading.Event()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.connections == 1:
            await super()._forward(reader, writer)
            return
        self.held.set()
        await asyncio.Event().wait()  # until the proxy stops


def test_sigterm_while_the_database_hangs_at_the_join_stops_the_node_at_once(
    database_url: str, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", ["tick"], min_duration="1s", interval="1m")
    proxy = FirstThenHang(database_url)
    proxy.start()
    try:
        args = ["serve", "--port", str(free_port()), "--jobs-file", str(jobs), "--workers", "1"]
        with Launched(*args, env={"BALANCECTL_DATABASE_URL": through(database_url, proxy)}) as node:
            wait_for("the node's second connection", proxy.held.is_set, 30)
            time.sleep(0.5)  # it waits on its scheduler's pool now
            assert node.process.poll() is None, node.output
            sent = time.monotonic()
            node.process.send_signal(signal.SIGTERM)
            status = node.finish(timeout=120)
            took = time.monotonic() - sent
            print(f"\nSIGTERM while joining: exit {status} after {took:.2f} s")
            assert took <= PROMPT, f"{took:.1f} s to stop:\n{node.output}"
            assert status == -signal.SIGTERM, node.output
            assert "Traceback" not in node.output, node.output
            assert node.leftovers() == []
    finally:
        proxy.stop()
