"""The node's HTTP API (Litestar)."""

from __future__ import annotations

from balancectl.api.app import create_app

__all__ = ["create_app"]
