from __future__ import annotations

import random
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).parent))

# tests/test_plugin.py runs user-style test files with pytester.
pytest_plugins = ["pytester"]

from support import SEED, SEED_VARIABLE, LineClient, start_server  # noqa: E402

from mq_trio.server import Server  # noqa: E402


def pytest_report_header() -> str:
    return f"random seed: {SEED_VARIABLE}={SEED}"


@pytest.fixture
def seed() -> int:
    """The run's random seed (printed, so a failing test's output shows it)."""
    print(f"random seed {SEED} (rerun with {SEED_VARIABLE}={SEED})")
    return SEED


@pytest.fixture
def rng(seed: int, request: pytest.FixtureRequest) -> random.Random:
    """A generator seeded from the run's seed and the test's id (printed on failure)."""
    return random.Random(f"{seed}:{request.node.nodeid}")


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    """An in-process server on an ephemeral 127.0.0.1 port, cache size 100."""
    return await start_server(nursery)


@pytest.fixture
def connect(server: Server) -> Callable[[], Awaitable[LineClient]]:
    """``await connect()`` opens a LineClient to the ``server`` fixture."""

    async def _connect() -> LineClient:
        return await LineClient.connect(server.port)

    return _connect
