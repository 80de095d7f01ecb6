"""The server's side of one connection, sans-IO (in the manner of h11 and wsproto).

Bytes (TCP) or messages (WebSocket) in, lines to parse out; encoded replies and
deliveries in, framed bytes or texts out. The wire rules live here, not in the trio
transports: lines end at ``\\n`` (a ``\\r`` before it is whitespace to the parser),
replies end in ``\\r\\n``, a line over the limit ends the connection after a
``Line too long`` reply (the lines before it still count), a last line without its
newline counts at end of input, and the reply order is the order of the items given to
:meth:`frame`. Parsing a line is :func:`~mq_trio.protocol.parse_line` (``quit`` is one
of its events); the connection calls it directly, on the hot path of every message.
"""

from __future__ import annotations

from ._commands import DEFAULT_MAX_LINE_BYTES, LINE_TOO_LONG
from ._encode import failure_bytes
from ._framing import LineBuffer

#: What ends every reply and delivery on a line transport.
TERMINATOR = b"\r\n"

_LINE_TOO_LONG = failure_bytes(LINE_TOO_LONG)


class LineConnection(LineBuffer):
    """One line-protocol connection's wire state (TCP, or any byte stream).

    The line buffer is this object's base class rather than an object it holds: every
    connection has one, and 10,000 idle connections pay for each object they keep.
    """

    __slots__ = ("_closing", "received")

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        super().__init__(max_line_bytes)
        #: Bytes received so far (metrics: one addition per chunk).
        self.received = 0
        #: Set by :meth:`abort`: the reply before closing, instead of any further input.
        self._closing: bytes | None = None

    def abort(self, reason: str) -> None:
        """Drop the unfinished line and end the input with a ``reason`` failure reply
        (``Line timeout``, ``Too much unfinished input``): :meth:`closing_reply` gives it,
        and no more lines come out."""
        self.release()
        self._closing = failure_bytes(reason)

    def release(self) -> None:
        """Drop the unfinished line now (the connection is closing); the byte count stays
        (metrics read it when the connection is retired)."""
        self._partial = None
        self.too_long = False

    def receive_data(self, data: bytes | bytearray) -> list[bytes]:
        """The complete lines ``data`` finishes (maybe none). Once a line is over the
        limit, only the lines before it come out, and :meth:`closing_reply` says why."""
        if self._closing is not None:
            return []
        self.received += len(data)
        return self.feed(data)

    def receive_eof(self) -> list[bytes]:
        """End of input: a last line without its newline still counts."""
        if self._closing is not None:
            return []
        tail = self.pending
        return [tail] if tail else []

    def closing_reply(self) -> bytes | None:
        """The last reply before the server closes on its own (``Line too long``, or
        what :meth:`abort` was given)."""
        if self._closing is not None:
            return self._closing
        return _LINE_TOO_LONG if self.too_long else None

    @staticmethod
    def frame(items: list[bytes]) -> bytes:
        """One write for encoded items, each terminated; takes ``items`` over (appends
        to it: joining once copies the bytes once)."""
        items.append(b"")
        return TERMINATOR.join(items)


class MessageConnection:
    """One WebSocket connection's protocol state: one command per message."""

    __slots__ = ("max_message_bytes", "too_big", "received")

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        #: Bytes of the messages received so far (metrics).
        self.received = 0
        #: A message was over the limit: the transport closes with 1009 (Message Too Big).
        self.too_big = False

    def receive_message(self, message: str | bytes | bytearray) -> list[bytes]:
        """The command a message carries (text, or binary holding UTF-8), as a line.

        Text within the limit in characters but over it in UTF-8 bytes is refused like
        an over-size message (trio-websocket counts characters), so the rule is one.
        """
        data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
        self.received += len(data)
        if len(data) > self.max_message_bytes:
            self.too_big = True
            return []
        return [data]

    @staticmethod
    def frame(items: list[bytes]) -> list[str]:
        """One text message per reply or delivery (they are UTF-8 JSON)."""
        return [item.decode("utf-8") for item in items]

    @staticmethod
    def frame_bytes(items: list[bytes]) -> bytes:
        """The same messages as server-to-client WebSocket frames (RFC 6455: final,
        text, unmasked, no extension), ready for one socket write: a fan-out writes
        hundreds of deliveries per write, as over TCP, instead of a frame per send."""
        parts: list[bytes] = []
        append = parts.append
        for item in items:
            n = len(item)
            if n < 126:
                append(b"\x81" + bytes((n,)))
            elif n < 65536:
                append(b"\x81\x7e" + n.to_bytes(2, "big"))
            else:
                append(b"\x81\x7f" + n.to_bytes(8, "big"))
            append(item)
        return b"".join(parts)
