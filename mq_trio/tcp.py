"""The TCP transport: line framing over a trio stream, ``\\r\\n``-terminated replies."""

from __future__ import annotations

import os
import socket
import sys

import trio

from .protocol import DEFAULT_MAX_LINE_BYTES, LineBuffer

#: How long a closing connection keeps reading (and discarding) to avoid a reset.
LINGER_SECONDS = 0.5

#: One receive_some; smaller costs syscalls and scheduler passes (trio checkpoints).
RECEIVE_BYTES = 64 << 10

# trio's socket methods take a scheduler pass on every call, even when the kernel could
# answer at once (receive_some: two). Reading and writing the descriptor ourselves lets a
# connection pay one pass only when it really has to wait, which is most of a round
# trip's cost in the rtt and e2e profiles. Plain os.read/os.write on a socket descriptor
# is POSIX; elsewhere the stream's own methods are used.
_DIRECT_IO = sys.platform != "win32"


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
        self._sock: trio.socket.SocketType | None = None
        self._maybe_more = True
        if _DIRECT_IO and isinstance(stream, trio.SocketStream):
            self._sock = stream.socket

    @property
    def line_too_long(self) -> bool:
        return self._lines.too_long

    async def receive_lines(self) -> list[bytes] | None:
        if self._eof:
            return None
        data = await self._receive()
        if data:
            return self._lines.feed(data)
        # EOF: a last line without its newline still counts (as readline() has it).
        self._eof = True
        tail = self._lines.pending
        return [tail] if tail else None

    async def _receive(self) -> bytes | bytearray:
        """Up to RECEIVE_BYTES, or b"" at EOF, reset or close."""
        sock = self._sock
        if sock is None:
            try:
                return await self.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
        if self._maybe_more:
            # The last read filled the buffer, so more is probably waiting: read first.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                data = os.read(sock.fileno(), RECEIVE_BYTES)
            except BlockingIOError:
                pass
            except OSError:  # reset, or closed
                return b""
            else:
                self._maybe_more = len(data) == RECEIVE_BYTES
                # Data was already waiting: still yield once, so a client that keeps its
                # socket full cannot starve the other connections.
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        # After a short read the socket is almost always empty: wait first rather than
        # spend a read syscall on EAGAIN (one of the few syscalls of a round trip).
        while True:
            try:
                await trio.lowlevel.wait_readable(sock)
                data = os.read(sock.fileno(), RECEIVE_BYTES)
            except BlockingIOError:
                continue
            except (OSError, trio.ClosedResourceError):
                return b""
            self._maybe_more = len(data) == RECEIVE_BYTES
            return data

    async def send_batch(self, items: list[bytes]) -> None:
        items.append(b"")  # so the join also terminates the last object
        data = b"\r\n".join(items)
        sock = self._sock
        if sock is None:
            await self.stream.send_all(data)
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        # Usually the kernel takes it all and no pass through the scheduler is needed;
        # the writer's own wait for its next item is the checkpoint.
        sent = self._write(sock, data)
        if sent == len(data):
            return
        with memoryview(data) as view:
            while sent < len(data):
                try:
                    await trio.lowlevel.wait_writable(sock)
                except trio.ClosedResourceError as exc:
                    raise trio.BrokenResourceError("socket closed") from exc
                sent += self._write(sock, view[sent:])

    @staticmethod
    def _write(sock: trio.socket.SocketType, data: bytes | memoryview) -> int:
        try:
            return os.write(sock.fileno(), data)
        except BlockingIOError:
            return 0
        except OSError as exc:  # reset, broken pipe, closed
            raise trio.BrokenResourceError(str(exc)) from exc

    async def aclose(self) -> None:
        if not self._eof and self._sock is not None:
            # Closing a socket with unread input makes the kernel send a reset, which can
            # destroy the last replies (e.g. "Line too long") before the client reads
            # them. Half-close instead, and discard input briefly until the client closes.
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            else:
                with trio.move_on_after(LINGER_SECONDS):
                    while await self._receive():
                        pass
        await trio.aclose_forcefully(self.stream)
