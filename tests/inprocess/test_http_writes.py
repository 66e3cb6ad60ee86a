"""``CoalescingTransport`` over real loopback sockets: what it joins, and what it never holds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from balancectl.api.http_writes import CoalescingTransport

Wrapped = tuple[CoalescingTransport, asyncio.StreamReader]


@pytest.fixture
async def wrapped() -> AsyncIterator[Wrapped]:
    """A server-side transport wrapped as a node wraps it, and the client's reader."""
    accepted: asyncio.Future[CoalescingTransport] = asyncio.get_running_loop().create_future()

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            accepted.set_result(CoalescingTransport(transport, asyncio.get_running_loop()))

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    transport = await accepted
    yield transport, reader
    writer.close()
    server.close()
    await server.wait_closed()


async def test_writes_of_one_iteration_arrive_whole_and_in_order(wrapped: Wrapped) -> None:
    transport, reader = wrapped
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"ok")
    assert transport.get_write_buffer_size() == 40  # held until the iteration ends
    assert await asyncio.wait_for(reader.readexactly(40), 2) == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    )


async def test_nothing_is_held_past_its_iteration(wrapped: Wrapped) -> None:
    transport, reader = wrapped
    for part in (b"one ", b"two ", b"three"):
        transport.write(part)
        await asyncio.sleep(0)  # the next iteration sends it
        assert transport.get_write_buffer_size() == 0
    assert await asyncio.wait_for(reader.readexactly(13), 2) == b"one two three"


async def test_close_sends_what_is_pending_first(wrapped: Wrapped) -> None:
    transport, reader = wrapped
    transport.write(b"last words")
    transport.close()
    assert await asyncio.wait_for(reader.read(), 2) == b"last words"  # then end of file
    assert transport.is_closing()


@pytest.mark.parametrize("end", [CoalescingTransport.abort, CoalescingTransport.close])
async def test_a_write_to_a_closed_connection_is_dropped(
    wrapped: Wrapped, end: Callable[[CoalescingTransport], None]
) -> None:
    transport, reader = wrapped
    end(transport)
    transport.write(b"too late")
    await asyncio.sleep(0.05)
    assert await asyncio.wait_for(reader.read(), 2) == b""
