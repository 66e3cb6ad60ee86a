"""Upgrade the schema with Alembic; safe when many nodes run it at once (see alembic/env.py)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import psycopg
import sqlalchemy.exc
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

import balancectl
from balancectl.errors import ConfigError

log = logging.getLogger("balancectl.migrations")


def script_location() -> Path:
    """The migrations: inside the wheel when installed, the top-level ``alembic/`` in a checkout."""
    package = Path(balancectl.__file__).parent
    shipped = package / "_migrations"
    return shipped if shipped.is_dir() else package.parent / "alembic"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str) -> None:
    """Bring the database to head; a no-op when it is there already."""
    command.upgrade(alembic_config(database_url), "head")


def head_revision() -> str:
    """The newest revision this build ships, for ``/readyz``."""
    head = ScriptDirectory.from_config(alembic_config("postgresql://")).get_current_head()
    assert head is not None
    return head


def upgrade_when_reachable(database_url: str, wait: float, report_every: float = 5.0) -> None:
    """Upgrade to head, retrying for up to ``wait`` seconds while the database is down.

    The wait is logged once at once, then at most every ``report_every`` seconds, not
    once per retry; ``wait=0`` is one attempt.
    """
    began = time.monotonic()
    deadline, next_report = began + wait, began
    while True:
        try:
            upgrade(database_url)
            break
        except (sqlalchemy.exc.OperationalError, psycopg.OperationalError) as error:
            reason = str(getattr(error, "orig", error)).strip().splitlines()[0]
            now = time.monotonic()
            if now >= deadline:
                raise ConfigError(f"the database cannot be reached: {reason}") from error
            if now >= next_report:
                left = deadline - now
                log.warning("database not reachable yet (%s); retrying for %.0f s", reason, left)
                next_report = now + report_every
            time.sleep(min(1.0, deadline - now))
    if next_report > began:
        log.info("database reached after %.1f s", time.monotonic() - began)
