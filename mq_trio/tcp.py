"""The TCP transport: line framing over a trio stream, ``\\r\\n``-terminated replies."""

from __future__ import annotations

import trio

from .protocol import DEFAULT_MAX_LINE_BYTES, LineBuffer

#: One receive_some; smaller costs syscalls and scheduler passes (trio checkpoints).
RECEIVE_BYTES = 64 << 10


def peer_name(stream: trio.abc.Stream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return "?"
    return f"{host}:{port}"


class TCPTransport:
    """Adapts a byte stream to the line-oriented :class:`~mq_trio.connection.Transport`."""

    def __init__(
        self, stream: trio.abc.Stream, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    ) -> None:
        self.stream = stream
        self.peer = peer_name(stream)
        self._lines = LineBuffer(max_line_bytes)
        self._eof = False

    @property
    def line_too_long(self) -> bool:
        return self._lines.too_long

    async def receive_lines(self) -> list[bytes] | None:
        if self._eof:
            return None
        try:
            data = await self.stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if data:
            return self._lines.feed(data)
        # EOF: a last line without its newline still counts (as readline() has it).
        self._eof = True
        tail = self._lines.pending
        return [tail] if tail else None

    async def send_batch(self, items: list[bytes]) -> None:
        items.append(b"")  # so the join also terminates the last object
        await self.stream.send_all(b"\r\n".join(items))

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
