"""Upgrade the schema with Alembic; safe when many nodes run it at once (see alembic/env.py)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

import balancectl


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
