"""TLS on the TCP and WebSocket ports: the server's context, the client certificate's
subject, the per-connection handshake and the close path (docs/security.md, "TLS").

The accept loops never do a handshake: each accepted socket's own task wraps it
(:func:`server_stream`) and runs :func:`handshake` under ``--tls-handshake-timeout``, so
a client that never completes one costs a task and a descriptor for that long, not
everybody's accepts.

The close path. ``trio.SSLStream`` has no ``send_eof`` (trio issue #823): TLS has no
half-close of its own, and trio's ``aclose`` closes the socket right after sending
``close_notify``. A socket closed with unread input makes the kernel send a reset, which
can destroy the last replies (``Line too long``, ``Line timeout``, ``Authentication
failed``...) before the client reads them. So the socket under the ``SSLStream`` is a
:class:`LingeringStream`: when ``SSLStream.aclose`` has sent ``close_notify`` and closes
it, it half-closes TCP (FIN after everything sent), reads and discards input until the
client closes or :data:`LINGER_SECONDS` pass, and only then closes -- what the plain TCP
transport does (``TCPTransport.aclose``). :func:`close_stream` bounds the whole.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import trio

#: How long a closing TLS connection keeps reading (and discarding) to avoid a reset
#: (the plain TCP transport's ``LINGER_SECONDS``).
LINGER_SECONDS = 0.5
#: Bound of a graceful close: close_notify (a client that does not read may block it),
#: then the linger.
CLOSE_SECONDS = 1.0
#: One raw read while lingering.
_DISCARD_BYTES = 64 << 10
#: One read of encrypted input (trio's SSLStream asks for no particular size).
RECEIVE_BYTES = 64 << 10
#: Read and write the descriptor directly (as the plain TCP transport does, see
#: ``transports/_tcp.py``); elsewhere the SocketStream's methods.
DIRECT_IO = sys.platform != "win32"


class TLSConfigError(Exception):
    """A certificate, key or CA file that cannot be used (one line: which file, why)."""


# --- the context -----------------------------------------------------------------------


def _no_password() -> str:
    raise TLSConfigError("encrypted")


def _read(path: str, what: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TLSConfigError(f"cannot read TLS {what} {path}: {exc.strerror or exc}") from None
    text = data.decode("ascii", "replace")
    if "-----BEGIN " not in text:
        raise TLSConfigError(f"TLS {what} {path} is not PEM (no '-----BEGIN' line)")
    return text


def _check_certificates(path: str, text: str, what: str) -> None:
    """Raise unless ``text`` holds at least one PEM certificate that OpenSSL parses."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc).split(" (_ssl", 1)[0]
        raise TLSConfigError(
            f"TLS {what} {path} holds no valid PEM certificate ({reason})"
        ) from None


def server_ssl_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """The server side's context: ``cert`` (the certificate chain, leaf first) and
    ``key`` (its private key, not encrypted), PEM files; with ``client_ca``, every
    client must present a certificate that CA signed (mutual TLS).

    TLS 1.2 at least and the standard library's secure defaults
    (``PROTOCOL_TLS_SERVER``: its cipher list, no compression, no renegotiation). Not
    ``ssl.create_default_context``: for client authentication it also trusts the
    system's CAs, so any publicly issued client certificate would pass mutual TLS.

    Raises :class:`TLSConfigError` naming the file and the reason: unreadable, not PEM,
    a key that does not match the certificate, an encrypted key.
    """
    cert_text = _read(cert, "certificate")
    _check_certificates(cert, cert_text, "certificate")
    _read(key, "key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        # A password callback that refuses: OpenSSL would otherwise prompt on the
        # terminal for an encrypted key.
        context.load_cert_chain(cert, key, password=_no_password)
    except TLSConfigError:
        raise TLSConfigError(
            f"TLS key {key} is encrypted: give an unencrypted key (readable by the server "
            "only)"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(
                f"TLS key {key} does not match the certificate {cert}"
            ) from None
        raise TLSConfigError(
            f"TLS key {key} holds no usable PEM private key ({exc.reason or exc})"
        ) from None
    except OSError as exc:  # the file went away between the checks
        raise TLSConfigError(f"cannot read TLS key {key}: {exc.strerror or exc}") from None
    if client_ca is not None:
        ca_text = _read(client_ca, "client CA")
        _check_certificates(client_ca, ca_text, "client CA")
        context.load_verify_locations(cadata=ca_text)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


# --- the client certificate's subject ---------------------------------------------------

#: OpenSSL's long names (what ``getpeercert`` gives) to RFC 4514's short names; other
#: attributes keep OpenSSL's name (``emailAddress``, ``serialNumber``, ``title``...).
SHORT_NAMES: Mapping[str, str] = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def escape_value(value: str) -> str:
    """An attribute value escaped as RFC 4514 section 2.4 asks: ``"+,;<>\\`` anywhere,
    ``#`` or a space first, a space last, NUL as ``\\00``."""
    out = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in '"+,;<>\\' or (i == 0 and ch in "# ") or (i == last and ch == " "):
            out.append("\\" + ch)
        elif ch == "\x00":
            out.append("\\00")
        else:
            out.append(ch)
    return "".join(out)


def subject_string(peercert: Mapping[str, object]) -> str:
    """The certificate's subject as an RFC 4514 string, in certificate order:
    ``O=Example Corp,OU=Ops,CN=alice`` for a subject issued as O, OU, CN.

    Short names (``CN``, ``O``, ``OU``, ``C``, ``L``, ``ST``, ``DC``...; others as
    OpenSSL names them: ``emailAddress``), values escaped per RFC 4514, ``,`` between
    RDNs and ``+`` within a multi-valued one. Not reversed (RFC 4514 writes the last
    RDN first): the same text as ``openssl x509 -noout -subject -nameopt
    RFC2253,-dn_rev,-esc_msb``. This is the string an auth file's ``certificate = "..."``
    names. ``peercert`` is ``SSLObject.getpeercert()`` of a verified certificate.
    """
    rdns: Iterable[Iterable[tuple[str, str]]] = peercert.get("subject", ())  # type: ignore[assignment]
    return ",".join(
        "+".join(f"{SHORT_NAMES.get(name, name)}={escape_value(value)}" for name, value in rdn)
        for rdn in rdns
    )


# --- streams: handshake and close --------------------------------------------------------


class LingeringStream(trio.abc.Stream):
    """The TCP stream under an ``SSLStream``, whose close delivers what was sent.

    ``aclose`` half-closes (the FIN follows ``close_notify`` and everything before it),
    discards input until the client closes or :data:`LINGER_SECONDS` pass, then closes:
    closing with unread input would make the kernel reset the connection and destroy
    the last replies. Cancelled (``aclose_forcefully``), it closes at once.

    Reads and writes go to the descriptor directly, as the plain TCP transport's do:
    a ``SocketStream`` takes a scheduler pass on every call, even when the kernel
    could answer at once (a write it takes whole; a read after a full one). The
    descriptor is asked of the socket on every call (-1 once closed: an error, never a
    reused number).
    """

    __slots__ = ("inner", "_maybe_more")

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        #: The last read filled its buffer: more is probably waiting.
        self._maybe_more = False

    @property
    def socket(self) -> trio.socket.SocketType:
        return self.inner.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not DIRECT_IO:
            return await self.inner.receive_some(max_bytes)
        size = RECEIVE_BYTES if max_bytes is None else max_bytes
        sock = self.inner.socket
        if self._maybe_more:
            await trio.lowlevel.checkpoint_if_cancelled()
            data = self._read(size)
            if data is not None:
                # still one pass, so a client that keeps its socket full cannot starve
                # the other connections
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        # After a short read the socket is almost always empty: wait first.
        while True:
            await trio.lowlevel.wait_readable(sock)  # ClosedResourceError once closed
            data = self._read(size)
            if data is not None:
                return data

    def _read(self, size: int) -> bytes | None:
        try:
            data = os.read(self.inner.socket.fileno(), size)
        except BlockingIOError:
            return None
        except OSError as exc:  # reset, or closed
            raise trio.BrokenResourceError(str(exc)) from exc
        self._maybe_more = len(data) == size
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not DIRECT_IO:
            await self.inner.send_all(data)
            return
        sock = self.inner.socket
        await trio.lowlevel.checkpoint_if_cancelled()
        # Usually the kernel takes it all and no pass through the scheduler is needed
        # (the connection's writer waits for its next batch anyway).
        sent = self._write(data)
        if sent == len(data):
            return
        with memoryview(data) as view:
            while sent < len(view):
                try:
                    await trio.lowlevel.wait_writable(sock)
                except trio.ClosedResourceError as exc:
                    raise trio.BrokenResourceError("socket closed") from exc
                sent += self._write(view[sent:])

    def _write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return os.write(self.inner.socket.fileno(), data)
        except BlockingIOError:
            return 0
        except OSError as exc:  # reset, broken pipe, closed
            raise trio.BrokenResourceError(str(exc)) from exc

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        try:
            try:
                self.inner.socket.shutdown(socket.SHUT_WR)
            except OSError:  # already reset, or not connected any more
                return
            with trio.move_on_after(LINGER_SECONDS):
                try:
                    while await self.receive_some(_DISCARD_BYTES):
                        pass
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        finally:
            await self.inner.aclose()  # closes the socket first, even when cancelled


def server_stream(
    stream: trio.SocketStream, context: ssl.SSLContext
) -> trio.SSLStream[LingeringStream]:
    """The server side of TLS over an accepted TCP stream; no I/O yet."""
    return trio.SSLStream(LingeringStream(stream), context, server_side=True)


async def handshake(stream: trio.SSLStream[LingeringStream], seconds: float) -> str | None:
    """Complete the handshake within ``seconds``: None, or why it failed (for
    the log: ``timed out``, ``closed by the client``, OpenSSL's reason such as
    ``PEER_DID_NOT_RETURN_A_CERTIFICATE``)."""
    with trio.move_on_after(seconds):
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            return _reason(exc.__cause__)
        return None
    return f"not completed within {seconds:g} s"


def _reason(exc: BaseException | None) -> str:
    if isinstance(exc, ssl.SSLEOFError) or (
        isinstance(exc, ssl.SSLError) and "EOF" in str(exc)
    ):
        return "closed by the client"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


def peer_subject(stream: trio.SSLStream[LingeringStream]) -> str | None:
    """The verified client certificate's subject (:func:`subject_string`), or None
    without one (TLS that is not mutual)."""
    cert = stream.getpeercert()
    return (subject_string(cert) or None) if cert else None  # (a subject may be empty)


async def close_stream(stream: trio.SSLStream[Any]) -> None:
    """Close gracefully within :data:`CLOSE_SECONDS`: ``close_notify``, then the
    linger of :class:`LingeringStream`; the socket is closed in every case."""
    # Input the reader has not decrypted yet is of no use now, and OpenSSL would choke
    # on it: trio's aclose calls SSL_shutdown, which writes the close_notify, but then
    # reads on and fails ("application data after close notify") before trio sends
    # what was written, so the client would get no close_notify and a TLS error
    # instead of the end of the stream. trio keeps that input in its incoming
    # MemoryBIO (a private attribute, hence the care): it is dropped here; what the
    # client still sends is discarded below TLS (LingeringStream).
    incoming = getattr(stream, "_incoming", None)
    if isinstance(incoming, ssl.MemoryBIO):
        incoming.read()
    try:
        with trio.move_on_after(CLOSE_SECONDS):
            await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        # Cut short (here, or by the caller's cancellation), SSLStream.aclose closes
        # its transport forcefully; closing the socket again costs nothing.
        sock = getattr(stream.transport_stream, "socket", None)
        if sock is not None:
            sock.close()
