"""A closed connection's memory is released at close, not at the next GC pass.

The server raises the collector's threshold, so an object kept alive only by a reference
cycle can stay for a long time: a connection closed with an unfinished line (up to the
line limit) held that line until then. Here the collector is disabled and every
connection object must die by reference counting alone once its connection ends
(issue #11): EOF with a partial line pending, a cut-off slow consumer, ``quit``.
"""

from __future__ import annotations

import gc
import socket
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from support import LineClient, start_server

from mq_trio.server import Server
from mq_trio.transports._tcp import TCPTransport

N = 20
PARTIAL = b"x" * (256 << 10)  # an unfinished line: no newline


@pytest.fixture
def no_gc() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.collect()  # start from a clean slate, then only reference counting frees
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


async def connected(server: Server, n: int) -> list[weakref.ref[Any]]:
    """Wait until ``n`` connections are open; weak references to each one's objects."""
    with trio.fail_after(10):
        await server.wait_until(lambda: len(server.connections) >= n)
    refs: list[weakref.ref[Any]] = []
    for conn in server.connections:
        refs += [weakref.ref(conn), weakref.ref(conn.outbox)]
    del conn
    return refs


async def all_closed(server: Server) -> None:
    with trio.fail_after(10):
        await server.wait_until(lambda: not server.connections)
    # Let the connection tasks finish their last steps (trio drops a finished task).
    for _ in range(5):
        await trio.lowlevel.checkpoint()


async def accept_one_more(server: Server) -> LineClient:
    """The accept loop keeps the connection it accepted last (a local variable) until
    the next one: accept another, untracked, so that reference goes."""
    client = await LineClient.connect(server.port)
    with trio.fail_after(10):
        await server.wait_until(lambda: bool(server.connections))
    return client


def alive(refs: list[weakref.ref[Any]]) -> list[str]:
    return [type(obj).__name__ for ref in refs if (obj := ref()) is not None]


async def test_closed_with_partial_line_freed_without_gc(
    nursery: trio.Nursery, no_gc: None
) -> None:
    server = await start_server(nursery)
    clients = [await LineClient.connect(server.port) for _ in range(N)]
    refs = await connected(server, N)
    assert len(refs) == 2 * N
    for client in clients:
        await client.send_raw(PARTIAL)
    for client in clients:
        await client.stream.aclose()
    del clients, client
    await all_closed(server)
    last = await accept_one_more(server)
    assert alive(refs) == []
    await last.stream.aclose()
    await all_closed(server)


async def test_quit_with_partial_line_freed_without_gc(
    nursery: trio.Nursery, no_gc: None
) -> None:
    server = await start_server(nursery)
    clients = [await LineClient.connect(server.port) for _ in range(N)]
    refs = await connected(server, N)
    for client in clients:
        assert await client.request({"command": "subscribe", "topic": "t"}) == {
            "success": True
        }
        # quit, then an unfinished line the server never handles
        await client.send_raw(b"quit\n" + PARTIAL)
    with trio.fail_after(10):
        for client in clients:
            await client.read_to_eof()
            await client.stream.aclose()
    del clients, client
    await all_closed(server)
    assert server.broker.subscribers("t") == []
    last = await accept_one_more(server)
    assert alive(refs) == []
    await last.stream.aclose()
    await all_closed(server)


async def test_slow_consumer_cut_off_freed_without_gc(
    nursery: trio.Nursery, no_gc: None
) -> None:
    budget = 64 << 10
    server = await start_server(nursery, max_pending_bytes=budget, max_line_bytes=16 << 10)
    slow = []
    for _ in range(3):
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", server.port))
        slow.append(LineClient(trio.SocketStream(sock)))
    refs = await connected(server, len(slow))
    for client in slow:
        assert await client.request({"command": "subscribe", "topic": "t"}) == {
            "success": True
        }
        await client.send_raw(b"x" * (8 << 10))  # an unfinished line, under the limit
    for conn in server.connections:  # keep the kernel from absorbing the backlog
        conn.transport.socket.setsockopt(  # type: ignore[attr-defined]
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
    del conn
    pub = await LineClient.connect(server.port)
    body = "x" * 1000
    with trio.fail_after(30):
        i = 0
        while len(server.connections) > 1:  # the publisher's own remains
            assert await pub.request(
                {"command": "send", "topic": "t", "msg": f"{i} {body}", "delivery": "all"}
            ) == {"success": True}
            i += 1
    assert server.broker.subscribers("t") == []
    # The cut-off connections are gone from the server while their clients still
    # have them open: nothing of theirs may stay behind.
    for _ in range(5):
        await trio.lowlevel.checkpoint()
    assert alive(refs) == []
    for client in slow:
        await client.stream.aclose()
    await pub.stream.aclose()
    await all_closed(server)


async def test_closed_connection_holds_no_buffers(nursery: trio.Nursery) -> None:
    """Even while something still holds a closed connection, its unfinished line is
    released at close, and its outbox no longer leads back to it."""
    server = await start_server(nursery)
    client = await LineClient.connect(server.port)
    with trio.fail_after(10):
        await server.wait_until(lambda: bool(server.connections))
    (conn,) = server.connections
    await client.send_raw(b"bogus\nquit\n" + PARTIAL)
    with trio.fail_after(10):
        assert (await client.read_to_eof()).startswith(b'{"success": false')
    await client.stream.aclose()
    await all_closed(server)
    transport = conn.transport
    assert isinstance(transport, TCPTransport)
    assert transport.wire.receive_eof() == []  # no unfinished line kept
    assert conn.outbox.transport is None
