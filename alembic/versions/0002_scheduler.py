"""scheduler: nodes, jobs (schedule and lease in one row), job_runs history.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("last_seen_at", TZ, nullable=False),
        sa.Column("stopped_at", TZ, nullable=True),
    )
    op.create_table(
        "jobs",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("function", sa.Text, nullable=False),
        sa.Column("interval_seconds", sa.Float, nullable=False),
        sa.Column("min_duration_seconds", sa.Float, nullable=False),
        sa.Column("next_run_at", TZ, nullable=False),
        sa.Column("owner", sa.Text, nullable=True),
        sa.Column("token", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("started_at", TZ, nullable=True),
        sa.Column("lease_expires_at", TZ, nullable=True),
        sa.CheckConstraint("interval_seconds > 0", name="jobs_interval_positive"),
    )
    op.create_index("jobs_owner", "jobs", ["owner"])
    op.create_table(
        "job_runs",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("job", sa.Text, nullable=False),
        sa.Column("node", sa.Text, nullable=False),
        sa.Column("token", sa.BigInteger, nullable=False),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("finished_at", TZ, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.UniqueConstraint("job", "token", name="job_runs_one_per_claim"),
        sa.CheckConstraint(
            "status IN ('succeeded', 'failed', 'lost', 'cancelled')", name="job_runs_status"
        ),
    )
    op.create_index("job_runs_job_started", "job_runs", ["job", sa.text("started_at DESC")])
    op.create_index("job_runs_node_started", "job_runs", ["node", sa.text("started_at DESC")])
    op.create_index("job_runs_started", "job_runs", [sa.text("started_at DESC")])
    op.create_index("job_runs_finished", "job_runs", ["finished_at"])


def downgrade() -> None:
    op.drop_table("job_runs")
    op.drop_table("jobs")
    op.drop_table("nodes")
