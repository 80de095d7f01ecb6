"""The byte carriers under a client: TCP (lines) and WebSocket (one message per command).

A wire only moves encoded commands out and complete JSON texts in; what they mean is the
client's business (``_client``). Framing comes from the sans-IO protocol package, so the
bytes are the ones the server's own transports expect.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol
from urllib.parse import urlsplit

import trio

from ..protocol import LineBuffer, frame
from ._values import ConnectError, Target

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found, unused-ignore]

#: Longest line accepted from a server: a delivery is a command (up to the server's
#: line limit, 1 MiB by default) plus its index, so leave plenty of room.
MAX_INCOMING_BYTES = 64 << 20
RECEIVE_BYTES = 64 << 10


class Wire(Protocol):
    """What the client needs of a connection, whichever transport carries it."""

    async def send(self, items: list[bytes]) -> None:
        """Send encoded commands; raise ``trio.BrokenResourceError`` if the peer is gone."""

    async def receive(self) -> list[bytes] | None:
        """The next complete JSON texts (maybe none yet), or ``None`` once closed."""


class BadServer(Exception):
    """The server sent something that is not protocol v1: drop the connection."""


class _TCPWire:
    """Commands out as ``\\n``-terminated lines in one write; replies in cut into lines."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._lines = LineBuffer(MAX_INCOMING_BYTES)
        self.close_reason: str | None = None

    async def send(self, items: list[bytes]) -> None:
        await self._stream.send_all(frame(items))

    async def receive(self) -> list[bytes] | None:
        try:
            data = await self._stream.receive_some(RECEIVE_BYTES)
        except trio.BrokenResourceError as exc:
            # e.g. a TLS alert: a client certificate refused after the handshake (TLS 1.3)
            if isinstance(exc.__cause__, ssl.SSLError):
                self.close_reason = f"connection broken ({describe(exc)})"
            return None
        except trio.ClosedResourceError:
            return None
        if not data:
            return None
        lines = self._lines.feed(data)
        if self._lines.too_long:
            raise BadServer(f"a line over {MAX_INCOMING_BYTES} bytes")
        return lines


class _WebSocketWire:
    """One text message per command and per reply: WebSocket frames are the framing."""

    def __init__(self, ws: object) -> None:
        from trio_websocket import WebSocketConnection

        assert isinstance(ws, WebSocketConnection)
        self._ws = ws
        self.close_reason: str | None = None

    async def send(self, items: list[bytes]) -> None:
        from trio_websocket import ConnectionClosed

        try:
            for item in items:
                await self._ws.send_message(item.decode())
        except ConnectionClosed as exc:
            raise trio.BrokenResourceError(self._closed_by(exc)) from exc

    async def receive(self) -> list[bytes] | None:
        from trio_websocket import ConnectionClosed

        try:
            message = await self._ws.get_message()
        except ConnectionClosed as exc:
            self._closed_by(exc)
            return None
        return [message.encode() if isinstance(message, str) else message]

    def _closed_by(self, exc: Exception) -> str:
        close = getattr(exc, "reason", None)
        code = getattr(close, "code", "?")
        text = getattr(close, "reason", None) or getattr(close, "name", "")
        self.close_reason = f"WebSocket closed: {code} {text}".rstrip()
        return self.close_reason


def describe(exc: BaseException) -> str:
    """A short human reason: "Connection refused" rather than a chain of wrappers."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        # Its errno (1) would read "Operation not permitted": say what failed instead.
        return f"TLS certificate verification failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        # Its errno is a resolver code (-2), which os.strerror reads "Unknown error -2".
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    cause = exc.__cause__
    if isinstance(exc, trio.BrokenResourceError) and cause is None and not str(exc):
        return "closed by the server"
    if isinstance(cause, BaseExceptionGroup):
        # trio's "all attempts to connect failed" wraps one error per address tried.
        reasons = dict.fromkeys(describe(e) for e in cause.exceptions)
        return "; ".join(reasons)
    if cause is not None and not str(exc):
        return describe(cause)
    return str(exc) or type(exc).__name__


async def _connect(
    target: Target, connect_timeout: float, ssl_context: ssl.SSLContext | None, *,
    https: bool = False
) -> trio.abc.Stream:
    """A TCP connection, with its TLS handshake done (certificate checked) if asked."""
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(target.host, target.port)
            if ssl_context is not None:
                # server_hostname: the certificate must be valid for the host dialled
                # (a name, or an IP address in its subjectAltName).
                stream = trio.SSLStream(
                    stream, ssl_context, server_hostname=target.host, https_compatible=https
                )
                await stream.do_handshake()
    except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        if stream is None:
            if isinstance(exc, socket.gaierror):
                text = f"cannot resolve host {target.host!r} ({exc.strerror or exc})"
            elif isinstance(exc, trio.TooSlowError):
                text = f"cannot connect to {target}: timed out after {connect_timeout:g} s"
            else:
                text = f"cannot connect to {target}: {describe(exc)}"
        else:
            await trio.aclose_forcefully(stream)
            if isinstance(exc, trio.TooSlowError):
                text = f"TLS handshake with {target} did not complete within {connect_timeout:g} s"
            else:
                text = f"TLS handshake with {target} failed: {describe(exc)}"
        raise ConnectError(text) from exc
    return stream


@asynccontextmanager
async def _open_websocket(
    target: Target, connect_timeout: float, ssl_context: ssl.SSLContext | None
) -> AsyncIterator[Wire]:
    """A WebSocket over a stream connected (and TLS-handshaken) by ``_connect``.

    Not trio-websocket's ``open_websocket_url``: it does the TLS handshake lazily inside
    its reader task, where a certificate error is swallowed and only shows as a
    connection connect_timeout.
    """
    import trio_websocket

    assert target.url is not None
    parts = urlsplit(target.url)
    if parts.scheme.lower() == "wss" and ssl_context is None:
        ssl_context = ssl.create_default_context()
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = target.host if ":" not in target.host else f"[{target.host}]"
    host_header = host if target.port in (80, 443) else f"{host}:{target.port}"
    # One deadline for connecting, the TLS handshake and the WebSocket handshake.
    deadline = trio.current_time() + connect_timeout
    stream = await _connect(target, connect_timeout, ssl_context, https=True)
    opened = False
    try:
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_at(deadline):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery, stream, host_header, resource,  # type: ignore[arg-type]
                        max_message_size=MAX_INCOMING_BYTES,
                    )
            except trio.TooSlowError:
                raise ConnectError(
                    f"cannot connect to {target}: no WebSocket handshake within "
                    f"{connect_timeout:g} s (is it the server's TCP port rather than its "
                    "--ws-port?)"
                ) from None
            opened = True
            try:
                yield _WebSocketWire(ws)
            finally:
                with trio.move_on_after(1.0) as cleanup:
                    cleanup.shield = True
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # One error from the body or from the reader task: raise it as itself.
        if len(group.exceptions) != 1:
            raise
        exc = group.exceptions[0]
        if not opened and isinstance(exc, trio_websocket.HandshakeError):
            raise ConnectError(f"cannot connect to {target}: {describe(exc)}") from exc
        context = exc.__context__
        try:
            raise exc
        finally:
            exc.__context__ = context
            del exc, context
    finally:
        await _close(stream)


@asynccontextmanager
async def open_wire(
    target: Target, connect_timeout: float, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Wire]:
    """Connect; raise :class:`ConnectError` (only) when that fails.

    With ``ssl_context`` (or a ``wss://`` URL) the connection is TLS, and the handshake,
    certificate check included, completes within ``connect_timeout`` before this returns.
    """
    if target.url is not None:
        async with _open_websocket(target, connect_timeout, ssl_context) as wire:
            yield wire
        return
    stream = await _connect(target, connect_timeout, ssl_context)
    try:
        yield _TCPWire(stream)
    finally:
        await _close(stream)


#: How long a TLS close may take to send its close_notify (even when cancelled).
CLOSE_NOTIFY_TIMEOUT = 0.25


async def _close(stream: trio.abc.Stream) -> None:
    """Close; over TLS, tell the server with a close_notify first (bounded, shielded)."""
    if isinstance(stream, trio.SSLStream):
        with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT, shield=True):
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    await trio.aclose_forcefully(stream)
