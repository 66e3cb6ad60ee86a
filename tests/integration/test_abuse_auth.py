"""The bearer token, and the refusal to listen beyond loopback without one.

With ``--api-token`` (or ``BALANCECTL_API_TOKEN``), the balance change needs
``Authorization: Bearer <token>``, else a ``401`` problem (``unauthorized``) that changes
nothing; reads stay open. The token never shows in a response nor in the node's log, even
at ``--log-level DEBUG``, and is compared in constant time. ``serve --host 0.0.0.0``
without a token exits 2 with one line; with ``--insecure`` it starts.
"""

from __future__ import annotations

import hmac
import http.client
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import urlsplit

import pytest

from balancectl.api import auth
from balancectl.errors import Unauthorized
from tests.conftest import free_port, sql
from tests.processes import ClusterFactory

PROBLEM_JSON = "application/problem+json"
READS = ["/users/1", "/jobs", "/jobs/history", "/nodes", "/healthz", "/readyz", "/metrics"]


def exchange(
    base: str, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    address = urlsplit(base)
    connection = http.client.HTTPConnection(
        address.hostname or "127.0.0.1", address.port, timeout=10
    )
    try:
        all_headers = {"Content-Type": "application/json", **headers}
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        connection.close()


def balance_row(database_url: str) -> list[tuple[Any, ...]]:
    return sql(
        database_url, "SELECT balance, (SELECT count(*) FROM ledger) FROM users WHERE id = 1"
    )


def assert_unauthorized(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 401, body
    assert headers["content-type"].split(";")[0] == PROBLEM_JSON
    assert headers["www-authenticate"].startswith("Bearer")  # RFC 9110: a 401 names its scheme
    document = json.loads(body)
    assert document["type"] == "urn:balancectl:problem:unauthorized"
    assert (document["status"], document["title"]) == (401, "Unauthorized")
    assert document["detail"]


def refused_authorizations(token: str) -> list[str | None]:
    return [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong",
        token,
        f"Bearer {token}x",
        f"Bearer {token[:-1]}",
        f"Basic {token}",
        f"Bearer  {token}",
        f"Bearer {token.upper()}",
        f"Bearer {token}\u00e9",
    ]


def test_the_token_guards_the_change_and_never_leaks(
    cluster_factory: ClusterFactory, database_url: str, tmp_path: Path
) -> None:
    token = f"s3cret-{secrets.token_hex(8)}"
    cluster = cluster_factory(1, "--no-scheduler", "--api-token", token, "--log-level", "DEBUG")
    url, seen = cluster.urls[0], []
    before = balance_row(database_url)

    for authorization in refused_authorizations(token):
        headers = {} if authorization is None else {"Authorization": authorization}
        answer = exchange(url, "POST", "/users/1/balance", b'{"amount": -2}', **headers)
        assert_unauthorized(*answer)
        seen.append(answer)
    # Refused before anything else is looked at: a bad body or an unknown user is still 401.
    for path, body in [("/users/1/balance", b"{"), ("/users/999/balance", b'{"amount": 1}')]:
        assert_unauthorized(*exchange(url, "POST", path, body, Authorization="Bearer no"))
    assert balance_row(database_url) == before

    for path in READS:
        answer = exchange(url, "GET", path)
        assert answer[0] == 200, (path, answer)
        seen.append(answer)
    accepted = exchange(
        url, "POST", "/users/1/balance", b'{"amount": -2}', Authorization=f"Bearer {token}"
    )
    assert (accepted[0], json.loads(accepted[2])) == (
        200,
        {"userId": 1, "balance": 9998, "amount": -2},
    )
    # RFC 9110 (5.5): whitespace around a field value is not part of it, whether or not
    # the server's parser strips it (uvicorn 0.55 does, earlier ones did not).
    padded = exchange(
        url, "POST", "/users/1/balance", b'{"amount": -2}', Authorization=f"Bearer {token} \t"
    )
    assert padded[0] == 200, padded
    seen += [accepted, padded, exchange(url, "GET", "/schema/openapi.json")]

    cluster.stop()  # the whole log, shutdown included
    log = (tmp_path / "cluster-1.log").read_text()
    assert "listening on" in log and "Finished server process" in log  # the log was captured
    assert token not in log
    for status, headers, body in seen:
        assert token.encode() not in body, (status, body)
        assert token not in json.dumps(headers)


def test_the_token_from_the_environment_guards_too_and_stays_off_the_command_line(
    cluster_factory: ClusterFactory, database_url: str
) -> None:
    token = f"env-{secrets.token_hex(8)}"
    cluster = cluster_factory(1, "--no-scheduler", env={"BALANCECTL_API_TOKEN": token})
    url = cluster.urls[0]

    assert_unauthorized(*exchange(url, "POST", "/users/1/balance", b'{"amount": 3}'))
    answer = exchange(
        url, "POST", "/users/1/balance", b'{"amount": 3}', Authorization=f"Bearer {token}"
    )
    assert answer[0] == 200
    assert balance_row(database_url) == [(10003, 2)]
    command_line = Path(f"/proc/{cluster.members[0].process.pid}/cmdline")
    if command_line.exists():  # visible to every local user, unlike the environment
        assert token.encode() not in command_line.read_bytes()


COMPARE_DIGEST = hmac.compare_digest


class Spy:
    """Records the calls to ``hmac.compare_digest`` and answers as it does."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, object]] = []

    def __call__(self, a: bytes, b: bytes) -> bool:
        self.calls.append((a, b))
        return COMPARE_DIGEST(a, b)


@pytest.mark.parametrize(
    ("given", "allowed"),
    [("Bearer s3cret", True), ("Bearer s3creT", False), ("", False), ("Bearer s3cret\xe9", False)],
)
async def test_the_token_is_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch, given: str, allowed: bool
) -> None:
    spy = Spy()
    monkeypatch.setattr(hmac, "compare_digest", spy)  # auth.py looks it up at each call
    connection = SimpleNamespace(
        app=SimpleNamespace(state=SimpleNamespace(api_token="s3cret")),
        headers={"authorization": given} if given else {},
    )

    if allowed:
        await auth.require_token(cast(Any, connection), cast(Any, None))
    else:
        with pytest.raises(Unauthorized):
            await auth.require_token(cast(Any, connection), cast(Any, None))
    assert spy.calls == [(given.encode(), b"Bearer s3cret")]  # one call, on the whole header


def serve(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "balancectl", "serve", "--no-scheduler", *args],
        env={**os.environ, "BALANCECTL_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_all_interfaces_without_a_token_is_refused_in_one_line(database_url: str) -> None:
    result = serve(database_url, "--host", "0.0.0.0", "--port", str(free_port()))

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("balancectl: ") and "--api-token" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_all_interfaces_with_insecure_starts(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory(1, "--no-scheduler", "--host", "0.0.0.0", "--insecure")
    port = cluster.members[0].port

    assert exchange(cluster.urls[0], "GET", "/users/1")[0] == 200
    listening = Path("/proc/net/tcp")
    if listening.exists():  # bound to 0.0.0.0, not to loopback only
        assert f"00000000:{port:04X} 00000000:0000 0A" in listening.read_text()
