"""Many concurrent clients: every message is delivered exactly once.

The 10,000-connection test runs the server in a subprocess (``python -m mq_trio serve
--port 0``) because the open-file limit is per process (20,000 here) and 10,000 client
sockets plus 10,000 server sockets would not fit in one.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from support import LineClient, start_server

LISTENING = re.compile(rb"listening on \S+:(\d+)")


def raise_open_file_limit(needed: int) -> None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        pytest.skip("needs the resource module")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        pytest.skip(f"needs {needed} open files, the limit is {soft}")


async def run_mesh(port: int, clients: int, per_client: int, seed: int) -> None:
    """Each client subscribes to its own topic, then sends to random other clients' topics.

    Checks that every client receives exactly the messages addressed to it, once each.
    """
    rng = random.Random(seed)

    def other(i: int) -> int:
        j = rng.randrange(clients - 1)  # uniform over the clients other than i
        return j + 1 if j >= i else j

    targets = [[other(i) for _ in range(per_client)] for i in range(clients)]
    expected: list[Counter[str]] = [Counter() for _ in range(clients)]
    for i, row in enumerate(targets):
        for k, j in enumerate(row):
            expected[j][f"{i}:{k}"] += 1
    received: list[Counter[str]] = [Counter() for _ in range(clients)]
    connected: list[LineClient | None] = [None] * clients
    subscribed = 0
    all_subscribed = trio.Event()
    connect_limit = trio.CapacityLimiter(256)  # stay under the listen backlog

    async def client(i: int) -> None:
        nonlocal subscribed
        async with connect_limit:
            c = await LineClient.connect(port)
        connected[i] = c
        assert await c.request({"command": "subscribe", "topic": f"c{i}"}) == {"success": True}
        subscribed += 1
        if subscribed == clients:
            all_subscribed.set()
        await all_subscribed.wait()
        await c.send_raw(b"".join(
            json.dumps({"command": "send", "topic": f"c{j}", "msg": f"{i}:{k}",
                        "delivery": "all"}).encode() + b"\n"
            for k, j in enumerate(targets[i])
        ))
        want = sum(expected[i].values())
        successes = 0
        mine = received[i]
        while successes < per_client or sum(mine.values()) < want:
            reply = await c.receive()
            if "success" in reply:
                assert reply == {"success": True}
                successes += 1
            else:
                assert reply["topic"] == f"c{i}"
                mine[reply["msg"]] += 1

    try:
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(client, i)
    finally:
        with trio.CancelScope(shield=True):
            for c in connected:
                if c is not None:
                    await c.aclose()
    assert subscribed == clients
    assert sum(sum(r.values()) for r in received) == clients * per_client
    for i in range(clients):
        assert received[i] == expected[i], i


async def test_1000_clients_each_sending_to_others(nursery: trio.Nursery, seed: int) -> None:
    raise_open_file_limit(2 * 1000 + 100)
    server = await start_server(nursery)
    with trio.fail_after(120):
        await run_mesh(server.port, clients=1000, per_client=5, seed=seed)
    # the clients closed: once the server has read every EOF it lets go of every one
    await trio.testing.wait_all_tasks_blocked()
    assert not server.connections
    assert all(not server.broker.subscribers(f"c{i}") for i in range(1000))


@pytest.fixture
def subprocess_server() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mq_trio", "serve", "--port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    assert proc.stderr is not None
    try:
        deadline = time.monotonic() + 30
        log = b""
        while (m := LISTENING.search(log)) is None:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([proc.stderr], [], [], left)[0], log
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, f"server exited: {log!r}"
            log += chunk
        yield proc, int(m.group(1))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.slow
async def test_10000_connections(
    subprocess_server: tuple[subprocess.Popen[bytes], int], seed: int
) -> None:
    """10,000 clients, each subscribed to its own topic, each sending 10 messages to random
    other topics: every one of the 100,000 messages arrives exactly once.

    About 25 s here, so it stays in the default run; ``pytest -m "not slow"`` skips it.
    """
    raise_open_file_limit(10_000 + 100)
    proc, port = subprocess_server
    with trio.fail_after(300):
        await run_mesh(port, clients=10_000, per_client=10, seed=seed)
    assert proc.poll() is None
