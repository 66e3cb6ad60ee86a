"""The schema: built from nothing, idempotent, and safe when many processes migrate at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from alembic import command

from balancectl.migrations import alembic_config, head_revision, upgrade
from balancectl.revision import SCHEMA_HEAD
from tests.conftest import sql
from tests.faults import proxied, through

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MIGRATING_PROCESSES = 5


def test_upgrade_creates_users_with_the_seed(empty_database_url: str) -> None:
    upgrade(empty_database_url)

    assert sql(empty_database_url, "SELECT id, balance FROM users") == [(1, 10000)]


def test_balance_cannot_go_below_zero(empty_database_url: str) -> None:
    upgrade(empty_database_url)

    with pytest.raises(psycopg.errors.CheckViolation):
        sql(empty_database_url, "UPDATE users SET balance = -1 WHERE id = 1")
    assert sql(empty_database_url, "SELECT balance FROM users WHERE id = 1") == [(10000,)]


def test_upgrade_twice_changes_nothing(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    upgrade(empty_database_url)

    assert_seeded_once_at_head(empty_database_url)


def test_processes_migrating_at_once_all_succeed(empty_database_url: str) -> None:
    command = [sys.executable, "-m", "balancectl", "migrate", "--database-url", empty_database_url]
    processes = [
        subprocess.Popen(
            command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(MIGRATING_PROCESSES)
    ]
    outcomes = [(process.communicate(timeout=120), process.returncode) for process in processes]

    for (_, stderr), returncode in outcomes:
        assert returncode == 0, stderr
    assert_seeded_once_at_head(empty_database_url)


def assert_seeded_once_at_head(url: str) -> None:
    assert sql(url, "SELECT id, balance FROM users") == [(1, 10000)]
    assert sql(url, "SELECT count(*) FROM ledger WHERE user_id = 1") == [(1,)]
    assert sql(url, "SELECT version_num FROM alembic_version") == [(head_revision(),)]


def test_the_build_knows_its_schema_head_without_alembic() -> None:
    assert SCHEMA_HEAD == head_revision()


# A node's start migration, in a fresh interpreter: whether it loaded Alembic.
NODE_MIGRATE = """
import sys
from balancectl.config import NodeSettings
from balancectl.db import server_facts
from balancectl.node import migrate
url = sys.argv[1]
migrate(NodeSettings(database_url=url), [], db_wait=10, revision=server_facts(url).schema_revision)
print("alembic" in sys.modules)
"""


def node_migrate(url: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", NODE_MIGRATE, url], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_node_start_on_a_database_at_head_leaves_it_without_loading_alembic(
    database_url: str,
) -> None:
    assert node_migrate(database_url) == "False"
    assert_seeded_once_at_head(database_url)


def test_a_node_start_on_an_empty_database_migrates_it_with_alembic(
    empty_database_url: str,
) -> None:
    assert node_migrate(empty_database_url) == "True"
    assert_seeded_once_at_head(empty_database_url)


def test_a_node_start_on_a_database_behind_head_upgrades_it(empty_database_url: str) -> None:
    command.upgrade(alembic_config(empty_database_url), "0005")
    assert node_migrate(empty_database_url) == "True"
    assert_seeded_once_at_head(empty_database_url)


MIGRATE_GIVES_UP = 15.0  # seconds: a connection's bound (5 s) and a process start, with slack


def test_migrate_against_a_database_that_never_answers_fails_in_one_line(
    empty_database_url: str,
) -> None:
    """A server that accepts the connection and then says nothing (a DROP rule, a hung
    host) is one line and exit 2 within the connection's 5 s bound, not a hang."""
    with proxied(empty_database_url) as proxy:
        proxy.cut("drop")
        began = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "balancectl", "migrate"],
            env={**os.environ, "BALANCECTL_DATABASE_URL": through(empty_database_url, proxy)},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        took = time.monotonic() - began
    print(f"\nmigrate against a silent database: exit {done.returncode} after {took:.1f} s")
    assert took <= MIGRATE_GIVES_UP, f"{took:.1f} s"
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("balancectl: the database cannot be reached: "), done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
