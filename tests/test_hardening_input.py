"""Hardening (issue 11): remote input that must not crash a durable server, and the line
limit with a ``\\r\\n`` terminator. Real sockets on 127.0.0.1 where a server is involved."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from support import LineClient, make_config, replay, start_server

from mq_trio import protocol
from mq_trio.protocol import LineBuffer, LineConnection
from mq_trio.server import Server, serve
from mq_trio.store import STORAGE_UNAVAILABLE, _sqlite
from mq_trio.store._sqlite import SqliteBackend

SUCCESS = {"success": True}
FAILURE = {"success": False, "reason": STORAGE_UNAVAILABLE}
GUARD_SECONDS = 60


def send(topic: str, msg: str) -> dict[str, Any]:
    return {"command": "send", "topic": topic, "msg": msg, "delivery": "all"}


@asynccontextmanager
async def running(data_dir: Path, **overrides: Any) -> AsyncIterator[Server]:
    """A durable in-process server; the test fails if it stops on its own."""
    with trio.fail_after(GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                serve, make_config(data_dir=str(data_dir), **overrides)
            )
            try:
                yield server
                assert not server.stopped.is_set(), "the server stopped by itself"
            finally:
                server.shutdown()
                await server.stopped.wait()


# --- last_seen out of SQLite's range ---------------------------------------------------

# memory_window < sends <= cache_size: the oldest messages live only on disk.
SPILLING = {"memory_window": 2, "cache_size": 10}


@pytest.mark.parametrize(
    ("last_seen", "expected"),
    [
        (-(2**63), list(range(6))),
        (-2, list(range(6))),
        (2**63 - 1, []),
        (1, [2, 3, 4, 5]),
    ],
)
async def test_any_last_seen_is_answered_by_a_durable_server(
    tmp_path: Path, last_seen: int, expected: list[int]
) -> None:
    async with running(tmp_path, **SPILLING) as server:
        pub = await LineClient.connect(server.port)
        other = await LineClient.connect(server.port)
        assert await other.request({"command": "subscribe", "topic": "t"}) == SUCCESS
        for i in range(6):
            assert await pub.request(send("t", f"m{i}")) == SUCCESS
        assert [m["index"] for m in await other.receive_many(6)] == list(range(6))
        # the oldest live only on disk: a replay of them reads the database
        assert [m.index for m in server.broker.history.cached("t")] == [4, 5]
        sub = await LineClient.connect(server.port)
        got = await replay(sub, "t", last_seen)
        assert [m["index"] for m in got] == expected
        # the server is still up: everyone keeps being served
        assert await pub.request(send("t", "after")) == SUCCESS
        assert (await other.receive())["msg"] == "after"
        assert (await sub.receive())["msg"] == "after"
        late = await LineClient.connect(server.port)
        assert [m["index"] for m in await replay(late, "t", -1)] == list(range(7))


async def test_extreme_last_seen_twice_on_one_connection(tmp_path: Path) -> None:
    async with running(tmp_path, **SPILLING) as server:
        pub = await LineClient.connect(server.port)
        for i in range(6):  # one by one: each is on disk before the next spills it
            assert await pub.request(send("t", f"m{i}")) == SUCCESS
        sub = await LineClient.connect(server.port)
        assert [m["index"] for m in await replay(sub, "t", -(2**63))] == list(range(6))
        assert await replay(sub, "t", 2**63 - 1) == []
        assert await pub.request(send("t", "still")) == SUCCESS
        assert (await sub.receive())["msg"] == "still"


@pytest.mark.parametrize("last_seen", [-(2**70), -(2**63) - 1, 2**63, 2**70])
async def test_last_seen_beyond_64_bits_is_refused_and_the_server_serves_on(
    tmp_path: Path, last_seen: int
) -> None:
    async with running(tmp_path, **SPILLING) as server:
        pub = await LineClient.connect(server.port)
        for i in range(6):
            assert await pub.request(send("t", f"m{i}")) == SUCCESS
        sub = await LineClient.connect(server.port)
        reply = await sub.request({"command": "subscribe", "topic": "t", "last_seen": last_seen})
        assert reply == {"success": False, "reason": "Malformed json message"}
        assert [m["index"] for m in await replay(sub, "t", -1)] == list(range(6))
        assert await pub.request(send("t", "after")) == SUCCESS
        assert (await sub.receive())["msg"] == "after"


# --- unexpected errors in the store's worker ----------------------------------------


async def test_unexpected_error_writing_fails_the_batch_not_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failing = False
    real_commit = SqliteBackend._commit

    def commit(self: SqliteBackend, conn: sqlite3.Connection, sync: bool) -> None:
        if failing:
            raise RuntimeError("unforeseen")
        real_commit(self, conn, sync)

    monkeypatch.setattr(SqliteBackend, "_commit", commit)
    async with running(tmp_path, cache_size=10) as server:
        pub = await LineClient.connect(server.port)
        sub = await LineClient.connect(server.port)
        assert await pub.request(send("t", "ok")) == SUCCESS
        assert await sub.request({"command": "subscribe", "topic": "t"}) == SUCCESS
        assert (await sub.receive())["msg"] == "ok"
        failing = True
        with caplog.at_level(logging.ERROR, logger="mq_trio.store"):
            assert await pub.request(send("t", "lost")) == FAILURE
        assert await sub.request({"command": "unsubscribe", "topic": "x"}) == SUCCESS
        failing = False
        assert await pub.request(send("t", "back")) == SUCCESS
        assert (await sub.receive())["msg"] == "back"
    # logged once, with its traceback
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [RuntimeError]


async def test_unexpected_error_in_apply_fails_the_batch_not_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failures = 0
    real_apply = SqliteBackend.apply

    def apply(self: SqliteBackend, ops: Any, sync: bool) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise ValueError("unforeseen")
        return real_apply(self, ops, sync)

    monkeypatch.setattr(SqliteBackend, "apply", apply)
    async with running(tmp_path, cache_size=10) as server:
        pub = await LineClient.connect(server.port)
        assert await pub.request(send("t", "ok")) == SUCCESS
        failures = 1
        with caplog.at_level(logging.ERROR, logger="mq_trio.store"):
            assert await pub.request(send("t", "lost")) == FAILURE
        assert await pub.request(send("t", "back")) == SUCCESS
        got = await replay(await LineClient.connect(server.port), "t", -1)
        assert [m["msg"] for m in got] == ["ok", "back"]
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [ValueError]


async def test_unexpected_error_opening_a_disk_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path, **SPILLING) as server:
        pub = await LineClient.connect(server.port)
        for i in range(6):  # one by one: each is on disk before the next spills it
            assert await pub.request(send("t", f"m{i}")) == SUCCESS
        real_read_chunk = _sqlite.read_chunk

        def read_chunk(*args: Any) -> Any:
            monkeypatch.setattr(_sqlite, "read_chunk", real_read_chunk)
            raise ValueError("unforeseen")

        monkeypatch.setattr(_sqlite, "read_chunk", read_chunk)
        doomed = await LineClient.connect(server.port)
        await doomed.send({"command": "subscribe", "topic": "t", "last_seen": -1})
        assert await doomed.receive() == SUCCESS
        # that replay cannot be served: its connection ends, the server stays up
        await doomed.read_to_eof()
        assert await pub.request(send("t", "after")) == SUCCESS
        got = await replay(await LineClient.connect(server.port), "t", -1)
        assert [m["index"] for m in got] == list(range(7))


# --- the line limit with "\r\n" ------------------------------------------------------

LIMIT = 10


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 11, 12, 13, 100])
def test_crlf_line_of_exactly_the_limit_is_accepted(chunk: int) -> None:
    data = b"ab\r\n" + b"x" * LIMIT + b"\r\n" + b"y" * LIMIT + b"\r\n" + b"z" * LIMIT + b"\r"
    buf = LineBuffer(max_line_bytes=LIMIT)
    lines = []
    for i in range(0, len(data), chunk):
        lines += buf.feed(data[i : i + chunk])
        assert not buf.too_long
    assert lines == [b"ab\r", b"x" * LIMIT + b"\r", b"y" * LIMIT + b"\r"]
    assert buf.pending == b"z" * LIMIT + b"\r"


@pytest.mark.parametrize("chunk", [1, 2, 5, 11, 12, 13, 100])
@pytest.mark.parametrize(
    "line",
    [
        b"x" * (LIMIT + 1) + b"\n",
        b"x" * (LIMIT + 1) + b"\r\n",
        b"x" * LIMIT + b"\r\r\n",
        b"x" * LIMIT + b"\rx\n",
        b"x" * LIMIT + b"\r" + b"x" * 5,
        b"x" * (LIMIT + 1),
        b"x" * (LIMIT + 2),
    ],
)
def test_over_the_limit_is_still_refused(chunk: int, line: bytes) -> None:
    data = b"ok\n" + line + b"late\n"
    buf = LineBuffer(max_line_bytes=LIMIT)
    lines = []
    for i in range(0, len(data), chunk):
        lines += buf.feed(data[i : i + chunk])
        if buf.too_long:
            break
    assert buf.too_long
    assert lines == [b"ok"]


def test_line_connection_crlf_at_the_limit() -> None:
    command = json.dumps({"command": "subscribe", "topic": "t"}).encode()
    core = LineConnection(max_line_bytes=len(command))
    assert core.receive_data(command + b"\r") == []
    assert core.receive_data(b"\n") == [command + b"\r"]
    assert core.receive_data(command + b"\r\n" + command + b"\r\n") == [command + b"\r"] * 2
    assert core.closing_reply() is None
    assert core.receive_data(command + b" \r\n") == []
    assert core.closing_reply() == protocol.failure_bytes("Line too long")


async def test_crlf_line_at_the_limit_over_tcp(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_line_bytes=100)
    c = await LineClient.connect(server.port)
    base = len(json.dumps(send("t", "")))
    exact = json.dumps(send("t", "x" * (100 - base))).encode()
    assert len(exact) == 100
    await c.send_raw(exact + b"\r\n")
    assert await c.receive() == SUCCESS
    await c.send_raw(exact[:60])
    await c.send_raw(exact[60:] + b"\r")
    await c.send_raw(b"\n")
    assert await c.receive() == SUCCESS
    over = json.dumps(send("t", "x" * (101 - base))).encode()
    await c.send_raw(over + b"\n")
    assert await c.read_to_eof() == protocol.failure_bytes("Line too long") + b"\r\n"
