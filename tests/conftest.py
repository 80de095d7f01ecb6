from __future__ import annotations

import os
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

#: The suite's own MQ_TRIO_* variables; every other one (a developer's MQ_TRIO_PORT or
#: MQ_TRIO_CONFIG, which tox passes through) would change the servers the tests start.
_SUITE_VARIABLES = frozenset({
    SEED_VARIABLE, "MQ_TRIO_BIG_HISTORY", "MQ_TRIO_REQUIRE_BROWSER", "MQ_TRIO_CHROMIUM",
    "MQ_TRIO_DOCS_SCREENSHOT",
})


@pytest.fixture(autouse=True)
def _no_outside_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run on the embedded defaults whatever the environment says."""
    for name in list(os.environ):
        if name.startswith("MQ_TRIO_") and name not in _SUITE_VARIABLES:
            monkeypatch.delenv(name)


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
