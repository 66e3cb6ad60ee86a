"""The balance change: one conditional statement, and its idempotent form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

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


@dataclass(frozen=True)
class BalanceChange:
    """An accepted change: the balance after it."""

    user_id: int
    balance: int
    amount: int

    def document(self) -> dict[str, int]:
        return {"userId": self.user_id, "balance": self.balance, "amount": self.amount}


@dataclass(frozen=True)
class Response:
    """A stored outcome of a keyed request: replayed as it was first answered."""

    status: int
    body: dict[str, Any]
    replayed: bool


async def get_balance(db: Database, user_id: int) -> int:
    row = await db.fetch_one("get_user", {"user_id": user_id})
    if row is None:
        raise UserNotFound(f"user {user_id} does not exist", userId=user_id)
    return int(row["balance"])


async def change_balance(db: Database, user_id: int, amount: int) -> BalanceChange:
    """Apply ``amount`` to the balance at once, or raise the domain error that says why not."""
    async with db.session() as session:
        return await _apply(session, user_id, amount, None)


async def change_balance_once(db: Database, user_id: int, amount: int, key: str) -> Response:
    """Apply the change once per ``key``; a repeat gets the first outcome back."""
    async with db.transaction() as tx:
        claimed = await tx.fetch_one(
            "claim_idempotency_key", {"key": key, "user_id": user_id, "amount": amount}
        )
        if claimed is None:
            return await _replay(tx, key, user_id, amount)
        response = await _respond(tx, user_id, amount, key)
        await tx.execute(
            "store_idempotent_response",
            {"key": key, "status_code": response.status, "response": Jsonb(response.body)},
        )
        return response


async def _apply(session: Session, user_id: int, amount: int, key: str | None) -> BalanceChange:
    row = await session.fetch_one(
        "change_balance", {"user_id": user_id, "amount": amount, "key": key}
    )
    assert row is not None
    return _outcome(user_id, amount, row)


def _outcome(user_id: int, amount: int, row: Row) -> BalanceChange:
    if row["balance"] is not None:
        return BalanceChange(user_id, int(row["balance"]), amount)
    if row["previous"] is None:
        raise UserNotFound(f"user {user_id} does not exist", userId=user_id)
    balance = int(row["previous"])
    if amount < 0:
        raise InsufficientFunds(
            f"the balance {balance} does not cover a debit of {-amount}",
            balance=balance,
            amount=amount,
        )
    raise BalanceOverflow(
        f"a credit of {amount} would take the balance past 2^63-1",
        balance=balance,
        amount=amount,
    )


async def _respond(session: Session, user_id: int, amount: int, key: str) -> Response:
    try:
        change = await _apply(session, user_id, amount, key)
    except (UserNotFound, InsufficientFunds, BalanceOverflow) as error:
        return Response(error.status, problem_document(error), replayed=False)
    return Response(200, change.document(), replayed=False)


async def _replay(session: Session, key: str, user_id: int, amount: int) -> Response:
    stored = await session.fetch_one("get_idempotency_key", {"key": key})
    if stored is None or stored["status_code"] is None:
        raise Unavailable("the idempotency key is being settled; retry with the same key")
    if (int(stored["user_id"]), int(stored["amount"])) != (user_id, amount):
        raise IdempotencyKeyReused(
            "this Idempotency-Key was first used with another user or amount",
            key=key,
        )
    return Response(int(stored["status_code"]), dict(stored["response"]), replayed=True)


__all__ = [
    "BalanceChange",
    "BalancectlError",
    "Response",
    "change_balance",
    "change_balance_once",
    "get_balance",
]
