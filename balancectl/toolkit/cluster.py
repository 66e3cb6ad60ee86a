"""A local cluster: N ``balancectl serve`` processes on loopback. A launcher only; the nodes
never learn of it or of each other.

Each node runs in a process group of its own, so a Ctrl-C in the terminal reaches the
launcher alone and the launcher stops every node the same way, whoever sent the signal:
SIGTERM to the node (which stops its own workers), then SIGKILL to the node's whole group
if it has not exited in time. ``stop_signals()`` turns SIGINT and SIGTERM into
``Interrupted`` in the launcher; starting and stopping nodes hold those signals until
they are done, so no node is ever spawned and then forgotten.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

from balancectl.errors import ConfigError
from balancectl.orphans import LAUNCHER_PID

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
TAIL_LINES = 20
GROUP_GRACE = 5.0  # seconds a stopped node's workers may take to finish exiting


class NodeFailed(ConfigError):
    """A node exited on its own; the message names it and ends with its own last line."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the launcher: stop what it started, exit 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """130 for SIGINT, 143 for SIGTERM: the shell's convention for a death by signal."""
        return 128 + self.signum


@dataclass
class NodeProcess:
    """One node process and where it listens."""

    node_id: str
    port: int
    process: subprocess.Popen[bytes]
    pump: threading.Thread | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))

    def reap(self) -> None:
        """After the process ended: finish copying its output and close the pipe."""
        if self.pump is not None:
            self.pump.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def last_line(self) -> str:
        """The node's last line with something to read (a refusal, an exception)."""
        if self.pump is not None and self.process.poll() is not None:
            self.pump.join(timeout=5)  # the process ended: its output ends soon after
        for line in reversed(self.tail):
            if any(character.isalnum() for character in line):
                return line.strip()
        return "(it printed nothing)"

    def failure(self) -> NodeFailed:
        """Why it is gone: its exit status and its own last line."""
        status = self.process.returncode
        how = f"was killed by {signal.Signals(-status).name}" if status < 0 else "exited"
        if status >= 0:
            how += f" with status {status}"
        return NodeFailed(f"{self.node_id} {how}; its last line: {self.last_line()}")


def node_command(node_id: str, port: int, extra: Sequence[str]) -> list[str]:
    return [
        sys.executable, "-m", "balancectl", "serve",
        "--node-id", node_id, "--host", "127.0.0.1", "--port", str(port), *extra,
    ]  # fmt: skip


def pump(
    stream: IO[bytes], prefix: str, sink: IO[str] | None, tail: deque[str] | None = None
) -> None:
    """Copy a child's output line by line, each prefixed with its node id; keep its tail."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace")
        if tail is not None:
            tail.append(line)
        if sink is not None:
            sink.write(f"{prefix} {line}")
            sink.flush()


@dataclass
class LocalCluster:
    """Start, wait for, and stop N local nodes sharing one database."""

    database_url: str
    nodes: int = 5
    base_port: int = 8000
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    log: IO[str] | None = None
    ports: Sequence[int] | None = None
    members: list[NodeProcess] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.members]

    def node_args(self, env: dict[str, str]) -> list[str]:
        """The nodes' options; local nodes share this machine's cores, so each gets its
        share of HTTP workers (at least one) unless ``--workers`` or its variable says."""
        args = list(self.extra_args)
        if "--workers" not in args and "BALANCECTL_WORKERS" not in env:
            args += ["--workers", str(max(1, (os.cpu_count() or 1) // self.nodes))]
        return args

    def start(self) -> None:
        env = {**os.environ, **self.env, "BALANCECTL_DATABASE_URL": self.database_url}
        env[LAUNCHER_PID] = str(os.getpid())  # a node ends with this process (orphans.py)
        ports = self.ports or range(self.base_port, self.base_port + self.nodes)
        for index, port in enumerate(ports, start=1):
            with signals_held():  # a node spawned is a node recorded, so it will be stopped
                self.members.append(self._spawn(f"node-{index}", port, env))

    def _spawn(self, node_id: str, port: int, env: dict[str, str]) -> NodeProcess:
        process = subprocess.Popen(
            node_command(node_id, port, self.node_args(env)),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            process_group=0,
        )
        node = NodeProcess(node_id, port, process)
        assert process.stdout is not None
        args = (process.stdout, f"[{node_id}]", self.log, node.tail)
        node.pump = threading.Thread(target=pump, args=args, daemon=True)
        node.pump.start()
        return node

    def node(self, node_id: str) -> NodeProcess:
        return next(node for node in self.members if node.node_id == node_id)

    def exited(self) -> NodeProcess | None:
        """The first node that has exited, if any."""
        return next((node for node in self.members if node.process.poll() is not None), None)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until every node answers ``/readyz``; ``NodeFailed`` if one exits first."""
        deadline = time.monotonic() + timeout
        for node in self.members:
            while not ready(node.url):
                gone = self.exited()
                if gone is not None:
                    raise gone.failure()
                if time.monotonic() > deadline:
                    raise NodeFailed(
                        f"{node.node_id} was not ready within {timeout:.0f} s; "
                        f"its last line: {node.last_line()}"
                    )
                time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every node (they cancel and release their jobs), then SIGKILL stragglers'
        process groups (a node and its workers). Signals wait until every node is gone."""
        with signals_held():
            for node in self.members:
                if node.process.poll() is None:
                    node.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for node in self.members:
                _wait_or_kill(node, deadline)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _wait_or_kill(node: NodeProcess, deadline: float) -> None:
    """The node, then the rest of its process group (workers and helpers finishing their
    exit), gone by ``deadline``; else SIGKILL to the whole group."""
    try:
        node.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        _wait_group_gone(node.process.pid, min(deadline, time.monotonic() + GROUP_GRACE))
    except subprocess.TimeoutExpired:
        _kill_group(node.process.pid)
        node.process.wait()
    node.reap()


def _wait_group_gone(group: int, deadline: float) -> None:
    # The group id stays reserved while any member lives, so it names no one else here.
    while time.monotonic() < deadline:
        if not group_alive(group):
            return
        time.sleep(0.05)
    _kill_group(group)


def group_alive(group: int) -> bool:
    """Whether a process of ``group`` still runs. A member that has exited but is not yet
    reaped (a zombie: its parent, the node, is gone and init reaps it when it gets to it)
    runs nothing and holds nothing, so it does not count."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    proc = Path("/proc")
    if not proc.is_dir():  # no process table to read: a signal delivered is a process
        return True
    return any(_runs_in_group(entry, group) for entry in proc.iterdir() if entry.name.isdigit())


def _runs_in_group(entry: Path, group: int) -> bool:
    try:
        stat = (entry / "stat").read_text()
    except OSError:  # it ended while we looked
        return False
    state, _, pgrp = stat.rsplit(")", 1)[1].split()[:3]  # after "pid (command)"
    return state != "Z" and int(pgrp) == group


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)  # the node and its workers
    except ProcessLookupError:
        pass


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


# --- ports --------------------------------------------------------------------------------


def check_ports_free(base_port: int, count: int) -> None:
    """``ConfigError`` naming the first busy port of ``base_port..base_port+count-1``."""
    for port in range(base_port, base_port + count):
        if not bindable(port):
            last = base_port + count - 1
            raise ConfigError(
                f"port {port} is in use (--base-port {base_port} asks for ports "
                f"{base_port}..{last}); choose another --base-port"
            )


def pick_free_ports(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports, below the ephemeral range.

    Below it, no outgoing connection (a load test opens thousands) can take a port
    between this check and the node's bind.
    """
    top = ephemeral_low() - count
    for _ in range(200):
        base = random.randrange(10000, max(top, 10001))
        if all(bindable(port) for port in range(base, base + count)):
            return base
    raise ConfigError(f"found no {count} consecutive free ports; pass --base-port")


def ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as file:
            return int(file.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS starts at 49152


def bindable(port: int) -> bool:
    """Whether a node could listen on ``127.0.0.1:port`` now (it binds as this probe does:
    with SO_REUSEADDR, so a port last used a moment ago counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- signals ------------------------------------------------------------------------------


@contextmanager
def stop_signals() -> Iterator[None]:
    """In the launcher: the first SIGINT or SIGTERM raises ``Interrupted``; later ones are
    ignored, so the stop that follows runs to its end."""
    received: list[int] = []

    def interrupt(signum: int, _frame: object) -> None:
        if not received:
            received.append(signum)
            name = signal.Signals(signum).name
            print(f"balancectl: {name}: stopping every node started", file=sys.stderr, flush=True)
            raise Interrupted(signum)

    with _handlers(interrupt):
        yield


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block, then deliver them to the handlers before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    with _handlers(lambda signum, _frame: held.append(signum)):
        yield
    for signum in dict.fromkeys(held):
        signal.raise_signal(signum)


@contextmanager
def _handlers(handler: Callable[[int, object], None]) -> Iterator[None]:
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before if before is not None else signal.SIG_DFL)


def in_thread(work: Callable[[], T]) -> T:
    """Run blocking ``work`` (a migration, an asyncio burst) in a thread; its result.

    The main thread only waits, so a signal interrupts the wait at once, whatever the
    work is blocked in; the launcher then stops its nodes and exits, leaving the daemon
    thread behind.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as error:  # handed to the main thread, re-raised there
            failure.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if failure:
        raise failure[0]
    return outcome[0]


def migrate(database_url: str) -> None:
    """Upgrade to head now; an unreachable database is one ``ConfigError`` line."""
    from balancectl.migrations import upgrade_when_reachable

    upgrade_when_reachable(database_url, wait=0)
