"""The balance route's fast lane: ``POST /users/{userId}/balance`` answered in plain ASGI.

The route is the node's hot path: the 10,000-request burst is nothing else. Through
Litestar's router, a request builds a ``Request``, a signature model, a ``Response`` and
an ``ASGIResponse`` and crosses two middlewares: py-spy put about a sixth of a worker's
samples there in the burst, and going round it takes a node's CPU in the burst to 0.80x
(``docs/benchmarks.md``). The node's app (``api.app.NodeApp``) hands a request whose
method and path are the route's canonical form to ``answer_change`` below before its
router sees it; every other request, this route's other spelling included (a trailing
slash), goes through Litestar as before, whose handler (``balance_routes.change_balance``)
documents the route and calls the same ``change_for``.

What the lane does that Litestar did, and where it comes from, so both entries answer
alike (``tests/inprocess/test_balance_lane.py`` compares them byte for byte):
- the body: read from ``receive`` with the node's size bound, ``413`` past it (an
  announced ``Content-Length`` over the bound is refused before reading, as Litestar does);
- the errors: the same problem documents and headers (``problems.problem_of``);
- the bodies: msgspec's JSON, as Litestar encodes a ``dict``;
- the counts: the route's outcome and its ``/metrics`` sample, under the same route label.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar.datastructures import State
from litestar.exceptions import InternalServerException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.types import HTTPScope, Receive, Send

from balancectl.api.balance_routes import change_for, status_of, wanted_headers
from balancectl.api.metrics import Metrics
from balancectl.api.problems import PROBLEM_JSON, problem_of
from balancectl.outcomes import OutcomeCounts, outcome_of

PREFIX, SUFFIX = "/users/", "/balance"
TEMPLATE = PREFIX + "{userId}" + SUFFIX  # the route label Litestar gives it in /metrics
JSON_TYPE = (b"content-type", b"application/json")
PROBLEM_TYPE = (b"content-type", PROBLEM_JSON.encode())
REPLAYED = (b"idempotent-replayed", b"true")


def lane_user(scope: HTTPScope) -> str | None:
    """The raw ``userId`` of a ``POST`` to the route's canonical path, else ``None``."""
    path: str = scope["path"]
    if scope["method"] != "POST" or not path.startswith(PREFIX) or not path.endswith(SUFFIX):
        return None
    raw = path[len(PREFIX) : -len(SUFFIX)]
    return raw if raw and "/" not in raw else None


async def answer_change(
    state: State, scope: HTTPScope, receive: Receive, send: Send, raw_user: str, max_body: float
) -> None:
    """Answer one request of the route, count it, and time it for ``/metrics``."""
    started = time.perf_counter()
    counts: OutcomeCounts = state["outcomes"]
    headers = wanted_headers(scope["headers"])
    try:
        outcome = await change_for(
            state, raw_user, headers, lambda: body(receive, headers, max_body)
        )
    except Exception as error:  # every error of the route is answered, as Litestar's handlers do
        status = status_of(error)
        counts.count(outcome_of(status))
        document, extra = problem_of(error, "POST", scope["path"])
        head = [PROBLEM_TYPE, *((k.lower().encode(), v.encode()) for k, v in (extra or {}).items())]
        await respond(send, status, head, document)
    else:
        counts.count(outcome_of(outcome.status, outcome.replayed))
        head = [JSON_TYPE if outcome.status == 200 else PROBLEM_TYPE]
        if outcome.replayed:
            head.append(REPLAYED)
        await respond(send, outcome.status, head, outcome.body)
        status = outcome.status
    metrics: Metrics = state["metrics"]
    metrics.observe(TEMPLATE, "POST", status, time.perf_counter() - started)


async def body(receive: Receive, headers: dict[bytes, bytes], limit: float) -> bytes:
    """The request's body, at most ``limit`` bytes (``413`` past it)."""
    announced = headers.get(b"content-length")
    if announced is not None and announced.isdigit() and int(announced) > limit:
        raise RequestEntityTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect: the client is gone
            raise InternalServerException("client disconnected prematurely")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise RequestEntityTooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # one chunk: no copy


async def respond(send: Send, status: int, head: list[tuple[bytes, bytes]], document: Any) -> None:
    content = msgspec.json.encode(document)
    head.append((b"content-length", str(len(content)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": content, "more_body": False})
