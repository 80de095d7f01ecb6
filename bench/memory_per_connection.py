"""Where an idle connection's memory goes: tracemalloc over N idle subscribed clients.

    python bench/memory_per_connection.py [N] > bench/results/memory-per-connection-10000.txt
    python bench/memory_per_connection.py 10000 --traceback   # grouped by call chain
    python bench/memory_per_connection.py 10000 --floor       # trio's part alone

Runs the server in this process with tracemalloc on, opens N connections from a child
process (each subscribes to its own topic, as the ``conns`` benchmark does), and prints
the growth in traced Python memory per connection, split into trio's, mq-trio's and the
rest, then by allocation site (with ``--traceback``: by the last frames of the call
chain, which tells the reader's waits from the writer's), then ``sys.getsizeof`` of one
connection's own objects. RSS is what the benchmark reports; this is the why.

``--floor`` runs, instead of mq-trio, the design card's shape and nothing else: per
accepted socket a task with a nursery, a reader waiting in ``trio.lowlevel.
wait_readable`` and a writer waiting in ``wait_task_rescheduled``, replying to the
subscribe without a broker. What it costs is trio's floor for that shape.
"""

from __future__ import annotations

import gc
import os
import socket
import resource
import subprocess
import sys
import tracemalloc
from functools import partial

import trio

from mq_trio.server import Config, serve

CLIENT = r"""
import socket, sys, time
n, port = int(sys.argv[1]), int(sys.argv[2])
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b'{"command": "subscribe", "topic": "bench.c%d"}\n' % i)
    socks.append(s)
    if i % 200 == 199 or i == n - 1:
        for t in socks[-(i % 200 + 1):]:
            assert t.recv(100).startswith(b'{"success"')
print("ready", flush=True)
sys.stdin.readline()
"""


def owner(filename: str) -> str:
    if "/trio/" in filename or "trio._core" in filename:
        return "trio"
    if "/mq_trio/" in filename:
        return "mq_trio"
    return "other"


def where(frame: tracemalloc.Frame, home: str) -> str:
    place = frame.filename.replace(home + "/", "")
    if "site-packages/" in place:
        place = place[place.find("site-packages/") + len("site-packages/"):]
    return f"{place}:{frame.lineno}"


def own_objects(conn: object) -> list[tuple[str, int]]:
    """``sys.getsizeof`` of a connection's own objects (not trio's, not the broker's)."""
    transport = getattr(conn, "transport", None)
    parts = [("Connection", conn), ("Outbox", getattr(conn, "outbox", None)),
             (type(transport).__name__, transport),
             ("LineConnection", getattr(transport, "wire", None))]
    return [(name, sys.getsizeof(obj)) for name, obj in parts if obj is not None]


def _abort(_: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.SUCCEEDED


async def _floor_writer() -> None:
    await trio.lowlevel.wait_task_rescheduled(_abort)


async def _floor_connection(fd: int, connections: list[int]) -> None:
    connections.append(fd)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_floor_writer, name="writer")
        while True:
            await trio.lowlevel.wait_readable(fd)
            if not os.read(fd, 65536):
                break
            os.write(fd, b'{"success": true}\r\n')
        nursery.cancel_scope.cancel()


class Floor:
    """What ``main`` needs of a server (``port``, ``connections``), for ``--floor``."""

    def __init__(self) -> None:
        self.port = 0
        self.connections: list[int] = []

    async def run(self, task_status: trio.TaskStatus[Floor]) -> None:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        self.port = listener.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            while True:
                client, _ = await listener.accept()
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(_floor_connection, client.detach(), self.connections,
                                   name="connection")
                del client


async def main(n: int, by_traceback: bool = False, floor: bool = False) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * n + 256)), hard))
    async with trio.open_nursery() as nursery:
        server = await nursery.start(Floor().run if floor else partial(serve, Config(port=0)))
        gc.collect()
        tracemalloc.start(8 if by_traceback else 1)
        before = tracemalloc.take_snapshot()
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(n), str(server.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert client.stdout is not None and client.stdin is not None
        line = await trio.to_thread.run_sync(client.stdout.readline)
        assert line.strip() == "ready", line
        while len(server.connections) < n:
            await trio.sleep(0.1)
        await trio.sleep(1)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        stats = after.compare_to(before, "traceback" if by_traceback else "lineno")
        total = sum(s.size_diff for s in stats)
        by_owner: dict[str, int] = {}
        for s in stats:
            key = owner(s.traceback[-1].filename)  # (the most recent frame is last)
            by_owner[key] = by_owner.get(key, 0) + s.size_diff
        print(f"{n} idle subscribed connections{' (--floor)' if floor else ''}, "
              f"Python {sys.version.split()[0]}, trio {trio.__version__}")
        print(f"total traced growth {total / 2**20:.1f} MiB = {total / n:.0f} B/conn")
        print({k: round(v / n) for k, v in sorted(by_owner.items())})
        home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for s in stats:
            if abs(s.size_diff) / n < 20:
                continue
            # the allocation site first, then its callers
            chain = " <- ".join(where(f, home) for f in list(s.traceback)[::-1][:4])
            print(f"{s.size_diff / n:7.0f} B/conn {s.count_diff / n:5.1f} obj/conn  {chain}")
        if not floor:
            conn = next(iter(server.connections))
            print("sys.getsizeof of one connection's objects:",
                  ", ".join(f"{name} {size}" for name, size in own_objects(conn)))
        client.stdin.write("\n")
        client.stdin.flush()
        client.wait()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    trio.run(main, int(args[0]) if args else 10_000, "--traceback" in sys.argv,
             "--floor" in sys.argv)
