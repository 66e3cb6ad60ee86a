"""request_outcomes: the balance route's answers by outcome, a row per second, node and
worker, for the dashboard's "requests of the last minute".

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "request_outcomes",
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("node_id", sa.Text, nullable=False),
        sa.Column("worker", sa.Integer, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("bucket", "node_id", "worker", "outcome"),
        sa.CheckConstraint("requests > 0", name="request_outcomes_requests_positive"),
    )


def downgrade() -> None:
    # An older node neither records nor reads the counts.
    op.drop_table("request_outcomes")
