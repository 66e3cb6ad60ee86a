"""Random requests at a real node: never a 5xx, every error a problem, a refusal changes nothing.

Hypothesis makes the requests (any method, known and made-up paths, user ids, query strings,
content types, idempotency keys, extra headers, JSON and non-JSON bodies) and sends each over
a real socket to a ``balancectl serve`` process. After each one the test reads the database:
a request that was not a fresh ``200`` credit or debit left every balance and the ledger as
they were; one that was moved the balance by exactly its amount and wrote one ledger row.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import quote, urlencode, urlsplit

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import sql
from tests.processes import ClusterFactory

PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:balancectl:problem:"
INT64_MAX = 2**63 - 1
MAX_AMOUNT = 10**12


@dataclass(frozen=True)
class Probe:
    """One request exactly as sent: a path already encoded, headers, an optional body."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes | None


@dataclass(frozen=True)
class Reply:
    status: int
    media_type: str
    replayed: bool
    body: bytes


def send(base: str, probe: Probe) -> Reply:
    address = urlsplit(base)
    connection = http.client.HTTPConnection(
        address.hostname or "127.0.0.1", address.port, timeout=30
    )
    try:
        connection.putrequest(probe.method, probe.path, skip_accept_encoding=True)
        for name, value in probe.headers:
            connection.putheader(name, value)
        if probe.body is not None:
            connection.putheader("Content-Length", str(len(probe.body)))
        connection.endheaders(probe.body)
        response = connection.getresponse()
        media_type = (response.getheader("Content-Type") or "").split(";")[0].strip()
        replayed = response.getheader("Idempotent-Replayed") == "true"
        return Reply(response.status, media_type, replayed, response.read())
    finally:
        connection.close()


# --- what to send ------------------------------------------------------------------------


def mostly(
    common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], one_in: int = 4
) -> st.SearchStrategy[Any]:
    """``rare`` once in ``one_in`` draws, else ``common``."""
    return st.integers(1, one_in).flatmap(lambda draw: rare if draw == 1 else common)


# Header values a client can put on the wire: visible ASCII, space, tab and obs-text.
header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
    | st.just("\t"),
    max_size=40,
)
# Headers that frame the message or the connection are the client's own to set.
FRAMING = {"host", "content-length", "transfer-encoding", "connection", "expect", "upgrade", "te"}
header_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,20}\Z").filter(
    lambda name: name.lower() not in FRAMING
)
USER_SEGMENTS = [
    *("1", "2", "01", "0", "-1", "+1", "1.0", "1e3", "abc", "", str(INT64_MAX), str(2**63)),
    *("%00", "%20", "1%2F2", "..", "%E2%80%8B1", "%D9%A1", "1;DROP%20TABLE%20users", "9" * 5000),
]
user_segments = mostly(
    st.sampled_from(USER_SEGMENTS), st.text(max_size=12).map(lambda text: quote(text, safe=""))
)
QUERY_VALUES = [
    *("0", "-1", "1001", "1e3", "abc", "", "\x00", "a\x00b", "' OR 1=1 --", "%", "9" * 5000),
]
queries = st.lists(
    st.tuples(
        mostly(st.sampled_from(["job", "node", "limit"]), st.text(max_size=6)),
        mostly(st.sampled_from(QUERY_VALUES), st.text(max_size=12), 2),
    ),
    max_size=3,
).map(lambda pairs: urlencode(pairs))
OTHER_PATHS = [
    *("/jobs", "/nodes", "/healthz", "/readyz", "/metrics", "/schema/openapi.json", "/"),
    *("//users/1/balance", "/users/1/balance/", "/users//balance", "/users/1/balance?x=1"),
]
paths = st.one_of(
    user_segments.map(lambda user: f"/users/{user}/balance"),
    user_segments.map(lambda user: f"/users/{user}"),
    queries.map(lambda query: f"/jobs/history?{query}"),
    st.sampled_from(OTHER_PATHS),
    st.text(max_size=20).map(lambda text: "/" + quote(text, safe="/")),
)
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-2 * MAX_AMOUNT, 2 * MAX_AMOUNT)
    | st.sampled_from([0, -1, 1, MAX_AMOUNT, -MAX_AMOUNT, MAX_AMOUNT + 1, 2**63, -(2**63) - 1])
    | st.floats(allow_nan=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
bodies = st.one_of(
    st.none(),
    json_values.map(lambda amount: json.dumps({"amount": amount}).encode()),
    st.integers(-20_000, 20_000).map(lambda amount: json.dumps({"amount": amount}).encode()),
    json_values.map(lambda document: json.dumps(document).encode()),
    st.binary(max_size=64),
    st.integers(4000, 4200).map(lambda size: b'{"amount": -1}'.ljust(size)),  # around the limit
)
CONTENT_TYPES = [
    *("application/json", "application/json; charset=utf-8", "application/problem+json"),
    *("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "", "*/*"),
]
content_types = st.sampled_from(CONTENT_TYPES) | header_text
methods = st.sampled_from(["POST", "GET", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
# Well-formed keys (some reused, so replays and reuse with another body happen), or any text.
keys = mostly(
    st.sampled_from(["k-1", "k-2", "k');DROP_TABLE_ledger;--"])
    | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20),
    header_text,
)


def probes_of(
    methods: st.SearchStrategy[str],
    paths: st.SearchStrategy[str],
    content_types: st.SearchStrategy[str],
    bodies: st.SearchStrategy[bytes | None],
) -> st.SearchStrategy[Probe]:
    headers = st.tuples(
        mostly(content_types.map(lambda value: ("Content-Type", value)), st.none(), 8),
        mostly(st.none(), keys.map(lambda value: ("Idempotency-Key", value))),
        mostly(st.none(), keys.map(lambda value: ("Idempotency-Key", value))),  # now and then two
        mostly(st.none(), header_text.map(lambda value: ("Authorization", value))),
        mostly(st.none(), st.tuples(header_names, header_text)),
    )
    return st.builds(
        lambda method, path, headers, body: Probe(
            method, path, tuple(h for h in headers if h is not None), body
        ),
        methods,
        paths,
        headers,
        bodies,
    )


# Mostly the balance route, as a client would call it (where a request can move money),
# then anything at all.
balance_posts = probes_of(
    st.just("POST"),
    mostly(st.sampled_from(["1", "2", "3"]), user_segments).map(
        lambda user: f"/users/{user}/balance"  # 2 holds 0, 3 does not exist
    ),
    mostly(st.just("application/json"), content_types, 8),
    mostly(
        mostly(st.integers(-20_000, 20_000), st.integers(-MAX_AMOUNT, -(10**9))).map(
            lambda amount: json.dumps({"amount": amount}).encode()
        ),
        bodies,
    ),
)
probes = mostly(balance_posts, probes_of(methods, paths, content_types, bodies))


# --- what the database says --------------------------------------------------------------


class Totals(NamedTuple):
    balances: tuple[tuple[int, int], ...]
    ledger_rows: int


def totals(connection: psycopg.Connection[Any]) -> Totals:
    balances = connection.execute("SELECT id, balance FROM users ORDER BY id").fetchall()
    rows = connection.execute("SELECT count(*) FROM ledger").fetchone()
    assert rows is not None
    return Totals(tuple((int(i), int(b)) for i, b in balances), int(rows[0]))


def assert_problem(probe: Probe, reply: Reply) -> None:
    """RFC 9457: the contract's media type and members, the status repeated, no trace."""
    assert reply.media_type == PROBLEM_JSON, (probe, reply)
    document = json.loads(reply.body)
    assert isinstance(document, dict), (probe, reply)
    assert str(document.get("type", "")).startswith(PROBLEM_TYPE_PREFIX), (probe, reply)
    assert document.get("status") == reply.status, (probe, reply)
    for member in ("title", "detail"):
        assert isinstance(document.get(member), str) and document[member], (probe, reply)
    assert b"Traceback" not in reply.body


def assert_effect(probe: Probe, reply: Reply, before: Totals, after: Totals) -> None:
    """Only a fresh 200 from the balance route changes anything, and by exactly its amount."""
    if not (reply.status == 200 and probe.method == "POST" and not reply.replayed):
        assert after == before, (probe, reply)
        return
    document = json.loads(reply.body)
    assert set(document) == {"userId", "balance", "amount"}, (probe, reply)
    changed = dict(before.balances)
    changed[document["userId"]] += document["amount"]
    assert dict(after.balances) == changed, (probe, reply)
    assert document["balance"] == changed[document["userId"]]
    assert after.ledger_rows == before.ledger_rows + 1, (probe, reply)


# --- the node ----------------------------------------------------------------------------


@pytest.fixture
def node_url(cluster_factory: ClusterFactory, database_url: str) -> str:
    sql(database_url, "INSERT INTO users (id, balance) VALUES (2, 0)")
    sql(database_url, "INSERT INTO ledger (user_id, amount, balance_after) VALUES (2, 0, 0)")
    return cluster_factory(1, "--no-scheduler").urls[0]


@pytest.fixture
def connection(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


JSON = (("Content-Type", "application/json"),)
# Each outcome at least once, whatever the draw: a credit, a replay, a reuse, and every refusal.
EXPLICIT = [
    Probe("POST", "/users/1/balance", JSON, b'{"amount": 5}'),
    Probe("POST", "/users/1/balance", (*JSON, ("Idempotency-Key", "k-1")), b'{"amount": -1}'),
    Probe("POST", "/users/1/balance", (*JSON, ("Idempotency-Key", "k-1")), b'{"amount": -1}'),
    Probe("POST", "/users/1/balance", (*JSON, ("Idempotency-Key", "k-1")), b'{"amount": 1}'),
    Probe("POST", "/users/2/balance", JSON, b'{"amount": -1}'),
    Probe("POST", "/users/3/balance", JSON, b'{"amount": 1}'),
    Probe("POST", "/users/1/balance", (("Content-Type", "text/plain"),), b'{"amount": 1}'),
    Probe("POST", "/users/1/balance", JSON, b'{"amount": 1.0}'),
    Probe("POST", "/users/1/balance", JSON, b'{"amount": -1}'.ljust(5000)),
    Probe("GET", f"/users/{'9' * 5000}", (), None),
    Probe("GET", "/jobs/history?job=%00", (), None),
]


def test_random_requests_never_fail_the_server_nor_change_what_they_refuse(
    node_url: str, connection: psycopg.Connection[Any], database_url: str
) -> None:
    statuses: list[int] = []

    def one_request(probe: Probe) -> None:
        before = totals(connection)
        reply = send(node_url, probe)
        statuses.append(reply.status)

        assert reply.status < 500, (probe, reply)
        if reply.status >= 400 and probe.method != "HEAD":
            assert_problem(probe, reply)
        assert_effect(probe, reply, before, totals(connection))

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(probe=probes)
    def any_request(probe: Probe) -> None:
        one_request(probe)

    for probe in EXPLICIT:
        one_request(probe)
    assert statuses == [200, 200, 200, 422, 409, 404, 415, 422, 413, 422, 422]
    any_request()

    ledger = sql(
        database_url,
        "SELECT u.id FROM users u LEFT JOIN ledger l ON l.user_id = u.id"
        " GROUP BY u.id, u.balance HAVING u.balance <> coalesce(sum(l.amount), 0)",
    )
    assert ledger == []  # every balance is still the sum of its ledger
