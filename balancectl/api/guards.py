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
    """When the node has an API token, demand ``Authorization: Bearer <token>`` (constant time)."""
    token: str | None = connection.app.state.api_token
    if token is None:
        return
    given = connection.headers.get("authorization", "")
    expected = f"Bearer {token}"
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("this route needs Authorization: Bearer <token>")
