"""WebSocket subscribers on raw sockets: the handshake, masked client frames, and a
reader that parses server frame headers only.

Issue 16 compares fan-out over WebSocket with fan-out over TCP (and with NATS's WebSocket
listener), so the subscriber side must cost about what the TCP one does: no WebSocket
library, no payload copies on the counting path (``DeliveryCounter``).
"""

from __future__ import annotations

import base64
import os
import socket

import attrs

from .base import BenchError, Target, recv
from .dialects import NATS_CONNECT_QUIET, NATS_PING, Dialect, TokenCounter

#: Opcodes of data frames (continuation, text, binary); the others are control frames.
_DATA_OPCODES = (0, 1, 2)


def ws_connect(target: Target) -> tuple[socket.socket, bytes]:
    """A blocking TCP connection to ``target.ws_port``, upgraded to WebSocket, and the
    frame bytes that came with the handshake's response (NATS: its INFO)."""
    if target.ws_port is None:
        raise BenchError(f"{target.name} has no WebSocket port")
    sock = socket.create_connection((target.host, target.ws_port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {target.host}:{target.ws_port}\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                      ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += recv(sock)
        status, _, rest = head.partition(b"\r\n")
        if not status.startswith(b"HTTP/1.1 101"):
            raise BenchError(f"WebSocket upgrade refused: {status.decode(errors='replace')}")
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock, rest.partition(b"\r\n\r\n")[2]


def client_frame(payload: bytes) -> bytes:
    """One final text frame, masked as RFC 6455 requires of a client."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = bytes((0x81, 0x80 | n))
    elif n < 65536:
        header = b"\x81\xfe" + n.to_bytes(2, "big")
    else:
        header = b"\x81\xff" + n.to_bytes(8, "big")
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")
    return header + mask + masked


@attrs.define
class WsReader:
    """Counts what server frames carry, parsing headers only.

    ``feed`` returns (data frames, newlines in their payloads); with ``keep_payload`` the
    payloads are also collected in ``payload`` (e2e reads timestamps from them).
    """

    keep_payload: bool = False
    payload: bytearray = attrs.field(factory=bytearray)
    closed: bool = False
    _buf: bytearray = attrs.field(factory=bytearray)

    def feed(self, data: bytes) -> tuple[int, int]:
        buf = self._buf
        buf += data
        frames = lines = pos = 0
        end = len(buf)
        while pos + 2 <= end:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if pos + 4 > end:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                head = 4
            elif length == 127:
                if pos + 10 > end:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            stop = pos + head + length
            if stop > end:
                break
            opcode = b0 & 0x0F
            if opcode in _DATA_OPCODES:
                if b0 & 0x80:
                    frames += 1
                lines += buf.count(b"\n", pos + head, stop)
                if self.keep_payload:
                    self.payload += buf[pos + head:stop]
            elif opcode == 8:
                self.closed = True
            pos = stop
        del buf[:pos]
        return frames, lines


def ws_subscribe(sock: socket.socket, first: bytes, d: Dialect, topic: str) -> WsReader:
    """Subscribe over WebSocket and wait for the server's confirmation.

    mq-trio: the subscribe command in a frame, its reply in one frame. NATS: its INFO,
    then CONNECT (quiet: no +OK), SUB and a PING in one frame; the PONG confirms the SUB.
    Returns the reader to count deliveries with (nothing of them read yet).
    """
    reader = WsReader()
    if d.name == "nats":
        want_lines = 2  # INFO, PONG
        sock.sendall(client_frame(NATS_CONNECT_QUIET + b"SUB %s 1\r\nPING\r\n"
                                  % topic.encode()))
    else:
        want_lines = 0
        sock.sendall(client_frame(d.subscribe(topic).rstrip(b"\n")))
    frames = lines = 0
    seen = bytearray()
    reader.keep_payload = True
    data = first
    while True:
        f, n = reader.feed(data)
        frames += f
        lines += n
        seen += reader.payload
        reader.payload.clear()
        if reader.closed:
            raise BenchError("the server closed the WebSocket")
        if (d.name == "nats" and lines >= want_lines) or (d.name != "nats" and frames >= 1):
            break
        data = recv(sock)
    reader.keep_payload = False
    if d.error_token in seen or (d.name != "nats" and d.sub_token not in seen):
        raise BenchError(f"subscribe refused: {bytes(seen[:200]).decode(errors='replace')}")
    if (d.name == "nats" and lines != want_lines) or (d.name != "nats" and frames != 1):
        raise BenchError("delivery before the publisher started")
    return reader


def deliveries(d: Dialect, frames: int, lines: int) -> int:
    """Deliveries in all a reader counted so far: frames for mq-trio (one delivery each),
    whole deliveries' lines for NATS (frames do not follow its message boundaries)."""
    return lines // d.delivery_lines if d.name == "nats" else frames


@attrs.define
class DeliveryCounter:
    """Deliveries to one WebSocket subscriber, counted as cheaply as the dialect allows.

    mq-trio sends one small frame per delivery: parsing each header in Python made the
    generator, not the server, the bottleneck (one process saturated at ~1M frames/s), so
    its deliveries are counted as over TCP, by their token (``"index"``, which no frame
    header can form), at C speed. NATS packs many deliveries into each frame: its headers
    are parsed (``WsReader``) and the newlines of the payloads counted.
    """

    dialect: Dialect
    reader: WsReader
    frames: int = 0
    lines: int = 0
    token: TokenCounter | None = None

    #: NATS PINGs (each one line, not a delivery; answered by the caller)
    pings: TokenCounter = attrs.field(factory=lambda: TokenCounter(NATS_PING))

    def __attrs_post_init__(self) -> None:
        if self.dialect.name != "nats":
            self.token = TokenCounter(self.dialect.delivery_token)

    @property
    def closed(self) -> bool:
        return self.reader.closed

    def feed(self, data: bytes) -> int:
        """All deliveries so far, ``data`` included."""
        if self.token is not None:
            self.token.feed(data)
            return self.token.count
        self.pings.feed(data)
        f, n = self.reader.feed(data)
        self.frames += f
        self.lines += n
        return deliveries(self.dialect, self.frames, self.lines - self.pings.count)
