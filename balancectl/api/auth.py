"""The bearer-token guard on mutating routes."""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from balancectl.errors import Unauthorized


async def require_token(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """The guard form of ``check_token``, for routes off the hot path."""
    given = connection.headers.get("authorization")
    check_token(connection.app.state.api_token, None if given is None else given.encode())


def check_token(token: str | None, given: bytes | None) -> None:
    """When the node has an API token, demand ``Authorization: Bearer <token>`` (constant time).

    Whitespace around the header's value is not part of it (RFC 9110, 5.5); the server's
    parser may or may not have stripped it (uvicorn strips it from 0.55 on).
    """
    if token is None:
        return
    expected = f"Bearer {token}".encode()
    if not hmac.compare_digest((given or b"").strip(b" \t"), expected):
        raise Unauthorized("this route needs Authorization: Bearer <token>")
