"""Domain errors: raised by the core, mapped to problem details in ``api.problems`` only."""

from __future__ import annotations


class BalancectlError(Exception):
    """Base of every domain error; ``slug`` names its problem type."""

    slug = "error"
    status = 500
    title = "Error"

    def __init__(self, detail: str, **extensions: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extensions = extensions


class InvalidRequest(BalancectlError):
    slug, status, title = "invalid-request", 422, "Invalid request"


class UserNotFound(BalancectlError):
    slug, status, title = "user-not-found", 404, "User not found"


class InsufficientFunds(BalancectlError):
    slug, status, title = "insufficient-funds", 409, "Insufficient funds"


class BalanceOverflow(BalancectlError):
    slug, status, title = "balance-overflow", 409, "Balance limit exceeded"


class IdempotencyKeyReused(BalancectlError):
    slug, status, title = "idempotency-key-reused", 422, "Idempotency key reused"


class JobNotFound(BalancectlError):
    slug, status, title = "job-not-found", 404, "Job not found"


class JobPaused(BalancectlError):
    slug, status, title = "job-paused", 409, "Job paused"


class Unavailable(BalancectlError):
    slug, status, title = "unavailable", 503, "Service unavailable"


class Unauthorized(BalancectlError):
    slug, status, title = "unauthorized", 401, "Unauthorized"


class ConfigError(Exception):
    """Bad usage or configuration: the command line exits with status 2 and this message."""


PROBLEM_TYPE_PREFIX = "urn:balancectl:problem:"


def problem_type(slug: str) -> str:
    """The ``type`` URI of a problem: ``urn:balancectl:problem:<slug>``."""
    return PROBLEM_TYPE_PREFIX + slug


def problem_document(error: BalancectlError) -> dict[str, object]:
    """The RFC 9457 body of a domain error (the same for live and replayed responses)."""
    return {
        "type": problem_type(error.slug),
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        **error.extensions,
    }
