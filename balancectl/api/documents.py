"""Request and response bodies (msgspec) and their OpenAPI descriptions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from litestar.enums import ParamType
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    Parameter,
    RequestBody,
    Schema,
)

from balancectl.dashboard.documents import DashboardJob, DashboardNode

MAX_AMOUNT = 10**12
INT64_MAX = 2**63 - 1


class BalanceRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``{"amount": <int>}``: below zero debits, above zero credits."""

    amount: int


class BalanceResult(msgspec.Struct):
    userId: int
    balance: int
    amount: int


class UserBalance(msgspec.Struct):
    userId: int
    balance: int


class Problem(msgspec.Struct):
    """RFC 9457 problem details; some problems add members (``balance``, ``amount``, ...)."""

    type: str
    title: str
    status: int
    detail: str


# --- the dashboard's document (``GET /dashboard``) ----------------------------------------

# What history may hold (see migration 0004), and the two states of a claim in progress.
RunStatus = Literal[
    "succeeded", "failed", "lost", "cancelled", "timed_out", "unresponsive", "crashed"
]
TimelineStatus = RunStatus | Literal["running", "expired"]


class TimelineRun(msgspec.Struct):
    """One bar of the timeline: a finished run, or a claim in progress (``finished_at`` null)."""

    job: str
    node: str
    token: int
    started_at: str
    finished_at: str | None
    status: TimelineStatus
    error: str | None


class AuditResult(msgspec.Struct):
    """The newest finished run of the ledger audit."""

    job: str
    status: str
    finished_at: str
    error: str | None


def counted(description: str) -> msgspec.Meta:
    return msgspec.Meta(ge=0, description=description)


class RequestCounts(msgspec.Struct):
    """``POST /users/{userId}/balance`` answers of the last minute, every node's, by outcome."""

    changed: Annotated[int, counted("200: the balance changed")]
    replayed: Annotated[int, counted("The stored answer of an Idempotency-Key already used")]
    refused: Annotated[int, counted("409: insufficient funds or the balance limit")]
    not_found: Annotated[int, counted("404: no such user")]
    invalid: Annotated[int, counted("413, 415, 422: a wrong request, or a reused key")]
    unauthorized: Annotated[int, counted("401: a missing or wrong bearer token")]
    unavailable: Annotated[int, counted("503: no database answer in time")]
    failed: Annotated[int, counted("500 (a bug: see the node's log), or another status")]


class MoneyDocument(msgspec.Struct):
    """The total of the balances against the sum of the ledger (decimal strings, exact)."""

    users: int
    total_balance: str
    ledger_sum: str
    balanced: bool
    audit: AuditResult | None
    requests_last_minute: RequestCounts


class DashboardDocument(msgspec.Struct):
    """Everything the dashboard shows, read in one transaction at the database's ``now``.

    ``token_required``: whether this node's verbs need its API token (the page asks for
    it before it shows the controls); the token itself is never in the document.
    """

    now: str
    served_by: str
    minutes: int
    lease_ttl_seconds: float
    jobs: list[DashboardJob]
    nodes: list[DashboardNode]
    timeline: list[TimelineRun]
    timeline_truncated: bool
    money: MoneyDocument
    token_required: bool


def problem_spec(description: str) -> ResponseSpec:
    return ResponseSpec(
        data_container=Problem,
        description=description,
        media_type="application/problem+json",
        generate_examples=False,  # Litestar's made-up examples would show a status of 578
    )


def problem_specs(descriptions: dict[int, str]) -> dict[int, ResponseSpec]:
    """Problem responses by status, and a 400 in place of Litestar's (another body and type)."""
    specs = {status: problem_spec(text) for status, text in descriptions.items()}
    return {400: problem_spec("Malformed request (slug bad-request)"), **specs}


# The handlers read ``userId`` as text and parse it themselves (so a bad one is a 422 problem,
# not Litestar's 404); the document states what it must be.
USER_ID_SCHEMA: dict[str, Any] = {
    "type": OpenAPIType.INTEGER,
    "format": "int64",
    "minimum": 1,
    "maximum": INT64_MAX,
}
# Job and node names are PostgreSQL text, which cannot hold NUL: such a filter is refused.
NAME_FILTER_SCHEMA: dict[str, Any] = {
    "one_of": None,
    "type": OpenAPIType.STRING,
    "pattern": r"^[^\u0000]*$",
}


AMOUNT_SCHEMA = Schema(
    type=OpenAPIType.INTEGER,
    format="int64",  # type: ignore[arg-type]
    minimum=-MAX_AMOUNT,
    maximum=MAX_AMOUNT,
    schema_not=Schema(const=0),
    description="Minor units; below zero debits, above zero credits; never 0.",
)


@dataclass
class BalanceOperation(Operation):
    """The balance route's OpenAPI operation, with the body the handler decodes itself."""

    def __post_init__(self) -> None:
        body = Schema(
            type=OpenAPIType.OBJECT,
            properties={"amount": AMOUNT_SCHEMA},
            required=["amount"],
            additional_properties=False,
        )
        self.request_body = RequestBody(
            content={"application/json": OpenAPIMediaType(schema=body)}, required=True
        )
        # The handler reads this header itself (cheaper than a header parameter).
        key = Parameter(
            name="Idempotency-Key",
            param_in=ParamType.HEADER,
            required=False,
            description="1 to 255 visible ASCII characters; a repeat replays the first outcome.",
            schema=Schema(
                type=OpenAPIType.STRING, min_length=1, max_length=255, pattern="^[!-~]+$"
            ),
        )
        self.parameters = [*(self.parameters or []), key]
