"""The balance change: one conditional statement, and its idempotent form.

A refusal is an ordinary answer, not a failure: both forms return an ``Outcome`` (the
status and the body the route sends) instead of raising, so a burst's 5,000 refusals
cost no exception handling. Every body is made here, from the outcome's facts, by the
same functions for a live answer and for a replayed one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from balancectl.db import Database, Row, Session
from balancectl.errors import (
    BalancectlError,
    BalanceOverflow,
    IdempotencyKeyReused,
    InsufficientFunds,
    Unavailable,
    UserNotFound,
    problem_document,
)

INT64_MAX = 2**63 - 1
# Conditional attempts before deciding on the locked row. Each retry follows a refusal
# whose snapshot would have covered the change, i.e. the row moved during the statement.
OPTIMISTIC_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a change came to: its HTTP status and body; ``replayed`` for a stored one."""

    status: int
    body: dict[str, Any]
    replayed: bool = False


def accepted(user_id: int, amount: int, balance: int) -> Outcome:
    return Outcome(200, {"userId": user_id, "balance": balance, "amount": amount})


def refused(user_id: int, amount: int, balance: int | None) -> Outcome:
    """The refusal of ``amount`` against ``balance`` (``None``: there is no such user)."""
    return Outcome(*_problem(refusal(user_id, amount, balance)))


def refusal(user_id: int, amount: int, balance: int | None) -> BalancectlError:
    """The domain error that says why ``amount`` cannot apply to ``balance``."""
    if balance is None:
        return UserNotFound(f"user {user_id} does not exist", userId=user_id)
    if amount < 0:
        return InsufficientFunds(
            f"the balance {balance} does not cover a debit of {-amount}",
            balance=balance,
            amount=amount,
        )
    return BalanceOverflow(
        f"a credit of {amount} would take the balance past 2^63-1", balance=balance, amount=amount
    )


def covers(balance: int, amount: int) -> bool:
    """Whether ``amount`` applied to ``balance`` stays within 0..2^63-1."""
    return balance >= -amount and balance <= INT64_MAX - max(amount, 0)


def _problem(error: BalancectlError) -> tuple[int, dict[str, Any]]:
    return error.status, problem_document(error)


async def get_balance(db: Database, user_id: int) -> int:
    row = await db.fetch_one("get_user", {"user_id": user_id})
    if row is None:
        raise UserNotFound(f"user {user_id} does not exist", userId=user_id)
    return int(row["balance"])


async def change_balance(db: Database, user_id: int, amount: int) -> Outcome:
    """Apply ``amount`` at once, or refuse it against a balance that was true during the call.

    The conditional statement takes no lock when it refuses; if its snapshot would have
    covered the change (a concurrent change moved the row), it is tried again, and after
    ``OPTIMISTIC_ATTEMPTS`` the locking form decides on the newest row.
    """
    params = {"user_id": user_id, "amount": amount}
    async with db.session() as session:
        for _ in range(OPTIMISTIC_ATTEMPTS):
            row = await session.fetch_row("change_balance", params)
            if row["balance"] is not None:
                return accepted(user_id, amount, int(row["balance"]))
            if row["seen"] is None or not covers(int(row["seen"]), amount):
                return refused(user_id, amount, _int(row["seen"]))
        return _decided(user_id, amount, await session.fetch_row("change_balance_locked", params))


def _decided(user_id: int, amount: int, row: Row) -> Outcome:
    if row["balance"] is not None:
        return accepted(user_id, amount, int(row["balance"]))
    return refused(user_id, amount, _int(row["seen"]))


async def change_balance_once(db: Database, user_id: int, amount: int, key: str) -> Outcome:
    """Apply the change once per ``key`` in one statement; a repeat gets the first outcome."""
    params = {"user_id": user_id, "amount": amount, "key": key}
    async with db.session() as session:
        row = await session.fetch_row("change_balance_once", params)
        if row["status"] is not None:
            return stored_outcome(user_id, amount, int(row["status"]), row["response"])
        return await _replay(session, key, user_id, amount)


def stored_outcome(user_id: int, amount: int, status: int, facts: dict[str, Any]) -> Outcome:
    """The answer for a key's stored ``status`` and facts (``{"balance": ...}``)."""
    if "status" in facts or "userId" in facts:
        return Outcome(status, dict(facts))  # a whole body, stored before version 0.2
    balance = _int(facts.get("balance"))
    if status == 200 and balance is not None:
        return accepted(user_id, amount, balance)
    return refused(user_id, amount, None if status == 404 else balance)


async def _replay(session: Session, key: str, user_id: int, amount: int) -> Outcome:
    stored = await session.fetch_one("get_idempotency_key", {"key": key})
    if stored is None or stored["status_code"] is None:
        raise Unavailable("the idempotency key is being settled; retry with the same key")
    if (int(stored["user_id"]), int(stored["amount"])) != (user_id, amount):
        raise IdempotencyKeyReused(
            "this Idempotency-Key was first used with another user or amount",
            key=key,
        )
    outcome = stored_outcome(user_id, amount, int(stored["status_code"]), stored["response"])
    return Outcome(outcome.status, outcome.body, replayed=True)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


__all__ = [
    "Outcome",
    "change_balance",
    "change_balance_once",
    "get_balance",
]
