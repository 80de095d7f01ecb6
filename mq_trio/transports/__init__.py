"""The trio transports: thin adapters between sockets and the sans-IO protocol core,
and the sans-IO HTTP decisions of the WebSocket port."""

from ._base import Transport
from ._http import (
    OriginPolicy,
    RequestHead,
    handshake_problem,
    http_response,
    normalise_origin,
    page_bytes,
    parse_head,
    parse_origins,
)
from ._tcp import TCPTransport
from ._websocket import WebSocketTransport

__all__ = [
    "OriginPolicy",
    "RequestHead",
    "TCPTransport",
    "Transport",
    "WebSocketTransport",
    "handshake_problem",
    "http_response",
    "normalise_origin",
    "page_bytes",
    "parse_head",
    "parse_origins",
]
