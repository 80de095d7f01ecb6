"""Work queues over real sockets (issue 14): the wire forms of docs/protocol.md
"Acknowledged jobs", "Atomic batches" and "Idempotent publishing", in memory and durable
(restarts, kill -9, storage failures)."""

from __future__ import annotations

import contextlib
import json
import signal
from collections import deque
from pathlib import Path
from typing import Any

import pytest
import trio
from support import FailingCommits, LineClient, start_server
from test_durability import running, server_process

from mq_trio.store import _sqlite

SUCCESS = {"success": True}
MALFORMED = {"success": False, "reason": "Malformed json message"}
UNKNOWN_JOB = {"success": False, "reason": "Unknown job"}
QUEUE_FULL = {"success": False, "reason": "Queue full"}
STORAGE_UNAVAILABLE = {"success": False, "reason": "Storage unavailable"}


def job(topic: str, msg: str, **extra: Any) -> dict[str, Any]:
    return {"command": "send", "topic": topic, "msg": msg, "delivery": "one", "ack": True,
            **extra}


def consumer(topic: str, prefetch: int = 1) -> dict[str, Any]:
    return {"command": "subscribe", "topic": topic, "ack": True, "prefetch": prefetch}


def ack(topic: str, index: int, command: str = "ack", **extra: Any) -> dict[str, Any]:
    return {"command": command, "topic": topic, "index": index, **extra}


async def test_the_documented_session(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    worker = await LineClient.connect(server.port)
    producer = await LineClient.connect(server.port)
    assert await worker.request(consumer("resize", 2)) == SUCCESS
    assert await producer.request(job("resize", "img-1.png")) == {"success": True, "index": 0}
    assert await worker.receive() == {**job("resize", "img-1.png"), "index": 0,
                                      "deliveries": 1}
    assert await worker.request(ack("resize", 0)) == SUCCESS
    assert await worker.request(ack("resize", 0)) == UNKNOWN_JOB
    info = server.broker.queue_info("resize")
    assert (info.waiting, info.in_flight, info.acked_total) == (0, 0, 1)


async def test_the_subscribe_reply_comes_before_waiting_jobs(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    producer = await LineClient.connect(server.port)
    for i in range(3):
        assert (await producer.request(job("q", f"m{i}")))["index"] == i
    worker = await LineClient.connect(server.port)
    await worker.send(consumer("q", 3))
    got = await worker.receive_many(4)
    assert got[0] == SUCCESS
    assert [(m["msg"], m["deliveries"]) for m in got[1:]] == [("m0", 1), ("m1", 1), ("m2", 1)]


@pytest.mark.parametrize("line", [
    job("q", "x", delivery="all"),
    job("q", "x", ack=1),
    job("q", "x", id=""),
    job("q", "x", id="k" * 257),
    job("q", "x", id=5),
    {"command": "subscribe", "topic": "q", "prefetch": 2},
    consumer("q", 0),
    consumer("q", 10_001),
    {**consumer("q"), "last_seen": 3},
    {**consumer("q"), "epoch": ""},
    {**consumer("q"), "cache": False},
    ack("q", -1),
    ack("q", True),
    ack("q", 1, "ack", delay=1),
    ack("q", 1, "nack", delay=-1),
    ack("q", 1, "nack", delay=86_401),
    ack("q", 1, "progress", extra=1),
    {"command": "ack", "index": 1},
    {"command": "batch", "topic": "q", "msgs": [], "delivery": "all"},
    {"command": "batch", "topic": "q", "msgs": ["a", 1], "delivery": "all"},
    {"command": "batch", "topic": "q", "msgs": ["a"] * 10_001, "delivery": "all"},
    {"command": "batch", "topic": "q", "msgs": ["a"], "delivery": "all", "ack": True},
    {"command": "batch", "topic": "q", "msgs": ["a"]},
    {"command": "batch", "topic": "q", "msgs": "a", "delivery": "all"},
])
async def test_malformed_extension_commands(nursery: trio.Nursery, line: Any) -> None:
    server = await start_server(nursery)
    client = await LineClient.connect(server.port)
    assert await client.request(line) == MALFORMED
    assert await client.request({"command": "unsubscribe", "topic": "q"}) == SUCCESS


async def test_nack_progress_and_unknown_jobs_over_the_wire(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    worker = await LineClient.connect(server.port)
    producer = await LineClient.connect(server.port)
    assert await worker.request(consumer("q")) == SUCCESS
    await producer.request(job("q", "a"))
    assert (await worker.receive())["deliveries"] == 1
    assert await worker.request(ack("q", 0, "progress")) == SUCCESS
    await worker.send(ack("q", 0, "nack"))
    assert await worker.receive() == SUCCESS
    assert (await worker.receive())["deliveries"] == 2
    assert await worker.request(ack("q", 7, "progress")) == UNKNOWN_JOB
    assert await worker.request(ack("other", 0, "nack")) == UNKNOWN_JOB
    assert await worker.request(ack("q", 0)) == SUCCESS


async def test_a_disconnected_worker_s_job_goes_to_another(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    first = await LineClient.connect(server.port)
    second = await LineClient.connect(server.port)
    producer = await LineClient.connect(server.port)
    assert await first.request(consumer("q")) == SUCCESS
    assert await second.request(consumer("q")) == SUCCESS
    await producer.request(job("q", "a"))
    await producer.request(job("q", "b"))
    got_first = await first.receive()
    got_second = await second.receive()
    await first.aclose()
    again = await second.request(ack("q", got_second["index"]))
    assert again == SUCCESS
    redelivered = await second.receive()
    assert (redelivered["msg"], redelivered["deliveries"]) == (got_first["msg"], 2)


async def test_the_ack_timeout_redelivers(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, ack_timeout=0.2)
    worker = await LineClient.connect(server.port)
    producer = await LineClient.connect(server.port)
    assert await worker.request(consumer("q")) == SUCCESS
    await producer.request(job("q", "a"))
    first = await worker.receive()
    again = await worker.receive()  # nothing acked: the server takes it back and resends
    assert (again["index"], again["deliveries"]) == (first["index"], 2)
    assert server.broker.queue_info("q").redelivered_total == 1


async def test_queue_full_over_the_wire(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_queue_jobs=2)
    producer = await LineClient.connect(server.port)
    for i in range(2):
        assert (await producer.request(job("q", str(i))))["index"] == i
    assert await producer.request(job("q", "2")) == QUEUE_FULL
    batch = {"command": "batch", "topic": "q", "msgs": ["x"], "delivery": "one", "ack": True}
    assert await producer.request(batch) == QUEUE_FULL
    # nothing accepted: the next job after room is made continues the index sequence
    worker = await LineClient.connect(server.port)
    await worker.send(consumer("q"))
    assert await worker.receive() == SUCCESS
    assert await worker.request(ack("q", (await worker.receive())["index"])) == SUCCESS
    assert await producer.request(job("q", "2")) == {"success": True, "index": 2}
    assert server.stats.failures["Queue full"] == 2


async def test_batches_and_ids_over_the_wire(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    sub = await LineClient.connect(server.port)
    producer = await LineClient.connect(server.port)
    assert await sub.request({"command": "subscribe", "topic": "t"}) == SUCCESS
    batch = {"command": "batch", "topic": "t", "msgs": ["a", "b"], "delivery": "all",
             "id": "b-1"}
    assert await producer.request(batch) == {"success": True, "index": 0, "count": 2}
    assert [(m["msg"], m["index"]) for m in await sub.receive_many(2)] == [("a", 0), ("b", 1)]
    assert await producer.request(batch) == {"success": True, "index": 0, "count": 2,
                                             "duplicate": True}
    send = {"command": "send", "topic": "t", "msg": "c", "delivery": "all", "id": "s-1"}
    assert await producer.request(send) == {"success": True, "index": 2}
    assert await producer.request(send) == {"success": True, "index": 2, "duplicate": True}
    assert (await sub.receive())["msg"] == "c"
    # nothing else was delivered: the next message is the next index
    plain = {"command": "send", "topic": "t", "msg": "d", "delivery": "all"}
    assert await producer.request(plain) == SUCCESS
    assert (await sub.receive())["index"] == 3


async def test_a_v1_client_on_a_job_topic_sees_nothing_new(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    plain = await LineClient.connect(server.port)
    producer = await LineClient.connect(server.port)
    assert await plain.request({"command": "subscribe", "topic": "q"}) == SUCCESS
    await producer.request(job("q", "job"))
    msg = {"command": "send", "topic": "q", "msg": "news", "delivery": "all"}
    assert await producer.request(msg) == SUCCESS
    assert await plain.receive() == {**msg, "index": 1}


# --- durable ---------------------------------------------------------------------------


async def test_jobs_survive_kill_9_and_acked_jobs_never_come_back(tmp_path: Path) -> None:
    async with server_process(tmp_path) as (process, port, _):
        producer = await LineClient.connect(port)
        lines = [json.dumps(job("q", f"m{i}")).encode() + b"\n" for i in range(10)]
        await producer.send_raw(b"".join(lines))
        assert [r["index"] for r in await producer.receive_many(10)] == list(range(10))
        worker = await LineClient.connect(port)
        await worker.send(consumer("q", 4))
        got = await worker.receive_many(5)
        assert got[0] == SUCCESS
        assert [m["index"] for m in got[1:]] == [0, 1, 2, 3]
        for index, room_for in ((0, 4), (2, 5)):
            assert await worker.request(ack("q", index)) == SUCCESS
            assert (await worker.receive())["index"] == room_for  # after the reply
        process.send_signal(signal.SIGKILL)
        await process.wait()
    async with server_process(tmp_path) as (_, port, _):
        worker = await LineClient.connect(port)
        await worker.send(consumer("q", 100))
        got = await worker.receive_many(9)
        assert got[0] == SUCCESS
        # in flight at the kill: delivered again, marked; never delivered: first time
        assert [(m["index"], m["deliveries"]) for m in got[1:]] == [
            (1, 2), (3, 2), (4, 2), (5, 2), (6, 1), (7, 1), (8, 1), (9, 1)
        ]
        producer = await LineClient.connect(port)
        assert await producer.request(job("q", "next")) == {"success": True, "index": 10}


async def test_a_graceful_restart_keeps_waiting_jobs(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        producer = await LineClient.connect(server.port)
        for i in range(3):
            await producer.request(job("q", f"m{i}"))
    async with running(tmp_path) as server:
        assert server.broker.queue_info("q").waiting == 3
        worker = await LineClient.connect(server.port)
        await worker.send(consumer("q", 3))
        got = await worker.receive_many(4)
        assert [m["msg"] for m in got[1:]] == ["m0", "m1", "m2"]


async def test_a_failed_batch_of_jobs_is_never_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path) as server:
        worker = await LineClient.connect(server.port)
        assert await worker.request(consumer("q", 10)) == SUCCESS
        producer = await LineClient.connect(server.port)
        commits = FailingCommits(monkeypatch)
        batch = {"command": "batch", "topic": "q", "msgs": ["a", "b", "c"],
                 "delivery": "one", "ack": True, "id": "b1"}
        assert await producer.request(batch) == STORAGE_UNAVAILABLE
        commits.failing = False
        # the retry (same id) is a new attempt, not a "duplicate" of the failed one
        reply = await producer.request(batch)
        assert reply["success"] and "duplicate" not in reply and reply["count"] == 3
        got = await worker.receive_many(3)
        assert [m["msg"] for m in got] == ["a", "b", "c"]  # only the accepted batch
        assert [m["index"] for m in got] == list(range(reply["index"], reply["index"] + 3))
        assert server.broker.queue_info("q").in_flight == 3


def lines(*objs: Any) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


async def test_pipelined_durable_replies_share_a_commit_in_order(tmp_path: Path) -> None:
    # A chunk's replies waiting for one commit are one outbox item (HeldReplies), and
    # only while nothing else was queued after it: the replies keep their order around a
    # reply that is not held, and each job's reply carries its own index.
    async with running(tmp_path) as server:
        producer = await LineClient.connect(server.port)
        await producer.send_raw(lines(job("q", "a"), job("q", "b"),
                                      {"command": "subscribe", "topic": "other"},
                                      job("q", "c"), ack("q", 7), job("q", "d")))
        assert await producer.receive_many(6) == [
            {"success": True, "index": 0}, {"success": True, "index": 1}, SUCCESS,
            {"success": True, "index": 2}, UNKNOWN_JOB, {"success": True, "index": 3}]
        worker = await LineClient.connect(server.port)
        await worker.send(consumer("q", 4))
        got = await worker.receive_many(5)
        assert [m["msg"] for m in got[1:]] == ["a", "b", "c", "d"]
        await worker.send_raw(lines(*(ack("q", i) for i in range(4))))
        assert await worker.receive_many(4) == [SUCCESS] * 4
        assert server.broker.queue_info("q").acked_total == 4


async def test_failed_acks_in_one_chunk_each_get_storage_unavailable_and_stay_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path) as server:
        producer = await LineClient.connect(server.port)
        await producer.send_raw(lines(*(job("q", f"m{i}") for i in range(6))))
        assert [r["index"] for r in await producer.receive_many(6)] == list(range(6))
        worker = await LineClient.connect(server.port)
        await worker.send(consumer("q", 6))
        assert len(await worker.receive_many(7)) == 7
        commits = FailingCommits(monkeypatch)
        await worker.send_raw(lines(*(ack("q", i) for i in range(3))))
        assert await worker.receive_many(3) == [STORAGE_UNAVAILABLE] * 3
        commits.failing = False
        await worker.send_raw(lines(ack("q", 3), ack("q", 4)))
        assert await worker.receive_many(2) == [SUCCESS] * 2  # (the removals retried too)
    async with running(tmp_path) as server:
        # acknowledged, even with a failed reply, never comes back; the held one does
        info = server.broker.queue_info("q")
        assert (info.waiting, info.in_flight) == (1, 0)
        worker = await LineClient.connect(server.port)
        await worker.send(consumer("q", 6))
        got = await worker.receive_many(2)
        assert (got[1]["index"], got[1]["msg"]) == (5, "m5")


@pytest.mark.parametrize("fsync", ["always", "everysec"])
async def test_kill_9_under_pipelined_jobs_and_acks(tmp_path: Path, fsync: str) -> None:
    # Jobs and acks pipelined in chunks share their commits (one JobBatch per commit):
    # after a SIGKILL mid-load, every job whose producer got its reply and whose ack got
    # no success reply is delivered again, and no job whose ack got one ever is.
    total, chunk = 20_000, 200
    accepted: set[int] = set()
    acked: set[int] = set()  # acks answered with success
    sent: deque[int] = deque()  # acks written, replies not read (either way at the kill)
    enough = trio.Event()
    async with server_process(tmp_path, "--fsync", fsync) as (process, port, _):
        producer = await LineClient.connect(port)
        worker = await LineClient.connect(port)
        assert await worker.request(consumer("q", 500)) == SUCCESS

        async def produce() -> None:
            async def write() -> None:
                with contextlib.suppress(trio.BrokenResourceError):
                    for start in range(0, total, chunk):
                        await producer.send_raw(lines(*(
                            job("q", f"m{i}") for i in range(start, start + chunk))))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                with contextlib.suppress(EOFError, trio.BrokenResourceError):
                    while True:
                        reply = await producer.receive()
                        assert reply["success"] is True
                        accepted.add(reply["index"])

        async def consume() -> None:
            with contextlib.suppress(EOFError, trio.BrokenResourceError):
                while True:
                    m = await worker.receive()
                    if "index" in m:  # a job: acked at once
                        sent.append(m["index"])
                        await worker.send(ack("q", m["index"]))
                    else:
                        assert m == SUCCESS
                        acked.add(sent.popleft())
                        if len(acked) >= 3000:
                            enough.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            nursery.start_soon(consume)
            await enough.wait()
            process.send_signal(signal.SIGKILL)
            await process.wait()
    assert 3000 <= len(acked) < len(accepted)  # the kill landed mid-load
    async with server_process(tmp_path, "--fsync", fsync) as (_, port, _):
        worker = await LineClient.connect(port)
        assert await worker.request(consumer("q", 10_000)) == SUCCESS
        producer = await LineClient.connect(port)
        end = (await producer.request(job("q", "end")))["index"]
        again: set[int] = set()
        while True:  # jobs go out in index order: the new one comes last
            m = await worker.receive()
            if "index" not in m:
                assert m == SUCCESS  # (an ack's reply)
                continue
            if m["index"] == end:
                break
            again.add(m["index"])
            await worker.send(ack("q", m["index"]))
    assert accepted - acked - set(sent) <= again  # kept until acknowledged
    assert not again & acked  # an acknowledged job never comes back


async def test_ids_survive_kill_9_so_a_resend_is_not_stored_twice(tmp_path: Path) -> None:
    send = {"command": "send", "topic": "t", "msg": "m", "delivery": "all", "id": "once"}
    batch = {"command": "batch", "topic": "t", "msgs": ["a", "b"], "delivery": "all",
             "id": "twice"}
    async with server_process(tmp_path) as (process, port, _):
        producer = await LineClient.connect(port)
        assert await producer.request(send) == {"success": True, "index": 0}
        assert await producer.request(batch) == {"success": True, "index": 1, "count": 2}
        process.send_signal(signal.SIGKILL)
        await process.wait()
    async with server_process(tmp_path) as (_, port, _):
        producer = await LineClient.connect(port)
        # the producer never read its replies, say: it sends again after the restart
        assert await producer.request(send) == {"success": True, "index": 0,
                                                "duplicate": True}
        assert await producer.request(batch) == {"success": True, "index": 1, "count": 2,
                                                 "duplicate": True}
        sub = await LineClient.connect(port)
        await sub.send({"command": "subscribe", "topic": "t"})
        got = await sub.receive_many(4)
        assert [m["msg"] for m in got[1:]] == ["m", "a", "b"]  # each stored once


async def test_a_failed_batch_reaches_no_subscriber(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path) as server:
        subs = [await LineClient.connect(server.port) for _ in range(3)]
        for sub in subs:
            assert await sub.request({"command": "subscribe", "topic": "t"}) == SUCCESS
        producer = await LineClient.connect(server.port)
        commits = FailingCommits(monkeypatch)
        batch = {"command": "batch", "topic": "t", "msgs": ["a", "b"], "delivery": "all"}
        assert await producer.request(batch) == STORAGE_UNAVAILABLE
        commits.failing = False
        batch["msgs"] = ["c", "d"]
        reply = await producer.request(batch)
        assert reply["success"] is True
        for sub in subs:  # only the accepted batch, in order, as separate deliveries
            got = await sub.receive_many(2)
            assert [(m["msg"], m["index"]) for m in got] == [
                ("c", reply["index"]), ("d", reply["index"] + 1)]


async def test_a_restart_restores_only_the_newest_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More ids within the window than the broker keeps (a flood): a start loads only
    the newest of them, as many as the bound, never all the rows."""
    monkeypatch.setattr(_sqlite, "ID_LOAD_LIMIT", 2)
    async with running(tmp_path) as server:
        producer = await LineClient.connect(server.port)
        for i in range(4):
            send = {"command": "send", "topic": "t", "msg": "m", "delivery": "all",
                    "id": f"k{i}"}
            assert (await producer.request(send))["index"] == i
    async with running(tmp_path) as server:
        assert len(server.broker.dedupe) == 2
        producer = await LineClient.connect(server.port)
        newest = {"command": "send", "topic": "t", "msg": "m", "delivery": "all", "id": "k3"}
        assert (await producer.request(newest))["duplicate"] is True
        oldest = {**newest, "id": "k0"}
        assert await producer.request(oldest) == {"success": True, "index": 4}
