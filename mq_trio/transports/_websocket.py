"""WebSocket clients and the browser page, served on one port.

A browser needs two things from the same origin: the page (a plain HTTP ``GET``) and the
WebSocket (a ``GET`` with ``Upgrade: websocket``). trio-websocket's ``serve_websocket``
answers only the second, so this module accepts the TCP stream itself, reads the request
head, and either answers it (the page, 400/403/404/405/431) or hands the stream, with the
head replayed in front of it, to ``trio_websocket.wrap_server_stream``.

Once accepted, a WebSocket client is an ordinary :class:`~mq_trio.connection.Connection`
with a :class:`WebSocketTransport`: reader and writer tasks, byte budget, slow-consumer
cut-off and cleanup are the TCP code. Protocol mapping (PROTOCOL.md section 6): one command
per message (text, or binary holding UTF-8), one reply or delivery per text message,
``quit`` closes normally (1000). Over-size messages close the WebSocket with 1009.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import attrs
import h11
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection

from ._tcp import peer_name

if TYPE_CHECKING:
    from ..server import Server

log = logging.getLogger("mq_trio.websocket")

#: Longest request head (request line and headers) accepted; longer gets 431.
MAX_HEAD_BYTES = 16 << 10
#: Time a client has to send its request head and complete the WebSocket handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Default seconds between keepalive pings; a ping unanswered for as long drops the peer.
DEFAULT_PING_INTERVAL = 20.0
#: Time allowed for the WebSocket closing handshake before the TCP stream is just closed.
CLOSE_TIMEOUT = 1.0
#: trio-websocket reads 4 KiB at a time by default; that costs syscalls on busy clients.
RECEIVE_BYTES = 64 << 10

#: Close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009

#: Host names whose origins the default policy accepts (a browser resolves these locally).
LOCAL_HOSTNAMES = frozenset(("localhost", "127.0.0.1", "::1"))
_DEFAULT_PORTS = {"http": 80, "https": 443}


# --- origin policy (sans-IO) ---------------------------------------------------------


def normalise_origin(text: str) -> str:
    """``scheme://host[:port]`` in lower case, default port dropped; ValueError otherwise."""
    parts = urlsplit(text.strip().lower())
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not an origin: {text!r} ({exc})") from None
    if (
        parts.scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ValueError(f"not an origin (expected scheme://host[:port]): {text!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is None or port == _DEFAULT_PORTS[parts.scheme]:
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


def parse_origins(text: str) -> tuple[str, ...]:
    """The ``--ws-allowed-origins`` value: comma-separated origins, or ``*``."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    return tuple(item if item == "*" else normalise_origin(item) for item in items)


@attrs.frozen
class OriginPolicy:
    """Which ``Origin`` may open a WebSocket (browsers send it; other clients need not).

    Always allowed: no ``Origin`` header (not a browser: nothing to protect, such a
    client can send any header it likes) and the page's own origin (``Origin`` names the
    same host and port as the request's ``Host``). Then either the localhost origins
    (the default, ``allowed=None``) or exactly the configured list; ``*`` allows any.
    """

    allowed: frozenset[str] | None = None

    @classmethod
    def from_config(cls, origins: Iterable[str] | None) -> OriginPolicy:
        if origins is None:
            return cls(None)
        return cls(frozenset(o if o == "*" else normalise_origin(o) for o in origins))

    def allows(self, origin: str | None, host: str | None) -> bool:
        if origin is None:
            return True
        try:
            origin = normalise_origin(origin)
        except ValueError:  # "null" (file: pages, sandboxed frames) and garbage
            return self.allowed is not None and "*" in self.allowed
        if host is not None and _same_host(origin, host):
            return True
        if self.allowed is None:
            hostname = urlsplit(origin).hostname or ""
            return hostname in LOCAL_HOSTNAMES or hostname.endswith(".localhost")
        return "*" in self.allowed or origin in self.allowed


def _same_host(origin: str, host_header: str) -> bool:
    """Whether ``Host`` names the origin's host and port (the page's own origin)."""
    o = urlsplit(origin)
    h = urlsplit("//" + host_header.strip().lower())
    try:
        default = _DEFAULT_PORTS[o.scheme]
        return o.hostname == h.hostname and (o.port or default) == (h.port or default)
    except ValueError:  # a bad port in Host
        return False


# --- the request head (sans-IO) --------------------------------------------------------


@attrs.frozen
class RequestHead:
    method: str
    target: str
    version: str
    #: Lower-case names; repeated headers joined with ", " (RFC 9110 section 5.3).
    headers: dict[str, str]

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def tokens(self, name: str) -> set[str]:
        """The comma-separated tokens of a header, in lower case."""
        return {t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()}

    @property
    def wants_websocket(self) -> bool:
        return "websocket" in self.tokens("upgrade")


def parse_head(data: bytes) -> RequestHead | None:
    """Parse a request head (without its blank line); ``None`` if it is not valid HTTP/1.x.

    h11 does the parsing because wsproto, under trio-websocket, parses the handshake with
    it again: a head accepted here is one the handshake will not choke on.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(data) + 8)
    conn.receive_data(data + b"\r\n\r\n")
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    headers: dict[str, str] = {}
    for raw_name, raw_value in event.headers:
        name, value = raw_name.decode("ascii"), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return RequestHead(
        event.method.decode("ascii"),
        event.target.decode("ascii"),
        "HTTP/" + event.http_version.decode("ascii"),
        headers,
    )


def handshake_problem(head: RequestHead) -> tuple[int, str] | None:
    """Why this upgrade request cannot become a WebSocket (status, text), or None.

    The same checks wsproto makes, done first so that a bad handshake gets its answer
    here instead of stalling trio-websocket's ``wrap_server_stream``.
    """
    if head.method != "GET" or head.version != "HTTP/1.1":
        return 400, "A WebSocket handshake is a GET over HTTP/1.1"
    if head.headers.get("upgrade", "").lower() != "websocket":
        return 400, "Expected 'Upgrade: websocket'"
    if "upgrade" not in head.tokens("connection"):
        return 400, "Missing header 'Connection: Upgrade'"
    try:
        head.headers["host"].encode("latin-1").decode("idna")
    except (KeyError, UnicodeError):
        return 400, "Missing or invalid header 'Host'"
    if head.headers.get("sec-websocket-version") != "13":
        return 426, "Only WebSocket version 13 is supported"
    if not head.headers.get("sec-websocket-key"):
        return 400, "Missing header 'Sec-WebSocket-Key'"
    return None


_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
}


def http_response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    headers: Iterable[tuple[str, str]] = (),
    *,
    head_only: bool = False,
) -> bytes:
    """One complete HTTP/1.1 response; the connection closes after it."""
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "X-Content-Type-Options: nosniff",
        *(f"{name}: {value}" for name, value in headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


@functools.cache
def page_bytes() -> bytes:
    """The browser page, shipped as package data (read once)."""
    return importlib.resources.files("mq_trio").joinpath("static/index.html").read_bytes()


_PAGE_HEADERS = (
    ("Cache-Control", "no-cache"),
    ("X-Frame-Options", "DENY"),
    # Inline script and style only; WebSocket connections to any server the user types.
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src data:; connect-src ws: wss:; base-uri 'none'; form-action 'none'",
    ),
)


# --- streams and the transport ---------------------------------------------------------


class ReplayStream(trio.abc.Stream):
    """A stream that first returns bytes already read from ``inner``, then reads on.

    The request head was read to decide between page and WebSocket; trio-websocket
    must see it again to do the handshake.
    """

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class WebSocketTransport:
    """Adapts a trio-websocket connection to :class:`~mq_trio.connection.Transport`.

    One message is one "line". ``line_too_long`` stays False: an over-size message
    closes the WebSocket with 1009 (Message Too Big) instead of a ``Line too long``
    reply, because trio-websocket closes at once when a message passes its limit and
    nothing can follow a close frame; text within the limit in characters but over it
    in UTF-8 bytes is closed the same way here, so the rule is one.
    """

    line_too_long = False

    def __init__(
        self,
        ws: WebSocketConnection,
        peer: str,
        max_message_bytes: int,
        going_away: Callable[[], bool] = lambda: False,
    ) -> None:
        self.ws = ws
        self.peer = peer
        self.max_message_bytes = max_message_bytes
        self._going_away = going_away
        self._close: tuple[int, str | None] | None = None
        #: A send was cut short: the connection is dropped with output still queued.
        self._interrupted = False
        self._stopping = False
        #: What send_nowait was given; the next send_batch sends it first.
        self._unsent: list[bytes] = []
        #: The scope of the receive in progress (stop_receiving cancels it).
        self._receiving: trio.CancelScope | None = None

    async def receive_lines(self) -> list[bytes] | None:
        if self._close is not None or self._stopping:
            return None
        message: str | bytes | None = None
        with trio.CancelScope() as self._receiving:
            try:
                message = await self.ws.get_message()
            except ConnectionClosed:
                pass
        self._receiving = None
        if message is None:  # closed, or stopped
            return None
        if isinstance(message, str):
            data = message.encode("utf-8")  # wsproto already rejected invalid UTF-8 (1007)
            if len(data) > self.max_message_bytes:
                log.info("closing %s: message over %d bytes", self.peer, self.max_message_bytes)
                self._close = (CLOSE_MESSAGE_TOO_BIG, "Line too long")
                return None
            return [data]
        return [bytes(message)]

    def stop_receiving(self) -> None:
        self._stopping = True
        if self._receiving is not None:
            self._receiving.cancel()

    def send_nowait(self, items: list[bytes]) -> bool:
        # trio-websocket has no non-blocking send: the writer sends them.
        self._unsent.extend(items)
        return False

    async def send_batch(self, items: list[bytes]) -> None:
        ws = self.ws
        if self._unsent:
            items, self._unsent = self._unsent + items, []
        try:
            for item in items:
                await ws.send_message(item.decode("utf-8"))
        except ConnectionClosed as exc:
            raise trio.BrokenResourceError("the WebSocket is closed") from exc
        except trio.Cancelled:
            # The connection cancels its writer when the client is cut off as a slow
            # consumer (or its flush deadline passes): say so in the close frame.
            self._interrupted = True
            raise

    def close_code(self) -> tuple[int, str | None]:
        """Why the server closes: 1009 over-size, 1001 shutdown, 1008 slow consumer, 1000."""
        if self._close is not None:
            return self._close
        if self._going_away():
            return CLOSE_GOING_AWAY, "server shutdown"
        if self._interrupted:
            return CLOSE_POLICY_VIOLATION, "slow consumer"
        return CLOSE_NORMAL, None

    async def aclose(self) -> None:
        """Close with a reason the client can act on (see ``close_code``)."""
        code, reason = self.close_code()
        # trio-websocket closes the TCP stream when its closing handshake ends or is cut.
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self.ws.aclose(code, reason)


async def keepalive(ws: WebSocketConnection, stream: trio.abc.Stream, interval: float,
                    peer: str) -> None:
    """Ping every ``interval`` seconds; no pong within ``interval``: close the stream.

    Closing the stream (not the WebSocket: a dead peer would never finish that
    handshake) wakes the connection's reader and writer with errors, so the ordinary
    cleanup runs. A peer that stops reading for that long is dropped the same way.
    """
    while True:
        await trio.sleep(interval)
        with trio.move_on_after(interval):
            try:
                await ws.ping()
            except ConnectionClosed:
                return
            continue
        log.info("dropping %s: no pong within %.1f s", peer, interval)
        await trio.aclose_forcefully(stream)
        return


# --- the listener's per-connection handler ---------------------------------------------


class _HeadTooLarge(Exception):
    pass


async def read_head(
    stream: trio.abc.Stream, limit: int = MAX_HEAD_BYTES
) -> tuple[bytes, int] | None:
    """Read until the blank line ending a request head: (all bytes read, head length).

    ``None`` when the client closes first; ``_HeadTooLarge`` past ``limit``.
    """
    buffer = b""
    while True:
        end = buffer.find(b"\r\n\r\n", max(0, len(buffer) - RECEIVE_BYTES - 3))
        if end >= 0:
            if end > limit:
                raise _HeadTooLarge
            return buffer, end
        if len(buffer) > limit:
            raise _HeadTooLarge
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            return None
        buffer += data


async def handle_stream(server: Server, stream: trio.SocketStream) -> None:
    """Serve one TCP connection of the WebSocket listener: the page or a WebSocket."""
    peer = peer_name(stream)
    try:
        await _dispatch(server, stream, peer)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the peer went away while we answered
    except Exception:
        # serve_listeners would let this crash the server; contain it here.
        log.exception("WebSocket listener: connection %s failed", peer)
    finally:
        await trio.aclose_forcefully(stream)


async def _dispatch(server: Server, stream: trio.SocketStream, peer: str) -> None:
    head_timeout = trio.move_on_after(HANDSHAKE_TIMEOUT)
    with head_timeout:
        try:
            received = await read_head(stream)
        except _HeadTooLarge:
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
        await _serve_websocket(server, ReplayStream(stream, buffer), peer)
        return
    if head.method not in ("GET", "HEAD"):
        await stream.send_all(
            http_response(405, b"Method not allowed\n", headers=[("Allow", "GET, HEAD")])
        )
        return
    head_only = head.method == "HEAD"
    if head.path in ("/", "/index.html"):
        response = http_response(
            200, page_bytes(), "text/html; charset=utf-8", _PAGE_HEADERS, head_only=head_only
        )
    else:
        response = http_response(404, b"Not found\n", head_only=head_only)
    await stream.send_all(response)


async def _serve_websocket(server: Server, stream: ReplayStream, peer: str) -> None:
    """Finish the handshake, then run the client as an ordinary connection.

    The nursery holds trio-websocket's reader task and the keepalive task; it lives
    exactly as long as the connection.
    """
    config = server.config
    async with trio.open_nursery() as nursery:
        ws: WebSocketConnection | None = None
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            try:
                request = await trio_websocket.wrap_server_stream(
                    nursery,
                    stream,
                    max_message_size=config.max_line_bytes,
                    receive_buffer_size=RECEIVE_BYTES,
                )
                ws = await request.accept()
            except ConnectionClosed:
                pass
        if ws is not None:
            if config.ws_ping_interval > 0:
                nursery.start_soon(keepalive, ws, stream, config.ws_ping_interval, peer)
            transport = WebSocketTransport(
                ws, peer, config.max_line_bytes, lambda: server.stopping
            )
            await server.handle_transport(transport)
        nursery.cancel_scope.cancel()
