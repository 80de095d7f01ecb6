"""The client's TLS (``open_client(..., ssl_context=...)``): certificates from a trustme CA.

The client side is tested against small TLS servers written here (a line server that
answers every command with success, and a listener that never starts the handshake), so
that verification failures and timeouts are the client's own; then against the real
server's TLS listeners (TCP and wss://), with the pytest plugin's test CA.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trustme

from mq_trio import ConnectError, MQError
from mq_trio.client import ConnectionLost, open_client
from mq_trio.testing import AuthFile, Certificates, ServerFactory

Handler = Callable[[trio.abc.Stream], Awaitable[None]]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def answer_success(stream: trio.abc.Stream) -> None:
    """A stand-in server: every line gets ``{"success": true}``; lines are recorded."""
    buffer = b""
    try:
        while data := await stream.receive_some(65536):
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                json.loads(line)
                await stream.send_all(b'{"success": true}\r\n')
    except trio.BrokenResourceError:
        pass


@asynccontextmanager
async def tls_server(context: ssl.SSLContext, handler: Handler = answer_success
                     ) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_ssl_over_tcp, handler, 0, context, host="127.0.0.1")
        )
        yield listeners[0].transport_listener.socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_tls_round_trip(ca: trustme.CA, server_ssl: ssl.SSLContext) -> None:
    async with tls_server(server_ssl) as port:
        async with open_client("127.0.0.1", port, ssl_context=client_context(ca)) as client:
            await client.send("t", "over TLS")
            await client.subscribe("t")
        # the certificate is for localhost too, and that is the name checked there
        async with open_client("localhost", port, ssl_context=client_context(ca)) as client:
            await client.send("t", "by name")


async def test_a_certificate_from_another_ca_is_refused(server_ssl: ssl.SSLContext) -> None:
    other = trustme.CA()
    async with tls_server(server_ssl) as port:
        with pytest.raises(ConnectError) as caught:
            async with open_client("127.0.0.1", port, ssl_context=client_context(other)):
                pass
    text = caught.value.reason
    assert text.startswith(f"TLS handshake with 127.0.0.1:{port} failed: ")
    assert "certificate verification failed" in text
    assert "\n" not in text


async def test_the_system_cas_do_not_trust_a_test_ca(server_ssl: ssl.SSLContext) -> None:
    async with tls_server(server_ssl) as port:
        with pytest.raises(ConnectError, match="certificate verification failed"):
            async with open_client("127.0.0.1", port, ssl_context=ssl.create_default_context()):
                pass


async def test_a_certificate_for_another_host_is_refused(ca: trustme.CA) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mq.example.org").configure_cert(context)
    async with tls_server(context) as port:
        with pytest.raises(ConnectError, match="certificate verification failed.*mismatch"):
            async with open_client("127.0.0.1", port, ssl_context=client_context(ca)):
                pass


async def test_a_handshake_that_never_completes_times_out(ca: trustme.CA) -> None:
    """A plain TCP listener that never answers the ClientHello."""
    accepted = []

    async def silent(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(ConnectError) as caught:
            async with open_client(
                "127.0.0.1", port, ssl_context=client_context(ca), connect_timeout=0.3
            ):
                pass
        nursery.cancel_scope.cancel()
    assert caught.value.reason == (
        f"TLS handshake with 127.0.0.1:{port} did not complete within 0.3 s"
    )
    assert len(accepted) == 1


async def test_tls_client_to_a_plain_server_fails_clearly(ca: trustme.CA) -> None:
    async def plain(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)  # the ClientHello, as a plain server sees it
        await stream.send_all(b'{"success": false, "reason": "Could not parse json"}\r\n')
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, plain, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(ConnectError, match=r"TLS handshake with .* failed: TLS error"):
            async with open_client("127.0.0.1", port, ssl_context=client_context(ca),
                                   connect_timeout=5):
                pass
        nursery.cancel_scope.cancel()


async def test_ssl_context_with_a_plain_ws_url_is_refused(ca: trustme.CA) -> None:
    with pytest.raises(ValueError, match="use wss://"):
        async with open_client("ws://127.0.0.1:1/", ssl_context=client_context(ca)):
            pass


async def test_wss_to_a_trio_websocket_server(ca: trustme.CA, server_ssl: ssl.SSLContext
                                              ) -> None:
    from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                json.loads(await ws.get_message())
                await ws.send_message('{"success": true}')
        except ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(serve_websocket, handler, "127.0.0.1", 0, ssl_context=server_ssl)
        )
        port = server.port
        async with open_client(f"wss://127.0.0.1:{port}/", ssl_context=client_context(ca)
                               ) as client:
            await client.send("t", "over wss")
        with pytest.raises(ConnectError, match="certificate verification failed"):
            async with open_client(f"wss://127.0.0.1:{port}/"):  # the system CAs
                pass
        nursery.cancel_scope.cancel()


# --- the real server's TLS listeners (the plugin's mq_tls CA) -----------------------------


async def test_real_server_over_tls_tcp_and_wss(mq_server_factory: ServerFactory,
                                                mq_tls: Certificates) -> None:
    server = await mq_server_factory(tls=True, ws_port=0)
    context = mq_tls.client_context()
    async with open_client(*server.address, ssl_context=context) as tcp, open_client(
        f"wss://localhost:{server.ws_port}/", ssl_context=context
    ) as wss:
        await wss.subscribe("t")
        await tcp.send("t", "from TLS over TCP")
        assert (await wss.receive()).msg == "from TLS over TCP"
    with pytest.raises(ConnectError, match="certificate verification failed"):
        async with open_client(*server.address, ssl_context=client_context(trustme.CA())):
            pass
    with pytest.raises(ConnectError, match="certificate verification failed"):
        async with open_client(f"wss://127.0.0.1:{server.ws_port}/"):  # the system CAs
            pass


async def test_real_server_reconnect_over_tls(nursery: trio.Nursery,
                                              mq_server_factory: ServerFactory,
                                              mq_tls: Certificates) -> None:
    from mq_trio.client import Backoff
    from mq_trio.testing import restart_server

    server = await mq_server_factory(tls=True)
    async with open_client(*server.address, ssl_context=mq_tls.client_context(),
                           reconnect=Backoff(initial=0.01, maximum=0.05)) as sub:
        await sub.subscribe("t")
        new = await restart_server(nursery, server)
        async with open_client(*new.address, ssl_context=mq_tls.client_context()) as pub:
            await pub.send("t", "after")
        with trio.fail_after(10):
            assert (await sub.receive()).msg == "after"
        assert sub.reconnects == 1


async def test_mutual_tls_certificate_is_the_identity(
    mq_server_factory: ServerFactory, mq_tls: Certificates, mq_auth: AuthFile
) -> None:
    mq_auth.add_user("alice", certificate=mq_tls.client_subject("alice"),
                     publish=["alice.*"], subscribe=[])
    server = await mq_server_factory(tls="mutual", auth=True)
    # No auth command: the certificate authenticated the connection.
    async with open_client(*server.address, ssl_context=mq_tls.client_context(cert="alice")
                           ) as alice:
        await alice.send("alice.news", "signed")
        with pytest.raises(MQError, match="Permission denied"):
            await alice.send("bob.news", "not mine")
    # A certificate the auth file does not name still needs an auth command.
    async with open_client(*server.address, ssl_context=mq_tls.client_context(cert="eve")
                           ) as eve:
        with pytest.raises(MQError, match="Not authenticated"):
            await eve.send("alice.news", "x")
    async with open_client(*server.address, ssl_context=mq_tls.client_context(cert="eve"),
                           token=mq_auth.token) as eve:
        await eve.send("alice.news", "with a token")
    # Without a client certificate nothing gets through: with TLS 1.3 the server's
    # refusal arrives after the client's side of the handshake, at the first command.
    with pytest.raises(ConnectionLost) as caught:
        async with open_client(*server.address, ssl_context=mq_tls.client_context()) as c:
            await c.send("t", "x")
    assert caught.value.reason.startswith("connection broken (")
