"""The TCP transport: line framing over a trio stream, ``\\r\\n``-terminated replies."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import trio

from ..protocol import DEFAULT_MAX_LINE_BYTES, INPUT_LIMIT, LineConnection
from . import _tls as tls
from ._base import WriteTurns
from ._input import BIG_LINE, InputGuard

#: How long a closing connection keeps reading (and discarding) to avoid a reset.
LINGER_SECONDS = 0.5

#: One receive_some; smaller costs syscalls and scheduler passes (trio checkpoints).
RECEIVE_BYTES = 64 << 10

# trio's socket methods take a scheduler pass on every call, even when the kernel could
# answer at once (receive_some: two). Reading and writing the descriptor ourselves lets a
# connection pay one pass only when it really has to wait, which is most of a round
# trip's cost in the rtt and e2e profiles. Plain os.read/os.write on a socket descriptor
# is POSIX; elsewhere the stream's own methods are used.
DIRECT_IO = sys.platform != "win32"


#: How ``TCPTransport.receive_lines`` starts (``TCPTransport._next``).
_WAIT, _READ, _MORE = 0, 1, 2

#: Unsent bytes the kernel may hold per socket (trio.SocketStream's choice too): without
#: it loopback send buffers grow to megabytes, so a slow consumer's backlog would sit
#: in the kernel, outside the byte budget, instead of being noticed.
NOTSENT_LOWAT = 16 << 10


def configure_socket(sock: trio.socket.SocketType) -> None:
    """What trio.SocketStream would set on an accepted socket: no Nagle delay, a small
    unsent-data mark."""
    for option, value in (
        (socket.TCP_NODELAY, 1),
        (getattr(socket, "TCP_NOTSENT_LOWAT", None), NOTSENT_LOWAT),
    ):
        if option is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
            except OSError:  # not a TCP socket, or not supported here
                pass


def peer_name(sock: object) -> str:
    try:
        host, port, *_ = sock.getpeername()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return "?"
    return f"{host}:{port}"


def _borrow(fd: int) -> socket.socket:
    """A socket object over a descriptor the transport owns, for the rare calls that
    need one (shutdown, getpeername); ``detach`` it after use, or it closes ``fd``."""
    return socket.socket(fileno=fd)


def _shutdown(fd: int, how: int) -> None:
    try:
        sock = _borrow(fd)
    except OSError:
        return
    try:
        sock.shutdown(how)
    except OSError:
        pass
    finally:
        sock.detach()


class SocketView:
    """Socket calls (``setsockopt``, ``getpeername``, ...) on a descriptor a transport
    owns: ``TCPTransport.socket`` for tests and tools; the server itself needs none."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            sock = _borrow(self._fd)
            try:
                return getattr(sock, name)(*args)
            finally:
                sock.detach()

        return call


class TCPTransport:
    """Adapts a TCP connection to the line-oriented :class:`~mq_trio.transports.Transport`.

    Takes the accepted trio socket itself (what the server does: a ``SocketStream`` and
    its conflict detector are two more objects per connection, unused here), or any trio
    stream: a ``trio.SSLStream`` over the accepted socket with TLS (its handshake done:
    ``transports/_tls.py``), in-memory ones in tests.

    An accepted socket is taken over as its bare descriptor (``detach``): the reads,
    writes and waits use the descriptor anyway, and the trio and stdlib socket objects
    were two more objects per idle connection. The transport closes it (``aclose``).
    """

    __slots__ = ("stream", "_fd", "_direct", "wire", "_eof", "_next", "_peer", "_stopping",
                 "_receiving", "_unsent", "_guard", "held", "tls_subject",
                 "turns")

    def __init__(
        self,
        stream: trio.abc.Stream | trio.socket.SocketType,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        guard: InputGuard | None = None,
        tls_subject: str | None = None,
    ) -> None:
        #: With mutual TLS: the verified client certificate's subject (RFC 4514, see
        #: ``transports/_tls.subject_string``); else None. The connection reads it.
        self.tls_subject = tls_subject
        self.stream: trio.abc.Stream | None = None
        #: The socket's descriptor while it is open, else -1 (a write after the close,
        #: e.g. another reader's send_ready, must fail, never reach a reused number).
        self._fd = -1
        #: Reads, writes and waits go to the descriptor (not through ``stream``).
        self._direct = False
        if isinstance(stream, trio.socket.SocketType):
            self._fd = stream.detach()  # ours now: aclose closes it
            self._direct = True
        else:
            self.stream = stream
            if DIRECT_IO and isinstance(stream, trio.SocketStream):
                self._fd = stream.socket.fileno()  # the stream still owns it
                self._direct = True
        #: The wire rules (framing, line limit), sans-IO.
        self.wire = LineConnection(max_line_bytes)
        self._eof = False
        #: How the next receive_lines reads: _WAIT first for input, _READ at once (the
        #: caller waited: ``wait_fd``), _MORE at once, then yield (the last read filled
        #: the buffer, so more is probably waiting).
        self._next = _MORE
        self._peer: str | None = None
        self._stopping = False
        #: Over a non-socket stream: the scope of the receive in progress.
        self._receiving: trio.CancelScope | None = None
        #: What a send_nowait could not write; the next send_batch sends it first.
        self._unsent = b""
        #: The server's bound on unfinished input (line timeout, input budget), if any.
        self._guard = guard
        #: Bytes of unfinished line counted in the guard (it keeps this up to date).
        self.held = 0
        #: The server's write turns (server/_pacer.py WriteTurns), set by the connection:
        #: a write that had to wait for the socket takes a turn before it goes on, so
        #: thousands of sockets that become writable at once are written over passes.
        self.turns: WriteTurns | None = None

    @property
    def socket(self) -> trio.socket.SocketType | SocketView | None:
        """The connection's socket, for its options and addresses (None over a
        non-socket stream); over an accepted socket, a view of the descriptor."""
        if self.stream is not None:
            return self.stream.socket if self._direct else None  # type: ignore[attr-defined]
        return SocketView(self._fd) if self._fd >= 0 else None

    @property
    def peer(self) -> str:
        """host:port of the client (looked up when first needed: logs only)."""
        if self._peer is None:
            stream = self.stream
            if stream is None:
                if self._fd < 0:
                    return "?"  # closed before anyone asked
                sock = _borrow(self._fd)
                try:
                    self._peer = peer_name(sock)
                finally:
                    sock.detach()
            else:
                if isinstance(stream, trio.SSLStream):  # the socket is under the TLS
                    stream = stream.transport_stream
                self._peer = peer_name(getattr(stream, "socket", None))
        return self._peer

    def wait_fd(self) -> int:
        """The descriptor to wait on (``trio.lowlevel.wait_readable``) before the next
        ``receive_lines``, or -1: call it at once.

        ``Connection.run`` waits itself rather than inside ``receive_lines``: an idle
        connection's reader then sits one coroutine frame shallower (about 300 bytes,
        times every idle connection). The read after such a wait takes no extra
        scheduler pass, as when ``receive_lines`` waited.
        """
        if self._next != _WAIT or self._eof or self._stopping or not self._direct:
            return -1
        self._next = _READ
        return self._fd

    def closing_reply(self) -> bytes | None:
        return self.wire.closing_reply()

    async def receive_lines(self) -> list[bytes] | None:
        """The next complete lines, or None at EOF, reset or close.

        The socket read is written out here rather than in a helper coroutine: this is
        where every idle connection waits, and each await level is a frame it keeps.
        """
        if self._eof or self._stopping:
            return None
        data: bytes | bytearray | None = None
        how = self._next
        if not self._direct:
            with trio.CancelScope() as self._receiving:
                try:
                    data = await self.stream.receive_some(RECEIVE_BYTES)  # type: ignore[union-attr]
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
            self._receiving = None
            if data is None:  # stopped, or the input aborted (closing_reply says why)
                return [] if self.wire.closing_reply() is not None else None
        elif how != _WAIT:
            # The last read filled the buffer, so more is probably waiting, or the caller
            # has just waited for input (wait_fd): read first.
            if how == _MORE:
                await trio.lowlevel.checkpoint_if_cancelled()
            try:
                data = os.read(self._fd, RECEIVE_BYTES)
            except BlockingIOError:
                self._next = _WAIT
            except OSError:  # reset, or closed
                data = b""
            else:
                self._next = _MORE if len(data) == RECEIVE_BYTES else _WAIT
                if how == _MORE:
                    # Data was already waiting: still yield once, so a client that keeps
                    # its socket full cannot starve the other connections.
                    await trio.lowlevel.cancel_shielded_checkpoint()
        # After a short read the socket is almost always empty: wait first rather than
        # spend a read syscall on EAGAIN (one of the few syscalls of a round trip).
        while data is None:
            try:
                await trio.lowlevel.wait_readable(self._fd)
                data = os.read(self._fd, RECEIVE_BYTES)
            except BlockingIOError:
                continue
            except (OSError, trio.ClosedResourceError):
                data = b""
            else:
                self._next = _MORE if len(data) == RECEIVE_BYTES else _WAIT
        if data:
            wire = self.wire
            lines = wire.receive_data(data)
            # Only a chunk that leaves (or ends) a partial line reaches the guard.
            if data[-1] != 0x0A or self.held:
                guard = self._guard
                size = wire.pending_bytes
                held = self.held
                if guard is not None and (size or held):
                    if not guard.update(self, size, bool(lines)):
                        wire.abort(INPUT_LIMIT)  # the lines before it still count
                    elif held >= BIG_LINE and lines:
                        await guard.turn()  # one big line per scheduler pass
            return lines
        if self.wire.closing_reply() is not None:  # aborted: the read saw SHUT_RD
            return []
        # EOF: a last line without its newline still counts (as readline() has it).
        self._eof = True
        held_by = self._guard
        if self.held and held_by is not None:  # (a held line implies the guard)
            if self.held >= BIG_LINE:
                await held_by.turn()
            held_by.release(self)
        return self.wire.receive_eof() or None

    def abort_input(self, reason: str) -> None:
        """End the input with a ``reason`` reply (from the server's :class:`InputGuard`:
        ``Line timeout``): the unfinished line is dropped at once, a waiting read wakes
        and returns no lines, and ``closing_reply`` gives the reply."""
        self.wire.abort(reason)
        self._wake_reader()

    def stop_receiving(self) -> None:
        self._stopping = True
        self._wake_reader()

    def _wake_reader(self) -> None:
        if self._direct:
            # Wakes a reader waiting for input (the read then sees EOF, or input that
            # was already there, which the connection no longer handles).
            if self._fd >= 0:
                _shutdown(self._fd, socket.SHUT_RD)
        elif self._receiving is not None:
            self._receiving.cancel()

    def send_nowait(self, items: list[bytes]) -> bool:
        data = self.wire.frame(items)
        if self._direct and not self._unsent:
            try:
                sent = self._write(data)
            except trio.BrokenResourceError:
                sent = 0  # the writer's send_batch will report it
            if sent == len(data):
                return True
            data = data[sent:]
        self._unsent += data
        return False

    async def send_batch(self, items: list[bytes]) -> None:
        if items:
            data = self.wire.frame(items)
            if self._unsent:
                data = self._unsent + data
        else:
            data = self._unsent
        self._unsent = b""
        if not self._direct:
            await self.stream.send_all(data)  # type: ignore[union-attr]
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        # Usually the kernel takes it all and no pass through the scheduler is needed;
        # the writer's own wait for its next item is the checkpoint.
        sent = self._write(data)
        if sent == len(data):
            return
        with memoryview(data) as view:
            while sent < len(data):
                try:
                    await trio.lowlevel.wait_writable(self._fd)
                except trio.ClosedResourceError as exc:
                    raise trio.BrokenResourceError("socket closed") from exc
                turns = self.turns
                if turns is not None and not turns.take(len(data) - sent):
                    await turns.wait_turn(len(data) - sent)
                sent += self._write(view[sent:])

    def _write(self, data: bytes | memoryview) -> int:
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:  # reset, broken pipe, closed
            raise trio.BrokenResourceError(str(exc)) from exc

    async def aclose(self) -> None:
        # Release the input and output buffers now (an unfinished line, up to the line
        # limit; unsent bytes), not when the transport object goes: whatever still holds
        # it (a log record, a late send_ready) holds no megabytes. The wire still frames
        # a late send, which then fails on the closed descriptor.
        self.wire.release()
        self._unsent = b""
        if self._guard is not None:
            self._guard.release(self)
        fd = self._fd
        if not self._eof and self._direct and fd >= 0:
            # Closing a socket with unread input makes the kernel send a reset, which can
            # destroy the last replies (e.g. "Line too long") before the client reads
            # them. Half-close instead, and discard input briefly until the client closes.
            try:
                sock = _borrow(fd)
            except OSError:
                pass
            else:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                else:
                    with trio.move_on_after(LINGER_SECONDS):
                        await self._discard_input(fd)
                finally:
                    sock.detach()
        self._fd = -1
        if isinstance(self.stream, trio.SSLStream):
            # TLS has no half-close (trio issue #823): close_notify after everything
            # sent, then the same half-close and discarding as above (bounded).
            await tls.close_stream(self.stream)
        elif self.stream is not None:
            await trio.aclose_forcefully(self.stream)
        elif fd >= 0:
            trio.lowlevel.notify_closing(fd)  # (what a trio socket's close does)
            os.close(fd)
            await trio.lowlevel.checkpoint()

    @staticmethod
    async def _discard_input(fd: int) -> None:
        """Read and drop input until the client closes (or the caller's timeout)."""
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                if not os.read(fd, RECEIVE_BYTES):
                    return
            except BlockingIOError:
                continue
            except OSError:
                return
