"""SQL injection: every statement is parameterized, and inputs that look like SQL stay data.

Two ways. By reading the code: ``sql/queries.sql`` holds the only statements, with named
``%(name)s`` placeholders only, and no Python code (package or migrations) builds SQL by
f-string, ``%`` or ``str.format``. By attacking a real node: user ids, idempotency keys,
amounts and job filters that would break a concatenated statement are refused (422) or
matched literally (an empty history, a key stored as sent), and every table is intact.
"""

from __future__ import annotations

import ast
import http.client
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import pytest

from balancectl.sql.loader import all_queries
from tests.conftest import sql
from tests.processes import ClusterFactory

ROOT = Path(__file__).resolve().parents[2]
PROBLEM_JSON = "application/problem+json"
SQL_WORDS = re.compile(
    r"\b(SELECT|INSERT\s+INTO|UPDATE|DELETE\s+FROM|CREATE|DROP|ALTER|TRUNCATE|WHERE|VALUES)\b"
)
TABLES = ["users", "ledger", "idempotency_keys", "jobs", "job_runs", "nodes", "balance_snapshots"]


# --- the code ------------------------------------------------------------------------------


def test_queries_use_named_placeholders_only() -> None:
    queries = all_queries()

    assert len(queries) > 10
    for name, statement in queries.items():
        assert re.findall(r"%(?!\(\w+\)s)", statement) == [], name  # no %s, %d, %%
        assert "{" not in statement, name  # no str.format fields


def formatted_strings(tree: ast.AST) -> list[tuple[int, str, str]]:
    """Every f-string, ``"..." % x`` and ``"...".format(x)``: (line, kind, literal text)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = [v.value for v in node.values if isinstance(v, ast.Constant)]
            found.append((node.lineno, "f-string", "".join(map(str, parts))))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
            if isinstance(node.left, ast.Constant) and isinstance(node.left.value, str):
                found.append((node.lineno, "%", node.left.value))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            receiver = node.func.value
            if node.func.attr == "format" and isinstance(receiver, ast.Constant):
                found.append((node.lineno, ".format", str(receiver.value)))
    return found


def test_no_python_code_formats_values_into_sql() -> None:
    sources = sorted((ROOT / "balancectl").rglob("*.py")) + sorted((ROOT / "alembic").rglob("*.py"))
    offenders = [
        f"{path.relative_to(ROOT)}:{line} {kind} {text[:60]!r}"
        for path in sources
        for line, kind, text in formatted_strings(ast.parse(path.read_text("utf-8")))
        if SQL_WORDS.search(text)
    ]

    assert len(sources) > 20
    assert offenders == []


def test_the_scan_would_see_formatted_sql() -> None:
    code = 'a = f"SELECT * FROM users WHERE id = {x}"\nb = "DELETE FROM t WHERE k = %s" % k\n'
    code += 'c = "UPDATE users SET balance = {}".format(v)\nd = f"no {sql} words here"\n'
    found = [kind for _, kind, text in formatted_strings(ast.parse(code)) if SQL_WORDS.search(text)]

    assert found == ["f-string", "%", ".format"]


# --- a node under attack -------------------------------------------------------------------


def call(
    base: str, method: str, path: str, body: bytes | None = None, key: str | None = None
) -> tuple[int, str, Any]:
    address = urlsplit(base)
    connection = http.client.HTTPConnection(
        address.hostname or "127.0.0.1", address.port, timeout=10
    )
    try:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        media_type = (response.getheader("Content-Type") or "").split(";")[0]
        return response.status, media_type, json.loads(response.read())
    finally:
        connection.close()


def table_counts(database_url: str) -> dict[str, int]:
    return {
        table: int(sql(database_url, f"SELECT count(*) FROM {table}")[0][0]) for table in TABLES
    }


def add_history(database_url: str) -> None:
    """A job and one finished run, so that a filter turned into ``OR 1=1`` would show it."""
    sql(
        database_url,
        "INSERT INTO jobs (name, function, interval_seconds, min_duration_seconds, next_run_at)"
        " VALUES ('audit', 'x:y', 60, 0, now())",
    )
    sql(
        database_url,
        "INSERT INTO job_runs (job, node, token, started_at, finished_at, status)"
        " VALUES ('audit', 'node-1', 1, now() - interval '1 minute', now(), 'succeeded')",
    )


USER_IDS = ["1;DROP TABLE users", "1 OR 1=1", "1' OR '1'='1", "1--", "1/**/OR/**/1=1", "(SELECT 1)"]
FILTERS = ["' OR 1=1 --", "audit' --", "audit'; DROP TABLE job_runs; --", "%", "_udit", "\\"]


@pytest.fixture
def url(cluster_factory: ClusterFactory, database_url: str) -> str:
    """An API-only node on the test's database, which holds a job and a finished run."""
    add_history(database_url)
    return cluster_factory(1, "--no-scheduler").urls[0]


def test_sql_looking_inputs_are_refused_or_taken_literally(url: str, database_url: str) -> None:
    before = table_counts(database_url)

    for user in USER_IDS:
        segment = quote(user, safe="")  # an encoded "/" is decoded before routing: no route, 404
        for method, path in [("GET", f"/users/{segment}"), ("POST", f"/users/{segment}/balance")]:
            status, media_type, _ = call(url, method, path, b'{"amount": 1}')
            assert (status in (404, 422), media_type) == (True, PROBLEM_JSON), (path, status)
    for amount in ['"1; DROP TABLE users"', '"1 OR 1=1"', "1; DROP TABLE users"]:
        body = b'{"amount": ' + amount.encode() + b"}"
        assert call(url, "POST", "/users/1/balance", body)[0] == 422, amount
    assert call(url, "POST", "/users/1/balance", b'{"amount": 1}', key="k' OR '1'='1")[0] == 422
    for query in [{"limit": "1; DROP TABLE job_runs"}, {"limit": "1 OR 1=1"}]:
        assert call(url, "GET", f"/jobs/history?{urlencode(query)}")[0] == 422, query
    for text in FILTERS:
        for name in ("job", "node"):
            status, _, document = call(url, "GET", f"/jobs/history?{urlencode({name: text})}")
            assert (status, document) == (200, {"runs": []}), (name, text)

    assert table_counts(database_url) == before  # nothing dropped, nothing written
    assert len(call(url, "GET", "/jobs/history?job=audit")[2]["runs"]) == 1  # the filter works


def test_a_key_that_looks_like_sql_is_stored_as_sent(url: str, database_url: str) -> None:
    key = "k');DROP/**/TABLE/**/ledger;--'\"\\"

    first = call(url, "POST", "/users/1/balance", b'{"amount": -2}', key=key)
    again = call(url, "POST", "/users/1/balance", b'{"amount": -2}', key=key)

    assert first[0] == again[0] == 200
    assert first[2] == again[2] == {"userId": 1, "balance": 9998, "amount": -2}
    assert sql(database_url, "SELECT key FROM idempotency_keys") == [(key,)]
    assert sql(database_url, "SELECT amount, idempotency_key FROM ledger ORDER BY id") == [
        (10000, None),
        (-2, key),
    ]
