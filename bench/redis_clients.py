"""Redis clients under trio: our RESP client (mq_trio/cluster) against coredis.

Measures, against one local redis-server it starts (pinned to CPU 0 with taskset; this
process pins itself to CPU 1): (1) an awaited GET round trip, (2) the cost per command
of pipelined GETs, (3) pub/sub intake of a burst of 400k 64-byte messages, published by a
separate process (on CPU 0 with Redis) as one pipelined stream. Results:
docs/cluster-clients.md.

    /work/venv/bin/pip install coredis   # only for this measurement, not a dependency
    /work/venv/bin/python bench/redis_clients.py [--burst 400000] [--calls 20000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from mq_trio.cluster import RedisAddress, RedisUnavailable, open_redis, open_subscription

CHANNEL = "burst"
MESSAGE = b"m" * 64

# The publisher: a plain blocking socket, every PUBLISH pre-encoded and sent as one stream
# while a thread reads the replies. Prints the number of replies it read.
PUBLISHER = r"""
import socket, sys, threading
port, n, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
body = b"m" * size
one = b"*3\r\n$7\r\nPUBLISH\r\n$5\r\nburst\r\n$%d\r\n%s\r\n" % (size, body)
data = one * n
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
got = 0
def read():
    global got
    buf = b""
    while got < n:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
        lines = buf.split(b"\r\n")
        buf = lines.pop()
        got += len(lines)
t = threading.Thread(target=read)
t.start()
s.sendall(data)
t.join()
print(got)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("redis-server is not installed")
    taskset = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    proc = subprocess.Popen(
        [*taskset, server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", directory],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(500):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.01)
    proc.kill()
    sys.exit("redis-server did not start")


def publisher(port: int, n: int) -> subprocess.Popen[str]:
    taskset = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    return subprocess.Popen([*taskset, sys.executable, "-c", PUBLISHER, str(port), str(n),
                             str(len(MESSAGE))], stdout=subprocess.PIPE, text=True)


def summary(samples: list[float]) -> str:
    samples.sort()
    p50 = samples[len(samples) // 2] * 1e6
    p99 = samples[int(len(samples) * 0.99)] * 1e6
    return f"mean {statistics.fmean(samples) * 1e6:.1f} µs, p50 {p50:.1f}, p99 {p99:.1f}"


async def timed_calls(call: Callable[[], Awaitable[Any]], n: int) -> str:
    for _ in range(min(n, 1000)):  # warm up
        await call()
    samples = []
    clock = time.perf_counter
    for _ in range(n):
        start = clock()
        await call()
        samples.append(clock() - start)
    return summary(samples)


async def timed_pipelines(run: Callable[[int], Awaitable[Any]], n: int, size: int) -> str:
    await run(size)
    start = time.perf_counter()
    for _ in range(n):
        await run(size)
    return f"{(time.perf_counter() - start) / (n * size) * 1e6:.2f} µs per command"


async def intake(
    port: int, burst: int, subscribe: Callable[[trio.Event, list[float]], Awaitable[int]]
) -> str:
    """Start the publisher once subscribed; the rate from first to last message."""
    subscribed = trio.Event()
    times: list[float] = []
    got = 0

    async def run() -> None:
        nonlocal got
        got = await subscribe(subscribed, times)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await subscribed.wait()
        pub = await trio.to_thread.run_sync(publisher, port, burst)
        out, _ = await trio.to_thread.run_sync(pub.communicate)
    if len(times) < 2:
        return f"received {got} of {burst} (publisher got {out.strip()} replies)"
    rate = (got - 1) / (times[1] - times[0])
    lost = "" if got == burst else f", LOST {burst - got} (cut off by Redis)"
    return f"received {got} of {burst}, {rate / 1000:.0f}k msg/s{lost}"


IDLE = 3.0  # seconds without a message: the burst is over (or the subscriber was cut off)


async def ours(port: int, args: argparse.Namespace) -> dict[str, str]:
    address = RedisAddress("127.0.0.1", port)
    results = {}
    async with open_redis(address) as conn:
        await conn.call("SET", "k", "v" * 16)
        results["rtt"] = await timed_calls(lambda: conn.call("GET", "k"), args.calls)
        results["pipelined"] = await timed_pipelines(
            lambda size: conn.pipeline([("GET", "k")] * size), 100, 1000
        )

    async def subscribe(subscribed: trio.Event, times: list[float]) -> int:
        got = 0
        async with open_subscription(address) as sub:
            await sub.subscribe(CHANNEL)
            subscribed.set()
            while got < args.burst:
                with trio.move_on_after(IDLE) as idle:
                    try:
                        batch = await sub.receive()
                    except RedisUnavailable:  # cut off by Redis's output buffer limit
                        break
                if idle.cancelled_caught:
                    break
                if not got:
                    times.append(time.perf_counter())
                got += len(batch)
            times.append(time.perf_counter())
        return got

    results["intake"] = await intake(port, args.burst, subscribe)
    return results


async def raw_socket(port: int, args: argparse.Namespace) -> dict[str, str]:
    """The floor: one task writing GET on a trio socket's descriptor and reading the reply
    itself (no reader task, no matching of replies to callers, no concurrency)."""
    import hiredis

    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fd = sock.fileno()
    reader = hiredis.Reader()
    command = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"

    async def call() -> Any:
        os.write(fd, command)
        while (reply := reader.gets()) is False:
            await trio.lowlevel.wait_readable(sock)
            reader.feed(os.read(fd, 1 << 16))
        return reply

    with sock:
        return {"rtt": await timed_calls(call, args.calls)}


async def coredis_client(port: int, args: argparse.Namespace) -> dict[str, str]:
    try:
        import coredis
    except ImportError:
        return {"error": "coredis is not installed (pip install coredis)"}
    results = {}
    client: Any = coredis.Redis(host="127.0.0.1", port=port, decode_responses=False)
    async with client:
        await client.set("k", "v" * 16)
        results["rtt"] = await timed_calls(lambda: client.get("k"), args.calls // 4)

        async def pipeline(size: int) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(size):
                    pipe.get("k")

        results["pipelined"] = await timed_pipelines(pipeline, 20, 1000)

        async def subscribe(subscribed: trio.Event, times: list[float]) -> int:
            got = 0
            async with client.pubsub(channels=[CHANNEL], ignore_subscribe_messages=True) as ps:
                subscribed.set()
                while got < args.burst:
                    with trio.move_on_after(IDLE) as idle:
                        message = await ps.get_message()
                    if idle.cancelled_caught:
                        break
                    if message is None or message.get("type") != "message":
                        continue
                    if not got:
                        times.append(time.perf_counter())
                    got += 1
                times.append(time.perf_counter())
            return got

        results["intake"] = await intake(port, args.burst, subscribe)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=400_000)
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory() as directory:
        proc, port = start_redis(directory)
        try:
            for name, run in (("mq_trio.cluster", ours), ("coredis", coredis_client),
                              ("raw socket, one task (the floor)", raw_socket)):
                try:
                    results = trio.run(run, port, args)
                except Exception as exc:  # report, do not hide: e.g. it does not run on trio
                    results = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"## {name}")
                for key, value in results.items():
                    print(f"- {key}: {value}")
                sys.stdout.flush()
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
