"""TLS on the WebSocket port (docs/security.md, "TLS"): wss:// and the page over
https:// on the same port, the handshake under its timeout in the connection's own
task, the page's own origin over https, and mutual TLS over wss://."""

from __future__ import annotations

import json
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
import trustme
from support import start_server
from test_tls import Certs, make_certs, refused_by_server
from trio_websocket import ConnectionRejected, WebSocketConnection

from mq_trio.server import Server
from mq_trio.transports import _websocket as websocket
from mq_trio.transports._http import page_bytes
from mq_trio.transports._websocket import WebSocketTransport

OK = {"success": True}


@pytest.fixture(autouse=True)
def short_close_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests end by cancelling clients and server at once (see test_websocket.py)."""
    monkeypatch.setattr(websocket, "CLOSE_TIMEOUT", 0.05)


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path)


async def tls_ws_server(nursery: trio.Nursery, certs: Certs, mutual: bool = False,
                        **overrides: Any) -> Server:
    return await start_server(nursery, ws_port=0, **certs.config(mutual, **overrides))


def wss_url(server: Server) -> str:
    return f"wss://127.0.0.1:{server.ws_port}/"


async def wss_connect(
    nursery: trio.Nursery, server: Server, context: ssl.SSLContext,
    origin: str | None = None,
) -> WebSocketConnection:
    headers = [(b"Origin", origin.encode())] if origin is not None else None
    with trio.fail_after(5):
        return await trio_websocket.connect_websocket_url(
            nursery, wss_url(server), ssl_context=context, extra_headers=headers
        )


async def request(ws: WebSocketConnection, obj: Any) -> Any:
    await ws.send_message(json.dumps(obj))
    with trio.fail_after(5):
        return json.loads(await ws.get_message())


def ws_transports(server: Server) -> list[WebSocketTransport]:
    return [c.transport for c in server.connections
            if isinstance(c.transport, WebSocketTransport)]


async def test_wss_round_trip(
    nursery: trio.Nursery, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mq_trio.server")
    server = await tls_ws_server(nursery, certs)
    port = server.ws_port
    assert (f"listening on 127.0.0.1:{port} (websocket, tls, page at "
            f"https://127.0.0.1:{port}/)") in caplog.text
    context = certs.client_context()
    subscriber = await wss_connect(nursery, server, context)
    publisher = await wss_connect(nursery, server, context)
    assert await request(subscriber, {"command": "subscribe", "topic": "t"}) == OK
    send = {"command": "send", "topic": "t", "msg": "over wss", "delivery": "all"}
    assert await request(publisher, send) == OK
    with trio.fail_after(5):
        assert json.loads(await subscriber.get_message()) == {**send, "index": 0}
    assert [t.tls_subject for t in ws_transports(server)] == [None, None]
    # quit closes normally (1000), over TLS too
    await publisher.send_message("quit")
    with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as info:
        await publisher.get_message()
    assert info.value.reason is not None and info.value.reason.code == 1000


async def https_get(port: int, context: ssl.SSLContext, path: str = "/") -> bytes:
    """A whole HTTP/1.1 response over TLS, read until the server's close_notify."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    try:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        )
        response = b""
        with trio.fail_after(5):
            while data := await stream.receive_some(65536):  # a TLS error raises
                response += data
        return response
    finally:
        await trio.aclose_forcefully(stream)


async def test_page_over_https(nursery: trio.Nursery, certs: Certs) -> None:
    server = await tls_ws_server(nursery, certs)
    assert server.ws_port is not None
    response = await https_get(server.ws_port, certs.client_context())
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/html; charset=utf-8" in head
    assert body == page_bytes()
    assert (await https_get(server.ws_port, certs.client_context(), "/nope")).startswith(
        b"HTTP/1.1 404 ")
    # a client speaking plain HTTP to the TLS port gets no page
    stream = await trio.open_tcp_stream("127.0.0.1", server.ws_port)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(5):
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
    assert not data.startswith(b"HTTP/")
    await stream.aclose()
    await server.wait_until(lambda: server.tls_failures == 1 and server.open_connections == 0)


async def test_own_https_origin_is_allowed(nursery: trio.Nursery, certs: Certs) -> None:
    """The page served over https://host:port opens its WebSocket with that origin."""
    server = await tls_ws_server(nursery, certs, ws_allowed_origins=("https://example.com",))
    context = certs.client_context()
    own = await wss_connect(nursery, server, context, f"https://127.0.0.1:{server.ws_port}")
    assert await request(own, {"command": "subscribe", "topic": "t"}) == OK
    listed = await wss_connect(nursery, server, context, "https://example.com")
    assert await request(listed, {"command": "subscribe", "topic": "t"}) == OK
    for origin in ("https://evil.example", f"https://127.0.0.1:{server.port}"):
        with trio.fail_after(5), pytest.raises(ConnectionRejected) as info:
            async with trio_websocket.open_websocket_url(
                wss_url(server), context, extra_headers=[(b"Origin", origin.encode())]
            ):
                pass
        assert info.value.status_code == 403


async def test_wss_mutual_tls(nursery: trio.Nursery, certs: Certs) -> None:
    server = await tls_ws_server(nursery, certs, mutual=True)
    # TLS with a bad client certificate: none, or one from another CA
    for cert in (None, trustme.CA().issue_cert("mallory@example.com")):
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", server.ws_port or 0, ssl_context=certs.client_context(cert)
        )
        with trio.fail_after(5):
            assert await refused_by_server(stream)
    await server.wait_until(lambda: server.tls_failures == 2 and server.open_connections == 0)
    bob = certs.client_cert(common_name="bob", organization_name="Example Corp",
                            organization_unit_name="Ops")
    ws = await wss_connect(nursery, server, certs.client_context(bob))
    assert await request(ws, {"command": "subscribe", "topic": "t"}) == OK
    assert [t.tls_subject for t in ws_transports(server)] == ["O=Example Corp,OU=Ops,CN=bob"]


async def test_handshake_timeout_on_the_websocket_port(
    nursery: trio.Nursery, certs: Certs
) -> None:
    """A client that never starts TLS is closed after --tls-handshake-timeout; meanwhile
    it counts against --max-connections (one more gets ``Too many connections``)."""
    server = await tls_ws_server(nursery, certs, tls_handshake_timeout=0.5,
                                 max_connections=1)
    silent = await trio.open_tcp_stream("127.0.0.1", server.ws_port or 0)
    started = trio.current_time()
    await server.wait_until(lambda: server.ws_handshakes == 1)
    refused = await wss_connect(nursery, server, certs.client_context())
    with trio.fail_after(5):
        assert json.loads(await refused.get_message()) == {
            "success": False, "reason": "Too many connections"}
    with trio.fail_after(5):
        assert await silent.receive_some(100) == b""
    assert trio.current_time() - started >= 0.45
    await silent.aclose()
    await server.wait_until(lambda: server.open_connections == 0)
    assert server.tls_failures == 1
