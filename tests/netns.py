"""Hosts for multi-host tests: Linux network namespaces joined to this one by veth pairs.

``hosts(n)`` makes n namespaces ("hosts"), each with one veth pair on its own /30 of
10.213.0.0/16 (an address range only these tests use): the root side gets ``.1`` of the
/30, the host's side ``.2``. Nothing is routed or forwarded: a host reaches only the
root side of its own link, and the root namespace reaches each host's address directly.
Everything made is removed when the block ends, also when it fails.

``Forwarder`` is ``tests.faults.TcpProxy`` listening on a root-side address instead of
loopback (PostgreSQL listens on 127.0.0.1 only), so each host reaches the database over
its own link. It can also hold every chunk for a fixed delay in both directions: the
fallback when the kernel has no ``netem`` qdisc.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tests.faults import TcpProxy, Upstream, abort

NETWORK = "10.213"  # the /16 these tests carve their /30s from


class KernelRefused(Exception):
    """The kernel (or the lack of a capability) refused a namespace, a link or a qdisc."""


def run(*command: str) -> subprocess.CompletedProcess[str]:
    """Run one ``ip`` / ``tc`` command; raise ``KernelRefused`` with its message on failure."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=15, check=False)
    except FileNotFoundError as missing:
        raise KernelRefused(f"{command[0]} is not installed (Debian: iproute2)") from missing
    if done.returncode != 0:
        raise KernelRefused(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
    return done


@dataclass(frozen=True)
class Host:
    """One namespace and its link: ``root_addr`` (root side) <-> ``addr`` (the host's)."""

    netns: str
    root_if: str
    host_if: str
    root_addr: str
    addr: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def link(self, up: bool) -> None:
        """Take the link down (a pulled cable: nothing passes either way) or up again."""
        run("ip", "link", "set", self.root_if, "up" if up else "down")

    def add_delay(self, milliseconds: int) -> None:
        """``tc netem`` delay on both ends of the link: each direction waits that long."""
        run(
            "tc", "qdisc", "add", "dev", self.root_if, "root", "netem", "delay", f"{milliseconds}ms"
        )
        try:
            run("ip", "netns", "exec", self.netns, "tc", "qdisc", "add", "dev", self.host_if,
                "root", "netem", "delay", f"{milliseconds}ms")  # fmt: skip
        except KernelRefused:
            self.remove_delay()
            raise

    def remove_delay(self) -> None:
        with contextlib.suppress(KernelRefused):
            run("tc", "qdisc", "del", "dev", self.root_if, "root")
        with contextlib.suppress(KernelRefused):
            run("ip", "netns", "exec", self.netns, "tc", "qdisc", "del", "dev", self.host_if,
                "root")  # fmt: skip

    def pids(self) -> list[int]:
        """Processes still running in the namespace (ours: only ours run there)."""
        with contextlib.suppress(KernelRefused):
            return [int(pid) for pid in run("ip", "netns", "pids", self.netns).stdout.split()]
        return []


def plan(count: int) -> list[Host]:
    """Names and addresses for ``count`` hosts, unique to this process."""
    tag = os.getpid() % 100000
    third = os.getpid() % 250
    return [
        Host(
            netns=f"balancectl-{tag}-{index}",
            root_if=f"bc{tag}r{index}",
            host_if=f"bc{tag}h{index}",
            root_addr=f"{NETWORK}.{third}.{4 * index + 1}",
            addr=f"{NETWORK}.{third}.{4 * index + 2}",
        )
        for index in range(count)
    ]


def create(host: Host) -> None:
    run("ip", "netns", "add", host.netns)
    run("ip", "link", "add", host.root_if, "type", "veth", "peer", "name", host.host_if,
        "netns", host.netns)  # fmt: skip
    run("ip", "addr", "add", f"{host.root_addr}/30", "dev", host.root_if)
    run("ip", "link", "set", host.root_if, "up")
    run("ip", "-n", host.netns, "addr", "add", f"{host.addr}/30", "dev", host.host_if)
    run("ip", "-n", host.netns, "link", "set", host.host_if, "up")
    run("ip", "-n", host.netns, "link", "set", "lo", "up")


def remove(host: Host) -> None:
    """Kill what still runs in it, delete the namespace and the link (each step may fail)."""
    for pid in host.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(KernelRefused):
        run("ip", "link", "delete", host.root_if)  # deletes its peer in the namespace too
    with contextlib.suppress(KernelRefused):
        run("ip", "netns", "delete", host.netns)


@contextlib.contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    """Make ``count`` hosts; remove them all when the block ends, however it ends."""
    planned = plan(count)
    try:
        for host in planned:
            create(host)
        yield planned
    finally:
        for host in planned:
            remove(host)


class Forwarder(TcpProxy):
    """A ``TcpProxy`` listening on ``listen_host``; ``delay`` holds every chunk that long.

    The delay applies to each chunk read from then on, in both directions, keeping the
    order (a chunk is never delivered before an earlier one); setting it back to 0 lets
    what is queued arrive at its due time, then flows freely.
    """

    def __init__(self, target: Upstream, listen_host: str) -> None:
        super().__init__(target, listen_host)
        self.delay = 0.0

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._deliver(queue, writer))
        try:
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + self.delay, data))
        except OSError:
            pass
        finally:
            queue.put_nowait((loop.time() + self.delay, b""))  # the end arrives late too
            await sender

    async def _deliver(
        self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    return
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            abort(writer)


def netem_refusal() -> str | None:
    """Why ``tc netem`` cannot be used here (no qdisc in the kernel, no ``tc``), or None."""
    tag = os.getpid() % 100000
    left, right = f"bc{tag}p0", f"bc{tag}p1"
    try:
        run("ip", "link", "add", left, "type", "veth", "peer", "name", right)
    except KernelRefused as refused:
        return str(refused)
    try:
        run("tc", "qdisc", "add", "dev", left, "root", "netem", "delay", "1ms")
        return None
    except KernelRefused as refused:
        return str(refused)
    finally:
        with contextlib.suppress(KernelRefused):
            run("ip", "link", "delete", left)
