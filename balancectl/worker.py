"""One HTTP worker process of a node: the app under uvicorn on the node's shared socket.

A node's supervisor (``balancectl.node``) starts W of these. Each has its own request
pool and event loop; none runs a scheduler. A worker dies with its supervisor, even on
``kill -9`` of the supervisor (``PR_SET_PDEATHSIG``), so a node never leaves orphans.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
from dataclasses import replace
from multiprocessing.queues import SimpleQueue
from multiprocessing.synchronize import Event

import uvicorn
from litestar import Litestar

from balancectl.api import create_app
from balancectl.api.http_limits import guarded_protocol
from balancectl.config import NodeSettings, worker_pool
from balancectl.db import Database, TooManyConnections
from balancectl.logs import configure_logging
from balancectl.orphans import die_with_parent

# How many gen-0 and gen-1 passes of the cyclic collector run before a pass of the next
# generation (CPython's are 10 and 10). A burst keeps 10,000 requests' objects alive, and
# every pass of an older generation walks them all: a fifth to a quarter of a worker's CPU
# in the 10,000 burst (py-spy, and 6.0 against 4.4 CPU-s with the collector off).
# Ten times rarer, they cost about what no collector does; gen 0 runs as often as before.
OLDER_GENERATIONS_EVERY = (100, 100)
log = logging.getLogger("balancectl.worker")


def uvicorn_config(settings: NodeSettings, node_ready: Event | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings, node_ready),
        backlog=settings.backlog,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=30,
        lifespan="on",
        http=guarded_protocol(settings.first_byte_timeout),
    )


class Server(uvicorn.Server):
    """uvicorn's server, telling the supervisor once its app has started and its request
    pool holds its first connections, or why the server refused them."""

    def __init__(
        self, config: uvicorn.Config, started: Event, refusals: SimpleQueue[str] | None = None
    ) -> None:
        super().__init__(config)
        self.started_event, self.refusals = started, refusals

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        try:
            await self.pool_opened()
        except TooManyConnections as error:
            if self.refusals is not None:
                self.refusals.put(error.detail)
            self.should_exit = True  # uvicorn then shuts the app down, closing its pool
            return
        self.started_event.set()

    async def pool_opened(self) -> None:
        app = self.config.app
        db = app.state.get("db") if isinstance(app, Litestar) else None
        if isinstance(db, Database):
            await db.wait_open()


def run_worker(
    settings: NodeSettings,
    sock: socket.socket,
    parent_pid: int,
    index: int,
    started: Event,
    node_ready: Event,
    refusals: SimpleQueue[str] | None = None,
) -> None:
    """The worker's process target: serve until SIGTERM or SIGINT, then drain and exit.

    A request pool the server refuses at start (no connection slots) is put on
    ``refusals`` for the supervisor, and the worker exits without serving.
    """
    die_with_parent(parent_pid)
    gc.set_threshold(gc.get_threshold()[0], *OLDER_GENERATIONS_EVERY)
    settings = replace(settings, pool=worker_pool(settings))
    configure_logging(f"{settings.node_id}/w{index}", settings.log_level)
    log.info("worker %d serving on pid %d", index, os.getpid())
    Server(uvicorn_config(settings, node_ready), started, refusals).run(sockets=[sock])
