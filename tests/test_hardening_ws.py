"""Hardening (issue 11): WebSocket peer names in logs, 1007 for invalid UTF-8 text,
and rate-limited accept-failure logging."""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

import pytest
import trio
import trio.testing
import wsproto
from support import ExhaustedSocket, start_server
from wsproto.events import AcceptConnection, CloseConnection, Request

from mq_trio.broker import Broker, MemoryHistory
from mq_trio.server import Config, Server
from mq_trio.transports import _websocket as websocket


@pytest.fixture(autouse=True)
def short_close_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(websocket, "CLOSE_TIMEOUT", 0.05)


async def handshake(port: int) -> tuple[trio.SocketStream, wsproto.WSConnection]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=f"127.0.0.1:{port}", target="/")))
    with trio.fail_after(5):
        while True:
            ws.receive_data(await stream.receive_some(65536))
            events = list(ws.events())
            if events:
                assert isinstance(events[0], AcceptConnection)
                return stream, ws


# --- 1. peers are named -----------------------------------------------------------------


async def test_websocket_peer_is_logged_as_host_and_port(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mq_trio.websocket")
    server: Server = await start_server(nursery, ws_port=0)
    assert server.ws_port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", server.ws_port)
    local_port = stream.socket.getsockname()[1]
    await stream.send_all(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nOrigin: http://evil.example\r\n\r\n"
    )
    with trio.fail_after(5):
        reply = await stream.receive_some(65536)
    assert reply.startswith(b"HTTP/1.1 403")
    await stream.aclose()
    lines = [r.getMessage() for r in caplog.records if "rejecting WebSocket" in r.getMessage()]
    assert lines == [
        f"rejecting WebSocket from 127.0.0.1:{local_port}: "
        "origin 'http://evil.example' not allowed"
    ]


# --- 2. invalid UTF-8 text closes with 1007 ----------------------------------------------


def masked_frame(opcode: int, payload: bytes) -> bytes:
    assert len(payload) < 126
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


async def close_event(stream: trio.SocketStream, ws: wsproto.WSConnection) -> Any:
    """The server's close frame, or None if TCP closes without one."""
    with trio.fail_after(5):
        while True:
            for event in ws.events():
                if isinstance(event, CloseConnection):
                    return event
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                return None
            ws.receive_data(data)


@pytest.mark.parametrize("payload", [b"\xff", b'{"command": "subscribe", "topic": "\xc3"}'])
async def test_invalid_utf8_text_is_closed_with_1007(
    nursery: trio.Nursery, payload: bytes
) -> None:
    server: Server = await start_server(nursery, ws_port=0)
    assert server.ws_port is not None
    stream, ws = await handshake(server.ws_port)
    await stream.send_all(masked_frame(0x1, payload))
    event = await close_event(stream, ws)
    assert isinstance(event, CloseConnection)
    assert event.code == 1007
    # and the server forgets the connection
    with trio.fail_after(5):
        await server.wait_until(lambda: not server.connections)


async def test_valid_text_still_works_and_a_peer_close_is_answered(
    nursery: trio.Nursery,
) -> None:
    server: Server = await start_server(nursery, ws_port=0)
    assert server.ws_port is not None
    stream, ws = await handshake(server.ws_port)
    await stream.send_all(ws.send(CloseConnection(code=1000)))
    event = await close_event(stream, ws)
    assert isinstance(event, CloseConnection)
    assert event.code == 1000


# --- 3. accept failures are logged at a bounded rate -------------------------------------




async def test_accept_failures_are_logged_at_a_bounded_rate(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mq_trio.server")
    server = Server(Config(), Broker(MemoryHistory(10)), [])
    sock = ExhaustedSocket(failures=250)  # 25 virtual seconds of retries every 0.1 s
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(30):
            await server._accept_loop(sock, nursery)  # type: ignore[arg-type]
    assert sock.calls == 251  # it kept retrying, then waited for the next client
    records = [r for r in caplog.records if r.name == "mq_trio.server"]
    failed = [r.getMessage() for r in records if "accept failed" in r.getMessage()]
    assert 1 <= len(failed) <= 4, failed
    assert "Too many open files" in failed[0]
    assert any("more failures" in line for line in failed[1:])


async def test_accept_recovery_is_reported_and_resets(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    nursery: trio.Nursery,
) -> None:
    caplog.set_level(logging.INFO, logger="mq_trio.server")
    server: Server = await start_server(nursery)
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()

    class Flaky:
        def __init__(self, errors: int) -> None:
            self.errors = errors

        async def accept(self) -> tuple[Any, Any]:
            await trio.lowlevel.checkpoint()
            if self.errors:
                self.errors -= 1
                raise OSError(errno.EMFILE, "injected")
            return await listener.accept()

    flaky = Flaky(errors=5)
    async with trio.open_nursery() as accepting:
        accepting.start_soon(
            server._accept_loop, flaky, accepting  # type: ignore[arg-type]
        )
        client = await trio.open_tcp_stream("127.0.0.1", listener.getsockname()[1])
        with trio.fail_after(5):
            await server.wait_until(lambda: bool(server.connections))
        await client.aclose()
        with trio.fail_after(5):
            await server.wait_until(lambda: not server.connections)
        accepting.cancel_scope.cancel()
    listener.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "mq_trio.server"]
    assert sum("accept failed" in m for m in messages) == 1
    assert any("accepting again (4 failures" in m for m in messages)
