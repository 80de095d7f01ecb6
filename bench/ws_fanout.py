"""WebSocket fan-out, measured: one topic, S WebSocket subscribers, a TCP publisher.

    python bench/ws_fanout.py [--python PYTHON] [--subscribers 1 10 100] [--messages N]

Starts ``PYTHON -m mq_trio serve --ws-port`` on CPU 0 (a build to compare: another
interpreter with another mq-trio installed), then, on CPU 1, subscribers that speak
WebSocket on raw sockets (they parse frame headers and count, so they are not what is
measured) and a publisher that pipelines 64-byte messages. Prints deliveries per second.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from multiprocessing import get_context
from typing import Any

from mq_trio.benchmark.ws import WsReader, client_frame

MSG = "x" * 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ws_connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head[:100]
    return sock


def ws_send(sock: socket.socket, text: str) -> None:
    sock.sendall(client_frame(text.encode()))


def subscriber(port: int, expected: int, ready: Any, done: Any) -> None:
    os.sched_setaffinity(0, {1})
    sock = ws_connect(port)
    ws_send(sock, json.dumps({"command": "subscribe", "topic": "t", "cache": False}))
    reader = WsReader()
    got = 0
    while got < 1:  # the subscribe's reply
        got += reader.feed(sock.recv(65536))[0]
    ready.release()
    got = 0
    while got < expected:
        data = sock.recv(1 << 20)
        if not data:
            break
        got += reader.feed(data)[0]
    done.put((time.perf_counter(), got))


def run(python: str, subscribers: int, messages: int) -> float:
    port, ws_port = free_port(), free_port()
    server = subprocess.Popen(
        ["taskset", "-c", "0", python, "-m", "mq_trio", "serve", "--port", str(port),
         "--ws-port", str(ws_port), "--log-level", "warning", "--max-pending-bytes", "64MiB"],
        # Not this checkout's directory: "-m mq_trio" would import the package from the
        # working directory instead of the build installed for PYTHON.
        cwd="/",
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        ctx = get_context("fork")
        ready = ctx.Semaphore(0)
        done = ctx.Queue()
        procs = [ctx.Process(target=subscriber, args=(ws_port, messages, ready, done))
                 for _ in range(subscribers)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire()
        os.sched_setaffinity(0, {1})
        pub = socket.create_connection(("127.0.0.1", port))
        line = json.dumps({"command": "send", "topic": "t", "msg": MSG, "delivery": "all",
                           "cache": False}).encode() + b"\n"
        start = time.perf_counter()
        sel = selectors.DefaultSelector()
        pub.setblocking(False)
        sel.register(pub, selectors.EVENT_READ)
        chunk = line * 500
        sent = 0
        while sent < messages:
            pub.setblocking(True)
            pub.sendall(chunk)
            sent += 500
            pub.setblocking(False)
            try:
                while pub.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass
        ends = [done.get(timeout=300) for _ in procs]
        for p in procs:
            p.join()
        short = [got for _, got in ends if got < messages]
        if short:
            raise SystemExit(f"{len(short)} subscriber(s) got fewer than {messages} messages "
                             f"(cut off as slow consumers?): {short[:5]}")
        elapsed = max(end for end, _ in ends) - start
        with open(f"/proc/{server.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        print(f"  ({subscribers * messages} deliveries in {elapsed:.2f} s; server CPU "
              f"{cpu:.2f} s since it started)", flush=True)
        return subscribers * messages / elapsed
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--subscribers", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--messages", type=int, default=100_000)
    args = ap.parse_args()
    for s in args.subscribers:
        rate = run(args.python, s, max(args.messages // max(s // 10, 1), 2000))
        print(f"subscribers {s:4d}: {rate / 1e3:9.1f}k deliveries/s", flush=True)


if __name__ == "__main__":
    main()
