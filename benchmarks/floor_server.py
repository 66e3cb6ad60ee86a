"""The floor: an HTTP server that does no work, for benchmarks/burst.py.

A raw asyncio protocol on uvloop (the event loop the nodes run on), one process: it
reads each request head (and a Content-Length body), and answers every request with
the same small JSON 200, keeping the connection open or closing it as uvicorn would. No framework,
no database, no parsing beyond finding where a request ends: whatever a real server
costs above this is the server's own work.

    python benchmarks/floor_server.py --port 8999
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import Any

import uvloop

BODY = b'{"userId":1,"balance":0,"amount":-2}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)


class NullHttp(asyncio.Protocol):
    """Answers each complete request with RESPONSE."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: Any = None  # uvloop's transport is no asyncio.Transport subclass

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            length = content_length(self.buffer[:end])
            if len(self.buffer) < end + 4 + length:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 + length :]
            self.transport.write(RESPONSE)
            if closes(head):
                self.transport.close()
                return


def closes(head: bytes) -> bool:
    """HTTP/1.0 without keep-alive (ab's requests), or ``Connection: close``: close after."""
    lower = head.lower()
    if lower.split(b"\r\n", 1)[0].endswith(b"http/1.0"):
        return b"connection: keep-alive" not in lower
    return b"connection: close" in lower


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


async def serve(port: int, backlog: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = await asyncio.get_running_loop().create_server(NullHttp, sock=sock, backlog=backlog)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=16384)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.backlog))


if __name__ == "__main__":
    main()
