"""Durable topics (issue 6): restarts, SIGKILL, torn logs, storage faults, the epoch
extension and history bigger than the memory window. Real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from support import LineClient, make_config, replay

from mq_trio.server import Server, serve
from mq_trio.store import DB_NAME, STORAGE_UNAVAILABLE, DurableHistory, _flusher, _ops, _sqlite
from mq_trio.store._ops import Record
from mq_trio.store._sqlite import SqliteBackend
from mq_trio.store._wal import scan_wal

SUCCESS = {"success": True}
TEST_GUARD_SECONDS = 120


def send(topic: str, msg: str, delivery: str = "all", **extra: Any) -> dict[str, Any]:
    return {"command": "send", "topic": topic, "msg": msg, "delivery": delivery, **extra}


@asynccontextmanager
async def running(data_dir: Path | None, **overrides: Any) -> AsyncIterator[Server]:
    """An in-process server; leaving the block shuts it down and closes its store."""
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir)
    # A guard, not a timing assertion: a bug here must fail the test, not hang the suite.
    with trio.fail_after(TEST_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, make_config(**overrides))
            try:
                yield server
            finally:
                server.shutdown()
                await server.stopped.wait()


# --- restarts -------------------------------------------------------------------------


async def test_graceful_restart_keeps_caches_and_indexes(tmp_path: Path) -> None:
    async with running(tmp_path, cache_size=3) as server:
        pub = await LineClient.connect(server.port)
        for i in range(5):
            assert await pub.request(send("a", f"a{i}")) == SUCCESS
        assert await pub.request(send("b", "uncached", cache=False)) == SUCCESS
        assert await pub.request(send("b", "queued", "one")) == SUCCESS
        assert await pub.request(send("c", "taken", "one")) == SUCCESS
        taker = await LineClient.connect(server.port)
        assert [m["msg"] for m in await replay(taker, "c")] == ["taken"]
        before = await replay(await LineClient.connect(server.port), "a", 1)

    async with running(tmp_path, cache_size=3) as server:
        sub = await LineClient.connect(server.port)
        # same cache window, same eviction, the exact same delivered bytes
        assert await replay(sub, "a", 1) == before
        assert [m["index"] for m in before] == [2, 3, 4]
        b = await replay(sub, "b")
        assert [(m["msg"], m["index"]) for m in b] == [("queued", 1)]
        # the "one" message was taken by a replay before the restart, and this one now
        assert await replay(sub, "c") == []
        assert await replay(await LineClient.connect(server.port), "b") == []
        pub = await LineClient.connect(server.port)
        assert await pub.request(send("a", "a5")) == SUCCESS
        assert (await sub.receive())["index"] == 5  # sub is still subscribed to "a"
        assert await pub.request(send("b", "b2")) == SUCCESS
        assert (await sub.receive())["index"] == 2  # index 0 went to the uncached send


async def test_without_data_dir_nothing_is_kept(tmp_path: Path) -> None:
    async with running(None) as server:
        pub = await LineClient.connect(server.port)
        assert await pub.request(send("a", "x")) == SUCCESS
        first_epoch = server.broker.epoch
    async with running(None) as server:
        assert await replay(await LineClient.connect(server.port), "a") == []
        assert server.broker.epoch != first_epoch
    assert list(await trio.Path(tmp_path).iterdir()) == []


async def test_cache_size_shrunk_between_runs(tmp_path: Path) -> None:
    async with running(tmp_path, cache_size=10) as server:
        pub = await LineClient.connect(server.port)
        for i in range(8):
            assert await pub.request(send("a", f"{i}")) == SUCCESS
    async with running(tmp_path, cache_size=3) as server:
        got = await replay(await LineClient.connect(server.port), "a")
        assert [m["index"] for m in got] == [5, 6, 7]


async def test_data_dir_in_use_is_refused(tmp_path: Path) -> None:
    async with running(tmp_path):
        with pytest.raises(Exception) as info:  # noqa: B017 - wrapped in exception groups
            async with running(tmp_path):
                pass  # pragma: no cover
        error = _ops.find_store_error(info.value)
        assert error is not None and "in use by another server" in str(error)


# --- the epoch extension --------------------------------------------------------------


@pytest.mark.parametrize("durable", [False, True])
async def test_epoch_extension(tmp_path: Path, durable: bool) -> None:
    data_dir = tmp_path if durable else None
    async with running(data_dir, cache_size=3) as server:
        epoch = server.broker.epoch
        pub = await LineClient.connect(server.port)
        sub = await LineClient.connect(server.port)
        # version 1: the version-1 reply, byte for byte
        await sub.send({"command": "subscribe", "topic": "t"})
        assert await sub.readline() == b'{"success": true}'
        # unknown epoch (e.g. a first connection): told, not recovered
        reply = await sub.request({"command": "subscribe", "topic": "t", "epoch": ""})
        assert reply == {"success": True, "epoch": epoch, "recovered": False}
        assert await sub.request({"command": "subscribe", "topic": "t", "epoch": 5}) == {
            "success": False,
            "reason": "Malformed json message",
        }
        assert await sub.request({"command": "subscribe", "topic": "t", "epoch": None}) == {
            "success": False,
            "reason": "Malformed json message",
        }
        await sub.request({"command": "unsubscribe", "topic": "t"})
        for i in range(5):
            assert await pub.request(send("t", f"{i}")) == SUCCESS  # 0 and 1 are evicted

        async def resume(last_seen: int, with_epoch: str = epoch) -> Any:
            client = await LineClient.connect(server.port)
            return await client.request(
                {"command": "subscribe", "topic": "t", "last_seen": last_seen, "epoch": with_epoch}
            )

        assert (await resume(1))["recovered"] is True
        assert (await resume(4))["recovered"] is True
        assert (await resume(0))["recovered"] is False  # index 1 was evicted
        assert (await resume(-1))["recovered"] is False
        assert (await resume(9))["recovered"] is False  # an index this history never gave
        assert (await resume(2, "other"))["recovered"] is False
        assert (await resume(-1, epoch))["epoch"] == epoch

    async with running(data_dir, cache_size=3) as server:
        if durable:
            assert server.broker.epoch == epoch
            client = await LineClient.connect(server.port)
            reply = await client.request(
                {"command": "subscribe", "topic": "t", "last_seen": 3, "epoch": epoch}
            )
            assert reply == {"success": True, "epoch": epoch, "recovered": True}
            assert (await client.receive())["index"] == 4  # the replay follows the reply
        else:
            assert server.broker.epoch != epoch


async def test_new_data_directory_new_epoch(tmp_path: Path) -> None:
    async with running(tmp_path / "one") as server:
        first = server.broker.epoch
    async with running(tmp_path / "two") as server:
        assert server.broker.epoch != first


# --- SIGKILL under pipelined load ------------------------------------------------------


@asynccontextmanager
async def server_process(
    data_dir: Path, *args: str
) -> AsyncIterator[tuple[trio.Process, int, list[str]]]:
    """``python -m mq_trio serve`` on an ephemeral port; yields (process, port, log)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mq_trio", "serve", "--port", "0", "--data-dir", str(data_dir),
         *args],
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[str] = []
    buffer = b""
    port = None
    try:
        with trio.fail_after(TEST_GUARD_SECONDS):
            while port is None:
                data = await process.stderr.receive_some()
                if not data:
                    raise AssertionError("server exited: " + "".join(lines))
                buffer += data
                *complete, buffer = buffer.split(b"\n")
                for line in complete:
                    lines.append(line.decode() + "\n")
                    m = re.search(r"listening on 127\.0\.0\.1:(\d+) \(tcp\)", lines[-1])
                    if m:
                        port = int(m.group(1))

        async def keep_reading() -> None:
            while data := await process.stderr.receive_some():  # type: ignore[union-attr]
                lines.append(data.decode(errors="replace"))

        with trio.fail_after(TEST_GUARD_SECONDS):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_reading)
                yield process, port, lines
                nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(10):
            await process.wait()


@pytest.mark.parametrize("fsync", ["always", "everysec", "never"])
async def test_sigkill_loses_no_acknowledged_message(tmp_path: Path, fsync: str) -> None:
    # Publishers pipeline without pause until the kill cuts them off.
    publishers, per_publisher, chunk = 3, 1_000_000, 250
    acked = [0] * publishers
    seen: dict[int, str] = {}  # what a subscriber saw before the crash: index -> msg
    enough = trio.Event()
    killed = trio.Event()

    async with server_process(tmp_path, "--fsync", fsync, "--cache-size", "1000000") as (
        process,
        port,
        _,
    ):
        watcher = await LineClient.connect(port)
        assert await watcher.request({"command": "subscribe", "topic": "t"}) == SUCCESS

        async def watch() -> None:
            try:
                while True:
                    m = await watcher.receive()
                    seen[m["index"]] = m["msg"]
            except (EOFError, trio.BrokenResourceError):
                pass

        async def publish(k: int) -> None:
            client = await LineClient.connect(port)

            async def write() -> None:
                try:
                    for start in range(0, per_publisher, chunk):
                        lines = b"".join(
                            json.dumps(send("t", f"{k}:{i}")).encode() + b"\n"
                            for i in range(start, start + chunk)
                        )
                        await client.send_raw(lines)
                except trio.BrokenResourceError:
                    pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                try:
                    while True:
                        assert await client.receive() == SUCCESS
                        acked[k] += 1
                        if sum(acked) >= 3000:
                            enough.set()
                except (EOFError, trio.BrokenResourceError):
                    assert killed.is_set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            for k in range(publishers):
                nursery.start_soon(publish, k)
            await enough.wait()
            killed.set()
            process.send_signal(signal.SIGKILL)  # mid-flight: sends still pipelined
            await process.wait()

    assert 0 < sum(acked) < publishers * per_publisher  # the kill did land mid-load

    async with server_process(tmp_path, "--fsync", fsync, "--cache-size", "1000000") as (
        _,
        port,
        log_lines,
    ):
        client = await LineClient.connect(port)
        got = await replay(client, "t")
        indexes = [m["index"] for m in got]
        assert indexes == sorted(set(indexes))
        by_publisher: dict[str, list[int]] = {}
        for m in got:
            k, i = m["msg"].split(":")
            by_publisher.setdefault(k, []).append(int(i))
        for k in range(publishers):
            numbers = by_publisher.get(str(k), [])
            assert numbers == sorted(numbers)  # per-topic order kept
            # every acknowledged send is there (a few unacknowledged ones may be too)
            assert numbers[: acked[k]] == list(range(acked[k]))
        # nothing a subscriber saw is missing or changed
        stored = {m["index"]: m["msg"] for m in got}
        assert all(stored.get(index) == msg for index, msg in seen.items())
        await client.send(send("t", "after"))
        after = await client.receive()  # subscribed: the delivery precedes the reply
        assert await client.receive() == SUCCESS
        assert after["msg"] == "after"
        assert after["index"] > max(indexes + list(seen))
        assert any("recovered" in line and "did not shut down cleanly" in line
                   for line in log_lines)


# --- torn and corrupt files -------------------------------------------------------------


def crash_copy(live: Path, target: Path) -> None:
    """What a crash leaves: the database and its write-ahead log, taken while open."""
    target.mkdir()
    for suffix in ("", "-wal"):
        shutil.copyfile(f"{live / DB_NAME}{suffix}", f"{target / DB_NAME}{suffix}")


def fill(
    directory: Path,
    messages: int,
    cache_size: int = 1000,
    batch: int = 10_000,
    msg_size: int = 0,
    one: Callable[[int], bool] = lambda i: False,
) -> SqliteBackend:
    """A store with ``messages`` cached sends on topic "t" (msg: the index, padded to
    ``msg_size``; delivery "one" where ``one(i)``), left open (not closed); one
    transaction per ``batch`` messages."""
    backend = SqliteBackend(directory, "never", cache_size, 1000)
    backend.open()
    backend.apply([_ops.NewTopic(1, "t")], sync=False)
    for start in range(0, messages, batch):
        records: list[_ops.Op] = []
        for i in range(start, min(messages, start + batch)):
            delivery = "one" if one(i) else "all"
            obj = {"command": "send", "topic": "t", "msg": str(i).ljust(msg_size),
                   "delivery": delivery, "index": i}
            records.append(Record(i + 1, 1, i, one(i), json.dumps(obj).encode()))
        assert backend.apply(records, sync=False).error is None
    return backend


async def test_torn_log_tail_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = fill(tmp_path / "live", 50)
    crash_copy(tmp_path / "live", tmp_path / "crashed")
    backend.abandon()
    wal = tmp_path / "crashed" / f"{DB_NAME}-wal"
    assert not scan_wal(wal).torn
    await trio.Path(wal).write_bytes(
        await trio.Path(wal).read_bytes() + os.urandom(1000)  # half a frame: a cut write
    )
    report = scan_wal(wal)
    assert report.torn and report.ignored_bytes == 1000
    caplog.set_level(logging.INFO, "mq_trio.store")
    async with running(tmp_path / "crashed") as server:
        got = await replay(await LineClient.connect(server.port), "t")
        assert [m["index"] for m in got] == list(range(50))
        pub = await LineClient.connect(server.port)
        assert await pub.request(send("t", "next")) == SUCCESS
    assert "torn or corrupt tail" in caplog.text
    assert "recovered 50 cached message(s) in 1 topic(s)" in caplog.text


async def test_corrupt_frame_in_log_is_skipped(tmp_path: Path) -> None:
    backend = fill(tmp_path / "live", 20, batch=5)
    crash_copy(tmp_path / "live", tmp_path / "crashed")
    backend.abandon()
    wal = tmp_path / "crashed" / f"{DB_NAME}-wal"
    data = bytearray(await trio.Path(wal).read_bytes())
    data[-100:-92] = b"\xff" * 8  # flip bytes inside the last frame's page
    await trio.Path(wal).write_bytes(bytes(data))
    assert scan_wal(wal).torn
    async with running(tmp_path / "crashed") as server:
        client = await LineClient.connect(server.port)
        got = await replay(client, "t")
        # the damaged last transaction is dropped whole; the ones before it are intact
        assert [m["index"] for m in got] == list(range(15))
        pub = await LineClient.connect(server.port)
        assert await pub.request(send("t", "next")) == SUCCESS
        assert (await client.receive())["index"] == 15


async def test_corrupt_database_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / DB_NAME).write_bytes(b"this is not a database" * 100)
    async with running(tmp_path) as server:
        pub = await LineClient.connect(server.port)
        assert await pub.request(send("t", "x")) == SUCCESS
    assert "is corrupt" in caplog.text
    assert any(p.name.startswith(f"{DB_NAME}.corrupt-")
               for p in await trio.Path(tmp_path).iterdir())


# --- an unwritable store ----------------------------------------------------------------


async def test_unwritable_store_fails_sends_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failing = True
    real_commit = SqliteBackend._commit

    def commit(self: SqliteBackend, conn: sqlite3.Connection, sync: bool) -> None:
        if failing:
            raise sqlite3.OperationalError("disk I/O error")
        real_commit(self, conn, sync)

    async with running(tmp_path, cache_size=10) as server:
        pub = await LineClient.connect(server.port)
        sub = await LineClient.connect(server.port)
        for i in range(3):
            assert await pub.request(send("t", f"ok{i}")) == SUCCESS
        assert await sub.request({"command": "subscribe", "topic": "t", "last_seen": 2}) == (
            SUCCESS
        )
        monkeypatch.setattr(SqliteBackend, "_commit", commit)
        failure = {"success": False, "reason": STORAGE_UNAVAILABLE}
        # pipelined: every send of the failing batches fails, in order
        for i in range(5):
            await pub.send(send("t", f"lost{i}"))
        assert await pub.receive_many(5) == [failure] * 5
        # subscribers are still served: subscribe, replay from the cache, round trips
        late = await LineClient.connect(server.port)
        assert [m["msg"] for m in await replay(late, "t")] == ["ok0", "ok1", "ok2"]
        assert await sub.request({"command": "unsubscribe", "topic": "other"}) == SUCCESS
        failing = False
        # recovers by itself: the next send works and gets a fresh index
        assert await pub.request(send("t", "back")) == SUCCESS
        got = await sub.receive()
        assert got["msg"] == "back"  # nothing of the failed sends was delivered
        assert got["index"] == 8  # their indexes are never handed out again
        assert (await late.receive())["msg"] == "back"  # late is subscribed too
        fresh = await LineClient.connect(server.port)
        assert [m["msg"] for m in await replay(fresh, "t", 1)] == ["ok2", "back"]
    assert "storage unavailable" in caplog.text and "works again" in caplog.text

    async with running(tmp_path, cache_size=10) as server:
        got = await replay(await LineClient.connect(server.port), "t")
        assert [(m["msg"], m["index"]) for m in got] == [
            ("ok0", 0), ("ok1", 1), ("ok2", 2), ("back", 8)
        ]


async def test_failed_batch_keeps_cache_count_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evictions caused only by failed messages are not applied on disk."""
    failing = False
    real_commit = SqliteBackend._commit

    def commit(self: SqliteBackend, conn: sqlite3.Connection, sync: bool) -> None:
        if failing:
            raise sqlite3.OperationalError("database or disk is full")
        real_commit(self, conn, sync)

    monkeypatch.setattr(SqliteBackend, "_commit", commit)
    async with running(tmp_path, cache_size=2) as server:
        pub = await LineClient.connect(server.port)
        for i in range(2):
            assert await pub.request(send("t", f"{i}")) == SUCCESS
        failing = True
        assert (await pub.request(send("t", "x")))["success"] is False
        failing = False
        cached = await replay(await LineClient.connect(server.port), "t")
        assert [m["msg"] for m in cached] == ["1"]  # 0 was evicted for x, x failed
    async with running(tmp_path, cache_size=2) as server:
        cached = await replay(await LineClient.connect(server.port), "t")
        assert [m["msg"] for m in cached] == ["1"]


async def test_burst_under_a_small_cache_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sends evicted by later sends before their batch is written are never inserted
    (Messages: dropped rows): the cache, the next index and the highest evicted index
    come out as if they had been; a failed batch with such sends leaves memory and disk
    agreeing, as for single sends."""
    failing = False
    real_commit = SqliteBackend._commit

    def commit(self: SqliteBackend, conn: sqlite3.Connection, sync: bool) -> None:
        if failing:
            raise sqlite3.OperationalError("disk I/O error")
        real_commit(self, conn, sync)

    monkeypatch.setattr(SqliteBackend, "_commit", commit)

    async def check(server: Server, msgs: list[str], evicted: int | None = None) -> None:
        client = await LineClient.connect(server.port)
        assert [m["msg"] for m in await replay(client, "t")] == msgs
        if evicted is None:
            return
        epoch = (await client.request({"command": "subscribe", "topic": "u", "epoch": ""}))[
            "epoch"]
        for last_seen in (evicted - 1, evicted):
            assert await client.request({"command": "subscribe", "topic": "t", "epoch": epoch,
                                         "last_seen": last_seen, "cache": False}) == {
                "success": True, "epoch": epoch, "recovered": last_seen == evicted}

    async with running(tmp_path, cache_size=3) as server:
        pub = await LineClient.connect(server.port)
        for i in range(50):
            await pub.send(send("t", f"{i}"))
        assert await pub.receive_many(50) == [SUCCESS] * 50
        await check(server, ["47", "48", "49"], 46)
    async with running(tmp_path, cache_size=3) as server:
        await check(server, ["47", "48", "49"], 46)
        pub = await LineClient.connect(server.port)
        failing = True
        for i in range(20):
            await pub.send(send("t", f"lost{i}"))
        assert [r["success"] for r in await pub.receive_many(20)] == [False] * 20
        failing = False
        assert await pub.request(send("t", "back")) == SUCCESS
        # the failed sends had pushed the older three out (memory and disk alike)
        await check(server, ["back"])
    async with running(tmp_path, cache_size=3) as server:
        await check(server, ["back"])
        pub = await LineClient.connect(server.port)
        assert await pub.request(send("t", "next")) == SUCCESS
        assert [m["index"] for m in await replay(await LineClient.connect(server.port), "t")
                ] == [70, 71]


def test_a_batch_of_sends_in_multi_row_inserts(tmp_path: Path) -> None:
    """One Messages batch: rows of two topics in statements of every size (256, 64, 16,
    4, 1 rows), each row's topic the statement's first parameter; a topic's rows
    evicted before the batch was written are not inserted but counted as evicted."""
    backend = SqliteBackend(tmp_path, "never", 10_000, 10_000)
    backend.open()
    store = _flusher.Store(backend)
    counts = {1: 343, 2: 5}  # 256 + 64 + 16 + 4 + 3 * 1; 4 + 1
    for tid in counts:
        backend.apply([_ops.NewTopic(tid, f"t{tid}")], sync=False)
    for i in range(max(counts.values())):
        for tid, n in counts.items():
            if i < n:
                batch = store.write(tid, i, i % 3 == 0, f"{tid}:{i}".encode())
    batch.topics[2].dropped, batch.topics[2].dropped_high = 2, 1
    del batch.topics[2].rows[:6]  # (as DurableHistory.take leaves them)
    assert backend.apply(list(store._queue), sync=False).error is None
    backend.close()
    again = SqliteBackend(tmp_path, "never", 10_000, 10_000)
    topics = {t.name: t for t in again.open().topics}
    again.close()
    assert [(i, one, p) for i, one, p in topics["t1"].window] == [
        (i, i % 3 == 0, f"1:{i}".encode()) for i in range(343)]
    assert [i for i, _, _ in topics["t2"].window] == [2, 3, 4]
    assert (topics["t1"].next_index, topics["t1"].evicted) == (343, -1)
    assert (topics["t2"].next_index, topics["t2"].evicted) == (5, 1)


# --- history bigger than the memory window ----------------------------------------------


async def test_history_beyond_memory_window(tmp_path: Path) -> None:
    async with running(tmp_path, cache_size=50, memory_window=10) as server:
        pub = await LineClient.connect(server.port)
        for i in range(60):
            await pub.send(send("t", f"{i}", "one" if i % 7 == 0 else "all"))
        assert await pub.receive_many(60) == [SUCCESS] * 60
        first = await replay(await LineClient.connect(server.port), "t", 12)
        assert [m["index"] for m in first] == list(range(13, 60))
        # the "one" messages went to that subscriber only
        again = await replay(await LineClient.connect(server.port), "t", 12)
        assert [m["index"] for m in again] == [i for i in range(13, 60) if i % 7]
        everything = await replay(await LineClient.connect(server.port), "t")
        assert [m["index"] for m in everything] == [i for i in range(10, 60) if i % 7 or i < 13]
    async with running(tmp_path, cache_size=50, memory_window=10) as server:
        everything = await replay(await LineClient.connect(server.port), "t")
        assert [m["index"] for m in everything] == [i for i in range(10, 60) if i % 7 or i < 13]


BIG_HISTORY = int(os.environ.get("MQ_TRIO_BIG_HISTORY", "1000000"))


async def test_big_history_replay_does_not_hold_up_others(tmp_path: Path) -> None:
    """A late subscriber replays a large history from disk; others keep their turn."""
    fill(tmp_path, BIG_HISTORY, cache_size=BIG_HISTORY).close()
    async with running(tmp_path, cache_size=BIG_HISTORY, memory_window=1000) as server:
        late = await LineClient.connect(server.port)
        other = await LineClient.connect(server.port)
        received = 0
        done = trio.Event()

        async def read_replay() -> None:
            nonlocal received
            assert await late.receive() == SUCCESS
            while received < BIG_HISTORY:
                m = await late.receive()
                assert m["index"] == received  # in order, nothing missing
                received += 1
            done.set()

        async with trio.open_nursery() as nursery:
            await late.send({"command": "subscribe", "topic": "t"})
            nursery.start_soon(read_replay)
            # While the replay streams, another client's round trips go through, sends
            # to the same topic included; they do not wait for the replay to end.
            for i in range(50):
                assert await other.request(send("u", f"{i}")) == SUCCESS
                assert await other.request({"command": "subscribe", "topic": f"x{i}"}) == SUCCESS
            assert await other.request(send("t", "live")) == SUCCESS
            progress = received
            await done.wait()
        assert progress < BIG_HISTORY
        live = await late.receive()  # the live message comes after the whole replay
        assert (live["msg"], live["index"]) == ("live", BIG_HISTORY)


# --- the flusher: group commit and fsync policies (fake backend, virtual clock) ---------


class FakeBackend:
    """Records what the flusher asks of the database, with the (virtual) time."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str, int, bool]] = []  # (time, kind, records, sync)

    def apply(self, ops: list[_ops.Op], sync: bool) -> _ops.BatchResult:
        records = sum(len(part.rows) // 3 for op in ops if isinstance(op, _ops.Messages)
                      for part in op.topics.values())
        self.calls.append((trio.current_time(), "apply", records, sync))
        return _ops.BatchResult()

    def sync(self) -> _ops.BatchResult:
        self.calls.append((trio.current_time(), "sync", 0, True))
        return _ops.BatchResult()


@asynccontextmanager
async def fake_store(
    fsync: str, monkeypatch: pytest.MonkeyPatch, gate: trio.Event | None = None
) -> AsyncIterator[tuple[_flusher.Store, FakeBackend]]:
    """A Store whose "worker thread" runs on the trio thread (exact virtual time);
    ``gate``, while unset, holds every write open."""

    async def run_sync(fn: Any, *args: Any) -> Any:
        if gate is not None:
            await gate.wait()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
    backend = FakeBackend()
    store = _flusher.Store(backend, fsync)  # type: ignore[arg-type]
    with trio.fail_after(TEST_GUARD_SECONDS):  # virtual seconds under autojump_clock
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            yield store, backend
            nursery.cancel_scope.cancel()


async def test_group_commit_with_fsync_always(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = trio.Event()
    async with fake_store("always", monkeypatch, gate) as (store, backend):
        first = store.write(1, 0, False, b"x")
        await trio.testing.wait_all_tasks_blocked()  # the first batch is being written
        later = [store.write(1, i, False, b"x") for i in range(1, 101)]
        gate.set()
        await store.wait(later[-1].seq)
        assert first.seq < later[0].seq and not any(r.failed for r in [first, *later])
    # one write (one fsync) for the first send, one for the 100 queued behind it
    assert [(kind, n, sync) for _, kind, n, sync in backend.calls] == [
        ("apply", 1, True),
        ("apply", 100, True),
    ]


async def test_everysec_fsyncs_within_a_second(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fake_store("everysec", monkeypatch) as (store, backend):
        await trio.sleep(5)
        await store.wait(store.write(1, 0, False, b"x").seq)  # after idling: synced at once
        second = store.write(1, 1, False, b"x")
        await store.wait(second.seq)  # acknowledged once written, before its fsync
        written = trio.current_time()
        await trio.sleep(3)
    assert [(kind, sync) for _, kind, _, sync in backend.calls] == [
        ("apply", True),
        ("apply", False),
        ("sync", True),
    ]
    assert backend.calls[2][0] - written <= 1.0 + 1e-6


async def test_everysec_idle_sync(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fake_store("everysec", monkeypatch) as (store, backend):
        first = store.write(1, 0, False, b"x")  # right at start: not synced yet
        await store.wait(first.seq)
        await trio.sleep(3)
    kinds = [(kind, sync) for _, kind, _, sync in backend.calls]
    assert kinds == [("apply", False), ("sync", True)]
    assert backend.calls[1][0] - backend.calls[0][0] <= 1.0 + 1e-6


async def test_fsync_never_does_not_sync(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fake_store("never", monkeypatch) as (store, backend):
        for i in range(3):
            await store.wait(store.write(1, i, False, b"x").seq)
            await trio.sleep(2)
    assert [sync for _, _, _, sync in backend.calls] == [False, False, False]


async def test_websocket_clients_get_durable_replies_and_deliveries(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The waiting outbox works for any transport: here a WebSocket subscriber."""
    import trio_websocket

    async with running(tmp_path, ws_port=0) as server:
        ws = await trio_websocket.connect_websocket_url(
            nursery, f"ws://127.0.0.1:{server.ws_port}/"
        )
        await ws.send_message(json.dumps({"command": "subscribe", "topic": "t"}))
        assert json.loads(await ws.get_message()) == SUCCESS
        await ws.send_message(json.dumps(send("t", "via ws")))
        delivery = json.loads(await ws.get_message())
        assert (delivery["msg"], delivery["index"]) == ("via ws", 0)
        assert json.loads(await ws.get_message()) == SUCCESS
        await ws.aclose()
    async with running(tmp_path) as server:
        got = await replay(await LineClient.connect(server.port), "t")
        assert [m["msg"] for m in got] == ["via ws"]


async def test_cache_size_zero_still_keeps_indexes(tmp_path: Path) -> None:
    async with running(tmp_path, cache_size=0) as server:
        pub = await LineClient.connect(server.port)
        for i in range(3):
            assert await pub.request(send("t", f"{i}")) == SUCCESS
    async with running(tmp_path, cache_size=0) as server:
        sub = await LineClient.connect(server.port)
        assert await replay(sub, "t") == []
        pub = await LineClient.connect(server.port)
        assert await pub.request(send("t", "next")) == SUCCESS
        assert (await sub.receive())["index"] == 3


async def test_disk_replay_is_the_cache_as_of_the_subscribe(tmp_path: Path) -> None:
    """Messages evicted after a subscribe still reach its replay from disk, even when
    that replay has not started yet (it waits behind another one, stalled by TCP)."""
    old = 3000
    fill(tmp_path, old, cache_size=old, msg_size=4000).close()  # 12 MB: TCP stalls it
    async with running(tmp_path, cache_size=old, memory_window=100) as server:
        late = await LineClient.connect(server.port)
        assert await late.request({"command": "subscribe", "topic": "t"}) == SUCCESS
        # a second replay of the same history, queued behind the stalled first one
        await late.send({"command": "subscribe", "topic": "t"})
        pub = await LineClient.connect(server.port)
        for i in range(old):  # evicts every old message while both replays wait
            await pub.send(send("t", f"new{i}"))
        assert await pub.receive_many(old) == [SUCCESS] * old
        fresh = await replay(await LineClient.connect(server.port), "t")
        assert [m["index"] for m in fresh] == list(range(old, 2 * old))
        first = [(await late.receive())["index"] for _ in range(old)]
        assert first == list(range(old))
        assert await late.receive() == SUCCESS
        rest = [(await late.receive())["index"] for _ in range(2 * old)]
        assert rest == list(range(old)) + list(range(old, 2 * old))  # then the live ones


async def test_concurrent_disk_replays_share_one_messages(tmp_path: Path) -> None:
    """Two replays from disk at once: each "one" message goes to exactly one of them."""
    total = 2000
    fill(tmp_path, total, cache_size=total, one=lambda i: i % 2 == 0).close()
    async with running(tmp_path, cache_size=total, memory_window=100) as server:
        a = await LineClient.connect(server.port)
        b = await LineClient.connect(server.port)
        await a.send({"command": "subscribe", "topic": "t"})
        await b.send({"command": "subscribe", "topic": "t"})
        got: dict[str, list[dict[str, Any]]] = {}

        async def read_all(name: str, client: LineClient) -> None:
            assert await client.receive() == SUCCESS
            got[name] = await replay_rest(client)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all, "a", a)
            nursery.start_soon(read_all, "b", b)
        for name in "ab":
            indexes = [m["index"] for m in got[name]]
            assert indexes == sorted(indexes)
            assert [i for i in indexes if i % 2] == list(range(1, total, 2))  # all "all"s
        ones_a = {m["index"] for m in got["a"] if m["delivery"] == "one"}
        ones_b = {m["index"] for m in got["b"] if m["delivery"] == "one"}
        assert not ones_a & ones_b
        assert ones_a | ones_b == set(range(0, total, 2))
        later = await replay(await LineClient.connect(server.port), "t")
        assert [m["index"] for m in later] == list(range(1, total, 2))
    async with running(tmp_path, cache_size=total, memory_window=100) as server:
        later = await replay(await LineClient.connect(server.port), "t")
        assert [m["index"] for m in later] == list(range(1, total, 2))


async def replay_rest(client: LineClient) -> list[dict[str, Any]]:
    """After a subscribe's reply: the replay, up to the reply of a marker request."""
    await client.send({"command": "unsubscribe", "topic": "\x00end-of-replay"})
    items = []
    while (item := await client.receive()) != SUCCESS:
        items.append(item)
    return items


async def test_snapshot_released_when_subscriber_leaves_early(tmp_path: Path) -> None:
    old = 3000
    fill(tmp_path, old, cache_size=old, msg_size=4000).close()
    async with running(tmp_path, cache_size=old, memory_window=100) as server:
        late = await LineClient.connect(server.port)
        assert await late.request({"command": "subscribe", "topic": "t"}) == SUCCESS
        await late.send({"command": "subscribe", "topic": "t"})  # queued, not started
        broker = server.broker
        assert isinstance(broker.history, DurableHistory)
        state = broker.history.topics["t"]
        # server-side state with no event to wait on: polled, bounded by fail_after
        with trio.fail_after(10):
            while state.disk_replays < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
            await late.aclose()
            await server.wait_until(lambda: not server.connections)
        assert state.disk_replays == 0
        # nothing was taken, nothing is lost
        got = await replay(await LineClient.connect(server.port), "t")
        assert [m["index"] for m in got] == list(range(old))


async def test_epoch_recovered_counts_evictions_on_disk(tmp_path: Path) -> None:
    """`recovered` is exact when the evicted messages live only on disk and the
    evictions are still on their way to the store (pipelined right before)."""
    async with running(tmp_path, cache_size=50, memory_window=10) as server:
        epoch = server.broker.epoch
        pub = await LineClient.connect(server.port)
        for i in range(60):
            assert await pub.request(send("t", f"{i}")) == SUCCESS  # cached: 10..59
        client = await LineClient.connect(server.port)
        lines = [send("t", f"more{i}") for i in range(5)]  # evict 10..14, on disk only
        lines.append({"command": "subscribe", "topic": "t", "last_seen": 11, "epoch": epoch})
        await client.send_raw(b"".join(json.dumps(obj).encode() + b"\n" for obj in lines))
        assert await client.receive_many(5) == [SUCCESS] * 5
        assert await client.receive() == {"success": True, "epoch": epoch, "recovered": False}
        got = [(await client.receive())["index"] for _ in range(50)]
        assert got == list(range(15, 65))
        other = await LineClient.connect(server.port)
        reply = await other.request(
            {"command": "subscribe", "topic": "t", "last_seen": 14, "epoch": epoch}
        )
        assert reply == {"success": True, "epoch": epoch, "recovered": True}
        assert (await other.receive())["index"] == 15


async def test_odd_topic_names_survive_a_restart(tmp_path: Path) -> None:
    topics = ["", "\ud800 lone surrogate", "é" * 3000, 'quote " and \\ backslash']
    async with running(tmp_path) as server:
        pub = await LineClient.connect(server.port)
        for topic in topics:
            assert await pub.request(send(topic, f"in {topic[:5]!r}")) == SUCCESS
    async with running(tmp_path) as server:
        client = await LineClient.connect(server.port)
        for topic in topics:
            got = await replay(client, topic)
            assert [(m["topic"], m["msg"], m["index"]) for m in got] == [
                (topic, f"in {topic[:5]!r}", 0)
            ]


async def test_one_messages_replayed_before_a_kill_stay_taken(tmp_path: Path) -> None:
    """A "one" message a subscriber got from the cache is never replayed again, even
    when the server is killed right after (window and disk parts both)."""
    args = ("--cache-size", "1000", "--memory-window", "50")
    async with server_process(tmp_path, *args) as (process, port, _):
        pub = await LineClient.connect(port)
        lines = [send("q", f"job{i}", "one") for i in range(200)]
        await pub.send_raw(b"".join(json.dumps(obj).encode() + b"\n" for obj in lines))
        assert await pub.receive_many(200) == [SUCCESS] * 200
        worker = await LineClient.connect(port)
        assert await worker.request({"command": "subscribe", "topic": "q"}) == SUCCESS
        got = [(await worker.receive())["msg"] for _ in range(200)]
        assert got == [f"job{i}" for i in range(200)]
        process.send_signal(signal.SIGKILL)
        await process.wait()
    async with server_process(tmp_path, *args) as (_, port, _):
        assert await replay(await LineClient.connect(port), "q") == []


@pytest.mark.parametrize(("policy", "new_epoch"), [("never", True), ("always", False)])
def test_reboot_after_an_unclean_stop_changes_the_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, new_epoch: bool
) -> None:
    """A crash followed by a machine restart may have lost unsynced writes: new epoch,
    unless every write was fsynced (--fsync always). A crash alone keeps the epoch."""
    monkeypatch.setattr(_sqlite, "_boot_id", lambda: "boot-1")
    live = SqliteBackend(tmp_path / "live", policy, 100, 100)  # type: ignore[arg-type]
    epoch = live.open().epoch
    crash_copy(tmp_path / "live", tmp_path / "crash")
    crash_copy(tmp_path / "live", tmp_path / "crash-and-reboot")
    live.abandon()

    same_boot = SqliteBackend(tmp_path / "crash", "everysec", 100, 100)
    loaded = same_boot.open()
    assert loaded.epoch == epoch
    assert "previous run did not shut down cleanly" in loaded.notes
    same_boot.close()

    monkeypatch.setattr(_sqlite, "_boot_id", lambda: "boot-2")
    rebooted = SqliteBackend(tmp_path / "crash-and-reboot", "everysec", 100, 100)
    assert (rebooted.open().epoch != epoch) is new_epoch
    rebooted.close()


async def test_failed_one_message_taken_before_its_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A "one" message replayed while its write is pending, and that write fails: the
    subscriber never gets it, and memory and disk agree on the cache afterwards."""
    failing = False
    real_commit = SqliteBackend._commit

    def commit(self: SqliteBackend, conn: sqlite3.Connection, sync: bool) -> None:
        if failing:
            raise sqlite3.OperationalError("disk I/O error")
        real_commit(self, conn, sync)

    monkeypatch.setattr(SqliteBackend, "_commit", commit)
    async with running(tmp_path, cache_size=2) as server:
        pub = await LineClient.connect(server.port)
        for msg in ("a", "b"):
            assert await pub.request(send("t", msg)) == SUCCESS
        failing = True
        # one TCP write: x is cached (evicting a), then taken by the subscribe at once
        lines = [send("t", "x", "one"), {"command": "subscribe", "topic": "t", "last_seen": 1}]
        await pub.send_raw(b"".join(json.dumps(obj).encode() + b"\n" for obj in lines))
        assert await pub.receive() == {"success": False, "reason": STORAGE_UNAVAILABLE}
        assert await pub.receive() == SUCCESS  # the subscribe; x is not delivered
        failing = False
        assert await pub.request({"command": "unsubscribe", "topic": "t"}) == SUCCESS
        cached = await replay(await LineClient.connect(server.port), "t")
        assert [m["msg"] for m in cached] == ["b"]
    async with running(tmp_path, cache_size=2) as server:
        cached = await replay(await LineClient.connect(server.port), "t")
        assert [m["msg"] for m in cached] == ["b"]
