"""The embedded PostgreSQL: started on demand, reused, left running for the next command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from balancectl.errors import ConfigError
from balancectl.migrations import upgrade
from balancectl.toolkit.embedded import embedded_database_url, stop_embedded
from tests.conftest import sql, url_for_database

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PRINT_URL = (
    "import sys, pathlib; from balancectl.toolkit.embedded import embedded_database_url; "
    "print(embedded_database_url(pathlib.Path(sys.argv[1])))"
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One data folder for the module (one initdb); the server is stopped and removed after."""
    pgdata = tmp_path_factory.mktemp("embedded") / "pgdata"
    yield pgdata
    stop_embedded(pgdata)
    shutil.rmtree(pgdata, ignore_errors=True)


def test_server_outlives_the_process_that_started_it(data_dir: Path) -> None:
    stop_embedded(data_dir)
    started = subprocess.run(
        [sys.executable, "-c", PRINT_URL, str(data_dir)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    url = started.stdout.strip()

    assert sql(url, "SELECT 1") == [(1,)]
    assert embedded_database_url(data_dir) == url


def test_migrations_run_on_the_embedded_server(data_dir: Path) -> None:
    url = embedded_database_url(data_dir)
    sql(url, "DROP DATABASE IF EXISTS migrated WITH (FORCE)")
    sql(url, "CREATE DATABASE migrated")
    migrated = url_for_database(url, "migrated")

    upgrade(migrated)

    assert sql(migrated, "SELECT id, balance FROM users") == [(1, 10000)]


def test_server_has_room_for_a_cluster(data_dir: Path) -> None:
    url = embedded_database_url(data_dir)

    assert int(sql(url, "SHOW max_connections")[0][0]) >= 200


def test_stopped_server_refuses_then_starts_again(data_dir: Path) -> None:
    url = embedded_database_url(data_dir)

    assert stop_embedded(data_dir) is True
    with pytest.raises(psycopg.OperationalError):
        sql(url, "SELECT 1")
    assert stop_embedded(data_dir) is False
    assert sql(embedded_database_url(data_dir), "SELECT 1") == [(1,)]


def test_unusable_folder_is_a_configuration_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    with pytest.raises(ConfigError, match="cannot start the embedded PostgreSQL"):
        embedded_database_url(blocker / "pgdata")
