"""The balance route and the operations routes of one real ``balancectl serve`` process.

Every refusal must be RFC 9457 problem details with the contract's slug and must change
nothing: the balance, the ledger and the stored idempotency keys are read back from the
database after each one. Bad inputs share one node (module scope, its own database);
tests that change balances get a node and a database of their own.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pytest

from balancectl.migrations import head_revision
from tests.conftest import sql
from tests.processes import ApiNode, ClusterFactory

PROBLEM_JSON = "application/problem+json"
INT64_MAX = 2**63 - 1
MAX_AMOUNT = 10**12
BODY_LIMIT = 4096
NO_SCHEDULER = "--no-scheduler"


# --- HTTP with full control over bytes and headers -----------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def media_type(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";")[0].strip()

    def json(self) -> Any:
        return json.loads(self.body)


def send(
    base: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    chunk: int | None = None,
) -> Reply:
    """One request as written: no header is added but Host (and the body's length or chunks)."""
    address = urlsplit(base)
    connection = http.client.HTTPConnection(address.netloc, timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None and chunk is None:
            connection.putheader("Content-Length", str(len(body)))
        if chunk is not None:
            connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        if body is not None:
            connection.send(body if chunk is None else chunked(body, chunk))
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def chunked(body: bytes, size: int) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def post_balance(
    base: str,
    user: object,
    body: bytes,
    content_type: str | None = "application/json",
    headers: Mapping[str, str] | None = None,
) -> Reply:
    all_headers = dict(headers or {})
    if content_type is not None:
        all_headers["Content-Type"] = content_type
    return send(base, "POST", f"/users/{user}/balance", body, all_headers)


def amount_body(amount: int) -> bytes:
    return json.dumps({"amount": amount}).encode()


def assert_problem(reply: Reply, status: int, slug: str) -> dict[str, Any]:
    """An RFC 9457 body of the contract's shape; returns it for further checks."""
    assert reply.status == status, reply.body
    assert reply.media_type == PROBLEM_JSON, reply.headers
    document = reply.json()
    assert document["type"] == f"urn:balancectl:problem:{slug}", document
    assert document["status"] == status
    assert isinstance(document["title"], str) and document["title"]
    assert isinstance(document["detail"], str) and document["detail"]
    assert "Traceback" not in reply.body.decode("utf-8", "replace")
    return dict(document)


# --- what the database says ----------------------------------------------------------------


class State(NamedTuple):
    balances: list[tuple[int, int]]
    ledger_rows: int
    keys: int


def state_of(url: str) -> State:
    rows = sql(url, "SELECT id, balance FROM users ORDER BY id")
    ledger = sql(url, "SELECT count(*) FROM ledger")[0][0]
    keys = sql(url, "SELECT count(*) FROM idempotency_keys")[0][0]
    return State([(int(i), int(b)) for i, b in rows], int(ledger), int(keys))


def balance_of(url: str, user: int) -> int:
    return int(sql(url, "SELECT balance FROM users WHERE id = %s", (user,))[0][0])


def ledger_of(url: str, user: int) -> list[tuple[int, int]]:
    rows = sql(
        url, "SELECT amount, balance_after FROM ledger WHERE user_id = %s ORDER BY id", (user,)
    )
    return [(int(a), int(b)) for a, b in rows]


def add_user(url: str, user: int, balance: int) -> None:
    """A user with its opening ledger entry, as the migration gives user 1."""
    sql(url, "INSERT INTO users (id, balance) VALUES (%s, %s)", (user, balance))
    sql(
        url,
        "INSERT INTO ledger (user_id, amount, balance_after) VALUES (%s, %s, %s)",
        (user, balance, balance),
    )


# --- one shared node for everything that must change nothing ----------------------------------


Node = ApiNode


@pytest.fixture(scope="module")
def node(api_node: ApiNode) -> ApiNode:
    return api_node


@pytest.fixture
def unchanged(node: Node) -> Iterator[None]:
    """Fails the test when it changed a balance, the ledger or the stored keys."""
    before = state_of(node.database_url)
    yield
    assert state_of(node.database_url) == before


J = "application/json"
JSON_CASES = [
    ("float", b'{"amount": 2.0}'),
    ("float-negative", b'{"amount": -2.0}'),
    ("float-fraction", b'{"amount": 2.5}'),
    ("exponent", b'{"amount": 1e3}'),
    ("string", b'{"amount": "2"}'),
    ("string-negative", b'{"amount": "-2"}'),
    ("boolean", b'{"amount": true}'),
    ("null", b'{"amount": null}'),
    ("zero", b'{"amount": 0}'),
    ("negative-zero", b'{"amount": -0}'),
    ("above-max", amount_body(MAX_AMOUNT + 1)),
    ("below-min", amount_body(-(MAX_AMOUNT + 1))),
    ("2^63", amount_body(2**63)),
    ("-2^63-1", amount_body(-(2**63) - 1)),
    ("2^64", amount_body(2**64)),
    ("missing-field", b"{}"),
    ("unknown-field", b'{"amount": -2, "x": 1}'),
    ("misspelt-field", b'{"Amount": -2}'),
    ("malformed", b'{"amount":'),
    ("trailing-garbage", b'{"amount": -2} x'),
    ("empty-body", b""),
    ("array", b'[{"amount": -2}]'),
    ("bare-number", b"-2"),
    ("not-utf8-key", b'{"amount": -2, "\xff": 1}'),
    ("not-utf8-value", b'{"amount": "\xff"}'),
]


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("body", [c[1] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES])
def test_bad_body_is_refused_and_changes_nothing(node: Node, body: bytes) -> None:
    assert_problem(post_balance(node.url, 1, body), 422, "invalid-request")


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_body_that_is_not_json_is_415(node: Node, content_type: str | None) -> None:
    reply = post_balance(node.url, 1, b'{"amount": -2}', content_type=content_type)

    assert_problem(reply, 415, "unsupported-media-type")


@pytest.mark.usefixtures("unchanged")
def test_json_with_charset_is_json(node: Node) -> None:
    reply = post_balance(
        node.url, 1, b'{"amount": 0}', content_type="application/json; charset=utf-8"
    )

    assert_problem(reply, 422, "invalid-request")  # parsed as JSON: refused for the 0, not 415


@pytest.mark.usefixtures("unchanged")
def test_body_over_the_limit_is_413(node: Node) -> None:
    body = b'{"amount": -2}'.ljust(BODY_LIMIT + 1)  # valid JSON: only its size is wrong

    assert_problem(post_balance(node.url, 1, body), 413, "payload-too-large")


@pytest.mark.usefixtures("unchanged")
def test_chunked_body_over_the_limit_is_413(node: Node) -> None:
    body = b'{"amount": -2}'.ljust(3 * BODY_LIMIT)
    reply = send(node.url, "POST", "/users/1/balance", body, {"Content-Type": J}, chunk=1000)

    assert_problem(reply, 413, "payload-too-large")


BAD_USER_IDS = {
    "zero": "0",
    "negative": "-1",
    "letters": "abc",
    "2^63": str(2**63),
    "2^64": str(2**64),
    "5000-digits": "9" * 5000,
    "fraction": "1.5",
    "exponent": "1e3",
    "plus-sign": "+1",
    "arabic-digit": "%D9%A3",
    "space": "%20",
}


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("user", BAD_USER_IDS.values(), ids=list(BAD_USER_IDS))
def test_user_id_that_is_not_a_positive_int64_is_422(node: Node, user: str) -> None:
    assert_problem(post_balance(node.url, user, b'{"amount": -2}'), 422, "invalid-request")
    assert_problem(send(node.url, "GET", f"/users/{user}"), 422, "invalid-request")


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("user", [999, INT64_MAX])
def test_unknown_user_is_404(node: Node, user: int) -> None:
    for amount in (-2, 2):
        problem = assert_problem(
            post_balance(node.url, user, amount_body(amount)), 404, "user-not-found"
        )
        assert problem["userId"] == user
    assert_problem(send(node.url, "GET", f"/users/{user}"), 404, "user-not-found")


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "key",
    ["k" * 256, "two words", "", "caf\xe9", "tab\there"],
    ids=["256-chars", "space", "empty", "non-ascii", "tab"],
)
def test_invalid_idempotency_key_is_422(node: Node, key: str) -> None:
    reply = post_balance(node.url, 1, b'{"amount": -2}', headers={"Idempotency-Key": key})

    assert_problem(reply, 422, "invalid-request")


@pytest.mark.usefixtures("unchanged")
def test_keyed_invalid_request_stores_no_key(node: Node) -> None:
    headers = {"Idempotency-Key": "refused-first"}

    assert_problem(
        post_balance(node.url, 1, b'{"amount": 0}', headers=headers), 422, "invalid-request"
    )
    assert sql(node.database_url, "SELECT count(*) FROM idempotency_keys") == [(0,)]


@pytest.mark.usefixtures("unchanged")
def test_get_user(node: Node) -> None:
    reply = send(node.url, "GET", "/users/1")

    assert reply.status == 200
    assert reply.media_type == J
    assert reply.json() == {"userId": 1, "balance": 10000}


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("method", "path", "status", "slug"),
    [
        ("GET", "/nope", 404, "not-found"),
        ("POST", "/users/1/balances", 404, "not-found"),
        ("DELETE", "/users/1/balance", 405, "method-not-allowed"),
        ("PUT", "/users/1", 405, "method-not-allowed"),
    ],
)
def test_unknown_route_or_method_is_a_problem(
    node: Node, method: str, path: str, status: int, slug: str
) -> None:
    assert_problem(send(node.url, method, path, b"{}", {"Content-Type": J}), status, slug)


def test_healthz(node: Node) -> None:
    reply = send(node.url, "GET", "/healthz")

    assert reply.status == 200
    assert reply.json() == {"status": "ok"}


def test_readyz_reports_the_head_revision(node: Node) -> None:
    reply = send(node.url, "GET", "/readyz")

    assert reply.status == 200
    assert reply.json() == {"status": "ready", "revision": head_revision()}


def test_metrics_count_requests_by_route_template(node: Node) -> None:
    post_balance(node.url, 31337, b'{"amount": 0}')
    reply = send(node.url, "GET", "/metrics")

    assert reply.status == 200
    assert reply.media_type == "text/plain"
    text = reply.body.decode()
    assert "# TYPE balancectl_http_requests_total counter" in text
    counted = (
        'balancectl_http_requests_total{method="POST",route="/users/{userId}/balance",status="422"}'
    )
    assert counted in text
    assert "31337" not in text  # labelled by template, not by path: bounded cardinality
    assert metric_value(text, 'balancectl_db_pool_connections{state="open"}') >= 1


def metric_value(text: str, series: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(series + " ")]
    assert len(lines) == 1, f"{series} not exactly once in /metrics"
    return float(lines[0].split()[-1])


def test_openapi_documents_the_routes_and_the_409(node: Node) -> None:
    reply = send(node.url, "GET", "/schema/openapi.json")

    assert reply.status == 200
    paths = reply.json()["paths"]
    for path in (
        "/users/{userId}/balance",
        "/users/{userId}",
        "/jobs",
        "/jobs/history",
        "/nodes",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
    responses = paths["/users/{userId}/balance"]["post"]["responses"]
    assert {"200", "404", "409", "422", "503"} <= set(responses)
    assert PROBLEM_JSON in responses["409"]["content"]
    body = paths["/users/{userId}/balance"]["post"]["requestBody"]["content"][J]["schema"]
    assert body["required"] == ["amount"]
    assert body["additionalProperties"] is False


# --- tests that change balances: a node and a database each ----------------------------------


@pytest.fixture
def one_node(cluster_factory: ClusterFactory, database_url: str) -> Node:
    return Node(cluster_factory(1, NO_SCHEDULER).urls[0], database_url)


def test_debit_then_credit(one_node: Node) -> None:
    debit = post_balance(one_node.url, 1, b'{"amount": -2}')
    assert (debit.status, debit.media_type) == (200, J)
    assert debit.json() == {"userId": 1, "balance": 9998, "amount": -2}
    assert send(one_node.url, "GET", "/users/1").json() == {"userId": 1, "balance": 9998}

    credit = post_balance(one_node.url, 1, b'{"amount": 5}')
    assert credit.status == 200
    assert credit.json() == {"userId": 1, "balance": 10003, "amount": 5}

    assert balance_of(one_node.database_url, 1) == 10003
    assert ledger_of(one_node.database_url, 1) == [(10000, 10000), (-2, 9998), (5, 10003)]


def test_body_at_the_limit_is_accepted(one_node: Node) -> None:
    body = b'{"amount": -2}'.ljust(BODY_LIMIT)

    reply = post_balance(one_node.url, 1, body)

    assert reply.status == 200, reply.body
    assert balance_of(one_node.database_url, 1) == 9998


def test_insufficient_funds_changes_nothing(one_node: Node) -> None:
    problem = assert_problem(
        post_balance(one_node.url, 1, amount_body(-10001)), 409, "insufficient-funds"
    )
    assert problem["title"] == "Insufficient funds"
    assert (problem["balance"], problem["amount"]) == (10000, -10001)
    assert state_of(one_node.database_url) == State([(1, 10000)], 1, 0)

    assert post_balance(one_node.url, 1, amount_body(-10000)).json()["balance"] == 0
    problem = assert_problem(
        post_balance(one_node.url, 1, amount_body(-1)), 409, "insufficient-funds"
    )
    assert (problem["balance"], problem["amount"]) == (0, -1)
    assert ledger_of(one_node.database_url, 1) == [(10000, 10000), (-10000, 0)]


def test_credit_past_int64_is_refused(one_node: Node) -> None:
    add_user(one_node.database_url, 7, INT64_MAX - 10)
    before = state_of(one_node.database_url)

    problem = assert_problem(
        post_balance(one_node.url, 7, amount_body(100)), 409, "balance-overflow"
    )
    assert (problem["balance"], problem["amount"]) == (INT64_MAX - 10, 100)
    assert state_of(one_node.database_url) == before

    assert post_balance(one_node.url, 7, amount_body(10)).json() == {
        "userId": 7,
        "balance": INT64_MAX,
        "amount": 10,
    }
    assert_problem(post_balance(one_node.url, 7, amount_body(1)), 409, "balance-overflow")
    assert post_balance(one_node.url, 7, amount_body(-MAX_AMOUNT)).status == 200
    assert balance_of(one_node.database_url, 7) == INT64_MAX - MAX_AMOUNT
    assert sql(one_node.database_url, "SELECT sum(amount) FROM ledger WHERE user_id = 7") == [
        (INT64_MAX - MAX_AMOUNT,)
    ]


def test_readyz_is_503_when_the_schema_is_not_at_head(one_node: Node) -> None:
    sql(one_node.database_url, "UPDATE alembic_version SET version_num = '0002'")

    problem = assert_problem(send(one_node.url, "GET", "/readyz"), 503, "unavailable")
    assert send(one_node.url, "GET", "/healthz").status == 200  # alive, just not ready
    assert "0002" in problem["detail"]


# --- idempotency ---------------------------------------------------------------------------


def test_repeat_with_the_same_key_replays(one_node: Node) -> None:
    key = {"Idempotency-Key": "order-17"}
    first = post_balance(one_node.url, 1, b'{"amount": -3}', headers=key)
    again = post_balance(one_node.url, 1, b'{"amount": -3}', headers=key)

    assert first.status == again.status == 200
    assert first.headers.get("Idempotent-Replayed") is None
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert first.json() == again.json() == {"userId": 1, "balance": 9997, "amount": -3}
    assert balance_of(one_node.database_url, 1) == 9997
    rows = sql(
        one_node.database_url, "SELECT amount FROM ledger WHERE idempotency_key = 'order-17'"
    )
    assert rows == [(-3,)]


def test_refusal_is_replayed_too(one_node: Node) -> None:
    key = {"Idempotency-Key": "too-much"}
    first = post_balance(one_node.url, 1, amount_body(-20000), headers=key)
    post_balance(one_node.url, 1, amount_body(15000))  # now it would be covered
    again = post_balance(one_node.url, 1, amount_body(-20000), headers=key)

    assert_problem(first, 409, "insufficient-funds")
    assert_problem(again, 409, "insufficient-funds")
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == first.json()
    assert balance_of(one_node.database_url, 1) == 25000


def test_same_key_with_another_body_or_user_is_422(one_node: Node) -> None:
    key = {"Idempotency-Key": "once"}
    assert post_balance(one_node.url, 1, b'{"amount": -2}', headers=key).status == 200
    add_user(one_node.database_url, 2, 50)
    before = state_of(one_node.database_url)

    other_amount = post_balance(one_node.url, 1, b'{"amount": -4}', headers=key)
    other_user = post_balance(one_node.url, 2, b'{"amount": -2}', headers=key)

    assert_problem(other_amount, 422, "idempotency-key-reused")
    assert_problem(other_user, 422, "idempotency-key-reused")
    assert state_of(one_node.database_url) == before


def test_same_key_at_the_same_moment_applies_once(one_node: Node) -> None:
    senders = 20
    barrier = threading.Barrier(senders)
    key = {"Idempotency-Key": "burst-key"}

    def fire(_: int) -> Reply:
        barrier.wait()
        return post_balance(one_node.url, 1, b'{"amount": -7}', headers=key)

    with ThreadPoolExecutor(senders) as pool:
        replies = list(pool.map(fire, range(senders)))

    assert [r.status for r in replies] == [200] * senders
    assert {json.dumps(r.json(), sort_keys=True) for r in replies} == {
        json.dumps({"amount": -7, "balance": 9993, "userId": 1}, sort_keys=True)
    }
    fresh = [r for r in replies if r.headers.get("Idempotent-Replayed") != "true"]
    assert len(fresh) == 1
    assert balance_of(one_node.database_url, 1) == 9993
    assert ledger_of(one_node.database_url, 1) == [(10000, 10000), (-7, 9993)]


# --- the API token ---------------------------------------------------------------------------


def test_api_token_guards_mutations_only(
    cluster_factory: ClusterFactory, database_url: str
) -> None:
    url = cluster_factory(1, NO_SCHEDULER, "--api-token", "secret").urls[0]
    body = b'{"amount": -2}'

    refused = ["", "Bearer wrong", "secret", "Bearer secret2", "Basic secret", "bearer  secret"]
    for authorization in refused:
        headers = {"Authorization": authorization} if authorization else {}
        assert_problem(post_balance(url, 1, body, headers=headers), 401, "unauthorized")
    assert state_of(database_url) == State([(1, 10000)], 1, 0)

    reply = post_balance(url, 1, body, headers={"Authorization": "Bearer secret"})
    assert reply.status == 200
    assert reply.json() == {"userId": 1, "balance": 9998, "amount": -2}
    assert send(url, "GET", "/users/1").json() == {"userId": 1, "balance": 9998}
    assert send(url, "GET", "/readyz").status == 200
