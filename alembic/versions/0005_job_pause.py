"""jobs.paused_at and jobs.stop_token: an operator's pause (a paused job is never claimed)
and the run in progress it asked to stop.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("jobs", sa.Column("stop_token", sa.BigInteger, nullable=True))


def downgrade() -> None:
    # An older node knows no pause: a paused job becomes claimable again.
    op.drop_column("jobs", "stop_token")
    op.drop_column("jobs", "paused_at")
