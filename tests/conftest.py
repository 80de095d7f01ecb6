from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).parent))

# tests/test_plugin.py runs user-style test files with pytester.
pytest_plugins = ["pytester"]

from support import LineClient, start_server  # noqa: E402

from mq_trio.server import Server  # noqa: E402


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    """An in-process server on an ephemeral 127.0.0.1 port, cache size 100."""
    return await start_server(nursery)


@pytest.fixture
def connect(server: Server):  # type: ignore[no-untyped-def]
    """``await connect()`` opens a LineClient to the ``server`` fixture."""

    async def _connect() -> LineClient:
        return await LineClient.connect(server.port)

    return _connect
