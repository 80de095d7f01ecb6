"""How long the HTTP port's requests hold up the event loop (issue #13 points 2-3).

    python bench/admin_stall.py                          # 1,000,000 topics, 19,000 clients
    python bench/admin_stall.py --topics 100000 --connections 2000 --json out.json

The server runs in this process (``serve`` with ``http_port=0``) with a **ticker** task
that does nothing but checkpoint: the longest time between two of its turns is the
longest the event loop was held by anyone, i.e. the latency every client of the server
would have seen added at that moment. The topics are made through the broker directly
(``broker.publish``, one message each, before measuring); the connections are real TCP
clients in a child process (the file-descriptor limit is per process), each subscribed
to one of the first 1,000 topics. The garbage collector is tuned as ``mq-trio serve``
tunes it (``gc.freeze()`` after loading, the same thresholds).

For each request the HTTP client is a raw socket in this process that only sends the
request and reads the bytes until the server closes (no parsing while measuring). The
report: per endpoint, the request's wall time and the longest event-loop gap during it,
next to the longest gap of an idle second (the noise floor of this machine), and, for
contrast, how long the one-call versions (copying and sorting every topic name) block.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from typing import Any

import trio

from mq_trio.cli._main import GC_THRESHOLD
from mq_trio.protocol import Send
from mq_trio.server import Config, Server, _introspect, serve

CLIENTS = textwrap.dedent("""
    import socket, sys
    port, count = int(sys.argv[1]), int(sys.argv[2])
    socks = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b'{"command":"subscribe","topic":"t/%07d"}\\n' % (i % 1000))
        socks.append(s)
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes it
""")


class Ticker:
    """Checkpoints in a loop; keeps the longest gap between its turns while recording,
    by the wall clock and by this thread's CPU time (which leaves out the time the
    operating system gave the CPU to other processes: the share of the gap that was
    work of this event loop). Also the longest garbage collection meanwhile."""

    def __init__(self) -> None:
        self.recording = False
        self.wall = self.cpu = self.gc = 0.0
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self.recording:
            self.gc = max(self.gc, time.perf_counter() - self._gc_started)

    async def run(self) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        while True:
            await trio.lowlevel.checkpoint()
            now_wall, now_cpu = time.perf_counter(), time.thread_time()
            if self.recording:
                self.wall = max(self.wall, now_wall - wall)
                self.cpu = max(self.cpu, now_cpu - cpu)
            wall, cpu = now_wall, now_cpu

    def start(self) -> None:
        self.wall = self.cpu = self.gc = 0.0
        self.recording = True

    def stop(self) -> tuple[float, float, float]:
        """The longest gaps since ``start`` (wall, CPU) and GC pause, in milliseconds."""
        self.recording = False
        return self.wall * 1000, self.cpu * 1000, self.gc * 1000


async def fetch(port: int, target: str) -> tuple[int, int]:
    """(status, response bytes) of one GET."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        chunks = []
        while chunk := await stream.receive_some(1 << 20):
            chunks.append(chunk)
    data = b"".join(chunks)
    return int(data.split(b" ", 2)[1]), len(data)


def load_topics(server: Server, count: int) -> float:
    """One message to each of ``count`` topics, in a shuffled order (names created in
    sorted order would make every sort a single run, which Timsort only checks)."""
    started = time.perf_counter()
    order = list(range(count))
    random.Random(13).shuffle(order)
    publish = server.broker.publish
    for i in order:
        publish(Send(f"t/{i:07d}", "x", "all"))
    return time.perf_counter() - started


def one_call_costs(server: Server) -> dict[str, float]:
    """What the naive versions would block for (copy and sort every name at once)."""
    started = time.perf_counter()
    names = server.broker.topic_names()
    copied = time.perf_counter() - started
    started = time.perf_counter()
    sorted(names)
    return {"copy all names at once (ms)": copied * 1000,
            "sort all names at once (ms)": (time.perf_counter() - started) * 1000}


SCENARIOS = [
    # (label, target, cold: wait for the topic snapshot to expire first)
    ("/healthz", "/healthz", False),
    ("/metrics", "/metrics", False),
    ("/stats", "/stats", False),
    ("/connections (sort=pending, 100 rows)", "/connections", False),
    ("/connections?sort=peer&limit=1000", "/connections?sort=peer&limit=1000", False),
    ("/topics?prefix=t/00012 (cold: builds the sorted snapshot)", "/topics?prefix=t/00012",
     True),
    ("/topics?prefix=t/00012 (warm: snapshot reused)", "/topics?prefix=t/00012", False),
    ("/topics?limit=1000 (warm)", "/topics?limit=1000", False),
    ("/topics?sort=subscribers (warm; counts every topic)", "/topics?sort=subscribers",
     False),
]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    config = Config(host="127.0.0.1", port=0, http_port=0,
                    max_topics=max(args.topics + 10, 1000),
                    max_connections=args.connections + 100)
    report: dict[str, Any] = {"topics": args.topics, "connections": args.connections,
                              "python": sys.version.split()[0], "cpus": os.cpu_count()}
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, config)
        assert server.http_port is not None
        report["load seconds"] = round(load_topics(server, args.topics), 1)
        clients = None
        if args.connections:
            clients = await trio.lowlevel.open_process(
                [sys.executable, "-c", CLIENTS, str(server.port), str(args.connections)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert clients.stdout is not None
            await clients.stdout.receive_some(100)  # "ready"
            await server.wait_until(lambda: len(server.connections) >= args.connections)
            # the clients' subscribes are read by the server soon after "ready": poll
            while server.broker.subscription_total < args.connections:  # noqa: ASYNC110
                await trio.sleep(0.05)
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLD)
        for target in ("/healthz", "/metrics"):  # warm up (first-use costs)
            await fetch(server.http_port, target)
        ticker = Ticker()
        nursery.start_soon(ticker.run)
        ticker.start()
        await trio.sleep(1.0)
        idle = ticker.stop()
        report["idle"] = {"max gap ms": round(idle[0], 2), "max cpu gap ms": round(idle[1], 2)}
        print(f"idle second: max gap {idle[0]:.2f} ms (cpu {idle[1]:.2f} ms)", flush=True)
        rows = []
        for label, target, cold in SCENARIOS:
            if cold:
                await trio.sleep(_introspect.TOPICS_TTL + 0.1)
            worst = [0.0, 0.0, 0.0]
            times = []
            size = 0
            for _ in range(1 if cold else args.repeat):
                ticker.start()
                started = trio.current_time()
                status, size = await fetch(server.http_port, target)
                times.append(trio.current_time() - started)
                worst = [max(a, b) for a, b in zip(worst, ticker.stop(), strict=True)]
                assert status == 200, (target, status)
            rows.append({"request": label, "bytes": size,
                         "wall ms (mean)": round(1000 * sum(times) / len(times), 1),
                         "max gap ms": round(worst[0], 2), "max cpu gap ms": round(worst[1], 2),
                         "max gc ms": round(worst[2], 2)})
            print(f"{label:60} {rows[-1]['wall ms (mean)']:>9} ms  max gap {worst[0]:7.2f} "
                  f"ms (cpu {worst[1]:6.2f}, gc {worst[2]:6.2f})", flush=True)
        report["requests"] = rows
        report["one call"] = {k: round(v, 1) for k, v in one_call_costs(server).items()}
        if clients is not None:
            assert clients.stdin is not None
            await clients.stdin.aclose()
            await clients.wait()
        server.shutdown()
        await server.stopped.wait()
        nursery.cancel_scope.cancel()  # the ticker
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"{report['topics']:,} topics, {report['connections']:,} connections; "
        f"Python {report['python']}, {report['cpus']} CPUs (shared with other jobs). "
        f"Longest gap of an idle second (the machine's noise): "
        f"{report['idle']['max gap ms']} ms (CPU {report['idle']['max cpu gap ms']} ms).",
        "",
        "| request | response bytes | wall time (ms) | longest gap (ms) | of it CPU (ms) "
        "| longest GC pause (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["requests"]:
        lines.append(f"| `{row['request']}` | {row['bytes']:,} | {row['wall ms (mean)']} | "
                     f"{row['max gap ms']} | {row['max cpu gap ms']} | {row['max gc ms']} |")
    lines.append("")
    lines.append("For contrast, done in one call (what the slicing avoids): " + ", ".join(
        f"{k.replace(' (ms)', '')} {v} ms" for k, v in report["one call"].items()) + ".")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topics", type=int, default=1_000_000)
    parser.add_argument("--connections", type=int, default=19_000,
                        help="TCP clients (each is a descriptor in the server process: "
                             "keep below its open-file limit)")
    parser.add_argument("--repeat", type=int, default=5, help="requests per warm scenario")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    report = trio.run(measure, args)
    print()
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
