"""Request and response bodies (msgspec) and their OpenAPI descriptions."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema

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


class RunDocument(msgspec.Struct):
    id: int
    job: str
    node: str
    token: int
    started_at: str
    finished_at: str
    duration_seconds: float
    status: str
    error: str | None


class JobDocument(msgspec.Struct):
    name: str
    function: str
    interval_seconds: float
    state: str
    node: str | None
    started_at: str | None
    elapsed_seconds: float | None
    next_run_at: str | None
    last_run: RunDocument | None


class JobsDocument(msgspec.Struct):
    now: str
    jobs: list[JobDocument]


class HistoryDocument(msgspec.Struct):
    runs: list[RunDocument]


class NodeDocument(msgspec.Struct):
    id: str
    host: str
    pid: int
    started_at: str
    last_seen_at: str
    alive: bool


class NodesDocument(msgspec.Struct):
    nodes: list[NodeDocument]


def problem_spec(description: str) -> ResponseSpec:
    return ResponseSpec(
        data_container=Problem, description=description, media_type="application/problem+json"
    )


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
