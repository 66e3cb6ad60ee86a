"""A node's HTTP worker processes: start W on the shared socket, restart one that dies, stop all.

Workers are started with the ``spawn`` method (a clean interpreter each, no state copied
from the supervisor's event loop or pools). Their Prometheus samples go to the node's
metrics folder (prometheus_client's multiprocess mode, ``metrics_folder``), as do the
supervisor's scheduler samples, so ``/metrics`` on any worker counts every request of
the node exactly once and shows its scheduler. This module imports neither the app nor
prometheus_client at import time: the supervisor must set the folder first.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.process import BaseProcess
from multiprocessing.queues import SimpleQueue
from multiprocessing.synchronize import Event
from typing import Any

from balancectl.config import NodeSettings
from balancectl.db import TooManyConnections

log = logging.getLogger("balancectl.workers")
METRICS_FOLDER = "PROMETHEUS_MULTIPROC_DIR"
WATCH_EVERY = 0.2  # seconds between looks at the workers
STARTUP_TIMEOUT = 120.0
STOP_GRACE = 15.0  # uvicorn drains for 10 s; then stragglers are killed
# A worker that keeps dying is a broken node, not bad luck: give up rather than spin.
MAX_RESTARTS, RESTART_WINDOW = 5, 60.0


@contextmanager
def metrics_folder(node_id: str) -> Iterator[str]:
    """The node's metrics folder, in the environment for the node's whole life.

    prometheus_client chooses how it stores values when it is first imported, so this
    must come before that import in the supervisor (whose scheduler writes samples
    too); every worker spawned meanwhile inherits it.
    """
    folder = tempfile.mkdtemp(prefix=f"balancectl-{node_id}-metrics-")
    before = os.environ.get(METRICS_FOLDER)
    os.environ[METRICS_FOLDER] = folder
    try:
        yield folder
    finally:
        if before is None:
            os.environ.pop(METRICS_FOLDER, None)
        else:
            os.environ[METRICS_FOLDER] = before
        shutil.rmtree(folder, ignore_errors=True)


def worker_main(*args: Any) -> None:
    """A worker process's target, given ``worker.run_worker``'s arguments. The app is
    imported here, in the worker: a ``spawn`` target is pickled by name, and naming
    ``run_worker`` itself would import the whole app into the supervisor, which never
    serves HTTP (a third of its start)."""
    from balancectl.worker import run_worker

    run_worker(*args)


class WorkersFailed(RuntimeError):
    """Workers died faster than a node should tolerate."""


class Workers:
    """The W worker processes of one node; a context manager that always reaps them."""

    def __init__(self, settings: NodeSettings, sock: socket.socket) -> None:
        self.settings, self.sock = settings, sock
        self.processes: list[BaseProcess] = []
        self.started: list[Event] = []
        self._restarts: list[float] = []
        self._context = multiprocessing.get_context("spawn")
        # Set by the supervisor once the node's scheduler has joined: /readyz waits for it.
        self.node_ready = self._context.Event()
        # A worker whose request pool the server refused at start says why here.
        self.refusals: SimpleQueue[str] = self._context.SimpleQueue()
        self._folder = ""

    def __enter__(self) -> Workers:
        self._folder = os.environ.get(METRICS_FOLDER, "")  # set by metrics_folder()
        if not self._folder:
            raise RuntimeError("Workers need the node's metrics folder (metrics_folder)")
        self.started = [self._context.Event() for _ in range(self.settings.workers)]
        self.processes = [self._spawn(index) for index in range(self.settings.workers)]
        return self

    async def wait_started(self, until: asyncio.Event, timeout: float = STARTUP_TIMEOUT) -> bool:
        """Until every worker's app has started (``False`` if ``until`` came first), so the
        node claims jobs and reads ready only once it serves."""
        deadline = time.monotonic() + timeout
        while not all(event.is_set() for event in self.started):
            if until.is_set():
                return False
            dead = [p for p in self.processes if not p.is_alive()]
            if dead and not self.refusals.empty():
                raise TooManyConnections(self.refusals.get())
            if dead:
                raise WorkersFailed(f"worker {dead[0].name} exited with status {dead[0].exitcode}")
            if time.monotonic() > deadline:
                raise WorkersFailed(f"the workers did not start within {timeout:.0f} s")
            await asyncio.sleep(WATCH_EVERY / 4)
        return True

    def __exit__(self, *_: object) -> None:
        self.terminate()
        self._reap(STOP_GRACE)

    def _spawn(self, index: int) -> BaseProcess:
        process = self._context.Process(
            target=worker_main,
            args=(
                self.settings,
                self.sock,
                os.getpid(),
                index,
                self.started[index],
                self.node_ready,
                self.refusals,
            ),
            name=f"{self.settings.node_id}-w{index}",
            daemon=False,
        )
        process.start()
        return process

    async def keep_running(self, until: asyncio.Event) -> None:
        """Watch the workers until ``until`` is set, restarting any that died."""
        while not until.is_set():
            for index, process in enumerate(self.processes):
                if not process.is_alive():
                    self._replace(index, process)
            try:
                await asyncio.wait_for(until.wait(), timeout=WATCH_EVERY)
            except TimeoutError:
                continue

    def _replace(self, index: int, dead: BaseProcess) -> None:
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW] + [now]
        self._forget(dead)
        if len(self._restarts) > MAX_RESTARTS:
            raise WorkersFailed(
                f"{len(self._restarts)} worker exits within {RESTART_WINDOW:.0f} s "
                f"(the last with status {dead.exitcode}); stopping the node"
            )
        log.warning("worker %d exited with status %s; starting another", index, dead.exitcode)
        self.started[index] = self._context.Event()
        self.processes[index] = self._spawn(index)

    def terminate(self) -> None:
        """Ask every worker to drain and stop (SIGTERM)."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()

    async def wait(self, timeout: float = STOP_GRACE) -> None:
        """Wait for the workers to end, without blocking the event loop; kill stragglers."""
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in self.processes) and time.monotonic() < deadline:
            await asyncio.sleep(WATCH_EVERY / 2)
        self._reap(0)

    def _reap(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(max(deadline - time.monotonic(), 0))
            if process.is_alive():
                log.warning("worker %s did not stop in time; killing it", process.name)
                process.kill()
                process.join()
            self._forget(process)

    def _forget(self, process: BaseProcess) -> None:
        """A worker that ended: drop its live gauges from ``/metrics``."""
        if process.pid is not None and self._folder:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(process.pid, self._folder)  # type: ignore[no-untyped-call]
