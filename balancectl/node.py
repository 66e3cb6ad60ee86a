"""Run one node: migrate, bind, serve the app under uvicorn until SIGTERM or Ctrl-C."""

from __future__ import annotations

import logging
import socket
import sys
import time
from collections.abc import Sequence

import psycopg
import sqlalchemy.exc
import uvicorn

from balancectl import migrations
from balancectl.api import create_app
from balancectl.config import NodeSettings
from balancectl.errors import ConfigError
from balancectl.http_guard import GuardedHttpToolsProtocol
from balancectl.limits import raise_open_files_limit
from balancectl.scheduler import JobSpec

log = logging.getLogger("balancectl.node")


def configure_logging(node_id: str, level: str = "INFO") -> None:
    """Logs go to stderr, one line each, named by node."""
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {node_id} %(name)s: %(message)s",
        force=True,
    )


def migrate_when_reachable(database_url: str, wait: float) -> None:
    """Upgrade to head, retrying for up to ``wait`` seconds while the database is down."""
    deadline = time.monotonic() + wait
    while True:
        try:
            migrations.upgrade(database_url)
            return
        except (sqlalchemy.exc.OperationalError, psycopg.OperationalError) as error:
            reason = str(getattr(error, "orig", error)).strip().splitlines()[0]
            if time.monotonic() >= deadline:
                raise ConfigError(f"the database cannot be reached: {reason}") from error
            log.warning("database not reachable yet (%s); retrying", reason)
            time.sleep(1.0)


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket here, so a port in use is one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror}") from error
    sock.set_inheritable(True)
    return sock


def serve(settings: NodeSettings, specs: Sequence[JobSpec], db_wait: float = 30.0) -> None:
    """Migrate, then serve the API and run the scheduler until asked to stop."""
    sock = bind(settings.host, settings.port)
    raise_open_files_limit()
    migrate_when_reachable(settings.database_url, db_wait)
    config = uvicorn.Config(
        create_app(settings, specs),
        backlog=4096,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=30,
        lifespan="on",
        http=GuardedHttpToolsProtocol,
    )
    log.info("node %s listening on http://%s:%d", settings.node_id, settings.host, settings.port)
    uvicorn.Server(config).run(sockets=[sock])
