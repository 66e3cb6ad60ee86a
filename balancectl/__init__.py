"""balancectl: an exact balance service and a masterless cluster scheduler on PostgreSQL."""

from __future__ import annotations

__version__ = "0.1.0"
