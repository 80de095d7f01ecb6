"""Shared test helpers: a raw line client over real TCP sockets on 127.0.0.1."""

from __future__ import annotations

import errno
import json
import os
import random
import sqlite3
from typing import Any

import pytest
import trio

from mq_trio.broker import Deferred
from mq_trio.protocol import Send, parse_line
from mq_trio.server import Config, Server, serve

SEED_VARIABLE = "MQ_TRIO_TEST_SEED"


def _run_seed() -> int:
    value = os.environ.get(SEED_VARIABLE)
    return int(value) if value else random.randrange(2**32)


# One random seed for the whole run: shown in pytest's header and printed by the ``seed``
# and ``rng`` fixtures (tests/conftest.py), so a failure names it. Rerun with
# MQ_TRIO_TEST_SEED=<seed> to make the same random choices again.
SEED = _run_seed()


def make_config(**overrides: Any) -> Config:
    """A config for in-process servers: loopback, ephemeral port."""
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0}
    values.update(overrides)
    return Config(**values)


async def start_server(nursery: trio.Nursery, **overrides: Any) -> Server:
    server: Server = await nursery.start(serve, make_config(**overrides))
    return server


class LineClient:
    """A protocol-v1 client that speaks raw lines; it decodes nothing it is not asked to."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = b""

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> LineClient:
        return cls(await trio.open_tcp_stream(host, port))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send(self, obj: Any) -> None:
        await self.stream.send_all(json.dumps(obj).encode() + b"\n")

    async def readline(self) -> bytes:
        """One reply line without its \\r\\n; raises EOFError at end of stream."""
        while b"\r\n" not in self._buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(f"connection closed; unterminated: {self._buffer[:100]!r}")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    async def receive(self) -> Any:
        return json.loads(await self.readline())

    async def receive_many(self, n: int) -> list[Any]:
        return [await self.receive() for _ in range(n)]

    async def request(self, obj: Any) -> Any:
        await self.send(obj)
        return await self.receive()

    async def read_to_eof(self) -> bytes:
        """Everything until the server closes the connection."""
        chunks = [self._buffer]
        self._buffer = b""
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def replay(client: LineClient, topic: str, last_seen: int = -1) -> list[dict[str, Any]]:
    """Subscribe and collect the whole replay (a later request's reply marks its end)."""
    await client.send({"command": "subscribe", "topic": topic, "last_seen": last_seen})
    await client.send({"command": "unsubscribe", "topic": "\x00end-of-replay"})
    assert await client.receive() == {"success": True}
    items: list[dict[str, Any]] = []
    while True:
        item = await client.receive()
        if item == {"success": True}:
            return items
        items.append(item)


class Fake:
    """A subscriber that records what the broker pushes to it."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.got: list[bytes] = []

    def push(self, payload: bytes) -> None:
        self.got.append(payload)

    def push_deferred(self, item: Deferred) -> None:
        # (a memory history defers nothing; a batch's shared item is already decided)
        out = item.ready()
        assert out is not None, "a memory history never defers a delivery"
        self.got.extend(out)

    @property
    def objects(self) -> list[Any]:
        return [json.loads(p) for p in self.got]

    @property
    def indexes(self) -> list[int]:
        return [o["index"] for o in self.objects]

    @property
    def msgs(self) -> list[str]:
        return [o["msg"] for o in self.objects]

    def __repr__(self) -> str:
        return f"Fake({self.name})"


class ExhaustedSocket:
    """accept() fails with EMFILE ``failures`` times, then waits forever."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def accept(self) -> tuple[Any, Any]:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        if self.calls <= self.failures:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 1)

    def close(self) -> None:
        pass


def parsed_send(
    topic: str = "t", msg: str = "m", delivery: str = "all", cache: bool | None = None
) -> Send:
    """A Send parsed from the wire form, so its delivery is the object as received."""
    obj: dict[str, Any] = {"command": "send", "topic": topic, "msg": msg, "delivery": delivery}
    if cache is not None:
        obj["cache"] = cache
    event = parse_line(json.dumps(obj).encode())
    assert isinstance(event, Send)
    return event


class FailingCommits:
    """The store's commits fail (a disk I/O error, raised where SQLite's would be) while
    ``failing`` is true: the real failure path of a durable server, switched by a test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, failing: bool = True) -> None:
        from mq_trio.store._sqlite import SqliteBackend

        self.failing = failing
        real_commit = SqliteBackend._commit

        def commit(backend: SqliteBackend, conn: sqlite3.Connection, sync: bool) -> None:
            if self.failing:
                raise sqlite3.OperationalError("disk I/O error")
            real_commit(backend, conn, sync)

        monkeypatch.setattr(SqliteBackend, "_commit", commit)
