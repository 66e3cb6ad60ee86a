"""job_runs: the statuses of runs the scheduler gave up (timed_out, unresponsive, crashed).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

OLD = "status IN ('succeeded', 'failed', 'lost', 'cancelled')"
NEW = (
    "status IN ('succeeded', 'failed', 'lost', 'cancelled', 'timed_out', 'unresponsive', 'crashed')"
)


def upgrade() -> None:
    op.drop_constraint("job_runs_status", "job_runs", type_="check")
    op.create_check_constraint("job_runs_status", "job_runs", NEW)


def downgrade() -> None:
    # The new statuses have no older name: such runs are kept as failed.
    op.execute(
        "UPDATE job_runs SET status = 'failed' "
        "WHERE status IN ('timed_out', 'unresponsive', 'crashed')"
    )
    op.drop_constraint("job_runs_status", "job_runs", type_="check")
    op.create_check_constraint("job_runs_status", "job_runs", OLD)
