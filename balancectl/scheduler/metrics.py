"""The scheduler's Prometheus metrics, written by the node's supervisor process.

The scheduler runs in the supervisor, ``/metrics`` is answered by a worker: in a node
both write to the node's metrics folder (prometheus_client's multiprocess mode, set up
by ``balancectl.node.serve`` before prometheus_client is first imported, which is why
it is imported here only when the metrics are made). Outside a node (tests that run a
``Scheduler`` in-process) the samples stay in this object's own registry.

Runs are counted as this node records them, not read from the history at scrape time:
a counter per node sums across nodes without counting a run twice, ``rate()`` works on
it, and a scrape costs no query (``/metrics`` answers while the database is away).
"""

from __future__ import annotations

import time
from datetime import datetime

RUN_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
CLAIM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class SchedulerMetrics:
    """What one node's scheduler did: runs, leases lost and taken over, claim latency,
    jobs held, and when its leases were last renewed."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.runs = Counter(
            "balancectl_scheduler_runs",
            "Runs this node recorded in the history, by job and status",
            ["job", "status"],
            registry=self.registry,
        )
        self.run_seconds = Histogram(
            "balancectl_scheduler_run_seconds",
            "Duration of the runs this node recorded, by job",
            ["job"],
            buckets=RUN_BUCKETS,
            registry=self.registry,
        )
        self.lease_losses = Counter(
            "balancectl_scheduler_lease_losses",
            "Runs of this node that lost their lease (recorded lost, here or by another node)",
            ["job"],
            registry=self.registry,
        )
        self.takeovers = Counter(
            "balancectl_scheduler_takeovers",
            "Claims of this node that took over another run's expired lease",
            ["job"],
            registry=self.registry,
        )
        self.claim_latency = Histogram(
            "balancectl_scheduler_claim_latency_seconds",
            "From when a job became claimable (due, or its lease expired) to its claim",
            buckets=CLAIM_BUCKETS,
            registry=self.registry,
        )
        # Only the supervisor writes these; "live" drops them with its process.
        self.jobs_held = Gauge(
            "balancectl_scheduler_jobs_held",
            "Jobs this node runs now",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.last_renewal = Gauge(
            "balancectl_scheduler_last_renewal_timestamp_seconds",
            "Unix time of this node's last successful lease renewal and heartbeat",
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )

    def claimed(
        self, job: str, started_at: datetime, due_at: datetime | None, took_over: bool
    ) -> None:
        """A claim won: its latency on the database clock, and whether it was a takeover."""
        if due_at is not None:
            self.claim_latency.observe(max(0.0, (started_at - due_at).total_seconds()))
        if took_over:
            self.takeovers.labels(job).inc()

    def recorded(self, job: str, decided: str, written: str | None, seconds: float) -> None:
        """A run ended as ``decided`` by this node; ``written`` is what history holds, if
        this node's record went in (``None``: another node recorded it, or no answer)."""
        if written is not None:
            self.runs.labels(job, written).inc()
            self.run_seconds.labels(job).observe(seconds)
        if "lost" in (decided, written):
            self.lease_losses.labels(job).inc()

    def held(self, count: int) -> None:
        self.jobs_held.set(count)

    def renewed(self) -> None:
        self.last_renewal.set(time.time())
