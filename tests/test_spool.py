"""The producer's spool (``open_client(spool=...)``): the file on its own, then with real
servers over real sockets, including a producer process killed with SIGKILL between
writing its publishes and reading their replies."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from support import start_server
from test_client_jobs import Cutter

from mq_trio.client import (
    ConnectionLost,
    Published,
    SpoolError,
    SpoolFull,
    open_client,
)
from mq_trio.client._spool import COMPACT_AT_BYTES, Spool
from mq_trio.server import Server
from mq_trio.testing import queue_state, wait_for_queue


def _line(topic: str, msg: str, id: str) -> bytes:
    return json.dumps({"command": "send", "topic": topic, "msg": msg, "delivery": "one",
                       "ack": True, "id": id}).encode()


# --- the file ----------------------------------------------------------------------------


def test_entries_outlive_the_spool_until_done(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = Spool(path)
    spool.open()
    a, b, c = (spool.add(_line("t", m, m)) for m in "abc")
    spool.done(b)
    spool.close()  # (closing keeps what is live)
    again = Spool(path)
    again.open()
    assert again.pending() == [(a, _line("t", "a", "a")), (c, _line("t", "c", "c"))]
    # Opening compacted the file: only the live entries are left in it.
    assert len(path.read_bytes().splitlines()) == 2
    d = again.add(_line("t", "d", "d"))
    assert d > c  # numbers are never reused
    again.done(a)
    again.done(c)
    again.done(d)
    assert len(again) == 0
    again.close()
    last = Spool(path)
    last.open()
    assert last.pending() == [] and path.read_bytes() == b""
    last.close()


def test_a_line_cut_short_by_a_crash_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = Spool(path)
    spool.open()
    spool.add(_line("t", "whole", "1"))
    spool.close()
    with open(path, "ab") as f:
        f.write(b'{"n": 7, "cmd": {"command": "send", "topic": "t", "ms')  # no newline
    with open(path, "rb") as f:
        data = f.read()
    (tmp_path / "garbage").write_bytes(b"not json\n" + data)
    cut = Spool(path)
    cut.open()
    assert [line for _, line in cut.pending()] == [_line("t", "whole", "1")]
    cut.close()
    garbage = Spool(tmp_path / "garbage")  # an unreadable line inside is skipped
    garbage.open()
    assert [line for _, line in garbage.pending()] == [_line("t", "whole", "1")]
    garbage.close()


def test_settled_records_are_compacted_away(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    big = "x" * (64 << 10)
    keep = spool.add(_line("t", "keep", "keep"))
    for i in range(COMPACT_AT_BYTES // len(big) + 2):
        spool.done(spool.add(_line("t", big, str(i))))
    # Compacted once the settled bytes passed the threshold: only "keep" and a few left.
    assert spool.size < COMPACT_AT_BYTES
    assert spool.size == (tmp_path / "spool").stat().st_size
    assert [n for n, _ in spool.pending()] == [keep]
    spool.close()


def test_full_spool_refuses_until_replies_make_room(tmp_path: Path) -> None:
    line = _line("t", "m", "id")
    spool = Spool(tmp_path / "spool", max_bytes=3 * (len(line) + 20))
    spool.open()
    taken = [spool.add(line) for _ in range(3)]
    with pytest.raises(SpoolFull, match="spool_max_bytes"):
        spool.add(line)
    assert len(spool) == 3
    spool.done(taken[0])
    spool.add(line)  # compacts the settled entry away to make room
    assert len(spool) == 3 and spool.size <= spool.max_bytes
    spool.close()


def test_one_process_at_a_time(tmp_path: Path) -> None:
    first = Spool(tmp_path / "spool")
    first.open()
    with pytest.raises(SpoolError, match="in use by another process"):
        Spool(tmp_path / "spool").open()
    first.close()
    second = Spool(tmp_path / "spool")
    second.open()
    second.close()


# --- with a server -------------------------------------------------------------------------


async def test_publishes_are_spooled_until_accepted(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "spool"
    async with open_client("127.0.0.1", server.port, spool=path, spool_fsync=True) as client:
        assert await client.send_job("t", "job", id="j1") == 0
        assert await client.publish("t", "news") == Published(1, 1, False)
        assert await client.send("t", "plain") is None  # no id: never spooled
        assert client.spooled == 0
        await client.flush_spool()  # (nothing to wait for)
    reopened = Spool(path)
    reopened.open()
    assert len(reopened) == 0
    reopened.close()


async def test_spool_full_refuses_the_publish(server: Server, tmp_path: Path) -> None:
    async with open_client("127.0.0.1", server.port, spool=tmp_path / "s",
                           spool_max_bytes=200) as client:
        with pytest.raises(SpoolFull):
            await client.publish("t", "x" * 200)
        assert client.spooled == 0
        assert await client.send("t", "after", id="a") == 0  # nothing was sent before


async def test_publishes_a_down_server_never_got_are_sent_by_the_next_run(
    nursery: trio.Nursery, server: Server, tmp_path: Path
) -> None:
    path = tmp_path / "spool"
    relay = await Cutter.start(nursery, server.port)
    relay.drop_new = relay.hold_new = True  # nothing gets through, either way
    async with open_client("127.0.0.1", relay.port, spool=path) as client:
        async with trio.open_nursery() as tasks:
            for i in range(3):
                tasks.start_soon(partial(client.send_job, "t", f"job {i}", id=f"id-{i}"))
            await trio.testing.wait_all_tasks_blocked()  # each spooled, then sent
            tasks.cancel_scope.cancel()
        assert client.spooled == 3
    assert queue_state(server, "t").waiting == 0  # the server has nothing yet
    async with open_client("127.0.0.1", server.port, spool=path) as client:
        await client.flush_spool()
        assert client.spooled == 0
    assert queue_state(server, "t").waiting == 3
    async with open_client("127.0.0.1", server.port) as worker:
        async with worker.consume("t", prefetch=3) as jobs:
            got = [await jobs.receive() for _ in range(3)]
            # Sent in the order they were spooled (the tasks', which trio chooses).
            assert [j.index for j in got] == [0, 1, 2]
            assert sorted(j.msg for j in got) == ["job 0", "job 1", "job 2"]
            for job in got:
                await job.ack()


PRODUCER = """
import sys, trio, mq_trio

async def main():
    port, spool = int(sys.argv[1]), sys.argv[2]
    async with mq_trio.open_client("127.0.0.1", port, spool=spool) as client:
        async with trio.open_nursery() as tasks:
            for i in range(3):
                tasks.start_soon(client.send_job, "t", f"job {i}")
        print("all accepted", flush=True)  # never: the replies do not come back

trio.run(main)
"""


async def test_a_producer_killed_before_its_replies_loses_and_repeats_nothing(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_server(nursery)
    relay = await Cutter.start(nursery, server.port)
    relay.hold_new = True  # the server gets the jobs; the producer never hears back
    path = tmp_path / "spool"
    process: trio.Process = await nursery.start(partial(
        trio.run_process, [sys.executable, "-c", PRODUCER, str(relay.port), str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False,
    ))
    await wait_for_queue(server, "t", lambda q: q.waiting == 3, timeout=30)
    process.send_signal(signal.SIGKILL)  # between the spool write and the reply
    with trio.fail_after(10):
        assert await process.wait() == -signal.SIGKILL
    left = Spool(path)  # (the dead process's lock went with it)
    left.open()
    ids = [json.loads(line)["id"] for _, line in left.pending()]
    left.close()
    assert len(ids) == 3 and len(set(ids)) == 3

    # The next run sends them again, first, with the same ids: all duplicates now.
    async with open_client("127.0.0.1", server.port, spool=path) as client:
        await client.flush_spool()
        assert client.spooled == 0
        assert await client.send_job("t", "new") == 3  # nothing was published twice
    assert queue_state(server, "t").waiting == 4
    async with open_client("127.0.0.1", server.port) as worker:
        async with worker.consume("t", prefetch=4) as jobs:
            got = [await jobs.receive() for _ in range(4)]
            assert [j.index for j in got] == [0, 1, 2, 3]  # (jobs 0-2 in the tasks' order)
            assert sorted(j.msg for j in got) == ["job 0", "job 1", "job 2", "new"]
            assert got[3].msg == "new"
            for job in got:
                await job.ack()
            with pytest.raises(trio.WouldBlock):
                jobs.receive_nowait()


async def test_flush_spool_raises_when_the_client_closes_first(
    nursery: trio.Nursery, server: Server, tmp_path: Path
) -> None:
    relay = await Cutter.start(nursery, server.port)
    relay.drop_new = True
    async with open_client("127.0.0.1", relay.port, spool=tmp_path / "s") as client:
        lost: list[ConnectionLost] = []

        async def publish() -> None:
            try:
                await client.publish("t", "never answered")
            except ConnectionLost as exc:
                lost.append(exc)

        async with trio.open_nursery() as tasks:
            tasks.start_soon(publish)
            await trio.testing.wait_all_tasks_blocked()
            assert client.spooled == 1
            await relay.cut()  # no reconnect: the client gives up
            with pytest.raises(ConnectionLost, match="stay in the spool"):
                await client.flush_spool()
        assert len(lost) == 1 and client.spooled == 1
