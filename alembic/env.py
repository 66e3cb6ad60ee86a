"""Alembic environment: one transaction for the whole upgrade, serialized across nodes.

Many nodes may migrate at the same moment. A transaction-scoped advisory lock
(safe behind a transaction-pooling PgBouncer) makes them queue; each one then
reads the version table afresh and finds nothing left to do.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import context

from balancectl.db import link_bounds
from balancectl.schema import metadata

MIGRATION_LOCK_ID = 0x62616C616E6365  # "balance"


def _url() -> str:
    url = context.config.get_main_option("sqlalchemy.url") or os.environ.get(
        "BALANCECTL_DATABASE_URL", ""
    )
    if not url:
        raise SystemExit("no database URL: set BALANCECTL_DATABASE_URL")
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def run_online() -> None:
    # Bounded like every connection of the node: a silent server fails the attempt in 5 s.
    engine = sa.create_engine(_url(), poolclass=sa.pool.NullPool, connect_args=link_bounds())
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            transaction_per_migration=False,
        )
        with context.begin_transaction():
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID}
            )
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `balancectl migrate`")
run_online()
