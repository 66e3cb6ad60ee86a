"""Logging for every process of a node: stderr, one line each, named by node (and worker)."""

from __future__ import annotations

import logging
import sys


def configure_logging(name: str, level: str = "INFO") -> None:
    """Logs go to stderr, one line each, prefixed with ``name`` (``node-1`` or ``node-1/w0``)."""
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s",
        force=True,
    )
