from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).parent))

# tests/test_plugin.py runs user-style test files with pytester.
pytest_plugins = ["pytester"]

from support import SEED, SEED_VARIABLE, LineClient, start_server  # noqa: E402

from mq_trio.benchmark.cli import started_server  # noqa: E402
from mq_trio.benchmark.dialects import MQ, REDIS  # noqa: E402
from mq_trio.benchmark.scenarios import Target  # noqa: E402
from mq_trio.server import Server  # noqa: E402

#: The suite's own MQ_TRIO_* variables; every other one (a developer's MQ_TRIO_PORT or
#: MQ_TRIO_CONFIG, which tox passes through) would change the servers the tests start.
#: A Redis URL: the ``server`` fixture is then a node of a cluster over it
#: (tests/test_cluster.py runs the protocol's integration tests that way).
CLUSTER_VARIABLE = "MQ_TRIO_TEST_CLUSTER"

_SUITE_VARIABLES = frozenset({
    SEED_VARIABLE, "MQ_TRIO_BIG_HISTORY", "MQ_TRIO_REQUIRE_BROWSER", "MQ_TRIO_CHROMIUM",
    "MQ_TRIO_DOCS_SCREENSHOT", CLUSTER_VARIABLE,
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
    """An in-process server on an ephemeral 127.0.0.1 port, cache size 100 (a cluster
    node if $MQ_TRIO_TEST_CLUSTER names a Redis)."""
    cluster = os.environ.get(CLUSTER_VARIABLE)
    if cluster:
        from mq_trio.cluster import open_redis, parse_redis_url

        async with open_redis(parse_redis_url(cluster)) as redis:
            await redis.call("FLUSHALL")  # each test starts from empty topics
        return await start_server(nursery, cluster=cluster)
    return await start_server(nursery)


@pytest.fixture
def connect(server: Server) -> Callable[[], Awaitable[LineClient]]:
    """``await connect()`` opens a LineClient to the ``server`` fixture."""

    async def _connect() -> LineClient:
        return await LineClient.connect(server.port)

    return _connect


# --- the benchmark's targets (tests/test_bench*.py) ----------------------------------


@pytest.fixture(scope="module")
def mq() -> Iterator[Target]:
    """A real ``mq-trio serve`` (a process) for the load generator, one per module."""
    with started_server("127.0.0.1", None) as (port, pid):
        yield Target("mq-trio", "127.0.0.1", port, MQ, pid)


@pytest.fixture(scope="module")
def redis() -> Iterator[Target]:
    """Debian's redis-server on a free loopback port (installed by bench/compare.sh)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.02)
        yield Target("redis", "127.0.0.1", port, REDIS, proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
