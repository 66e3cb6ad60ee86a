"""Schemathesis against a real node's own ``/schema/openapi.json``, every check on.

It derives valid and invalid requests from the document (its coverage phase walks every
bound and every type; its fuzzing phase draws at random) and asserts that the node answers
no 5xx, only status codes the document lists, with the media types and bodies it declares,
that it accepts what the schema allows and refuses what it does not. Then, from the run's
HAR record of every exchange, the database must hold exactly the changes of the fresh
``200`` answers: a refused request moved no money.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tests.conftest import sql
from tests.processes import ClusterFactory

MAX_EXAMPLES = 50
# The same Idempotency-Key with another body is 422 ``idempotency-key-reused`` by contract,
# which no schema can express; everything else a valid request may meet is a 404 or a 409.
CONFIG = """
[[operations]]
include-path = "/users/{userId}/balance"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "404", "409", "422"]

# The job routes act on a job that exists (PROBE_JOB), so they are tested past their 404.
[parameters]
name = "probe"
"""
PROBE_JOB = (
    "INSERT INTO jobs (name, function, interval_seconds, min_duration_seconds, next_run_at)"
    " VALUES ('probe', 'balancectl.jobs.builtin:idle', 3600, 0, now())"
)


def run_schemathesis(base_url: str, folder: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    config, har = folder / "schemathesis.toml", folder / "exchanges.har"
    config.write_text(CONFIG)
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config),
        "run", f"{base_url}/schema/openapi.json",
        "--checks", "all",
        "--max-examples", str(MAX_EXAMPLES),
        "--request-timeout", "10",
        "--generation-database", "none",
        "--no-color",
        "--output-sanitize", "false",
        "--report", "har", "--report-har-path", str(har),
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=folder, capture_output=True, text=True, timeout=180, check=False
    )
    return result, har


def fresh_changes(har: Path) -> tuple[Counter[int], Counter[int]]:
    """Per user, how many fresh ``200`` balance changes the node answered, and their sum."""
    entries: list[dict[str, Any]] = json.loads(har.read_text())["log"]["entries"]
    count: Counter[int] = Counter()
    total: Counter[int] = Counter()
    for entry in entries:
        request, response = entry["request"], entry["response"]
        headers = {h["name"].lower(): h["value"] for h in response["headers"]}
        if request["method"] != "POST" or response["status"] != 200:
            continue
        if not request["url"].split("?")[0].endswith("/balance"):
            continue  # an operator's verb on a job
        if headers.get("idempotent-replayed") == "true":
            continue
        document = json.loads(response["content"]["text"])
        count[document["userId"]] += 1
        total[document["userId"]] += document["amount"]
    return count, total


def test_schemathesis_finds_nothing_and_refusals_move_no_money(
    cluster_factory: ClusterFactory, database_url: str, tmp_path: Path
) -> None:
    url = cluster_factory(1, "--no-scheduler").urls[0]
    sql(database_url, PROBE_JOB)

    result, har = run_schemathesis(url, tmp_path)

    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout, result.stdout[-4000:]
    count, total = fresh_changes(har)
    rows = sql(
        database_url,
        "SELECT u.id, u.balance, count(l.id) - 1, coalesce(sum(l.amount), 0)"
        " FROM users u LEFT JOIN ledger l ON l.user_id = u.id GROUP BY u.id ORDER BY u.id",
    )
    assert rows == [(1, 10000 + total[1], count[1], 10000 + total[1])]
    assert set(count) <= {1}  # no other user exists, so no other user was changed
    assert count[1] > 0  # the run did move money, so the comparison above means something
