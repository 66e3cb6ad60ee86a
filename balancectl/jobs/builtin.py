"""The shipped jobs. Each does its work through the run's fenced session (``ctx.execute``
and friends), then the scheduler keeps the run going for its ``min_duration`` (2 minutes by
default), waking at once on shutdown or lease loss."""

from __future__ import annotations

import logging

from balancectl.scheduler.context import JobContext

log = logging.getLogger("balancectl.jobs")


class AuditMismatch(Exception):
    """Some balance differs from the sum of its ledger."""


async def ledger_audit(ctx: JobContext) -> None:
    """Check every balance against the sum of its ledger entries; fail the run on a mismatch."""
    rows = await ctx.fetch_all("audit_ledger")
    if rows:
        worst = ", ".join(
            f"user {r['user_id']}: balance {r['balance']} vs ledger {r['ledger_total']}"
            for r in rows[:5]
        )
        raise AuditMismatch(f"{len(rows)} balance(s) differ from their ledger: {worst}")
    log.info("ledger audit: every balance matches its ledger")


async def balance_snapshot(ctx: JobContext) -> None:
    """Record the total of all balances; the write is fenced by the run's token."""
    row = await ctx.fetch_one("snapshot_totals")
    if row is None:
        log.warning("balance snapshot not written: the lease of token %d is gone", ctx.token)


async def prune_history(ctx: JobContext) -> None:
    """Delete job runs older than the history retention (fenced)."""
    deleted = await ctx.execute("prune_job_runs", {"retention_seconds": ctx.retention_seconds})
    log.info("pruned %d old job runs", deleted)


async def prune_idempotency_keys(ctx: JobContext) -> None:
    """Forget idempotency keys past their retention (24 h by default; fenced)."""
    deleted = await ctx.execute(
        "prune_idempotency_keys", {"retention_seconds": ctx.idempotency_retention_seconds}
    )
    log.info("pruned %d expired idempotency keys", deleted)


async def prune_nodes(ctx: JobContext) -> None:
    """Forget nodes not seen for the history retention (fenced)."""
    deleted = await ctx.execute("prune_nodes", {"retention_seconds": ctx.retention_seconds})
    log.info("pruned %d departed nodes", deleted)


async def idle(ctx: JobContext) -> None:
    """Do nothing: the run only lasts its ``min_duration`` (for tests and demos)."""
