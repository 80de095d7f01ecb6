"""A trio client for mq-trio (and any protocol-v1 server), over TCP or WebSocket, with
optional authentication (``token=``, ``user=``/``password=``) and TLS (``ssl_context=``)."""

from ._client import PROBE_TOPIC, Client, open_client
from ._values import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    AuthError,
    Backoff,
    ConnectError,
    ConnectionEvent,
    ConnectionLost,
    Gap,
    Message,
    MQError,
    Target,
    parse_target,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "PROBE_TOPIC",
    "AuthError",
    "Backoff",
    "Client",
    "ConnectError",
    "ConnectionEvent",
    "ConnectionLost",
    "Gap",
    "MQError",
    "Message",
    "Target",
    "open_client",
    "parse_target",
]
