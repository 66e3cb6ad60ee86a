"""A local cluster: N ``balancectl serve`` processes on loopback. A launcher only; the nodes
never learn of it or of each other."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO


@dataclass
class Node:
    """One node process and where it listens."""

    node_id: str
    port: int
    process: subprocess.Popen[bytes]
    pump: threading.Thread | None = None

    def reap(self) -> None:
        """After the process ended: finish copying its output and close the pipe."""
        if self.pump is not None:
            self.pump.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def node_command(node_id: str, port: int, extra: Sequence[str]) -> list[str]:
    return [
        sys.executable, "-m", "balancectl", "serve",
        "--node-id", node_id, "--host", "127.0.0.1", "--port", str(port), *extra,
    ]  # fmt: skip


def pump(stream: IO[bytes], prefix: str, sink: IO[str]) -> None:
    """Copy a child's output line by line, each line prefixed with its node id."""
    for raw in iter(stream.readline, b""):
        sink.write(f"{prefix} {raw.decode('utf-8', 'replace')}")
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
    members: list[Node] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.members]

    def start(self) -> None:
        env = {**os.environ, **self.env, "BALANCECTL_DATABASE_URL": self.database_url}
        ports = self.ports or range(self.base_port, self.base_port + self.nodes)
        for index, port in enumerate(ports, start=1):
            self.members.append(self._spawn(f"node-{index}", port, env))

    def _spawn(self, node_id: str, port: int, env: dict[str, str]) -> Node:
        output = subprocess.PIPE if self.log is not None else subprocess.DEVNULL
        process = subprocess.Popen(
            node_command(node_id, port, self.extra_args),
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        node = Node(node_id, port, process)
        if self.log is not None and process.stdout is not None:
            args = (process.stdout, f"[{node_id}]", self.log)
            node.pump = threading.Thread(target=pump, args=args, daemon=True)
            node.pump.start()
        return node

    def node(self, node_id: str) -> Node:
        return next(node for node in self.members if node.node_id == node_id)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until every node answers ``/readyz``; raise if one exits or time runs out."""
        deadline = time.monotonic() + timeout
        for node in self.members:
            while not ready(node.url):
                if node.process.poll() is not None:
                    raise RuntimeError(
                        f"{node.node_id} exited with status {node.process.returncode}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{node.node_id} was not ready within {timeout:.0f} s")
                time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every node (they cancel and release their jobs), then SIGKILL stragglers."""
        for node in self.members:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in self.members:
            try:
                node.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
            node.reap()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
