"""The rtt floor: servers that answer every line with a success reply and do nothing else.

    python bench/floor_server.py trio 7298 &      # one trio task per client: wait, read, write
    python bench/floor_server.py blocking 7299 &  # plain blocking sockets, no event loop
    mq-trio bench --port 7298 rtt

They speak just enough of protocol v1 for ``mq-trio bench rtt`` (one reply per line, no
parsing). What they measure is the cost of the I/O layer alone on this machine, which
mq-trio's own round trip cannot go below: docs/benchmarks.md compares the three.
"""

from __future__ import annotations

import os
import socket
import sys

import trio

REPLY = b'{"success": true}\r\n'


async def trio_client(sock: trio.socket.SocketType) -> None:
    fd = sock.fileno()
    with sock:
        while True:
            await trio.lowlevel.wait_readable(sock)
            data = os.read(fd, 65536)
            if not data:
                return
            os.write(fd, REPLY * data.count(b"\n"))


async def trio_server(port: int) -> None:
    listener = trio.socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await listener.bind(("127.0.0.1", port))
    listener.listen()
    async with trio.open_nursery() as nursery:
        while True:
            sock, _ = await listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(trio_client, sock)


def blocking_server(port: int) -> None:
    """One client at a time, which is all the rtt scenario opens."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with sock:
            fd = sock.fileno()
            while data := os.read(fd, 65536):
                os.write(fd, REPLY * data.count(b"\n"))


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    try:
        if kind == "trio":
            trio.run(trio_server, port)
        elif kind == "blocking":
            blocking_server(port)
        else:
            sys.exit("usage: floor_server.py trio|blocking PORT")
    except KeyboardInterrupt:
        pass
