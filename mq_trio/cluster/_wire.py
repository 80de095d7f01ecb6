"""Bytes to and from Redis: RESP encoding, the hiredis parser, and the socket.

A plain TCP connection is read and written on its descriptor directly (``os.read``,
``os.write``), waiting with ``wait_readable``/``wait_writable`` only when the kernel has
nothing to give or no room: a trio stream's ``receive_some``/``send_all`` take a scheduler
pass on every call, which was most of a round trip's cost (as in
``mq_trio/transports/_tcp.py``). TLS goes through ``trio.SSLStream``.
"""

from __future__ import annotations

import os
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import hiredis
import trio

from ._address import RedisAddress

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found, unused-ignore]

#: One read: large, so a burst of pub/sub messages costs few syscalls and passes.
RECEIVE_BYTES = 256 << 10

Command = Sequence[bytes | str | int | float]
"""A command and its arguments, sent as RESP bulk strings (str as UTF-8, numbers via str())."""


class RedisError(Exception):
    """An error reply (``-ERR ...``, ``-NOSCRIPT ...``, ``-MOVED ...``); str(e) is its text."""


class RedisUnavailable(Exception):
    """Redis cannot be reached: no connection, connection lost, or a timeout."""


class _ProtocolError(RedisUnavailable):
    """Bytes that are not RESP: the stream cannot be trusted any more."""


#: What ``Reader.gets`` returns when no complete reply is buffered (a reply can be None).
NOTHING: Any = object()


def new_reader() -> hiredis.Reader:
    """A RESP2 parser: error replies become :class:`RedisError` instances (not raised),
    bulk strings stay bytes."""
    return hiredis.Reader(
        protocolError=_ProtocolError, replyError=RedisError, notEnoughData=NOTHING
    )


def encode(command: Command) -> bytes:
    """One command as a RESP array of bulk strings (hiredis's encoder, in C)."""
    if not command:
        raise ValueError("an empty Redis command")
    return cast(bytes, hiredis.pack_command(tuple(command)))  # type: ignore[arg-type]


class Wire:
    """A connected socket (or TLS stream) to Redis. One task reads, one writes."""

    def __init__(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._fd = self._sock.fileno() if self._sock is not None else -1
        self._maybe_more = False
        self._buffer = bytearray(RECEIVE_BYTES) if self._sock is not None else bytearray()
        self._view = memoryview(self._buffer)
        #: a plain socket (read and written on its descriptor): any task may read, and a
        #: cancelled read leaves it intact (over TLS it might not)
        self.direct = self._sock is not None

    async def receive(self) -> bytes | memoryview:
        """The next bytes (up to ``RECEIVE_BYTES``), valid until the next call (feed them
        to the parser at once); empty at EOF, reset or close.

        A plain socket is read into one buffer kept for the connection: ``os.read`` of
        256 KiB allocates (and maps) 256 KiB per call, which cost 30 µs per read.
        """
        sock = self._sock
        if sock is None:
            try:
                return await self.stream.receive_some(RECEIVE_BYTES)  # type: ignore[return-value]
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
        if self._maybe_more:  # the last read filled the buffer: more is probably there
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                n = os.readv(self._fd, [self._buffer])
            except BlockingIOError:
                pass
            except OSError:
                return b""
            else:
                self._maybe_more = n == RECEIVE_BYTES
                await trio.lowlevel.cancel_shielded_checkpoint()  # let others run
                return self._view[:n]
        while True:  # after a short read the socket is almost always empty: wait first
            try:
                await trio.lowlevel.wait_readable(sock)
                n = os.readv(self._fd, [self._buffer])
            except BlockingIOError:
                continue
            except (OSError, trio.ClosedResourceError):
                return b""
            self._maybe_more = n == RECEIVE_BYTES
            return self._view[:n]

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Write what the kernel takes now, without waiting; how much it took (0 over TLS,
        whose writes the writer task does). Raises RedisUnavailable if the socket is gone."""
        if self._sock is None:
            return 0
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:  # reset, broken pipe, closed
            raise RedisUnavailable(f"connection to Redis lost: {exc}") from exc

    async def send_all(self, data: bytes) -> None:
        """Write all of ``data``, waiting for room. Raises RedisUnavailable on failure."""
        sock = self._sock
        if sock is None:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise RedisUnavailable(f"connection to Redis lost: {exc}") from exc
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        sent = self.send_nowait(data)
        with memoryview(data) as view:
            while sent < len(data):
                try:
                    await trio.lowlevel.wait_writable(sock)
                except trio.ClosedResourceError as exc:
                    raise RedisUnavailable("connection to Redis closed") from exc
                sent += self.send_nowait(view[sent:])

    async def aclose(self) -> None:
        self._fd = -1
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await self.stream.aclose()


async def connect(
    address: RedisAddress, connect_timeout: float, ssl_context: ssl.SSLContext | None
) -> Wire:
    """A connected :class:`Wire` (TLS handshake done if ``address.tls``), within ``connect_timeout``
    seconds; RedisUnavailable otherwise. No command is sent."""
    try:
        with trio.fail_after(connect_timeout):
            sock_stream = await trio.open_tcp_stream(address.host, address.port)
            if not address.tls:
                return Wire(sock_stream)
            context = ssl_context if ssl_context is not None else ssl.create_default_context()
            tls = trio.SSLStream(sock_stream, context, server_hostname=address.host)
            try:
                await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(sock_stream)
                raise
            return Wire(tls)
    except trio.TooSlowError:
        raise RedisUnavailable(f"cannot connect to {address}: timed out") from None
    except (OSError, trio.BrokenResourceError) as exc:
        raise RedisUnavailable(f"cannot connect to {address}: {exc}") from exc


def handshake_commands(address: RedisAddress, name: str | None = None) -> list[Command]:
    """AUTH and SELECT, as the address needs them, and CLIENT SETNAME with ``name`` (so
    ``CLIENT LIST`` says which node and what for)."""
    commands: list[Command] = []
    if address.password is not None:
        if address.username is not None:
            commands.append(("AUTH", address.username, address.password))
        else:
            commands.append(("AUTH", address.password))
    if address.db:
        commands.append(("SELECT", address.db))
    if name is not None:
        commands.append(("CLIENT", "SETNAME", name))
    return commands


@asynccontextmanager
async def hosted(
    run: Callable[..., Awaitable[None]],
) -> AsyncIterator[None]:
    """Run ``run`` (started with ``nursery.start``) in a nursery of its own around the body.

    Our tasks never raise out of it (a lost connection is reported to the callers), so an
    exception group holds the body's one exception: it is re-raised as the caller would
    have seen it without us.
    """
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(run)
            yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            exc = group.exceptions[0]
            context = exc.__context__
            try:
                raise exc
            finally:
                exc.__context__ = context
                del exc, context
        raise
