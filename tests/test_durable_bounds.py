"""Durable mode's memory bounds (issue #11): a replay from disk holds one chunk, bounded
in bytes, and frees it when its subscriber leaves; the memory windows of all topics
together stay under ``--max-cache-bytes`` without evicting anything."""

from __future__ import annotations

import gc
import json
import socket
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from support import LineClient, make_config

from mq_trio.protocol import Send
from mq_trio.server import Server, serve
from mq_trio.store import DurableHistory
from mq_trio.store._flusher import Store
from mq_trio.store._history import ENTRY_OVERHEAD
from mq_trio.store._ops import BatchResult, Op
from mq_trio.store._replay import REPLAY_CHUNK_BYTES
from mq_trio.store._sqlite import SqliteBackend

#: A guard, not a timing assertion: a bug must fail the test, not hang the suite.
GUARD_SECONDS = 120


@asynccontextmanager
async def running(data_dir: Path, **overrides: Any) -> AsyncIterator[Server]:
    with trio.fail_after(GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            config = make_config(data_dir=str(data_dir), **overrides)
            server: Server = await nursery.start(serve, config)
            try:
                yield server
            finally:
                server.shutdown()
                await server.stopped.wait()


def history(server: Server) -> DurableHistory:
    h = server.broker.history
    assert isinstance(h, DurableHistory)
    return h


def send_line(topic: str, msg: str) -> bytes:
    command = {"command": "send", "topic": topic, "msg": msg, "delivery": "all"}
    return json.dumps(command).encode() + b"\n"


async def publish(port: int, topic: str, count: int, size: int, first: int = 0) -> None:
    """``count`` messages of about ``size`` bytes; returns once all are acknowledged
    (so written: a durable reply waits for the commit). The last one is sent after the
    others are written, so the window is trimmed to its size."""
    pub = await LineClient.connect(port)
    for batch in (range(first, first + count - 1), range(first + count - 1, first + count)):
        for i in batch:
            await pub.send_raw(send_line(topic, f"{i:06d}" + "x" * (size - 6)))
        for _ in batch:
            assert json.loads(await pub.readline()) == {"success": True}
    await pub.stream.aclose()


async def read_all(port: int, topic: str, count: int) -> list[dict[str, Any]]:
    sub = await LineClient.connect(port)
    await sub.send({"command": "subscribe", "topic": topic, "last_seen": -1})
    assert json.loads(await sub.readline()) == {"success": True}
    got = [json.loads(await sub.readline()) for _ in range(count)]
    await sub.stream.aclose()
    return got


def assert_complete(got: list[dict[str, Any]], topic: str, count: int, size: int) -> None:
    assert [m["index"] for m in got] == list(range(count))
    for i, m in enumerate(got):
        assert m["topic"] == topic
        assert m["msg"] == f"{i:06d}" + "x" * (size - 6)


async def stalled_subscriber(port: int, topic: str) -> trio.SocketStream:
    """A subscriber with a tiny receive window that reads its reply and two deliveries
    (without keeping them: its own buffers must not count), then nothing more."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(json.dumps({"command": "subscribe", "topic": topic}).encode() + b"\n")
    lines = 0
    while lines < 3:
        data = await stream.receive_some(16384)
        assert data
        lines += data.count(b"\r\n")
    return stream


# --- a replay from disk is bounded in bytes, and freed when its subscriber leaves ------


@pytest.mark.parametrize(("count", "size"), [(400, 16 << 10), (12, 900 << 10)])
async def test_replay_from_disk_holds_one_bounded_chunk(
    tmp_path: Path, count: int, size: int
) -> None:
    async with running(tmp_path, cache_size=1000, memory_window=2) as server:
        await publish(server.port, "t", count, size)
        state = history(server).topics["t"]
        assert state.count == count and len(state.window) <= 2  # the rest only on disk
        gc.collect()
        tracemalloc.start()
        try:
            baseline, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            # The first deliveries came from disk: the replay has read its first chunk.
            stream = await stalled_subscriber(server.port, "t")
            # Let it go as far as the socket lets it (a settle point, not an assertion).
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)
            assert state.disk_replays == 1  # still under way, paced by the client
            current, peak = tracemalloc.get_traced_memory()
            # One chunk (at most REPLAY_CHUNK_BYTES plus one message), and the
            # transport's joined copy of it while it is written; the history itself is
            # count * size (6.4 MB and 10.8 MB here).
            bound = 2 * (REPLAY_CHUNK_BYTES + size) + (512 << 10)
            assert peak - baseline < bound, (peak - baseline, bound)
            assert current - baseline < bound
            await stream.aclose()
            # The server notices when its write fails; the replay ends and releases.
            while state.disk_replays:
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)
            # ... and its connection closes (a crowd of them would take a few passes:
            # the transport's framed copy of the failed write goes with it).
            await server.wait_until(lambda: not server.connections)
            # Freed at once (no reference cycle waits for a garbage collection).
            current, _ = tracemalloc.get_traced_memory()
            assert current - baseline < 256 << 10, current - baseline
        finally:
            tracemalloc.stop()
        assert_complete(await read_all(server.port, "t", count), "t", count, size)


# --- --max-cache-bytes: the windows of all topics, not an eviction --------------------


def window_cost(h: DurableHistory, topic: str) -> int:
    return sum(len(m.payload) + ENTRY_OVERHEAD for m in h.cached(topic))


async def recovered(h: DurableHistory, topic: str, last_seen: int) -> bool:
    answer = h.recovered(topic, last_seen)
    if isinstance(answer, bool):
        return answer
    await answer.wait()
    return answer.value()


async def test_windows_stay_under_max_cache_bytes_oldest_leave_first(tmp_path: Path) -> None:
    size = 1000
    budget = 40 * (size + 100 + ENTRY_OVERHEAD)  # about 40 messages of 100 per topic
    async with running(tmp_path, cache_size=1000, memory_window=1000,
                       max_cache_bytes=budget) as server:
        h = history(server)
        await publish(server.port, "a", 100, size)
        await publish(server.port, "b", 100, size)
        # The oldest across topics left first: all of "a" (published before "b"),
        # then the oldest of "b"; what stays is the newest of "b".
        assert h.cached("a") == []
        kept = [m.index for m in h.cached("b")]
        assert kept and kept == list(range(100 - len(kept), 100))
        assert h.window_bytes == window_cost(h, "a") + window_cost(h, "b")
        assert 0 < h.window_bytes <= budget
        # Still cached (on disk), still replayed, and nothing counts as lost.
        for topic in ("a", "b"):
            assert h.topics[topic].count == 100
            assert h.topics[topic].evicted == -1
            assert await recovered(h, topic, -1)
            assert_complete(await read_all(server.port, topic, 100), topic, 100, size)
        # New messages still push the oldest out, and the budget holds.
        await publish(server.port, "a", 20, size, first=100)
        assert h.window_bytes <= budget
        assert [m.index for m in h.cached("a")] == list(range(100, 120))
        assert len(h.cached("b")) == len(kept) - 20


async def test_windows_loaded_at_startup_fit_the_budget(tmp_path: Path) -> None:
    size = 1000
    async with running(tmp_path, cache_size=1000, memory_window=1000) as server:
        await publish(server.port, "a", 60, size)
        await publish(server.port, "b", 100, size)
    budget = 50 * (size + 100 + ENTRY_OVERHEAD)
    async with running(tmp_path, cache_size=1000, memory_window=1000,
                       max_cache_bytes=budget) as server:
        h = history(server)
        # Loaded entries have no send order: the longest windows are trimmed first.
        a, b = len(h.cached("a")), len(h.cached("b"))
        assert a > 0 and abs(a - b) <= 1
        assert a + b < 160
        assert 0 < h.window_bytes <= budget
        assert h.window_bytes == window_cost(h, "a") + window_cost(h, "b")
        for topic, count in (("a", 60), ("b", 100)):
            assert await recovered(h, topic, -1)
            assert_complete(await read_all(server.port, topic, count), topic, count, size)


def take_queue(store: Store) -> list[Op]:
    """What the flusher does when it takes the queue: the sends recorded after this
    join a new batch."""
    ops, store._queue = store._queue, []
    store.messages = None
    if store.on_take is not None:
        store.on_take(ops)
    return ops


def decide(store: Store, ops: list[Op], result: BatchResult | None = None) -> None:
    """The flusher's settling of a batch written by the worker thread."""
    store._settle(ops, result or BatchResult())


async def test_only_written_entries_leave_ram(tmp_path: Path) -> None:
    """A message not yet written stays in its window even over the budget (nothing else
    holds it), and leaves once its batch is decided."""
    backend = SqliteBackend(tmp_path, "never", 100, 100)  # never opened: nothing is written
    store = Store(backend)
    h = DurableHistory(store, 100, 100, max_cache_bytes=3 * (100 + ENTRY_OVERHEAD))
    store.on_result, store.on_take = h.on_result, h.take
    for _ in range(6):
        h.record("t", Send("t", "x" * 60, "all"), False, True)
    first = take_queue(store)
    for _ in range(4):
        h.record("t", Send("t", "x" * 60, "all"), False, True)
    assert len(h.cached("t")) == 10  # over the budget, but undecided
    decide(store, first)
    assert [m.index for m in h.cached("t")] == list(range(6, 10))
    assert h.topics["t"].spilled_max == 5
    take_queue(store)  # (the sends not taken yet count as received, not as delivered)
    assert h.window_bytes == window_cost(h, "t")


def test_a_burst_over_the_window_size_shrinks_once_written(tmp_path: Path) -> None:
    """--memory-window: entries not written yet stay; once their batch is decided the
    window shrinks to its size, without waiting for the topic's next send."""
    backend = SqliteBackend(tmp_path, "never", 100, 3)  # never opened: nothing is written
    store = Store(backend)
    h = DurableHistory(store, 100, 3)
    store.on_result, store.on_take = h.on_result, h.take
    batches = []
    for n in (6, 4):
        for _ in range(n):
            h.record("t", Send("t", "x", "all"), False, True)
        batches.append(take_queue(store))
    assert len(h.cached("t")) == 10
    for ops, window in ((batches[0], [6, 7, 8, 9]), (batches[1], [7, 8, 9])):
        decide(store, ops)
        assert [m.index for m in h.cached("t")] == window
    assert h.topics["t"].spilled_max == 6 and h.topics["t"].count == 10


def test_windows_that_empty_and_refill_do_not_grow_the_heap(tmp_path: Path) -> None:
    """A topic whose window empties (its "one" messages taken) and refills, far under the
    budget, keeps no growing list of stale entries."""
    store = Store(SqliteBackend(tmp_path, "never", 100, 100))
    h = DurableHistory(store, 100, 100)
    for _ in range(1000):
        h.record("t", Send("t", "x", "one"), True, True)
        h.replay("t", -1)  # takes it: the window is empty again
        assert h.cached("t") == []
    assert len(h._heads) <= 2 * len(h.topics) + 64
    assert h.window_bytes == 0
