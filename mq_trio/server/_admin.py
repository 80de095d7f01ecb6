"""The HTTP port (``--http-port``): /metrics, /healthz, /stats, /connections, /topics.

Stub: being built (issue #13 points 2-3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ._server import Server


async def serve_admin(server: Server, listener: trio.SocketListener) -> None:
    """Answer HTTP requests on ``listener`` until cancelled (the server's accept scope)."""
    async with listener:
        await trio.sleep_forever()
