"""``POST /users/{userId}/balance`` and ``GET /users/{userId}``."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.params import Parameter

from balancectl import balance
from balancectl.api.auth import check_token
from balancectl.api.documents import (
    INT64_MAX,
    MAX_AMOUNT,
    USER_ID_SCHEMA,
    BalanceOperation,
    BalanceRequest,
    BalanceResult,
    UserBalance,
    problem_specs,
)
from balancectl.api.problems import problem_response
from balancectl.db import Database
from balancectl.errors import BalancectlError, InvalidRequest
from balancectl.outcomes import OutcomeCounts, outcome_of

ROUTE = "/users/{userId:str}/balance"
UserId = Annotated[
    str, Parameter(description="A positive 64-bit integer", schema_extra=USER_ID_SCHEMA)
]


def parse_user_id(raw: str) -> int:
    """A positive 64-bit integer written in plain ASCII digits."""
    digits = raw.lstrip("0")
    # Length before int(): more than 4300 digits would raise ValueError (a 500), not refuse.
    if not (raw.isascii() and raw.isdigit() and 0 < len(digits) <= 19 and int(digits) <= INT64_MAX):
        raise InvalidRequest(f"userId must be a positive 64-bit integer, not {raw[:40]!r}")
    return int(digits)


def parse_amount(body: bytes) -> int:
    """The ``amount`` of a JSON body: an integer, ``0 < |amount| <= 10^12``; nothing is coerced.

    A member name may appear once (I-JSON, RFC 7493): msgspec lets the last of two win,
    while a proxy or a validator in front may read the first.
    """
    try:
        amount = msgspec.json.decode(body, type=BalanceRequest).amount
    except msgspec.ValidationError as error:
        raise InvalidRequest(f"invalid body: {error}") from error
    except (msgspec.DecodeError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"the body is not valid JSON: {error}") from error
    refuse_repeated_names(body)
    if amount == 0 or abs(amount) > MAX_AMOUNT:
        raise InvalidRequest(f"amount must be a non-zero integer within ±10^12, not {amount}")
    return amount


BACKSLASH = ord("\\")  # an int: `in` is a memchr (a bytes needle costs four times more)


def refuse_repeated_names(body: bytes) -> None:
    """Refuse a body that names a member twice; a body msgspec accepted is the input.

    Such a body has only ``amount`` as a member (unknown fields are refused), so a repeat
    shows as a second ``"amount"`` or as an escape (``"am\\u006funt"``); only then is the
    body parsed again, with the standard library, to be sure. The hot path pays two scans
    of a small body (docs/reliability.md has the figures).
    """
    if body.count(b'"amount"') < 2 and BACKSLASH not in body:
        return
    try:
        json.loads(body, object_pairs_hook=unique_members)
    except RepeatedName as error:
        raise InvalidRequest(f"the body names {error} more than once (RFC 7493)") from error
    except ValueError as error:  # the two parsers disagree: refuse rather than pick one
        raise InvalidRequest(f"the body is not valid I-JSON: {error}") from error


class RepeatedName(ValueError):
    """A JSON object named one member twice."""


def unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise RepeatedName(repr(name))
        seen.add(name)
    return dict(pairs)


def parse_key(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not 1 <= len(raw) <= 255 or not all("!" <= c <= "~" for c in raw):
        raise InvalidRequest("Idempotency-Key must be 1 to 255 visible ASCII characters")
    return raw


def require_json(content_type: bytes | None) -> None:
    """Refuse a body that does not say it is JSON (``application/json`` or ``*+json``)."""
    media_type = (decoded(content_type) or "").partition(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise HTTPException(
            status_code=415, detail=f"the body must be application/json, not {media_type!r}"
        )


async def change_for(
    state: State, raw_user: str, headers: dict[bytes, bytes], body: Callable[[], Awaitable[bytes]]
) -> balance.Outcome:
    """The route's work, the same on both of its entries (Litestar's handler below and the
    fast lane, ``api.balance_lane``): check the request in the order the API documents,
    read its body, change the balance. A request the route refuses raises the error
    its problem document is made from."""
    check_token(state["api_token"], headers.get(b"authorization"))
    require_json(headers.get(b"content-type"))
    uid, key = parse_user_id(raw_user), parse_key(decoded(headers.get(b"idempotency-key")))
    amount = parse_amount(await body())
    db: Database = state["db"]
    if key is None:
        return await balance.change_balance(db, uid, amount)
    return await balance.change_balance_once(db, uid, amount, key)


@post(
    ROUTE,
    operation_class=BalanceOperation,
    status_code=200,
    responses=problem_specs(
        {
            401: "Missing or wrong bearer token, when the node has one (slug unauthorized)",
            404: "No such user (slug user-not-found)",
            409: "Insufficient funds, or the balance limit (nothing changed)",
            413: "The body is over the size limit (slug payload-too-large)",
            415: "The body is not JSON (slug unsupported-media-type)",
            422: "Invalid request or reused Idempotency-Key",
            503: "No database answer in time; `outcome` says whether it may have applied",
        }
    ),
    summary="Change a user's balance at once",
)
async def change_balance(
    request: Request[Any, Any, Any], userId: UserId
) -> Response[BalanceResult]:
    """Debit (amount < 0) or credit (amount > 0); the balance never goes below zero.

    A node answers this route's canonical path in its fast lane (``api.balance_lane``),
    before Litestar's router; this handler answers the spelling only the router matches
    (``/users/1/balance/``) and documents the route in OpenAPI.
    Both call ``change_for``. The handler reads its headers itself: a Litestar guard
    copies the handler and a header parameter builds a ``Headers`` per request.
    """
    # Subscripted: a State attribute costs 0.5 µs (a failed lookup first), an item 0.06 µs.
    counts: OutcomeCounts = request.app.state["outcomes"]
    try:
        headers = wanted_headers(request.scope["headers"])
        outcome = await change_for(request.app.state, userId, headers, request.body)
    except Exception as error:  # counted, then answered by the exception handlers
        counts.count(outcome_of(status_of(error)))
        raise
    counts.count(outcome_of(outcome.status, outcome.replayed))
    return answer(outcome)


def status_of(error: Exception) -> int:
    """The status the exception handlers (``api.problems``) answer ``error`` with."""
    if isinstance(error, BalancectlError):
        return error.status
    if isinstance(error, HTTPException):
        return error.status_code
    return 500


WANTED = frozenset({b"authorization", b"content-length", b"content-type", b"idempotency-key"})


def wanted_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """The headers the route reads, from the ASGI scope (names arrive lower-case)."""
    return {name: value for name, value in raw if name in WANTED}


def decoded(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def answer(outcome: balance.Outcome) -> Response[Any]:
    """The outcome as sent: a refusal is a problem document returned, not an exception raised."""
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
    if outcome.status != 200:
        return problem_response(outcome.body, headers=headers)
    return Response(outcome.body, status_code=200, headers=headers)


@get(
    "/users/{userId:str}",
    responses=problem_specs(
        {
            404: "No such user (slug user-not-found)",
            422: "Invalid userId (slug invalid-request)",
            503: "The database could not be reached in time",
        }
    ),
    summary="A user's balance",
)
async def get_user(db: NamedDependency[Database], userId: UserId) -> UserBalance:
    uid = parse_user_id(userId)
    return UserBalance(userId=uid, balance=await balance.get_balance(db, uid))
