"""A PgBouncer in transaction mode in front of a test database, on a free loopback port.

``pgbouncer(database_url)`` starts one (``pool_mode = transaction``, ``auth_type = trust``
with an auth file naming the URL's user) and yields it; ``bouncer.url`` is the same
database reached through it. The ``bouncer`` fixture is one (pool size 20) for a test's
own database; request it before ``cluster_factory``, so that the nodes stop first.
PgBouncer refuses to run as root, so as root it runs as the system user ``postgres``
(its files then live in a folder that user owns). In front of the embedded test server,
whose Unix socket only its own user may open, it goes through a ``tests.faults.TcpProxy``
relay on loopback.

Without the ``pgbouncer`` binary the calling test fails, saying how to install it: CI
installs it, so a missing binary is a broken environment, never a reason to skip.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.conftest import free_port
from tests.faults import TcpProxy, server_address, through
from tests.processes import wait_or_kill

RUN_AS = "postgres"  # PgBouncer exits at once when started as root
SEARCH_PATH = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")


def pgbouncer_binary() -> str:
    """The ``pgbouncer`` executable; fails the calling test when it is not installed."""
    found = shutil.which("pgbouncer") or shutil.which(
        "pgbouncer", path=os.pathsep.join(SEARCH_PATH)
    )
    if found is None:
        pytest.fail(
            "pgbouncer is not installed: `apt-get install pgbouncer` (Debian/Ubuntu) or "
            "`brew install pgbouncer`; CI installs it and these tests must not be skipped",
            pytrace=False,
        )
    return found


class PgBouncer:
    """One PgBouncer process; ``start`` it, read ``url``, ``stop`` it."""

    def __init__(self, database_url: str, *, pool_size: int = 20, max_client_conn: int = 900):
        self.database_url = database_url
        self.pool_size, self.max_client_conn = pool_size, max_client_conn
        self.listen_host, self.port = "127.0.0.1", free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="balancectl-pgbouncer-"))
        self.process: subprocess.Popen[bytes] | None = None
        # The embedded test server's Unix socket is its own user's, not PgBouncer's: a
        # relay on loopback (in this process, as root) reaches it instead.
        self._relay: TcpProxy | None = None
        self._server: tuple[str, int] = ("127.0.0.1", 5432)

    @property
    def url(self) -> str:
        """The test database's URL, through the bouncer."""
        return through(self.database_url, self)

    @property
    def log(self) -> Path:
        return self.folder / "pgbouncer.log"

    def config(self) -> str:
        return "\n".join(
            [
                "[databases]",
                f"* = host={self._server[0]} port={self._server[1]}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {self.port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {self.folder / 'userlist.txt'}",
                "pool_mode = transaction",
                f"max_client_conn = {self.max_client_conn}",
                f"default_pool_size = {self.pool_size}",
                f"max_db_connections = {self.pool_size}",
                "reserve_pool_size = 0",
                "ignore_startup_parameters = extra_float_digits,options",
                f"logfile = {self.log}",
                "",
            ]
        )

    def start(self, timeout: float = 20.0) -> PgBouncer:
        binary = pgbouncer_binary()
        address = server_address(self.database_url)
        if isinstance(address, str):
            self._relay = TcpProxy(address).start()
            address = (self._relay.listen_host, self._relay.port)
        self._server = address
        user = urlsplit(self.database_url).username or "postgres"
        (self.folder / "userlist.txt").write_text(f'"{user}" ""\n')
        (self.folder / "pgbouncer.ini").write_text(self.config())
        command = [binary, str(self.folder / "pgbouncer.ini")]
        if os.geteuid() == 0:
            self._hand_folder_to(RUN_AS)
            command = ["runuser", "-u", RUN_AS, "--", *command]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        self._wait_ready(timeout)
        return self

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM), then SIGKILL if it lingers; removes its folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            wait_or_kill(self.process, 10)
        if self._relay is not None:
            self._relay.stop()
            self._relay = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def _hand_folder_to(self, user: str) -> None:
        entry = pwd.getpwnam(user)
        for path in [self.folder, *self.folder.iterdir()]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self.folder.chmod(0o755)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"pgbouncer exited with {self.process.returncode}: {self.tail()}"
                )
            try:
                with psycopg.connect(self.url, prepare_threshold=None, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as error:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer not ready: {error}; {self.tail()}") from error
                time.sleep(0.1)

    def tail(self, lines: int = 20) -> str:
        """The end of its log, for failure messages."""
        try:
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextmanager
def pgbouncer(database_url: str, *, pool_size: int = 20) -> Iterator[PgBouncer]:
    """A PgBouncer in transaction mode in front of ``database_url``, for the block's life."""
    bouncer = PgBouncer(database_url, pool_size=pool_size)
    try:
        yield bouncer.start()
    finally:
        bouncer.stop()


@pytest.fixture
def bouncer(database_url: str) -> Iterator[PgBouncer]:
    """Requested before ``cluster_factory``: the nodes stop before their bouncer does."""
    with pgbouncer(database_url, pool_size=20) as running_bouncer:
        yield running_bouncer
