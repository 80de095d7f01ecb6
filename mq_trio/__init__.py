"""mq-trio: a pub/sub message server speaking the aiomemq line-JSON protocol, on trio."""

from __future__ import annotations

__version__ = "0.1.0"

from .broker import Broker, MemoryHistory, TopicHistory  # noqa: E402
from .client import (  # noqa: E402
    AuthError,
    Backoff,
    Client,
    ConnectError,
    ConnectionLost,
    Gap,
    Message,
    MQError,
    open_client,
)
from .server import Config, Server, serve  # noqa: E402

__all__ = [
    "AuthError",
    "Backoff",
    "Broker",
    "Client",
    "Config",
    "ConnectError",
    "ConnectionLost",
    "Gap",
    "MQError",
    "MemoryHistory",
    "Message",
    "Server",
    "TopicHistory",
    "__version__",
    "open_client",
    "serve",
]
