"""Limits: a slow consumer is cut off, a pipelining client is slowed, memory stays bounded."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
from support import LineClient, make_config, start_server

from mq_trio.broker import Broker, Deferred, MemoryHistory
from mq_trio.server import Server
from mq_trio.server._connection import Connection
from mq_trio.server._outbox import Outbox
from mq_trio.transports._tcp import TCPTransport

OK = {"success": True}


def enc(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def snd(msg: str, topic: str = "t") -> dict[str, Any]:
    return {"command": "send", "topic": topic, "msg": msg, "delivery": "all"}


@pytest.fixture
def pending_watch(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[Outbox, int]]:
    """Record, per outbox, the highest ``pending`` ever reached (queued plus being written)."""
    highest: dict[Outbox, int] = {}
    real_push = Outbox.push

    def push(self: Outbox, payload: bytes) -> None:
        real_push(self, payload)
        highest[self] = max(highest.get(self, 0), self.pending)

    monkeypatch.setattr(Outbox, "push", push)
    yield highest


def server_side(server: Server, client: LineClient) -> Connection:
    host, port = client.stream.socket.getsockname()[:2]
    (conn,) = [c for c in server.connections if c.peer == f"{host}:{port}"]
    return conn


async def connect_small_rcvbuf(port: int) -> LineClient:
    """A client whose kernel receive buffer is tiny, so the server's output backs up soon."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    return LineClient(trio.SocketStream(sock))


async def test_slow_consumer_is_cut_off_others_unaffected(
    nursery: trio.Nursery, pending_watch: dict[Outbox, int], caplog: pytest.LogCaptureFixture
) -> None:
    budget = 64 << 10
    server = await start_server(nursery, max_pending_bytes=budget, max_line_bytes=16 << 10)
    slow = await connect_small_rcvbuf(server.port)
    fast = await LineClient.connect(server.port)
    pub = await LineClient.connect(server.port)
    assert await slow.request({"command": "subscribe", "topic": "t"}) == OK
    assert await fast.request({"command": "subscribe", "topic": "t"}) == OK
    # keep the kernel from absorbing megabytes on the server side of the slow socket
    slow_conn = server_side(server, slow)
    slow_conn.transport.socket.setsockopt(  # type: ignore[attr-defined]
        socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
    )
    n = 1500
    body = "x" * 1000
    received: list[Any] = []

    async def read_fast() -> None:
        for _ in range(n):
            received.append(await fast.receive())

    with caplog.at_level(logging.WARNING, logger="mq_trio"), trio.fail_after(30):
        async with trio.open_nursery() as readers:
            readers.start_soon(read_fast)
            for i in range(n):
                assert await pub.request(snd(f"{i} {body}")) == OK
    assert [r["index"] for r in received] == list(range(n))
    assert all(r["msg"] == f"{r['index']} {body}" for r in received)
    # the slow one was cut off: no longer subscribed, its connection ends
    assert slow_conn.outbox.overflowed
    with trio.fail_after(10):
        await server.wait_until(lambda: slow_conn not in server.connections)
    assert server.broker.subscribers("t") == [server_side(server, fast).outbox]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("slow consumer" in r.getMessage() and slow_conn.peer in r.getMessage()
               for r in warnings)
    # what the slow client can still read is a prefix of the stream, then the end
    data = await slow.read_to_eof()
    lines = data.split(b"\r\n")  # after the last \r\n: maybe a cut-off partial object
    got = [json.loads(x)["index"] for x in lines[:-1]]
    assert got == list(range(len(got))) and len(got) < n
    # memory stayed bounded, for everyone
    assert pending_watch and all(v <= budget for v in pending_watch.values()), pending_watch
    # the publisher and the server carry on
    assert await pub.request(snd("after")) == OK
    assert (await fast.receive())["index"] == n


def memory_server(**overrides: Any) -> Server:
    config = make_config(**overrides)
    return Server(config, Broker(MemoryHistory(config.cache_size)), [])


async def test_slow_consumer_memory_streams(
    nursery: trio.Nursery, pending_watch: dict[Outbox, int], autojump_clock: Any
) -> None:
    """Deterministic: the slow peer is a lockstep stream nobody ever reads."""
    budget = 8 << 10
    server = memory_server(max_pending_bytes=budget, max_line_bytes=2 << 10)
    slow_client, slow_server = trio.testing.lockstep_stream_pair()
    fast_client, fast_server = trio.testing.memory_stream_pair()
    done = trio.Event()

    async def run_slow() -> None:
        await server.handle_transport(TCPTransport(slow_server))
        done.set()

    nursery.start_soon(run_slow)
    nursery.start_soon(server.handle_transport, TCPTransport(fast_server))
    await slow_client.send_all(enc({"command": "subscribe", "topic": "t"}))
    await fast_client.send_all(enc({"command": "subscribe", "topic": "t"}))
    await trio.testing.wait_all_tasks_blocked()
    (slow_conn,) = [c for c in server.connections if c.transport.stream is slow_server]  # type: ignore[attr-defined]
    fast_data = b""
    n = 200
    for i in range(n):
        server.broker.publish(_send(f"{i} " + "y" * 100))
        fast_data += await fast_client.receive_some()
        await trio.testing.wait_all_tasks_blocked()
    while fast_data.count(b"\r\n") < n + 1:
        fast_data += await fast_client.receive_some()
    assert [json.loads(x) for x in fast_data.split(b"\r\n")[1:-1]] == [
        {**snd(f"{i} " + "y" * 100), "index": i} for i in range(n)
    ]
    with trio.fail_after(60):
        await done.wait()
    assert slow_conn.outbox.overflowed
    assert server.broker.subscribers("t") != [] and slow_conn not in server.connections
    assert all(v <= budget for v in pending_watch.values()), pending_watch


def _send(msg: str, delivery: str = "all", topic: str = "t") -> Any:
    """A Send as parsed from the wire (so its delivery is the object as received)."""
    from mq_trio.protocol import Send, parse_line

    event = parse_line(json.dumps({**snd(msg, topic), "delivery": delivery}).encode())
    assert isinstance(event, Send)
    return event


async def test_pipelining_client_is_slowed_not_cut_off(
    nursery: trio.Nursery, pending_watch: dict[Outbox, int]
) -> None:
    """A client that writes without reading stalls the server's reader, then gets it all."""
    budget = 16 << 10
    server = memory_server(max_pending_bytes=budget, max_line_bytes=4 << 10)
    client, server_stream = trio.testing.lockstep_stream_pair()
    nursery.start_soon(server.handle_transport, TCPTransport(server_stream))
    n = 10_000
    lines = [enc(snd(str(i), topic="nobody")) if i % 2 else b"[%d]\n" % i for i in range(n)]
    chunks = [b"".join(lines[i : i + 50]) for i in range(0, n, 50)]
    sent = 0

    async def writer() -> None:
        nonlocal sent
        for chunk in chunks:
            await client.send_all(chunk)
            sent += 1

    nursery.start_soon(writer)
    await trio.testing.wait_all_tasks_blocked()
    # stuck: the server stopped reading long before the end, and did not disconnect
    assert 0 < sent < len(chunks)
    (conn,) = server.connections
    assert not conn.outbox.overflowed
    assert conn.outbox.pending <= budget
    stuck_at = sent
    await trio.testing.wait_all_tasks_blocked()
    assert sent == stuck_at
    # now read everything: every reply, in order
    data = b""
    with trio.fail_after(30):
        while data.count(b"\r\n") < n:
            data += await client.receive_some()
    replies = [json.loads(x) for x in data.split(b"\r\n")[:-1]]
    assert replies == [
        OK if i % 2 else {"success": False, "reason": "Malformed json message"} for i in range(n)
    ]
    assert sent == len(chunks)
    assert all(v <= budget for v in pending_watch.values())
    assert set(server.connections) == {conn}


async def test_one_never_goes_to_a_consumer_being_cut_off(nursery: trio.Nursery) -> None:
    """Once a subscriber overflowed, later "one" messages go to the live subscribers only.

    The publisher's pipelined sends are handled without a checkpoint in between, so the
    cut-off connection's own cleanup has not run yet when the next sends arrive.
    """
    budget = 8 << 10
    server = memory_server(max_pending_bytes=budget, max_line_bytes=2 << 10)
    slow_client, slow_server = trio.testing.lockstep_stream_pair()
    nursery.start_soon(server.handle_transport, TCPTransport(slow_server))
    await slow_client.send_all(enc({"command": "subscribe", "topic": "t"}))
    await trio.testing.wait_all_tasks_blocked()
    (slow_conn,) = server.connections

    class Live:
        def __init__(self) -> None:
            self.got: list[bytes] = []

        def push(self, payload: bytes) -> None:
            self.got.append(payload)

        def push_deferred(self, item: Deferred) -> None:
            raise AssertionError("a memory history never defers a delivery")

    live = Live()
    server.broker.subscribe(live, "t")
    big = _send("z" * 1000)
    for _ in range(20):  # enough to overflow the slow one's 8 KiB budget
        server.broker.publish(big)
    assert slow_conn.outbox.overflowed
    one = _send("one", delivery="one")
    for _ in range(100):
        server.broker.publish(one)
    assert sum(1 for p in live.got if json.loads(p)["delivery"] == "one") == 100
    assert server.broker.subscribers("t") == [live]


async def test_replay_larger_than_the_budget(nursery: trio.Nursery) -> None:
    server = await start_server(
        nursery, max_pending_bytes=64 << 10, max_line_bytes=16 << 10, cache_size=100
    )
    pub = await LineClient.connect(server.port)
    for i in range(100):
        assert await pub.request(snd(f"{i} " + "r" * 1000)) == OK
    late = await LineClient.connect(server.port)
    await late.send({"command": "subscribe", "topic": "t"})
    with trio.fail_after(10):
        assert await late.receive() == OK
        got = [(await late.receive())["index"] for _ in range(100)]
    assert got == list(range(100))


async def test_replay_allowance_ends_once_the_replay_is_written() -> None:
    """The replay may exceed the budget; once written, the plain budget applies again."""
    outbox = Outbox(1000)
    outbox.queue_replay([b"r" * 600, b"r" * 600])
    assert not outbox.overflowed and outbox.pending == 1200
    outbox.push(b"l" * 300)  # live data on top of the replay still has its budget
    assert not outbox.overflowed and outbox.pending == 1500
    outbox.written(1200)  # the replay went out; the allowance shrinks to what is queued
    assert outbox.pending == 300
    outbox.written(300)
    outbox.push(b"l" * 1000)  # exactly the budget
    assert not outbox.overflowed
    outbox.push(b"l")
    assert outbox.overflowed


async def test_cut_off_client_gets_nothing_more_handled(nursery: trio.Nursery) -> None:
    """Commands still in the batch of a client cut off as a slow consumer are not handled.

    The client's reader is paused (its own output is over the high-water mark and it does
    not read) when other publishers push it over its budget.
    """
    budget = 8 << 10
    server = memory_server(max_pending_bytes=budget, max_line_bytes=2 << 10)
    for _ in range(10):
        server.broker.publish(_send("x" * 1000))
    client, server_stream = trio.testing.lockstep_stream_pair()
    done = trio.Event()

    async def run() -> None:
        await server.handle_transport(TCPTransport(server_stream))
        done.set()

    nursery.start_soon(run)
    batch = enc({"command": "subscribe", "topic": "t"})
    batch += b"".join(enc(snd("late", topic="after")) for _ in range(5))
    async with trio.open_nursery() as writer:
        writer.start_soon(client.send_all, batch)
        await trio.testing.wait_all_tasks_blocked()
        # replayed, and paused before the sends: nobody reads, so it cannot drain
        assert len(server.broker.subscribers("t")) == 1
        for _ in range(20):
            server.broker.publish(_send("y" * 1000))
        with trio.fail_after(10):
            await done.wait()
        writer.cancel_scope.cancel()
    late = _send("late", topic="after")
    assert server.broker.publish(late) == 0  # none of the "late" sends was handled
    assert server.broker.subscribers("t") == []

