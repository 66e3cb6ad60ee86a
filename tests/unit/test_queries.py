"""Every SQL statement lives in sql/queries.sql and every name the code asks for is there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from balancectl.sql.loader import all_queries, parse, query

PACKAGE = Path(__file__).resolve().parents[2] / "balancectl"


def test_parse_splits_named_blocks() -> None:
    text = "-- header\n\n-- name: one\nSELECT 1\n\n-- name: two\n-- why\nSELECT 2\n"
    assert parse(text) == {"one": "SELECT 1", "two": "-- why\nSELECT 2"}


def test_every_name_used_in_the_code_exists() -> None:
    used: set[str] = set()
    pattern = re.compile(r"""(?:fetch_one|fetch_all|execute)\(\s*"(\w+)\"""")
    for path in PACKAGE.rglob("*.py"):
        used |= set(pattern.findall(path.read_text()))
    assert used, "the pattern found no query names: the test would prove nothing"
    missing = used - set(all_queries())
    assert not missing


def test_unknown_name_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        query("no_such_query")


def test_no_sql_outside_the_queries_file() -> None:
    statement = re.compile(r"""["'](?:SELECT|UPDATE|INSERT|DELETE)\s""")
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if statement.search(path.read_text())
    ]
    assert offenders == []


def test_every_query_is_used_by_the_code() -> None:
    source = "\n".join(path.read_text() for path in PACKAGE.rglob("*.py"))
    unused = [name for name in all_queries() if f'"{name}"' not in source]
    assert unused == []


def test_each_query_is_called_from_one_module() -> None:
    """A query belongs to its concept's store: its name is written in one module only."""
    sources = {path.relative_to(PACKAGE): path.read_text() for path in PACKAGE.rglob("*.py")}
    callers = {
        name: sorted(str(path) for path, text in sources.items() if f'"{name}"' in text)
        for name in all_queries()
    }
    assert all(callers.values()), "every query is used (see the test above)"
    assert {name: paths for name, paths in callers.items() if len(paths) > 1} == {}
