"""The HTTP port (``--http-port``): /metrics, /healthz, /stats, /connections, /topics.

One request per connection (``Connection: close``), GET or HEAD only. The port may be
reached by anyone who can reach its address, so every client is bounded like one of the
protocol's (docs/operations.md, "Metrics and introspection"): a request head of at most
:attr:`AdminLimits.max_head_bytes`, read within :attr:`AdminLimits.read_timeout` (a
slowloris holds a slot that long, no more), a response written within
:attr:`AdminLimits.write_timeout`, and at most :attr:`AdminLimits.max_clients` clients
at once (one more gets 503). A failure stays with its client: nothing reaches the
server's nurseries. The views themselves are in ``_metrics.py`` and ``_introspect.py``.

The port keeps answering after ``Server.shutdown()`` until the last connection is gone
(``/healthz`` then says 503 ``stopping``: what a load balancer polls during the grace).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import attrs
import trio

from ..transports._http import parse_head
from ..transports._tcp import peer_name
from ._introspect import (
    QueryError,
    TopicNames,
    connections_view,
    encode_page,
    stats_view,
    topics_view,
)
from ._metrics import CONTENT_TYPE, count_traffic, render

if TYPE_CHECKING:
    from ._server import Server

log = logging.getLogger("mq_trio.http")


@attrs.frozen
class AdminLimits:
    """The bounds of the HTTP port against hostile or broken clients."""

    #: Bytes of a request head (request line and headers); beyond: 431.
    max_head_bytes: int = 8 << 10
    #: Seconds to receive the whole head; beyond: 408.
    read_timeout: float = 10.0
    #: Seconds to write the response; beyond: the connection is dropped.
    write_timeout: float = 10.0
    #: Clients served at once; one more gets 503 (and as many more again are told so;
    #: beyond that they are closed at once).
    max_clients: int = 64
    #: Seconds the input of a closing client is read and discarded, so that the kernel
    #: does not reset the connection (losing the response) over unread bytes.
    linger: float = 1.0


#: The limits in force (tests replace them with shorter timeouts).
LIMITS = AdminLimits()

_JSON = "application/json"
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}
_RECEIVE_BYTES = 4096
_ACCEPT_TASK = "mq_trio.http"


def response(status: int, body: bytes, content_type: str = _JSON, *,
             head_only: bool = False, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """One complete HTTP/1.1 response, after which the connection closes."""
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        *(f"{name}: {value}" for name, value in headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def json_response(status: int, obj: Any, *, head_only: bool = False,
                  headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    return response(status, body, head_only=head_only, headers=headers)


def _error(status: int, text: str, **kwargs: Any) -> bytes:
    return json_response(status, {"error": text}, **kwargs)


@attrs.define(eq=False)
class Admin:
    """The HTTP port of one server: its clients, and the state its requests share."""

    server: Server
    limits: AdminLimits
    topic_names: TopicNames = attrs.Factory(TopicNames)
    #: Clients being served, and clients being told 503.
    clients: int = 0
    refusing: int = 0

    def start(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        """The accept loop's hook: serve the new client, tell it 503, or close it."""
        if self.clients < self.limits.max_clients:
            self.clients += 1
            nursery.start_soon(self._serve, trio.SocketStream(sock), name=_ACCEPT_TASK)
        elif self.refusing < self.limits.max_clients:
            self.refusing += 1
            nursery.start_soon(self._refuse, trio.SocketStream(sock), name=_ACCEPT_TASK)
        else:
            sock.close()

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            await self._exchange(stream)
        finally:
            self.clients -= 1

    async def _refuse(self, stream: trio.SocketStream) -> None:
        try:
            await self._reply_and_close(stream, _error(503, "Too many HTTP clients"))
        finally:
            self.refusing -= 1

    async def _exchange(self, stream: trio.SocketStream) -> None:
        reply = b""
        try:
            reply = await self._answer(stream)
        except Exception:
            log.exception("HTTP request from %s failed", peer_name(stream.socket))
            reply = _error(500, "Internal error")
        finally:
            await self._reply_and_close(stream, reply)

    async def _reply_and_close(self, stream: trio.SocketStream, reply: bytes) -> None:
        """Write the reply (bounded), half-close, discard input briefly (bounded: closing
        with unread input would reset the connection, response and all), close. Not
        shielded: the end of the shutdown grace ends it too."""
        limits = self.limits
        try:
            if reply:
                with trio.move_on_after(limits.write_timeout):
                    await stream.send_all(reply)
                    await stream.send_eof()
                    with trio.move_on_after(limits.linger):
                        while await stream.receive_some(_RECEIVE_BYTES):
                            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        finally:
            await trio.aclose_forcefully(stream)

    async def _answer(self, stream: trio.SocketStream) -> bytes:
        """The response to the client's one request (or to its failure to send one)."""
        data = b""
        end = -1
        with trio.move_on_after(self.limits.read_timeout) as timer:
            while (end := data.find(b"\r\n\r\n")) < 0:
                if len(data) > self.limits.max_head_bytes:
                    return _error(431, "Request head too large")
                chunk = await stream.receive_some(_RECEIVE_BYTES)
                if not chunk:
                    return b""  # closed before a whole head: nobody to answer
                data += chunk
        if timer.cancelled_caught:
            return _error(408, "Request head not received in time")
        if end > self.limits.max_head_bytes:
            return _error(431, "Request head too large")
        head = parse_head(data[:end])
        if head is None:
            return _error(400, "Bad request")
        if head.method not in ("GET", "HEAD"):
            return _error(405, "Only GET and HEAD", headers=(("Allow", "GET, HEAD"),))
        head_only = head.method == "HEAD"
        target = head.target
        query_text = target.split("?", 1)[1] if "?" in target else ""
        try:
            query = dict(parse_qsl(query_text, keep_blank_values=True, strict_parsing=False,
                                   max_num_fields=20))
            return await self.route(head.path, query, head_only)
        except (QueryError, ValueError) as exc:
            return _error(400, str(exc), head_only=head_only)

    async def route(self, path: str, query: dict[str, str], head_only: bool) -> bytes:
        server = self.server
        if path == "/metrics":
            text = render(server, await count_traffic(server))
            return response(200, text.encode(), CONTENT_TYPE, head_only=head_only)
        if path == "/healthz":
            if server.stopping:
                return json_response(503, {"status": "stopping"}, head_only=head_only)
            if not server.broker.history.stats().available:
                return json_response(503, {"status": "storage unavailable"},
                                     head_only=head_only)
            return json_response(200, {"status": "ok"}, head_only=head_only)
        if path == "/stats":
            return json_response(200, await stats_view(server), head_only=head_only)
        if path == "/connections":
            body = await encode_page(await connections_view(server, query), "connections")
            return response(200, body, head_only=head_only)
        if path == "/topics":
            view = await topics_view(server, query, self.topic_names)
            return response(200, await encode_page(view, "topics"), head_only=head_only)
        return _error(404, f"No such endpoint: {path}", head_only=head_only)


async def serve_admin(server: Server, listener: trio.SocketListener) -> None:
    """Answer HTTP requests on ``listener``; after ``server.shutdown()``, until the last
    connection is gone (the server's connections nursery runs this)."""
    admin = Admin(server, LIMITS)
    async with listener, trio.open_nursery() as nursery:
        nursery.start_soon(server._accept_loop, listener.socket, nursery, admin.start)
        await server.wait_until(lambda: server.stopping and server.open_connections == 0)
        nursery.cancel_scope.cancel()
