"""ledger, idempotency keys and balance snapshots; the seed gets its opening ledger entry.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "ledger",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("balance_after", sa.BigInteger, nullable=False),
        sa.Column("idempotency_key", sa.Text, nullable=True),
        sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ledger_user_id", "ledger", ["user_id"])
    op.execute(
        "INSERT INTO ledger (user_id, amount, balance_after) SELECT id, balance, balance FROM users"
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("user_id", sa.BigInteger, nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column("response", postgresql.JSONB, nullable=True),
        sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("idempotency_keys_created_at", "idempotency_keys", ["created_at"])
    op.create_table(
        "balance_snapshots",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("taken_at", TZ, nullable=False),
        sa.Column("users", sa.BigInteger, nullable=False),
        sa.Column("total_balance", sa.Numeric, nullable=False),
        sa.Column("ledger_entries", sa.BigInteger, nullable=False),
        sa.Column("job_token", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("balance_snapshots")
    op.drop_table("idempotency_keys")
    op.drop_table("ledger")
