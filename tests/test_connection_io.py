"""The connection's I/O paths: replies sent from the reader's task, leftovers of a partial
write, graceful stop without a cancel scope, the accept loop's error handling."""

from __future__ import annotations

import errno
import json
import socket
from typing import Any

import pytest
import trio
import trio.testing
from support import LineClient, start_server

from mq_trio.server import Server
from mq_trio.server._outbox import SEND_NOW_BYTES, Outbox, send_ready
from mq_trio.transports._tcp import TCPTransport

OK = {"success": True}


def enc(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def snd(msg: str, topic: str = "t") -> dict[str, Any]:
    return {"command": "send", "topic": topic, "msg": msg, "delivery": "all"}


class RecordingTransport:
    """A transport whose non-blocking send takes at most ``room`` bytes."""

    peer = "test"

    def __init__(self, room: int) -> None:
        self.room = room
        self.wire = b""
        self.unsent = b""
        self.nowait_calls = 0
        self.batch_calls = 0

    def closing_reply(self) -> bytes | None:
        return None

    def send_nowait(self, items: list[bytes]) -> bool:
        self.nowait_calls += 1
        data = b"".join(item + b"\n" for item in items)
        self.wire += data[: self.room]
        self.unsent += data[self.room :]
        return not self.unsent

    async def send_batch(self, items: list[bytes]) -> None:
        self.batch_calls += 1
        self.wire += self.unsent + b"".join(item + b"\n" for item in items)
        self.unsent = b""
        await trio.lowlevel.checkpoint()

    def stop_receiving(self) -> None:
        pass

    async def receive_lines(self) -> list[bytes] | None:
        return None

    async def aclose(self) -> None:
        pass


async def test_send_now_writes_replies_without_the_writer() -> None:
    outbox = Outbox(1 << 20)
    transport = RecordingTransport(room=1 << 20)
    outbox.queue_reply(b"a")
    outbox.queue_reply(b"b")
    assert outbox.pending == 2
    outbox.write_inline(transport)
    assert transport.wire == b"a\nb\n"
    assert outbox.pending == 0
    assert transport.batch_calls == 0


async def test_partial_send_now_leaves_the_rest_to_the_writer_in_order() -> None:
    outbox = Outbox(1 << 20)
    transport = RecordingTransport(room=3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.drain_into, transport, lambda: None)
        await trio.testing.wait_all_tasks_blocked()
        outbox.queue_reply(b"first")
        outbox.queue_reply(b"second")
        outbox.write_inline(transport)  # the kernel took 3 bytes
        outbox.push(b"third")  # a delivery queued behind the leftover
        await trio.testing.wait_all_tasks_blocked()
        assert transport.wire == b"first\nsecond\nthird\n"
        outbox.close()
    assert transport.batch_calls >= 1


async def test_send_now_leaves_big_or_busy_output_to_the_writer() -> None:
    outbox = Outbox(4 * SEND_NOW_BYTES)
    transport = RecordingTransport(room=1 << 30)
    outbox.queue_reply(b"x" * (SEND_NOW_BYTES + 1))
    outbox.write_inline(transport)
    assert transport.nowait_calls == 0  # over SEND_NOW_BYTES: the writer's job
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.drain_into, transport, lambda: None)
        await trio.testing.wait_all_tasks_blocked()
        assert transport.wire == b"x" * (SEND_NOW_BYTES + 1) + b"\n"
        outbox.close()


async def test_reply_pushed_without_wake_is_sent_by_the_reader_loop(
    nursery: trio.Nursery,
) -> None:
    """End to end over TCP: every reply arrives, in order, pipelined or one by one."""
    server = await start_server(nursery)
    client = await LineClient.connect(server.port)
    for i in range(50):
        assert await client.request(snd(str(i))) == OK
    await client.send_raw(b"".join(enc(snd(str(i))) for i in range(2000)))
    assert await client.receive_many(2000) == [OK] * 2000


async def test_tcp_send_nowait_keeps_what_the_kernel_did_not_take() -> None:
    """A real socket with tiny buffers: the leftover goes out first in send_batch."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = trio.socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await client.connect(listener.getsockname())
    server_sock, _ = await listener.accept()
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    transport = TCPTransport(server_sock)
    items = [b"%05d" % i + b"y" * 100 for i in range(3000)]
    expected = b"".join(item + b"\r\n" for item in items) + b"tail\r\n"
    assert transport.send_nowait(list(items)) is False  # 300 KiB cannot all fit
    received = bytearray()

    async def read_all() -> None:
        while len(received) < len(expected):
            data = await client.recv(65536)
            assert data
            received.extend(data)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await transport.send_batch([b"tail"])
    assert bytes(received) == expected
    for sock in (client, server_sock, listener):
        sock.close()


async def test_shutdown_stops_idle_and_busy_readers(nursery: trio.Nursery) -> None:
    """stop() wakes a reader waiting for input (SHUT_RD), a reader with input keeps
    coming stops handling it; both connections end long before the grace period."""
    server = await start_server(nursery, shutdown_grace=30)
    idle = await LineClient.connect(server.port)  # its reader waits for input at the stop
    assert await idle.request({"command": "subscribe", "topic": "t"}) == OK
    client = await LineClient.connect(server.port)
    assert await client.request({"command": "subscribe", "topic": "t"}) == OK
    stop_sending = trio.Event()

    async def keep_sending() -> None:
        i = 0
        with trio.move_on_after(10):
            while not stop_sending.is_set():
                try:
                    await client.send_raw(enc(snd(str(i), topic="other")))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                i += 1
                await trio.sleep(0.001)

    nursery.start_soon(keep_sending)
    await trio.sleep(0.05)
    conns = set(server.connections)
    assert len(conns) == 2
    server.shutdown()
    # Without the stop the reader would go on reading until the 30 s grace ran out.
    with trio.fail_after(4):
        await server.stopped.wait()
    stop_sending.set()
    assert not conns & server.connections
    assert await idle.read_to_eof() == b""
    rest = await client.read_to_eof()
    assert rest == b"" or rest.endswith(b"\r\n")


async def test_idle_connection_is_two_tasks(nursery: trio.Nursery) -> None:
    """The design card's shape, and what memory per connection is built on: a reader
    (the connection's own task) and a writer, nothing else per idle client."""
    server = await start_server(nursery)
    clients = [await LineClient.connect(server.port) for _ in range(5)]
    for client in clients:
        assert await client.request({"command": "subscribe", "topic": "t"}) == OK
    root = trio.lowlevel.current_root_task()
    assert root is not None
    tasks = _tasks_under(root)
    conn_tasks = [t for t in tasks if t.name == "mq_trio.connection"]
    writers = [t for t in tasks if t.name == "mq_trio.connection.writer"]
    assert len(conn_tasks) == 5
    assert len(writers) == 5
    assert all(
        [c.name for n in t.child_nurseries for c in n.child_tasks] == ["mq_trio.connection.writer"]
        for t in conn_tasks
    )


def _tasks_under(task: trio.lowlevel.Task) -> list[trio.lowlevel.Task]:
    found = [task]
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            found.extend(_tasks_under(child))
    return found


class FlakyListenerSocket:
    """accept() fails as a busy server's does before it succeeds."""

    def __init__(self, real: trio.socket.SocketType, errors: list[int]) -> None:
        self.real = real
        self.errors = errors

    async def accept(self) -> tuple[trio.socket.SocketType, Any]:
        if self.errors:
            await trio.lowlevel.checkpoint()
            code = self.errors.pop(0)
            raise OSError(code, "injected")
        return await self.real.accept()


async def test_accept_loop_survives_transient_and_capacity_errors(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    server: Server = await start_server(nursery)
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    flaky = FlakyListenerSocket(listener, [errno.ECONNABORTED, errno.EMFILE])
    nursery.start_soon(server._accept_loop, flaky, nursery)  # type: ignore[arg-type]
    client = await LineClient.connect(listener.getsockname()[1])
    with trio.fail_after(5):
        assert await client.request({"command": "subscribe", "topic": "t"}) == OK
    assert any("accept failed" in r.getMessage() for r in caplog.records)
    assert not flaky.errors


async def test_accept_loop_raises_unexpected_errors(nursery: trio.Nursery) -> None:
    server: Server = await start_server(nursery)
    listener = trio.socket.socket()
    flaky = FlakyListenerSocket(listener, [errno.EBADF])
    with pytest.raises(OSError, match="injected"):
        await server._accept_loop(flaky, nursery)  # type: ignore[arg-type]
    listener.close()


async def test_woken_outboxes_are_written_by_the_reader_that_woke_them() -> None:
    """A delivery leaves in the same pass as the command that produced it: the woken
    writer's outbox is on the ready list, and send_ready writes it without the writer."""
    ready: list[Outbox] = []
    subscriber = Outbox(1 << 20)
    transport = RecordingTransport(room=1 << 20)
    subscriber.attach(transport, ready)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(subscriber.drain_into, transport, lambda: None)
        await trio.testing.wait_all_tasks_blocked()
        subscriber.push(b"d1")
        subscriber.push(b"d2")  # the writer is already woken: listed once
        assert ready == [subscriber]
        send_ready(ready)
        assert ready == []
        assert transport.wire == b"d1\nd2\n"
        assert (transport.nowait_calls, transport.batch_calls) == (1, 0)
        await trio.testing.wait_all_tasks_blocked()  # the woken writer found nothing
        assert transport.batch_calls == 0
        subscriber.push(b"d3")  # idle again: listed again
        assert ready == [subscriber]
        subscriber.close()
    assert transport.wire == b"d1\nd2\nd3\n"  # written by the writer when nobody else did


async def test_deliveries_reach_subscribers_over_tcp_in_order(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    subs = [await LineClient.connect(server.port) for _ in range(3)]
    for sub in subs:
        assert await sub.request({"command": "subscribe", "topic": "t"}) == OK
    pub = await LineClient.connect(server.port)
    for i in range(20):
        assert await pub.request(snd(str(i))) == OK
    await pub.send_raw(b"".join(enc(snd(str(i))) for i in range(20, 1000)))
    assert await pub.receive_many(980) == [OK] * 980
    for sub in subs:
        got = await sub.receive_many(1000)
        assert [m["index"] for m in got] == list(range(1000))
        assert [m["msg"] for m in got] == [str(i) for i in range(1000)]


async def test_close_right_after_the_idle_writer_is_cancelled() -> None:
    # The cancelled writer is already scheduled when close() (another task, the same
    # scheduler pass) wakes it: it must not be rescheduled twice (trio asserts).
    outbox = Outbox(1 << 20)
    transport = RecordingTransport(room=1 << 20)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.drain_into, transport, lambda: None)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            outbox.close()
    assert scope.cancelled_caught


async def test_push_right_after_the_backlogged_reader_is_cancelled() -> None:
    outbox = Outbox(100)
    outbox.queue_reply(b"x" * 80)  # over the high-water mark, nobody drains it
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.wait_drained)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            outbox.wake_reader()
    assert scope.cancelled_caught
