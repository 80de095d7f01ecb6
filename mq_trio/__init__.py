"""mq-trio: a pub/sub message server speaking the aiomemq line-JSON protocol, on trio."""

from __future__ import annotations

__version__ = "0.1.0"

from .broker import Broker, MemoryHistory, TopicHistory  # noqa: E402
from .client import (  # noqa: E402
    AuthError,
    Backoff,
    Client,
    ConnectError,
    ConnectionEvent,
    ConnectionLost,
    Consumer,
    Gap,
    Job,
    Message,
    MQError,
    Published,
    QueueFull,
    SpoolError,
    SpoolFull,
    UnknownJob,
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
    "ConnectionEvent",
    "ConnectionLost",
    "Consumer",
    "Gap",
    "Job",
    "MQError",
    "MemoryHistory",
    "Message",
    "Published",
    "QueueFull",
    "Server",
    "SpoolError",
    "SpoolFull",
    "TopicHistory",
    "UnknownJob",
    "__version__",
    "open_client",
    "serve",
]
