"""The server: listeners, one broker, a nursery of connections."""

from ._server import (
    Config,
    Server,
    open_http_listeners,
    open_listeners,
    open_ws_listeners,
    serve,
)
from ._stats import Stats

__all__ = [
    "Config",
    "Server",
    "Stats",
    "open_http_listeners",
    "open_listeners",
    "open_ws_listeners",
    "serve",
]
