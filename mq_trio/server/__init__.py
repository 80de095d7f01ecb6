"""The server: listeners, one broker, a nursery of connections."""

from ._server import Config, Server, open_listeners, open_ws_listeners, serve

__all__ = ["Config", "Server", "open_listeners", "open_ws_listeners", "serve"]
