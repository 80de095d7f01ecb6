"""mq-trio: a pub/sub message server speaking the aiomemq line-JSON protocol, on trio."""

from __future__ import annotations

__version__ = "0.1.0"

from .broker import Broker, MemoryHistory, TopicHistory  # noqa: E402
from .server import Config, Server, serve  # noqa: E402

__all__ = ["Broker", "Config", "MemoryHistory", "Server", "TopicHistory", "__version__", "serve"]
