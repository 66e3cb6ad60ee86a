"""Settings: read once by the command line, then passed down. No globals."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from balancectl.errors import ConfigError

# How long history and idempotency keys are kept (the pruning jobs), defined once.
HISTORY_RETENTION = 30 * 24 * 3600.0
IDEMPOTENCY_RETENTION = 24 * 3600.0


# Seconds a new HTTP connection may stay silent before the node closes it: long, because a
# burst's own client is slow to write (balancectl.api.http_limits).
FIRST_BYTE_TIMEOUT = 60.0


@dataclass(frozen=True)
class PoolSettings:
    """The hot-path connection pool: sized by measurement, well inside 100 connections."""

    min_size: int = 2
    # Every request of a burst updates one hot row: fewer connections on it measured
    # faster (docs/benchmarks.md); 5 nodes x (5 + 3 scheduler + 2 jobs) = 50 of 100.
    max_size: int = 5
    # A burst of 10,000 requests queues for the pool: the wait must outlast the queue.
    timeout: float = 30.0
    max_waiting: int = 20000
    prepared_statements: bool = True
    # One statement never takes this long unless the link is cut; then: 503, not a hang.
    # The server enforces it too (statement_timeout), so a cut-off statement ends there.
    statement_timeout: float = 10.0
    # A transaction left idle this long (its node paused, stalled or cut off) is ended by
    # the server, and its row locks with it: nobody waits behind a stalled node for longer.
    idle_in_transaction_timeout: float = 1.0
    # A statement waits this long for a row lock, then fails with nothing applied (a 503).
    # Above the hot row's queue in a 10,000-request burst; below the statement deadline.
    lock_timeout: float = 5.0
    # TCP keepalives and tcp_user_timeout: a link that goes silent is dropped after this.
    link_timeout: float = 5.0


@dataclass(frozen=True)
class SchedulerSettings:
    """The in-process scheduler's timing; every lease decision itself uses the database clock."""

    lease_ttl: float = 15.0
    poll_interval: float = 1.0
    settle: float = 5.0
    enabled: bool = True

    @property
    def starve_after(self) -> float:
        """A due job waiting this long is claimed by any node, whatever the spread.

        Counted on top of the settle delay: jobs are due from the first node's start, so
        a bound no longer than ``settle`` (a short ``--lease-ttl``) would let the first
        node to settle claim every job at once.
        """
        return self.settle + self.lease_ttl

    @property
    def renew_every(self) -> float:
        return self.lease_ttl / 3


@dataclass(frozen=True)
class NodeSettings:
    """Everything ``balancectl serve`` needs to run one node."""

    database_url: str
    node_id: str = "node-1"
    host: str = "127.0.0.1"
    port: int = 8000
    api_token: str | None = None
    insecure: bool = False
    idempotency_retention: float = IDEMPOTENCY_RETENTION
    max_body_bytes: int = 4096
    # HTTP worker processes sharing the node's socket; the node still runs one scheduler.
    workers: int = 1
    # Ask the kernel for an accept queue as long as a burst (net.core.somaxconn caps it).
    backlog: int = 16384
    first_byte_timeout: float = FIRST_BYTE_TIMEOUT
    log_level: str = "INFO"
    pool: PoolSettings = field(default_factory=PoolSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)

    def __post_init__(self) -> None:
        check_database_url(self.database_url)
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.scheduler.lease_ttl <= 0:
            raise ConfigError("--lease-ttl must be a positive number of seconds")
        if not is_loopback(self.host) and not self.api_token and not self.insecure:
            raise ConfigError(
                f"refusing to listen on {self.host} without --api-token (or pass --insecure)"
            )


def check_database_url(url: str) -> None:
    """Refuse anything but a ``postgresql://`` URL, with one clear line."""
    scheme = urlsplit(url).scheme
    if scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"the database URL must start with postgresql:// (got {scheme or url!r})")


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def worker_pool(settings: NodeSettings) -> PoolSettings:
    """This worker's share of the node's request connections (``--pool-size`` is per node).

    A node holds ``pool-size`` request connections however many workers it runs (each
    gets ``ceil(pool-size / workers)``, at least one), so the connection arithmetic of a
    cluster does not grow with the CPU count: docs/operations.md.
    """
    share = max(1, math.ceil(settings.pool.max_size / settings.workers))
    return replace(settings.pool, max_size=share, min_size=min(settings.pool.min_size, share))
