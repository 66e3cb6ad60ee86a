"""Every SQL statement, loaded by name from ``sql/queries.sql``."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """Split a queries file into ``{name: statement}`` at each ``-- name:`` line."""
    parts = _NAME.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


@cache
def all_queries() -> dict[str, str]:
    """The shipped queries, read once."""
    text = resources.files("balancectl.sql").joinpath("queries.sql").read_text("utf-8")
    return parse(text)


def query(name: str) -> str:
    """The statement called ``name``; a ``KeyError`` names an unknown one."""
    return all_queries()[name]
