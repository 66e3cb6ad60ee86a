"""uvicorn's httptools protocol with deadlines and a size bound on each request's head.

uvicorn arms no timer before a request's headers are complete and bounds their size
nowhere, so a client that connects and sends nothing, trickles header lines, or sends
megabytes of headers would hold its connection (and memory) for ever. This protocol
closes a connection that sends nothing for ``first_byte_timeout`` seconds after it
opened (``--first-byte-timeout``, 60 s by default, nginx's ``client_header_timeout``),
closes one whose request head is not complete ``HEAD_TIMEOUT`` seconds after its first
byte, and answers 400 to a head over ``MAX_HEAD_BYTES``. Idle keep-alive connections
are still uvicorn's business (``timeout_keep_alive``).

The silent deadline is long because a burst's client is slow, not malicious: one
process opening 10,000 connections has them all accepted at once, then writes each
request when its own loop gets round to it, up to 24 s later on a busy machine.

Every 400 it sends (malformed HTTP, a head too large) is a problem document
(``application/problem+json``, type ``urn:balancectl:problem:bad-request``) like every
other error of the API, not uvicorn's plain text; the connection is closed after it.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from balancectl.api.http_writes import CoalescingTransport
from balancectl.api.problems import PROBLEM_JSON, http_problem
from balancectl.config import FIRST_BYTE_TIMEOUT

HEAD_TIMEOUT = 10.0
MAX_HEAD_BYTES = 16 * 1024


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """``uvicorn.Config(http=GuardedHttpToolsProtocol)``, or ``guarded_protocol(seconds)``."""

    first_byte_timeout = FIRST_BYTE_TIMEOUT
    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # One send per response instead of uvicorn's two (head, body): api/http_writes.py.
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        self._arm(self.first_byte_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is None:
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:  # the head is still not complete
            self._disarm()
            self.send_400_response("Request head too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._disarm()  # the client has begun: from now on its head has HEAD_TIMEOUT
        self._arm(HEAD_TIMEOUT)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self, seconds: float) -> None:
        if self._head_timer is None:
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, as a problem document."""
        body = json.dumps(http_problem(400, msg)).encode()
        head = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            f"content-type: {PROBLEM_JSON}\r\n".encode(),
            f"content-length: {len(body)}\r\n".encode(),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join([*head, body]))
        self.transport.close()

    def _too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(first_byte_timeout: float) -> type[GuardedHttpToolsProtocol]:
    """The protocol with its own silent-connection deadline (``--first-byte-timeout``)."""
    attributes = {"first_byte_timeout": first_byte_timeout}
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), attributes)
