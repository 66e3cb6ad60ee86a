"""An operator's verbs on one job: run it now, pause it, resume it; each one statement.

A paused job is never claimed. A run in progress when it is paused finishes as usual,
unless the pause asks to stop it (``pause-stop``): its node then stops it at its next
lease renewal and records it ``cancelled``. "Run now" never overlaps a running copy: a
running job is due again as soon as its run ends. See ``run_job_now``, ``pause_job``,
``pause_job_stop`` and ``resume_job``.
"""

from __future__ import annotations

from balancectl.db import Database
from balancectl.errors import JobNotFound, JobPaused

VERBS = {
    "run": "run_job_now",
    "pause": "pause_job",
    "pause-stop": "pause_job_stop",
    "resume": "resume_job",
}


async def control_job(db: Database, verb: str, job: str) -> None:
    """Apply ``verb`` (run, pause, pause-stop, resume) to ``job``; ``JobNotFound``, or ``JobPaused``
    when asked to run a paused job (resume it first)."""
    if "\x00" in job:  # PostgreSQL text cannot hold NUL, so no job is named so
        raise JobNotFound(f"no job is named {job!r}")
    row = await db.fetch_one(VERBS[verb], {"job": job})
    if row is None:
        raise JobNotFound(f"no job is named {job!r}")
    if verb == "run" and row["paused"]:
        raise JobPaused(f"job {job!r} is paused; resume it to run it")
