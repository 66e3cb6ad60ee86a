"""The masterless cluster scheduler: leases in rows, fencing tokens, the database clock."""

from __future__ import annotations

from balancectl.scheduler.context import FencedSession, JobContext, LeaseLost
from balancectl.scheduler.registry import JobSpec, load_jobs, parse_jobs
from balancectl.scheduler.runner import JobRetention, Scheduler
from balancectl.scheduler.store import Claim, SchedulerStore

__all__ = [
    "Claim",
    "FencedSession",
    "JobContext",
    "JobRetention",
    "JobSpec",
    "LeaseLost",
    "Scheduler",
    "SchedulerStore",
    "load_jobs",
    "parse_jobs",
]
