"""The live web dashboard: its document (read from the database alone) and its static page."""

from __future__ import annotations

from balancectl.dashboard.assets import asset
from balancectl.dashboard.state import AUDIT_FUNCTION, TIMELINE_LIMIT, dashboard_document

__all__ = ["AUDIT_FUNCTION", "TIMELINE_LIMIT", "asset", "dashboard_document"]
