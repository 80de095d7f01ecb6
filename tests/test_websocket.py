"""The WebSocket endpoint and the page on its port (issue 3, PROTOCOL.md section 6).

Clients: trio-websocket's own client for the protocol, raw TCP for HTTP, and a small
wsproto client where the test must control pongs or never read.
"""

from __future__ import annotations

import collections
import json
import re
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
import wsproto
from support import LineClient, start_server
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection
from wsproto.events import AcceptConnection, Ping, Request, TextMessage

from mq_trio import cli
from mq_trio.broker import Broker
from mq_trio.server import Config, Server, _ws_listener
from mq_trio.transports import (
    OriginPolicy,
    WebSocketTransport,
    handshake_problem,
    normalise_origin,
    page_bytes,
    parse_head,
    parse_origins,
)
from mq_trio.transports import _websocket as websocket

SUCCESS = {"success": True}


def failure(reason: str) -> dict[str, Any]:
    return {"success": False, "reason": reason}


# --- helpers -------------------------------------------------------------------------


async def ws_server(nursery: trio.Nursery, **overrides: Any) -> Server:
    overrides.setdefault("ws_port", 0)
    return await start_server(nursery, **overrides)


def ws_url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.ws_port}/"


@pytest.fixture(autouse=True)
def short_close_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests end by cancelling clients and server at once: no client answers a close
    frame then, and each server connection would wait out the 1 s closing handshake."""
    monkeypatch.setattr(websocket, "CLOSE_TIMEOUT", 0.05)


async def ws_connect(
    nursery: trio.Nursery, server: Server, origin: str | None = None
) -> WebSocketConnection:
    headers = [(b"Origin", origin.encode())] if origin is not None else None
    with trio.fail_after(5):
        ws = await trio_websocket.connect_websocket_url(
            nursery, ws_url(server), extra_headers=headers
        )
    return ws


async def receive(ws: WebSocketConnection) -> Any:
    with trio.fail_after(5):
        message = await ws.get_message()
    assert isinstance(message, str), "the server sends text messages only"
    return json.loads(message)


async def request(ws: WebSocketConnection, obj: Any) -> Any:
    await ws.send_message(json.dumps(obj))
    return await receive(ws)


async def closed_reason(ws: WebSocketConnection) -> trio_websocket.CloseReason:
    """Read until the server closes; the close reason."""
    with trio.fail_after(5):
        while True:
            try:
                await ws.get_message()
            except ConnectionClosed as exc:
                assert exc.reason is not None
                return exc.reason


async def http(port: int, data: bytes, *, eof: bool = False) -> bytes:
    """Send raw bytes to the WebSocket port, return everything until the server closes."""
    with trio.fail_after(5):
        client = await LineClient.connect(port)
        await client.send_raw(data)
        if eof:
            await client.stream.send_eof()
        return await client.read_to_eof()


async def settled() -> None:
    """Until every task has been blocked for longer than the (shortened) close timeout:
    a closing handshake that gets no answer has timed out and its connection has ended."""
    await trio.testing.wait_all_tasks_blocked(cushion=2 * websocket.CLOSE_TIMEOUT)


def ws_connections(server: Server) -> int:
    return sum(isinstance(c.transport, WebSocketTransport) for c in server.connections)


class RawWS:
    """A wsproto client over a raw socket: the test decides whether it pongs or reads."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self._events: collections.deque[wsproto.events.Event] = collections.deque()

    @classmethod
    async def connect(cls, port: int, receive_buffer: int | None = None) -> RawWS:
        sock = trio.socket.socket()
        if receive_buffer is not None:
            # Before connect, so the advertised window stays small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        self = cls(trio.SocketStream(sock))
        await self.stream.send_all(self.ws.send(Request(host=f"127.0.0.1:{port}", target="/")))
        assert isinstance(await self.event(), AcceptConnection)
        return self

    async def event(self) -> wsproto.events.Event | None:
        """The next event, or None once the server closed the TCP stream."""
        with trio.fail_after(5):
            while not self._events:
                self._events.extend(self.ws.events())
                if self._events:
                    break
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    return None
                self.ws.receive_data(data)
            return self._events.popleft()

    async def send(self, event: wsproto.events.Event) -> None:
        await self.stream.send_all(self.ws.send(event))


# --- the HTTP side of the port ---------------------------------------------------------


async def test_page_is_served_on_the_websocket_port(nursery: trio.Nursery) -> None:
    server = await ws_server(nursery)
    assert server.ws_port is not None and server.ws_port != server.port
    response = await http(server.ws_port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"Content-Type: text/html; charset=utf-8" in lines
    assert f"Content-Length: {len(body)}".encode() in lines
    assert b"Connection: close" in lines
    assert body == page_bytes()
    assert b"<title>mq-trio</title>" in body
    # self-contained: nothing is loaded from elsewhere
    assert b"<script src" not in body and b"<link" not in body and b"http://" not in body


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
        (b"GET /index.html?x=1 HTTP/1.0\r\n\r\n", b"200"),
        (b"GET /favicon.ico HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"405"),
        (b"GET / HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 without Host
        (b"hello there\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * (20 << 10) + b"\r\n\r\n", b"431"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * (20 << 10), b"431"),  # no end in sight
    ],
)
async def test_http_answers(nursery: trio.Nursery, data: bytes, status: bytes) -> None:
    server = await ws_server(nursery)
    assert server.ws_port is not None
    response = await http(server.ws_port, data)
    assert response.split(b" ")[1] == status
    if data.startswith(b"HEAD"):
        head, _, body = response.partition(b"\r\n\r\n")
        assert body == b"" and f"Content-Length: {len(page_bytes())}".encode() in head
    # the listener is still fine
    assert (await http(server.ws_port, b"GET / HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 200")


async def test_slow_request_head_times_out(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_ws_listener, "HANDSHAKE_TIMEOUT", 0.2)
    server = await ws_server(nursery)
    assert server.ws_port is not None
    response = await http(server.ws_port, b"GET / HTTP/1.1\r\n")  # never finished
    assert response.startswith(b"HTTP/1.1 408 ")


async def test_client_leaving_before_its_head_is_harmless(nursery: trio.Nursery) -> None:
    server = await ws_server(nursery)
    assert server.ws_port is not None
    assert await http(server.ws_port, b"", eof=True) == b""
    assert await http(server.ws_port, b"GET / HT", eof=True) == b""
    ws = await ws_connect(nursery, server)
    assert await request(ws, {"command": "subscribe", "topic": "t"}) == SUCCESS


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n", b"400"),
        (b"Connection: Upgrade\r\nUpgrade: websocket, h2c\r\nSec-WebSocket-Version: 13\r\n"
         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"400"),
        (b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\n"
         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"426"),
        (b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"400"),
    ],
)
async def test_bad_handshake_is_answered(
    nursery: trio.Nursery, headers: bytes, status: bytes
) -> None:
    server = await ws_server(nursery)
    assert server.ws_port is not None
    response = await http(server.ws_port, b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert response.split(b" ")[1] == status


async def test_handshake_with_a_bad_host_is_answered(nursery: trio.Nursery) -> None:
    # wsproto would raise on this Host inside trio-websocket's reader task
    server = await ws_server(nursery)
    assert server.ws_port is not None
    response = await http(
        server.ws_port,
        b"GET / HTTP/1.1\r\nHost: xn--zz\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    assert response.startswith(b"HTTP/1.1 400 ")


# --- the protocol over WebSocket -------------------------------------------------------


async def test_every_command(nursery: trio.Nursery) -> None:
    server = await ws_server(nursery)
    a = await ws_connect(nursery, server)
    b = await ws_connect(nursery, server)
    send = {"command": "send", "topic": "t", "msg": "m0", "delivery": "all"}
    assert await request(a, send) == SUCCESS  # index 0, cached
    assert await request(a, {**send, "msg": "m1", "cache": False}) == SUCCESS  # 1, not cached
    # subscribe replays the cache after the reply
    assert await request(b, {"command": "subscribe", "topic": "t"}) == SUCCESS
    assert await receive(b) == {**send, "index": 0}
    # last_seen skips what was seen; cache false skips the replay entirely
    assert await request(a, {"command": "subscribe", "topic": "t", "last_seen": 0}) == SUCCESS
    assert await request(a, {"command": "subscribe", "topic": "u", "cache": False}) == SUCCESS
    # a subscribed sender sees its delivery before its success
    await a.send_message(json.dumps({**send, "msg": "m2"}))
    assert await receive(a) == {**send, "msg": "m2", "index": 2}
    assert await receive(a) == SUCCESS
    assert await receive(b) == {**send, "msg": "m2", "index": 2}
    # one: exactly one subscriber gets it
    await b.send_message(json.dumps({"command": "unsubscribe", "topic": "t"}))
    assert await receive(b) == SUCCESS
    one = {"command": "send", "topic": "t", "msg": "only", "delivery": "one", "cache": True}
    await b.send_message(json.dumps(one))
    assert await receive(b) == SUCCESS
    assert await receive(a) == {**one, "index": 3}
    # unsubscribing twice is fine; b no longer gets "t"
    assert await request(b, {"command": "unsubscribe", "topic": "t"}) == SUCCESS
    assert await request(b, {**send, "msg": "m4"}) == SUCCESS
    assert await receive(a) == {**send, "msg": "m4", "index": 4}


async def test_binary_blank_and_whitespace(nursery: trio.Nursery) -> None:
    server = await ws_server(nursery)
    ws = await ws_connect(nursery, server)
    await ws.send_message(b'{"command": "subscribe", "topic": "b"}')  # binary: UTF-8 command
    assert await receive(ws) == SUCCESS
    await ws.send_message("   ")  # blank: no reply
    await ws.send_message(' \r\n {"command": "unsubscribe", "topic": "b"}\n ')
    assert await receive(ws) == SUCCESS
    await ws.send_message('{"command": "unsubscribe", "topic": "never"}')
    assert await receive(ws) == SUCCESS


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("{not json", "Could not parse json"),
        ('{"command": "send", "topic": "t"}', "Malformed json message"),
        ('{"command": "subscribe", "topic": "t", "last_seen": true}', "Malformed json message"),
        ("[1, 2]", "Malformed json message"),
        ('{"command": "subscribe", "topic": "t"}\n{"command": "subscribe", "topic": "u"}',
         "Could not parse json"),  # one message is one command, newlines or not
        (b"\xff\xfe", "Could not decode input as UTF-8"),
    ],
)
async def test_failures_keep_the_connection(
    nursery: trio.Nursery, message: str | bytes, reason: str
) -> None:
    server = await ws_server(nursery)
    ws = await ws_connect(nursery, server)
    await ws.send_message(message)
    assert await receive(ws) == failure(reason)
    assert await request(ws, {"command": "subscribe", "topic": "t"}) == SUCCESS


async def test_internal_exception_is_reported(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await ws_server(nursery)
    ws = await ws_connect(nursery, server)

    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Broker, "publish", broken)
    send = {"command": "send", "topic": "t", "msg": "x", "delivery": "all"}
    assert await request(ws, send) == failure("Internal exception")
    assert await request(ws, {"command": "subscribe", "topic": "t"}) == SUCCESS


async def test_quit_flushes_then_closes_normally(nursery: trio.Nursery) -> None:
    server = await ws_server(nursery)
    ws = await ws_connect(nursery, server)
    await ws.send_message('{"command": "subscribe", "topic": "t"}')
    await ws.send_message(" quit ")
    assert await receive(ws) == SUCCESS
    reason = await closed_reason(ws)
    assert reason.code == 1000
    await settled()
    assert ws_connections(server) == 0


async def test_shutdown_closes_websockets_with_going_away(nursery: trio.Nursery) -> None:
    server = await ws_server(nursery)
    ws = await ws_connect(nursery, server)
    assert await request(ws, {"command": "subscribe", "topic": "t"}) == SUCCESS
    server.shutdown()
    reason = await closed_reason(ws)
    assert (reason.code, reason.reason) == (1001, "server shutdown")
    with trio.fail_after(5):
        await server.stopped.wait()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", server.ws_port)  # type: ignore[arg-type]


# --- across transports --------------------------------------------------------------


async def test_tcp_publisher_to_ws_subscriber(nursery: trio.Nursery) -> None:
    server = await ws_server(nursery)
    ws = await ws_connect(nursery, server)
    assert await request(ws, {"command": "subscribe", "topic": "news"}) == SUCCESS
    tcp = await LineClient.connect(server.port)
    send = {"command": "send", "topic": "news", "msg": "héllo \"web\"", "delivery": "all"}
    assert await tcp.request(send) == SUCCESS
    assert await receive(ws) == {**send, "index": 0}


async def test_ws_publisher_to_tcp_subscriber(nursery: trio.Nursery) -> None:
    server = await ws_server(nursery)
    tcp = await LineClient.connect(server.port)
    assert await tcp.request({"command": "subscribe", "topic": "news"}) == SUCCESS
    ws = await ws_connect(nursery, server)
    send = {"command": "send", "topic": "news", "msg": "from a browser", "delivery": "all"}
    assert await request(ws, send) == SUCCESS
    assert await tcp.receive() == {**send, "index": 0}


async def test_one_delivery_across_transports(nursery: trio.Nursery) -> None:
    server = await ws_server(nursery)
    tcp = await LineClient.connect(server.port)
    assert await tcp.request({"command": "subscribe", "topic": "jobs"}) == SUCCESS
    ws = await ws_connect(nursery, server)
    assert await request(ws, {"command": "subscribe", "topic": "jobs"}) == SUCCESS
    publisher = await LineClient.connect(server.port)
    n = 64
    for i in range(n):
        await publisher.send({"command": "send", "topic": "jobs", "msg": str(i), "delivery": "one"})
    assert await publisher.receive_many(n) == [SUCCESS] * n
    # a marker "all" message tells each subscriber it has seen everything before it
    assert await publisher.request(
        {"command": "send", "topic": "jobs", "msg": "end", "delivery": "all"}
    ) == SUCCESS
    got_tcp: list[int] = []
    while (d := await tcp.receive())["msg"] != "end":
        got_tcp.append(d["index"])
    got_ws: list[int] = []
    while (d := await receive(ws))["msg"] != "end":
        got_ws.append(d["index"])
    assert sorted(got_tcp + got_ws) == list(range(n))  # each exactly once
    assert got_tcp and got_ws  # both transports take part (fails with p = 2**-63)


# --- limits --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        "x" * 1025,
        b"x" * 1025,
        "é" * 600,  # 600 characters, 1200 bytes: the limit is in bytes
    ],
    ids=["text", "binary", "multibyte-text"],
)
async def test_oversize_message_closes_with_1009(
    nursery: trio.Nursery, message: str | bytes
) -> None:
    server = await ws_server(nursery, max_line_bytes=1024, max_pending_bytes=1 << 20)
    tcp = await LineClient.connect(server.port)
    assert await tcp.request({"command": "subscribe", "topic": "t"}) == SUCCESS
    ws = await ws_connect(nursery, server)
    assert await request(ws, {"command": "subscribe", "topic": "t"}) == SUCCESS
    # exactly at the limit is fine
    at_limit = json.dumps({"command": "send", "topic": "t", "msg": "", "delivery": "all"})
    at_limit = at_limit.replace('"msg": ""', '"msg": "' + "y" * (1024 - len(at_limit)) + '"')
    assert len(at_limit.encode()) == 1024
    await ws.send_message(at_limit)
    assert (await receive(ws))["index"] == 0
    assert await receive(ws) == SUCCESS
    await ws.send_message(message)
    reason = await closed_reason(ws)
    assert reason.code == 1009
    # nothing else is affected
    assert (await tcp.receive())["index"] == 0
    send = {"command": "send", "topic": "t", "msg": "after", "delivery": "all"}
    assert await tcp.request(send) == {**send, "index": 1}
    assert await tcp.receive() == SUCCESS


async def test_slow_ws_subscriber_is_cut_off_tcp_gets_everything(nursery: trio.Nursery) -> None:
    server = await ws_server(nursery, max_line_bytes=8 << 10, max_pending_bytes=256 << 10)
    assert server.ws_port is not None
    # a WebSocket subscriber that never reads, with a small receive window
    lazy = await RawWS.connect(server.ws_port, receive_buffer=4096)
    await lazy.send(TextMessage('{"command": "subscribe", "topic": "firehose"}'))
    assert isinstance(ev := await lazy.event(), TextMessage) and json.loads(ev.data) == SUCCESS
    (lazy_conn,) = [c for c in server.connections if isinstance(c.transport, WebSocketTransport)]
    tcp = await LineClient.connect(server.port)
    assert await tcp.request({"command": "subscribe", "topic": "firehose"}) == SUCCESS

    received: list[int] = []
    done = trio.Event()

    async def read_all(total: int) -> None:
        while len(received) < total:
            received.append((await tcp.receive())["index"])
        done.set()

    publisher = await LineClient.connect(server.port)
    payload = "p" * 4000
    batch = 64
    sent = 0
    for _ in range(400):  # at most 400 * 64 * 4 kB = 100 MB
        for _ in range(batch):
            await publisher.send(
                {"command": "send", "topic": "firehose", "msg": payload, "delivery": "all"}
            )
        # the TCP subscriber reads while the publisher waits for its replies
        async with trio.open_nursery() as readers:
            readers.start_soon(read_all, sent + batch)
            assert await publisher.receive_many(batch) == [SUCCESS] * batch
        sent += batch
        if lazy_conn.outbox.overflowed:
            break
    assert lazy_conn.outbox.overflowed, "the WebSocket subscriber was never cut off"
    assert received == list(range(sent))
    # its close frame cannot get through a full window: the stream is closed within 1 s
    await settled()
    assert ws_connections(server) == 0
    # the lazy peer finds its connection closed once it reads
    with trio.fail_after(10):
        while (await lazy.event()) is not None:
            pass


# --- keepalive -----------------------------------------------------------------------


async def test_pings_keep_a_live_peer(nursery: trio.Nursery) -> None:
    # an interval long enough for this test to answer in time on a busy machine
    server = await ws_server(nursery, ws_ping_interval=0.25)
    assert server.ws_port is not None
    client = await RawWS.connect(server.ws_port)
    pings = 0
    while pings < 2:
        event = await client.event()
        assert isinstance(event, Ping), event
        pings += 1
        await client.send(event.response())
    await client.send(TextMessage('{"command": "subscribe", "topic": "t"}'))
    while isinstance(event := await client.event(), Ping):
        await client.send(event.response())
    assert isinstance(event, TextMessage) and json.loads(event.data) == SUCCESS


async def test_dead_peer_is_dropped(nursery: trio.Nursery) -> None:
    server = await ws_server(nursery, ws_ping_interval=0.1)
    assert server.ws_port is not None
    client = await RawWS.connect(server.ws_port)
    await client.send(TextMessage('{"command": "subscribe", "topic": "t"}'))
    events = []
    while (event := await client.event()) is not None:  # never answers a ping
        events.append(event)
    assert any(isinstance(e, Ping) for e in events)
    await settled()
    assert ws_connections(server) == 0
    # its subscription went with it: a "one" message waits in the cache for the next one
    tcp = await LineClient.connect(server.port)
    send = {"command": "send", "topic": "t", "msg": "kept", "delivery": "one"}
    assert await tcp.request(send) == SUCCESS
    assert await tcp.request({"command": "subscribe", "topic": "t"}) == SUCCESS
    assert await tcp.receive() == {**send, "index": 0}


# --- origins -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "origin", "ok"),
    [
        (None, None, True),  # not a browser
        (None, "OWN", True),  # the page's own origin
        (None, "http://localhost:3000", True),
        (None, "https://127.0.0.1", True),
        (None, "http://[::1]:8080", True),
        (None, "http://evil.example", False),
        (None, "null", False),
        (("https://app.example",), "https://app.example", True),
        (("https://app.example",), "https://app.example:443", True),
        (("https://app.example",), "http://app.example", False),
        (("https://app.example",), "http://localhost:3000", False),
        (("https://app.example",), "OWN", True),
        (("*",), "http://evil.example", True),
        ((), "OWN", True),  # --ws-allowed-origins '': the page's own origin only
        ((), "http://localhost:3000", False),
    ],
)
async def test_origin_check(
    nursery: trio.Nursery, allowed: tuple[str, ...] | None, origin: str | None, ok: bool
) -> None:
    server = await ws_server(nursery, ws_allowed_origins=allowed)
    if origin == "OWN":
        origin = f"http://127.0.0.1:{server.ws_port}"
    if ok:
        ws = await ws_connect(nursery, server, origin)
        assert await request(ws, {"command": "subscribe", "topic": "t"}) == SUCCESS
    else:
        assert origin is not None
        with trio.fail_after(5), pytest.raises(ConnectionRejected) as info:
            async with trio_websocket.open_websocket_url(
                ws_url(server), extra_headers=[(b"Origin", origin.encode())]
            ):
                pass
        assert info.value.status_code == 403
        assert ws_connections(server) == 0


# --- sans-IO pieces ------------------------------------------------------------------


def test_origin_normalisation() -> None:
    assert normalise_origin("HTTP://Example.COM:80/") == "http://example.com"
    assert normalise_origin("https://a.b:8443") == "https://a.b:8443"
    assert normalise_origin("http://[::1]:7001") == "http://[::1]:7001"
    for bad in ("example.com", "ftp://x", "http://x/path", "http://x:99999", "null", ""):
        with pytest.raises(ValueError):
            normalise_origin(bad)
    assert parse_origins(" https://a.b , * ,") == ("https://a.b", "*")
    assert parse_origins("") == ()


def test_origin_policy_own_origin_compares_host_and_port() -> None:
    policy = OriginPolicy.from_config(())
    assert policy.allows("http://mq.example:7001", "mq.example:7001")
    assert policy.allows("http://mq.example", "MQ.example:80")
    assert policy.allows("https://mq.example", "mq.example")
    assert not policy.allows("http://mq.example:7002", "mq.example:7001")
    assert not policy.allows("http://other.example:7001", "mq.example:7001")
    assert not policy.allows("http://mq.example:7001", "mq.example:bad")
    assert not policy.allows("http://localhost:7001", None)


def test_parse_head() -> None:
    head = parse_head(b"GET /x?y HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n"
                      b"upgrade: WebSocket\r\nX-A: 1\r\nx-a: 2")
    assert head is not None
    assert (head.method, head.path, head.version) == ("GET", "/x", "HTTP/1.1")
    assert head.headers["x-a"] == "1, 2"
    assert head.wants_websocket and "upgrade" in head.tokens("connection")
    assert handshake_problem(head) == (426, "Only WebSocket version 13 is supported")
    for bad in (b"", b"GET /", b"GET / HTTP/2", b"GET / HTTP/1.1\r\n: v", b"G\xc3T / HTTP/1.1",
                b"GET / HTTP/1.1\r\nBad Name: v", b"GET / HTTP/1.1",  # 1.1 needs Host
                b"GET /\xff HTTP/1.1\r\nHost: a"):
        assert parse_head(bad) is None, bad


def test_cli_flags() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--host", "0.0.0.0", "--ws-port", "7001",
                              "--ws-allowed-origins", "https://App.example,http://x:1"])
    config = cli.config_from_args(args)
    assert (config.ws_port, config.ws_host, config.host) == (7001, None, "0.0.0.0")
    assert config.ws_allowed_origins == ("https://app.example", "http://x:1")
    config.check()
    default = cli.config_from_args(parser.parse_args(["serve"]))
    assert default.ws_port is None and default.ws_allowed_origins is None
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--ws-allowed-origins", "not an origin"])
    with pytest.raises(ValueError):
        Config(ws_allowed_origins=("nope",)).check()


async def test_ws_port_is_off_by_default(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    assert server.ws_port is None and server.ws_listeners == []


async def test_ws_host_defaults_to_host(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, host="127.0.0.1", ws_port=0)
    assert server.ws_listeners[0].socket.getsockname()[0] == "127.0.0.1"


async def test_cli_serves_the_page_and_websocket() -> None:
    """``mq-trio serve --ws-port``, end to end: the real command line, signals included."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mq_trio", "serve", "--port", "0", "--ws-port", "0"],
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        log = b""
        with trio.fail_after(10):
            while (m := re.search(rb":(\d+) \(websocket", log)) is None:
                chunk = await process.stderr.receive_some(4096)
                assert chunk, log
                log += chunk
        ws_port = int(m[1])
        response = await http(ws_port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 200 OK") and response.endswith(page_bytes())
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{ws_port}/") as ws:
            assert await request(ws, {"command": "subscribe", "topic": "t"}) == SUCCESS
        process.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


class FakeWS:
    """Just enough of a trio-websocket connection for the transport's close codes."""

    def __init__(self) -> None:
        self.closed_with: tuple[int, str | None] | None = None

    async def send_message(self, message: str) -> None:
        await trio.sleep_forever()  # a peer that does not read

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed_with = (code, reason)


@pytest.mark.parametrize(
    ("interrupted", "going_away", "expected"),
    [
        (False, False, (1000, None)),
        (True, False, (1008, "slow consumer")),
        (True, True, (1001, "server shutdown")),
    ],
)
async def test_close_codes(
    interrupted: bool, going_away: bool, expected: tuple[int, str | None]
) -> None:
    fake = FakeWS()
    transport = WebSocketTransport(fake, "peer", 1024, lambda: going_away)  # type: ignore[arg-type]
    if interrupted:  # the connection cancels a writer stuck in send_batch
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.send_batch, [b'{"success": true}'])
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    await transport.aclose()
    assert fake.closed_with == expected


async def test_slow_subscriber_is_told_why(nursery: trio.Nursery) -> None:
    """A reader slower than the publisher: cut off, and the close frame says why."""
    server = await ws_server(nursery, max_line_bytes=4 << 10, max_pending_bytes=64 << 10)
    ws = await ws_connect(nursery, server)
    assert await request(ws, {"command": "subscribe", "topic": "t"}) == SUCCESS
    publisher = await LineClient.connect(server.port)
    line = json.dumps({"command": "send", "topic": "t", "msg": "x" * 1000, "delivery": "all"})
    # the client reads nothing while this is published; its socket buffers take some of it
    (conn,) = [c for c in server.connections if isinstance(c.transport, WebSocketTransport)]
    while not conn.outbox.overflowed:
        await publisher.send_raw((line + "\n").encode() * 100)
        await publisher.receive_many(100)
    reason = await closed_reason(ws)
    assert reason.code in (1008, 1006), reason  # 1006: the close frame did not get through
    if reason.code == 1008:
        assert reason.reason == "slow consumer"


# --- batched frames (docs/websocket.md) ------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_frames_are_what_wsproto_writes(size: int) -> None:
    """The server frames deliveries itself, many per write: byte for byte what wsproto
    would write for each one as a text message (server side: unmasked, final)."""
    from wsproto.frame_protocol import FrameProtocol

    from mq_trio.protocol import MessageConnection

    text = ("é" * (size // 2) + "a" * (size % 2)).encode()  # two-byte characters
    assert len(text) == size
    items = [text, b'{"success": true}']
    reference = FrameProtocol(client=False, extensions=[])
    expected = b"".join(reference.send_data(i.decode(), fin=True) for i in items)
    assert MessageConnection.frame_bytes(items) == expected


async def test_a_fan_out_is_written_in_batches_of_frames(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    messages: list[object] = []
    real_send_frames = websocket.ServerWebSocket.send_frames

    async def send_frames(self: websocket.ServerWebSocket, data: bytes) -> None:
        writes.append(len(data))
        await real_send_frames(self, data)

    async def send_message(self: WebSocketConnection, message: str | bytes) -> None:
        messages.append(message)
        raise AssertionError("a delivery framed one message at a time")

    monkeypatch.setattr(websocket.ServerWebSocket, "send_frames", send_frames)
    monkeypatch.setattr(websocket.ServerWebSocket, "send_message", send_message)
    server = await ws_server(nursery)
    ws = await ws_connect(nursery, server)
    assert await request(ws, {"command": "subscribe", "topic": "t"}) == SUCCESS
    publisher = await LineClient.connect(server.port)
    n = 2000
    lines = b"".join(
        json.dumps({"command": "send", "topic": "t", "msg": f"m{i}", "delivery": "all"})
        .encode() + b"\n" for i in range(n)
    )
    await publisher.send_raw(lines)
    got = [await receive(ws) for _ in range(n)]
    assert [m["index"] for m in got] == list(range(n))  # all, in order, each its own text
    assert not messages
    assert len(writes) < n // 10  # many deliveries per socket write


async def test_a_batch_reaches_a_websocket_subscriber_as_separate_messages(
    nursery: trio.Nursery,
) -> None:
    server = await ws_server(nursery)
    ws = await ws_connect(nursery, server)
    assert await request(ws, {"command": "subscribe", "topic": "t"}) == SUCCESS
    publisher = await LineClient.connect(server.port)
    batch = {"command": "batch", "topic": "t", "msgs": ["a", "b", "c"], "delivery": "all"}
    assert await publisher.request(batch) == {"success": True, "index": 0, "count": 3}
    got = [await receive(ws) for _ in range(3)]
    assert got == [{"command": "send", "topic": "t", "msg": m, "delivery": "all", "index": i}
                   for i, m in enumerate("abc")]
