"""The WebSocket transport: one command per message, one reply or delivery per message.

Once accepted (server/_ws_listener.py), a WebSocket client is an ordinary connection
with a :class:`WebSocketTransport`: reader and writer tasks, byte budget, slow-consumer
cut-off and cleanup are the TCP code. Protocol mapping (docs/protocol.md, "WebSocket"):
one command per message (text, or binary holding UTF-8), one reply or delivery per text
message, ``quit`` closes normally (1000). Over-size messages close the WebSocket with 1009.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, TextMessage

from ..protocol import INPUT_LIMIT, MessageConnection, failure_bytes
from . import _tls as tls
from ._input import BIG_LINE, InputGuard

log = logging.getLogger("mq_trio.websocket")

MAX_HEAD_BYTES = 16 << 10
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
CLOSE_TRY_AGAIN_LATER = 1013


# --- the server side of trio-websocket ---------------------------------------------------


class ServerWebSocket(WebSocketConnection):
    """trio-websocket's connection, but a frame wsproto rejects gets its close frame.

    wsproto reports a frame it cannot accept (invalid UTF-8 in a text message: 1007;
    a protocol error: 1002) as a ``CloseConnection`` event while the connection is still
    open. trio-websocket handles that like the peer's close frame, but sends none
    (there is no peer close to answer) and closes TCP. Here the close frame with
    wsproto's code is sent first, as RFC 6455 section 7.1.7 asks.
    """

    #: For the log line (host:port); set by :func:`wrap_server_stream`.
    peer = "?"
    #: Its transport, once it is a connection of the server with an input guard: a
    #: message received in part (fragments, or a frame still arriving) is unfinished
    #: input like a TCP partial line (--line-timeout, --max-input-bytes).
    holder: WebSocketTransport | None = None

    async def _handle_message_event(self, event: BytesMessage | TextMessage) -> None:
        await super()._handle_message_event(event)
        holder = self.holder
        # A whole message in one event (the usual case) never reaches the guard.
        if holder is not None and (not event.message_finished or holder.held):
            holder.unfinished(self._message_size)

    @property
    def frames_ok(self) -> bool:
        """Whether frames built here may be written as they are: the connection is
        open and no extension (compression) was negotiated, so wsproto would frame a
        message exactly as ``MessageConnection.frame_bytes`` does."""
        connection = self._wsproto.connection
        if connection is None or connection.state is not ConnectionState.OPEN:
            return False
        # (wsproto keeps the negotiated extensions in its frame protocol; anything
        # unexpected there: frame with wsproto, one message at a time, as before)
        extensions = getattr(getattr(connection, "_proto", None), "extensions", None)
        return extensions is not None and not extensions

    async def send_frames(self, data: bytes) -> None:
        """Write whole frames (``frame_bytes``) in one send, under the connection's
        send lock, as ``send_message`` writes one."""
        if self._close_reason:
            raise ConnectionClosed(self._close_reason)
        async with self._stream_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self._abort_web_socket()
                assert self._close_reason is not None
                raise ConnectionClosed(self._close_reason) from None

    def drop_partial_message(self) -> None:
        self._message_parts = []
        self._message_size = 0

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        # A peer's close frame moves wsproto to REMOTE_CLOSING (or CLOSED, answering
        # ours): still OPEN means wsproto made this event from a frame it rejected.
        if self._wsproto.state is ConnectionState.OPEN:
            log.info("closing %s: %s (%d)", self.peer, event.reason, event.code)
            with trio.move_on_after(CLOSE_TIMEOUT):
                try:
                    await self._send(CloseConnection(code=event.code, reason=event.reason))
                except ConnectionClosed:
                    pass
        await super()._handle_close_connection_event(event)


async def wrap_server_stream(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    max_message_size: int,
    receive_buffer_size: int = RECEIVE_BYTES,
    peer: str = "?",
) -> WebSocketRequest:
    """``trio_websocket.wrap_server_stream``, with a :class:`ServerWebSocket`."""
    connection = ServerWebSocket(
        stream,
        WSConnection(ConnectionType.SERVER),
        max_message_size=max_message_size,
        receive_buffer_size=receive_buffer_size,
    )
    connection.peer = peer
    nursery.start_soon(connection._reader_task)
    return await connection._get_request()


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
        if isinstance(self.inner, trio.SSLStream):
            # wss://: close_notify even with unread input, then linger (bounded)
            await tls.close_stream(self.inner)
        else:
            await self.inner.aclose()


class WebSocketTransport:
    """Adapts a trio-websocket connection to :class:`~mq_trio.transports.Transport`.

    One message is one "line" (the rules: :class:`~mq_trio.protocol.MessageConnection`).
    There is no ``Line too long`` reply: an over-size message
    closes the WebSocket with 1009 (Message Too Big) instead of a ``Line too long``
    reply, because trio-websocket closes at once when a message passes its limit and
    nothing can follow a close frame; text within the limit in characters but over it
    in UTF-8 bytes is closed the same way here, so the rule is one.
    """

    def __init__(
        self,
        ws: WebSocketConnection,
        peer: str,
        max_message_bytes: int,
        going_away: Callable[[], bool] = lambda: False,
        guard: InputGuard | None = None,
        tls_subject: str | None = None,
    ) -> None:
        self.ws = ws
        self.peer = peer
        #: Over wss:// with mutual TLS: the verified client certificate's subject
        #: (``transports/_tls.subject_string``); else None. The connection reads it.
        self.tls_subject = tls_subject
        self.max_message_bytes = max_message_bytes
        self.wire = MessageConnection(max_message_bytes)
        self._going_away = going_away
        self._close: tuple[int, str | None] | None = None
        #: A send was cut short: the connection is dropped with output still queued.
        self._interrupted = False
        self._stopping = False
        #: What send_nowait was given; the next send_batch sends it first.
        self._unsent: list[bytes] = []
        #: The scope of the receive in progress (stop_receiving cancels it).
        self._receiving: trio.CancelScope | None = None
        #: Unfinished input (a message received in part), counted in ``guard``.
        self.held = 0
        self._guard = guard
        #: Set by abort_input: the failure reply, then a close with 1008.
        self._closing: bytes | None = None
        if guard is not None and isinstance(ws, ServerWebSocket):
            ws.holder = self

    def unfinished(self, size: int) -> None:
        """trio-websocket now holds ``size`` bytes of a message not complete yet."""
        if self._closing is not None:  # aborted: what still arrives is dropped
            if isinstance(self.ws, ServerWebSocket):
                self.ws.drop_partial_message()
            return
        guard = self._guard
        if guard is not None and not guard.update(self, size, False):
            self.abort_input(INPUT_LIMIT)

    def refuse(self, reason: str) -> None:
        """The server ends this client for a policy reason (auth: failed, timed out,
        expired): close with 1008 and ``reason`` once what is queued is sent."""
        self._close = (CLOSE_POLICY_VIOLATION, reason)

    def abort_input(self, reason: str) -> None:
        """Drop the partial message, reply ``reason`` and close (1008) after it."""
        ws = self.ws
        if isinstance(ws, ServerWebSocket):
            ws.drop_partial_message()
        if self._guard is not None:
            self._guard.release(self)
        self._closing = failure_bytes(reason)
        self._close = (CLOSE_POLICY_VIOLATION, reason)
        if self._receiving is not None:
            self._receiving.cancel()

    async def receive_lines(self) -> list[bytes] | None:
        if self._closing is not None:
            return []  # closing_reply gives the failure; the connection stops reading
        if self._close is not None or self._stopping:
            return None
        message: str | bytes | None = None
        with trio.CancelScope() as self._receiving:
            try:
                message = await self.ws.get_message()
            except ConnectionClosed:
                pass
        self._receiving = None
        if self._closing is not None:
            return []
        if message is None:  # closed, or stopped
            return None
        if len(message) >= BIG_LINE and self._guard is not None:
            await self._guard.turn()  # one big command per scheduler pass, as over TCP
        # Text is valid UTF-8: wsproto rejects it otherwise (1007, see ServerWebSocket).
        lines = self.wire.receive_message(message)
        if self.wire.too_big:
            log.info("closing %s: message over %d bytes", self.peer, self.max_message_bytes)
            self._close = (CLOSE_MESSAGE_TOO_BIG, "Line too long")
            return None
        return lines

    def closing_reply(self) -> bytes | None:
        # An over-size message closes with 1009: nothing can follow a close. A partial
        # message cut off (abort_input) gets its failure as text, then a close (1008).
        return self._closing

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
            if isinstance(ws, ServerWebSocket) and ws.frames_ok:
                if items:
                    await ws.send_frames(self.wire.frame_bytes(items))
            else:
                for text in self.wire.frame(items):
                    await ws.send_message(text)
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
        if self._guard is not None:
            self._guard.release(self)
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


class HeadTooLarge(Exception):
    pass


async def read_head(
    stream: trio.abc.Stream, limit: int = MAX_HEAD_BYTES
) -> tuple[bytes, int] | None:
    """Read until the blank line ending a request head: (all bytes read, head length).

    ``None`` when the client closes first; ``HeadTooLarge`` past ``limit``.
    """
    buffer = b""
    while True:
        end = buffer.find(b"\r\n\r\n", max(0, len(buffer) - RECEIVE_BYTES - 3))
        if end >= 0:
            if end > limit:
                raise HeadTooLarge
            return buffer, end
        if len(buffer) > limit:
            raise HeadTooLarge
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            return None
        buffer += data
