"""The WebSocket port's per-connection handler: the page, or a WebSocket connection.

trio-websocket's ``serve_websocket`` answers only upgrades, so the stream is accepted
here, its request head read and judged (transports/_http.py), and then either answered
or handed, with the head replayed in front of it, to trio-websocket (``wrap_server_stream``
in transports/_websocket.py).

With TLS (--tls-cert) the stream is first wrapped and its handshake done here, in the
connection's own task, under --tls-handshake-timeout (transports/_tls.py): the page is
then served over https:// and the WebSocket is wss://, on the same port.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from ..protocol import TOO_MANY_CONNECTIONS, failure_bytes
from ..transports import _tls as tls
from ..transports._http import (
    PAGE_HEADERS,
    OriginPolicy,
    handshake_problem,
    http_response,
    load_page,
    page_bytes,
    parse_head,
)
from ..transports._tcp import peer_name
from ..transports._websocket import (
    CLOSE_TIMEOUT,
    CLOSE_TRY_AGAIN_LATER,
    RECEIVE_BYTES,
    HeadTooLarge,
    ReplayStream,
    WebSocketTransport,
    keepalive,
    read_head,
    wrap_server_stream,
)

if TYPE_CHECKING:
    from ._server import Server

log = logging.getLogger("mq_trio.websocket")

#: Time a client has to send its request head and complete the WebSocket handshake.
HANDSHAKE_TIMEOUT = 10.0

# The page is read once, when the server is loaded, and served from memory: a reinstall
# under a running server (the file replaced or briefly missing) does not break it.
_page_problem = load_page()
if _page_problem is not None:  # pragma: no cover - a broken installation
    log.warning("%s (retried on the first request)", _page_problem)


async def handle_stream(
    server: Server, stream: trio.SocketStream, refused: bool = False
) -> None:
    """Serve one TCP connection of the WebSocket listener: the page or a WebSocket.

    ``refused`` (over --max-connections): a WebSocket is accepted, given one
    ``Too many connections`` text and closed with 1013 (Try Again Later); a plain
    HTTP request gets 503. Otherwise the stream was counted in ``server.ws_handshakes``
    by the accept loop, and is given back here.
    """
    # peer_name asks a socket for its peer: the stream's, not the stream (which has none).
    peer = peer_name(getattr(stream, "socket", stream))
    secure: trio.SSLStream[tls.LingeringStream] | None = None
    try:
        if server.ssl_context is not None:
            secure = tls.server_stream(stream, server.ssl_context)
            if not await server.tls_handshake(secure, refused):
                secure = None  # closed at once below: nothing to deliver
                return
            await _dispatch(server, secure, peer, refused, tls.peer_subject(secure))
        else:
            await _dispatch(server, stream, peer, refused)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the peer went away while we answered
    except Exception:
        # serve_listeners would let this crash the server; contain it here.
        log.exception("WebSocket listener: connection %s failed", peer)
    finally:
        if not refused:
            server.ws_handshakes -= 1
        if secure is not None:
            # close_notify after the response, then half-close and discard input
            # (bounded): TLS has no half-close, and a reset could lose the response.
            with trio.CancelScope(shield=True):
                await tls.close_stream(secure)
        await trio.aclose_forcefully(stream)


async def _dispatch(
    server: Server,
    stream: trio.abc.Stream,
    peer: str,
    refused: bool = False,
    tls_subject: str | None = None,
) -> None:
    head_timeout = trio.move_on_after(HANDSHAKE_TIMEOUT)
    with head_timeout:
        try:
            received = await read_head(stream)
        except HeadTooLarge:
            await stream.send_all(http_response(431, b"Request head too large\n"))
            return
    if head_timeout.cancelled_caught:
        await stream.send_all(http_response(408, b"Request head not received in time\n"))
        return
    if received is None:
        return
    buffer, end = received
    head = parse_head(buffer[:end])
    if head is None:
        await stream.send_all(http_response(400, b"Bad request\n"))
        return
    if head.wants_websocket:
        problem = handshake_problem(head)
        if problem is not None:
            status, text = problem
            extra = [("Sec-WebSocket-Version", "13")] if status == 426 else []
            await stream.send_all(http_response(status, text.encode() + b"\n", headers=extra))
            return
        policy = OriginPolicy.from_config(server.config.ws_allowed_origins)
        origin = head.headers.get("origin")
        if not policy.allows(origin, head.headers.get("host")):
            log.info("rejecting WebSocket from %s: origin %r not allowed", peer, origin)
            await stream.send_all(http_response(403, b"Origin not allowed\n"))
            return
        await _serve_websocket(
            server, ReplayStream(stream, buffer), peer, refused, tls_subject
        )
        return
    if refused:
        await stream.send_all(http_response(503, TOO_MANY_CONNECTIONS.encode() + b"\n"))
        return
    if head.method not in ("GET", "HEAD"):
        await stream.send_all(
            http_response(405, b"Method not allowed\n", headers=[("Allow", "GET, HEAD")])
        )
        return
    head_only = head.method == "HEAD"
    if head.path in ("/", "/index.html"):
        try:
            page = page_bytes()
        except OSError as exc:
            log.error("cannot read the browser page: %s", exc)
            response = http_response(500, b"The page is unavailable\n", head_only=head_only)
        else:
            response = http_response(
                200, page, "text/html; charset=utf-8", PAGE_HEADERS, head_only=head_only
            )
    else:
        response = http_response(404, b"Not found\n", head_only=head_only)
    await stream.send_all(response)


async def _serve_websocket(
    server: Server,
    stream: ReplayStream,
    peer: str,
    refused: bool = False,
    tls_subject: str | None = None,
) -> None:
    """Finish the handshake, then run the client as an ordinary connection.

    The nursery holds trio-websocket's reader task and the keepalive task; it lives
    exactly as long as the connection.
    """
    config = server.config
    async with trio.open_nursery() as nursery:
        ws: WebSocketConnection | None = None
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            try:
                request = await wrap_server_stream(
                    nursery,
                    stream,
                    max_message_size=config.max_line_bytes,
                    receive_buffer_size=RECEIVE_BYTES,
                    peer=peer,
                )
                ws = await request.accept()
            except ConnectionClosed:
                pass
        if ws is not None and refused:
            # The handshake is accepted so that the client gets the same reply as over
            # TCP, and a close code it can act on (browsers show nothing of a 503).
            with trio.move_on_after(CLOSE_TIMEOUT):
                try:
                    await ws.send_message(failure_bytes(TOO_MANY_CONNECTIONS).decode())
                    await ws.aclose(CLOSE_TRY_AGAIN_LATER, TOO_MANY_CONNECTIONS)
                except ConnectionClosed:
                    pass
        elif ws is not None:
            if config.ws_ping_interval > 0:
                nursery.start_soon(keepalive, ws, stream, config.ws_ping_interval, peer)
            transport = WebSocketTransport(
                ws, peer, config.max_line_bytes, lambda: server.stopping, server.input_guard,
                tls_subject,
            )
            # From here it counts as one of server.connections, not as a handshake.
            server.ws_handshakes -= 1
            try:
                await server.handle_transport(transport)
            finally:
                server.ws_handshakes += 1
        nursery.cancel_scope.cancel()
