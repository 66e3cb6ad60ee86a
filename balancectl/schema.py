"""The database schema in SQLAlchemy Core: Alembic's target, and the one place tables are named."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData()

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
    sa.Column("balance", sa.BigInteger, nullable=False),
    sa.CheckConstraint("balance >= 0", name="users_balance_non_negative"),
)

ledger = sa.Table(
    "ledger",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
    sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("balance_after", sa.BigInteger, nullable=False),
    sa.Column("idempotency_key", sa.Text, nullable=True),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Index("ledger_user_id", "user_id"),
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("user_id", sa.BigInteger, nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("response", postgresql.JSONB, nullable=True),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Index("idempotency_keys_created_at", "created_at"),
)

nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("function", sa.Text, nullable=False),
    sa.Column("interval_seconds", sa.Float, nullable=False),
    sa.Column("min_duration_seconds", sa.Float, nullable=False),
    sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("owner", sa.Text, nullable=True),
    sa.Column("token", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
    # Set by an operator's pause (database clock): the job is not claimed until resumed.
    sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True),
    # The run (fencing token) an operator's pause asked to stop; its node cancels it.
    sa.Column("stop_token", sa.BigInteger, nullable=True),
    sa.CheckConstraint("interval_seconds > 0", name="jobs_interval_positive"),
    sa.Index("jobs_owner", "owner"),
)

job_runs = sa.Table(
    "job_runs",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
    sa.Column("job", sa.Text, nullable=False),
    sa.Column("node", sa.Text, nullable=False),
    sa.Column("token", sa.BigInteger, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.UniqueConstraint("job", "token", name="job_runs_one_per_claim"),
    sa.CheckConstraint(
        "status IN ('succeeded', 'failed', 'lost', 'cancelled', 'timed_out', 'unresponsive', "
        "'crashed')",
        name="job_runs_status",
    ),
    sa.Index("job_runs_job_started", "job", sa.text("started_at DESC")),
    sa.Index("job_runs_node_started", "node", sa.text("started_at DESC")),
    sa.Index("job_runs_started", sa.text("started_at DESC")),
    sa.Index("job_runs_finished", "finished_at"),
)

balance_snapshots = sa.Table(
    "balance_snapshots",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
    sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("users", sa.BigInteger, nullable=False),
    sa.Column("total_balance", sa.Numeric, nullable=False),
    sa.Column("ledger_entries", sa.BigInteger, nullable=False),
    sa.Column("job_token", sa.BigInteger, nullable=False),
)

# The balance route's answers by outcome, a row per second, node and worker process
# (balancectl.outcomes); kept a few minutes, summed by GET /dashboard.
request_outcomes = sa.Table(
    "request_outcomes",
    metadata,
    sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
    sa.Column("node_id", sa.Text, nullable=False),
    sa.Column("worker", sa.Integer, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("requests", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("bucket", "node_id", "worker", "outcome"),
    sa.CheckConstraint("requests > 0", name="request_outcomes_requests_positive"),
)
