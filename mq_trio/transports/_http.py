"""The HTTP side of the WebSocket port, sans-IO: request heads, origins, responses, the page.

A browser needs the page (a plain ``GET``) and the WebSocket (a ``GET`` with
``Upgrade: websocket``) from the same origin, so one port answers both; these are the
decisions about a request head, with no I/O.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import attrs
import h11

if TYPE_CHECKING:
    from importlib.abc import Traversable

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


#: Where the page is read from: package data (a test points it at a copy).
PAGE_PATH: Traversable | Path = importlib.resources.files("mq_trio").joinpath("static/index.html")
_page: bytes | None = None


def page_bytes() -> bytes:
    """The browser page, read once (at server start, see ``load_page``) and kept in memory.

    Served from memory afterwards, so replacing or removing the installed file under a
    running server (a reinstall) does not affect it. OSError if it cannot be read.
    """
    global _page
    if _page is None:
        _page = PAGE_PATH.read_bytes()
    return _page


def load_page() -> str | None:
    """Read the page now (at start); the problem as text if it cannot be read (yet)."""
    try:
        page_bytes()
    except OSError as exc:
        return f"cannot read the browser page {PAGE_PATH}: {exc}"
    return None


PAGE_HEADERS = (
    ("Cache-Control", "no-cache"),
    ("X-Frame-Options", "DENY"),
    # Inline script and style only; WebSocket connections to any server the user types.
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src data:; connect-src ws: wss:; base-uri 'none'; form-action 'none'",
    ),
)
