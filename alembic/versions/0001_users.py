"""users: one balance per user, never negative; seed user 1 with 10000.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("balance", sa.BigInteger, nullable=False),
        sa.CheckConstraint("balance >= 0", name="users_balance_non_negative"),
    )
    op.execute("INSERT INTO users (id, balance) VALUES (1, 10000)")
    op.execute("SELECT setval(pg_get_serial_sequence('users', 'id'), 1)")


def downgrade() -> None:
    op.drop_table("users")
