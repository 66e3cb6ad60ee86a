"""Oversized bodies, slow and half-open clients, idle connections: one node's limits.

- A body over the limit (4096 bytes) is refused with a 413 problem as soon as its size is
  known, without the node waiting for the rest: a declared ``Content-Length`` of 10 MB with
  a few bytes sent, and a chunked body that passes the limit before it ends.
- Hundreds of clients that connect and say nothing, trickle headers, or trickle a body do
  not stop the node answering everyone else; their latency is measured beside a baseline
  (printed with ``-s``; a bound of seconds is asserted, as a liveness check, not a speed).
- An idle keep-alive connection is closed after uvicorn's ``timeout_keep_alive`` (30 s).

uvicorn (httptools) itself arms no timer before a request's headers are complete and sets
no bound on their size; balancectl.api.http_limits adds both (``--first-byte-timeout``, set
to 10 s here, 10 s from a head's first byte, 16 KiB), and the tests
below hold the node to them: a silent or trickling client is cut off, megabytes of
headers are refused.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import pytest

from tests.conftest import sql
from tests.processes import ApiNode

PROBLEM_JSON = "application/problem+json"
BODY_LIMIT = 4096
KEEP_ALIVE_TIMEOUT = 30.0  # balancectl/node.py: uvicorn.Config(timeout_keep_alive=30)
# The node's silent-connection deadline here: the default 60 s, shortened so the watch
# below (the keep-alive timeout + 5 s) sees a silent client cut off.
SILENT_TIMEOUT = 10.0
NODE_ARGS = ("--first-byte-timeout", str(SILENT_TIMEOUT))  # the module node's (api_node)
PROMPTLY = 5.0  # seconds: far above any answer here, far below any "waited for the client"


Node = ApiNode


@pytest.fixture(scope="module")
def node(api_node: ApiNode) -> ApiNode:
    return api_node


def connect(node: Node, timeout: float = PROMPTLY) -> socket.socket:
    return socket.create_connection((node.host, node.port), timeout=timeout)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


def read_answer(sock: socket.socket, started: float) -> Answer:
    """One HTTP/1.1 response with a Content-Length, read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of a body"
        body += chunk
    return Answer(int(status_line.split()[1]), headers, body, time.monotonic() - started)


def request_head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: node", "Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def assert_problem(answer: Answer, status: int, slug: str) -> None:
    assert answer.status == status, answer
    assert answer.headers["content-type"].split(";")[0] == PROBLEM_JSON
    document = json.loads(answer.body)
    assert document["type"] == f"urn:balancectl:problem:{slug}"
    assert document["status"] == status
    assert document["title"] and document["detail"]


def balance_and_ledger(node: Node) -> list[tuple[int, int]]:
    return [
        (int(b), int(n))
        for b, n in sql(
            node.database_url,
            "SELECT (SELECT balance FROM users WHERE id = 1), (SELECT count(*) FROM ledger)",
        )
    ]


# --- bodies over the limit ---------------------------------------------------------------


def test_a_declared_10_mb_body_is_refused_before_it_is_sent(node: Node) -> None:
    before = balance_and_ledger(node)
    with connect(node) as sock:
        sock.sendall(request_head("/users/1/balance", "Content-Length: 10000000") + b'{"amo')
        answer = read_answer(sock, time.monotonic())

    assert_problem(answer, 413, "payload-too-large")
    assert answer.seconds < PROMPTLY  # it did not wait for the 9,999,995 bytes never sent
    assert balance_and_ledger(node) == before


def test_expect_100_continue_over_the_limit_gets_413_and_no_100(node: Node) -> None:
    with connect(node) as sock:
        head = request_head("/users/1/balance", "Content-Length: 10000000", "Expect: 100-continue")
        sock.sendall(head)
        answer = read_answer(sock, time.monotonic())

    assert_problem(answer, 413, "payload-too-large")  # the first status line: no 100 Continue


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(node: Node) -> None:
    before = balance_and_ledger(node)
    chunk = b" " * 1000
    with connect(node) as sock:
        sock.sendall(request_head("/users/1/balance", "Transfer-Encoding: chunked"))
        for _ in range(5):  # 5000 bytes, and never the last (empty) chunk
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = read_answer(sock, time.monotonic())

    assert_problem(answer, 413, "payload-too-large")
    assert balance_and_ledger(node) == before


def test_a_body_at_the_limit_is_read(node: Node) -> None:
    body = b'{"amount": 0}'.ljust(BODY_LIMIT)  # read and parsed: refused for its amount only
    with connect(node) as sock:
        sock.sendall(request_head("/users/1/balance", f"Content-Length: {len(body)}") + body)
        answer = read_answer(sock, time.monotonic())

    assert_problem(answer, 422, "invalid-request")


MALFORMED = [
    b"GET /users/1 HTTP/1.1\r\nHost: node\r\nBad Header: y\r\n\r\n",
    b"POST /users/1/balance HTTP/1.1\r\nHost: node\r\nContent-Length: abc\r\n\r\n",
    b"POST /users/1/balance HTTP/1.1\r\nHost: node\r\nContent-Length: -5\r\n\r\n",
    b"GET /users/\x001 HTTP/1.1\r\nHost: node\r\n\r\n",
    # Request smuggling: both framings at once; a front proxy could see another request.
    b"POST /users/1/balance HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\n"
    b"Content-Length: 14\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'e\r\n{"amount": -2}\r\n0\r\n\r\n',
]


@pytest.mark.parametrize(
    "raw", MALFORMED, ids=["space-in-name", "cl-text", "cl-neg", "nul", "cl-te"]
)
def test_malformed_http_is_refused_and_the_connection_closed(node: Node, raw: bytes) -> None:
    before = balance_and_ledger(node)
    with connect(node) as sock:
        sock.sendall(raw)
        answer = read_answer(sock, time.monotonic())
        closed = sock.recv(1) == b""

    # Refused by uvicorn's parser, before the app: still a problem document (http_limits).
    assert_problem(answer, 400, "bad-request")
    assert closed and answer.headers.get("connection") == "close"
    assert balance_and_ledger(node) == before


def test_a_request_head_over_the_limit_is_a_400_problem(node: Node) -> None:
    line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    with connect(node) as sock:
        sock.sendall(b"GET /users/1 HTTP/1.1\r\nHost: node\r\n" + line * 20)
        answer = read_answer(sock, time.monotonic())

    assert_problem(answer, 400, "bad-request")
    assert json.loads(answer.body)["detail"] == "Request head too large"


DUPLICATES = [
    b'{"amount": 1, "amount": -999999}',
    b'{"amount": -999999, "amount": 1}',
    b'{"amount": 5, "am\\u006funt": -5}',
]


@pytest.mark.parametrize(
    "body", DUPLICATES, ids=["credit-then-debit", "debit-then-credit", "escaped"]
)
@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_a_body_naming_a_member_twice_is_422_and_changes_nothing(
    node: Node, body: bytes, keyed: bool
) -> None:
    before = balance_and_ledger(node)
    key = f"dup-{secrets.token_hex(8)}"
    headers = [f"Content-Length: {len(body)}", *([f"Idempotency-Key: {key}"] if keyed else [])]
    with connect(node) as sock:
        sock.sendall(request_head("/users/1/balance", *headers) + body)
        answer = read_answer(sock, time.monotonic())

    assert_problem(answer, 422, "invalid-request")
    assert "more than once" in json.loads(answer.body)["detail"]
    assert balance_and_ledger(node) == before
    stored = sql(node.database_url, "SELECT count(*) FROM idempotency_keys WHERE key = %s", (key,))
    assert stored == [(0,)]  # the key is still free: nothing was claimed under it


# --- slow and half-open clients ----------------------------------------------------------


class SlowClients:
    """Sockets held open against a node: silent, trickling headers, or trickling a body."""

    def __init__(self, node: Node, silent: int, headers: int, bodies: int) -> None:
        self.node, self.counts = node, (silent, headers, bodies)
        self.stack = contextlib.ExitStack()
        self.silent: list[socket.socket] = []
        self.header_tricklers: list[socket.socket] = []
        self.body_tricklers: list[socket.socket] = []
        self.stop, self.rounds = threading.Event(), 0
        self.thread = threading.Thread(target=self.trickle, daemon=True)

    def open(self, first: bytes = b"") -> socket.socket:
        sock = self.stack.enter_context(connect(self.node))
        if first:
            sock.sendall(first)
        return sock

    def trickle(self) -> None:
        """A header line to each header trickler and a byte to each body, every second."""
        while not self.stop.wait(1.0):
            for sock in self.header_tricklers:
                sock.sendall(b"X-Slow: 1\r\n")
            for sock in self.body_tricklers:
                sock.sendall(b" ")
            self.rounds += 1

    def still_open(self) -> int:
        """How many of the sockets the node has neither answered nor closed."""
        return sum(
            is_open(sock) for sock in self.silent + self.header_tricklers + self.body_tricklers
        )

    def __enter__(self) -> SlowClients:
        silent, headers, bodies = self.counts
        try:
            self.silent = [self.open() for _ in range(silent)]
            first_lines = b"GET /users/1 HTTP/1.1\r\nHost: node\r\n"
            self.header_tricklers = [self.open(first_lines) for _ in range(headers)]
            head = request_head("/users/1/balance", "Content-Length: 100") + b'{"amount":'
            self.body_tricklers = [self.open(head) for _ in range(bodies)]
        except BaseException:
            self.stack.close()
            raise
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.stack.close()


def is_open(sock: socket.socket) -> bool:
    """True while the node has neither answered, closed nor reset the connection."""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        sock.recv(1, socket.MSG_PEEK)  # some bytes (an answer, such as a 408) or b"" (closed)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)
    return False


def get_user_latency(node: Node) -> float:
    started = time.monotonic()
    with connect(node) as sock:
        sock.sendall(b"GET /users/1 HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        answer = read_answer(sock, started)
    assert answer.status == 200, answer
    return answer.seconds


def credit_latency(node: Node) -> float:
    started = time.monotonic()
    body = b'{"amount": 1}'
    with connect(node) as sock:
        sock.sendall(request_head("/users/1/balance", f"Content-Length: {len(body)}") + body)
        answer = read_answer(sock, started)
    assert answer.status == 200, answer
    return answer.seconds


class Latency(NamedTuple):
    p50_ms: float
    p99_ms: float
    max_ms: float

    def __str__(self) -> str:
        return f"p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, max {self.max_ms:.1f} ms"

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        ordered = sorted(seconds)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return cls(statistics.median(ordered) * 1e3, p99 * 1e3, ordered[-1] * 1e3)


def test_hundreds_of_slow_clients_do_not_stop_the_node_answering(node: Node) -> None:
    baseline = Latency.of([get_user_latency(node) for _ in range(100)])
    ledger_before = balance_and_ledger(node)

    with SlowClients(node, silent=200, headers=200, bodies=60) as slow:
        time.sleep(2.0)  # the slow clients have trickled something twice
        reads = Latency.of([get_user_latency(node) for _ in range(200)])
        writes = Latency.of([credit_latency(node) for _ in range(40)])
        held, trickled = slow.still_open(), slow.rounds

    print(f"\nGET /users/1 alone: {baseline}")
    print(f"beside 460 slow clients: GET /users/1 {reads}; POST credit {writes}")
    assert trickled >= 2
    assert held == 460  # the measurement ran while every slow client was connected
    assert reads.max_ms < PROMPTLY * 1000 and writes.max_ms < PROMPTLY * 1000
    # 60 bodies still being read (more than the pool's 10 connections) held no connection:
    assert balance_and_ledger(node) == [(ledger_before[0][0] + 40, ledger_before[0][1] + 40)]


# --- idle connections ----------------------------------------------------------------------


class Idle(NamedTuple):
    keep_alive_closed_after: float | None
    silent_open: bool
    trickler_open: bool


@pytest.fixture(scope="module")
def idle_for_the_keep_alive_timeout(node: Node) -> Idle:
    """Three connections watched for the keep-alive timeout and a few seconds more."""
    with contextlib.ExitStack() as stack:
        kept = stack.enter_context(connect(node, timeout=KEEP_ALIVE_TIMEOUT + 10))
        kept.sendall(b"GET /users/1 HTTP/1.1\r\nHost: node\r\n\r\n")
        answered = time.monotonic()
        assert read_answer(kept, answered).status == 200
        silent = stack.enter_context(connect(node))
        trickler = stack.enter_context(connect(node))
        trickler.sendall(b"GET /users/1 HTTP/1.1\r\nHost: node\r\n")
        closed_after = None
        while time.monotonic() - answered < KEEP_ALIVE_TIMEOUT + 5:
            with contextlib.suppress(OSError):  # a node that cuts it off is what we hope for
                trickler.sendall(b"X-Slow: 1\r\n")
            if closed_after is None and not is_open(kept):
                closed_after = time.monotonic() - answered
            time.sleep(0.5)
        return Idle(closed_after, is_open(silent), is_open(trickler))


@pytest.mark.slow  # waits out the 30 s keep-alive timeout (once for the three)
def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(
    idle_for_the_keep_alive_timeout: Idle,
) -> None:
    closed_after = idle_for_the_keep_alive_timeout.keep_alive_closed_after
    print(f"\nidle keep-alive connection closed after {closed_after} s")
    assert closed_after is not None
    assert KEEP_ALIVE_TIMEOUT - 1 <= closed_after <= KEEP_ALIVE_TIMEOUT + 2


@pytest.mark.slow  # waits out the 30 s keep-alive timeout (once for the three)
def test_a_connection_that_never_sends_a_request_is_closed(
    idle_for_the_keep_alive_timeout: Idle,
) -> None:
    assert not idle_for_the_keep_alive_timeout.silent_open


@pytest.mark.slow  # waits out the 30 s keep-alive timeout (once for the three)
def test_a_client_trickling_headers_is_cut_off(idle_for_the_keep_alive_timeout: Idle) -> None:
    assert not idle_for_the_keep_alive_timeout.trickler_open


def test_headers_of_megabytes_are_refused(node: Node) -> None:
    line = b"X-Pad: " + b"a" * 8000 + b"\r\n"
    with connect(node) as sock:
        sock.sendall(b"GET /users/1 HTTP/1.1\r\nHost: node\r\n")
        with contextlib.suppress(OSError):  # a node that refuses may reset the connection
            for _ in range(256):  # 2 MB of headers; nginx's default limit is 32 KB
                sock.sendall(line)
            sock.sendall(b"\r\n")
        try:
            status = read_answer(sock, time.monotonic()).status
        except (AssertionError, OSError):
            status = None  # closed: refused too

    assert status != 200
