"""The trio transports: thin adapters between sockets and the sans-IO protocol core."""

from ._tcp import TCPTransport
from ._websocket import WebSocketTransport

__all__ = ["TCPTransport", "WebSocketTransport"]
