"""Fault injection for tests: a TCP proxy on loopback whose link can be cut.

A node reaches PostgreSQL through ``TcpProxy``; ``cut("reject")`` resets every open
connection and refuses new ones (a firewall REJECT rule), ``cut("drop")`` keeps
connections open but forwards nothing and leaves new ones hanging (a DROP rule, or a
pulled cable); ``restore()`` lets traffic flow again. It runs its own event loop in a
thread, so it works beside both synchronous and asynchronous tests. ``proxied(url)`` runs
one to the server of ``url``, on TCP or on the Unix socket the embedded test server
listens on (without ``BALANCECTL_TEST_DATABASE_URL``); ``through(url, proxy)`` is the same
database reached over TCP through the proxy.

The ``spawn`` fixture starts ``balancectl serve`` with a node id and a database URL of the
test's choosing (one through a proxy, say), all logging to ``nodes.log`` in the test's
tmp_path; ``log_line`` and ``logged_at`` find a node's line there and its time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from balancectl.toolkit.cluster import NodeProcess, node_command, pump, ready
from tests.conftest import free_port
from tests.processes import wait_or_kill
from tests.scheduling import wait_for

T = TypeVar("T")
Spawn = Callable[[str, str, Sequence[str]], NodeProcess]


# Where a server listens: (host, port) on TCP, or the path of its Unix socket.
Upstream = tuple[str, int] | str


def server_address(database_url: str) -> Upstream:
    """Where the server of ``database_url`` listens. The embedded test server (no
    ``BALANCECTL_TEST_DATABASE_URL``) listens on a Unix socket only: ``?host=/dir``."""
    parts = urlsplit(database_url)
    query = parse_qs(parts.query)
    port = int(query.get("port", [str(parts.port or 5432)])[0])
    folder = query.get("host", [""])[0]
    if folder.startswith("/"):
        return f"{folder}/.s.PGSQL.{port}"
    return (parts.hostname or "127.0.0.1", port)


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target``; ``cut`` and ``restore`` the link."""

    def __init__(self, target: Upstream, listen_host: str = "127.0.0.1") -> None:
        self.target, self.listen_host = target, listen_host
        self.mode: str | None = None  # None (flowing), "reject" or "drop"
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> TcpProxy:
        self._thread.start()
        self._server = self._call(self._listen())
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        self._call(self._close_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def cut(self, mode: str = "reject") -> None:
        assert mode in ("reject", "drop")
        self.mode = mode
        if mode == "reject":
            self._call(self._reset_all())

    def restore(self) -> None:
        self.mode = None

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, self.listen_host, 0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reject":
            abort(writer)
            return
        self._writers.add(writer)  # reset with the others, even while it hangs
        try:
            await self._forward(reader, writer)
        finally:
            abort(writer)
            self._writers.discard(writer)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while self.mode == "drop":  # a new connection hangs, unanswered
            await asyncio.sleep(0.05)
        try:
            if isinstance(self.target, str):
                up_reader, up_writer = await asyncio.open_unix_connection(self.target)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            return
        self._writers.add(up_writer)
        try:
            await asyncio.gather(
                self._to_server(reader, up_writer),
                self._pipe(up_reader, writer),
                return_exceptions=True,
            )
        finally:
            abort(up_writer)
            self._writers.discard(up_writer)

    async def _to_server(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._pipe(reader, writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                while self.mode == "drop":  # held, never delivered while cut
                    await asyncio.sleep(0.05)
                if self.mode == "reject":
                    break
                writer.write(data)
                await writer.drain()
        finally:
            abort(writer)

    async def _reset_all(self) -> None:
        for writer in list(self._writers):
            abort(writer)

    async def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
        # A connection accepted just now has a task that has not run yet: cancelled before
        # its first step it would never close its socket (a ResourceWarning in a later test).
        for _ in range(3):
            await asyncio.sleep(0)
        await self._reset_all()
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a REJECT rule would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextlib.contextmanager
def proxied(database_url: str) -> Iterator[TcpProxy]:
    """A running proxy to the server of ``database_url`` (``through`` gives its URL)."""
    proxy = TcpProxy(server_address(database_url)).start()
    try:
        yield proxy
    finally:
        proxy.stop()


class Listener(Protocol):
    """Anything a client reaches the database through: a proxy, a bouncer."""

    listen_host: str
    port: int


def through(database_url: str, proxy: Listener) -> str:
    """The same database, reached through the proxy (over TCP, whatever the server is)."""
    parts = urlsplit(database_url)
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port")])
    credentials = parts.username or "postgres"
    if parts.password:
        credentials += f":{parts.password}"
    netloc = f"{credentials}@{proxy.listen_host}:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc, query=query))


@pytest.fixture
def spawn(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Spawn]:
    """Start ``balancectl serve`` with a given node id and database URL; stop all after."""
    log = (tmp_path / "nodes.log").open("w")
    nodes: list[NodeProcess] = []

    def start(node_id: str, database_url: str, args: Sequence[str]) -> NodeProcess:
        port = free_port()
        process = subprocess.Popen(
            node_command(node_id, port, args),
            env={**os.environ, "BALANCECTL_DATABASE_URL": database_url},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        node = NodeProcess(node_id, port, process)
        assert process.stdout is not None
        node.pump = threading.Thread(
            target=pump, args=(process.stdout, f"[{node_id}]", log), daemon=True
        )
        node.pump.start()
        nodes.append(node)
        wait_for(f"{node_id} ready", lambda: ready(node.url) or process.poll() is not None, 60)
        assert process.poll() is None, f"{node_id} exited with {process.returncode}"
        return node

    yield start
    for node in nodes:
        if node.process.poll() is None:
            node.process.terminate()
    for node in nodes:
        wait_or_kill(node.process, 20)
        node.reap()
    log.close()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print("===== nodes.log (last 120 lines)")
        print("\n".join((tmp_path / "nodes.log").read_text().splitlines()[-120:]))


def log_line(log: Path, node_id: str, text: str) -> str | None:
    return next(
        (
            line
            for line in log.read_text().splitlines()
            if line.startswith(f"[{node_id}] ") and text in line
        ),
        None,
    )


def logged_at(line: str) -> datetime:
    """The time of a node's log line (``[id] 2026-01-01 12:00:00,123 ...``), local zone."""
    _, day, clock = line.split(" ", 3)[:3]
    return datetime.strptime(f"{day} {clock}", "%Y-%m-%d %H:%M:%S,%f").astimezone()
