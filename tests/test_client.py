"""The trio client library against real in-process servers (and a scripted fake one)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import pytest
import trio
from support import LineClient, make_config, start_server

import mq_trio
from mq_trio.broker import Broker, MemoryHistory
from mq_trio.client import (
    Backoff,
    Client,
    ConnectError,
    ConnectionLost,
    Gap,
    Message,
    MQError,
    Target,
    open_client,
    parse_target,
)
from mq_trio.protocol import Send
from mq_trio.server import Config, Server, serve

FAST = Backoff(initial=0.01, maximum=0.05)
HAS_WS = "ws_port" in attrs.fields_dict(Config)


def test_exports() -> None:
    assert mq_trio.open_client is open_client
    assert mq_trio.MQError is MQError
    assert mq_trio.Message is Message
    assert issubclass(ConnectionLost, MQError) and issubclass(ConnectError, MQError)


def test_parse_target() -> None:
    assert parse_target("127.0.0.1", 7005) == Target("127.0.0.1", 7005)
    assert parse_target("localhost") == Target("localhost", 7000)
    assert parse_target("tcp://127.0.0.1:7003") == Target("127.0.0.1", 7003)
    ws = parse_target("ws://127.0.0.1:7001/")
    assert ws == Target("127.0.0.1", 7001, "ws://127.0.0.1:7001/")
    assert str(ws) == "ws://127.0.0.1:7001/"
    assert parse_target("wss://example.org/mq").port == 443
    with pytest.raises(ValueError, match="scheme"):
        parse_target("http://127.0.0.1:7000/")
    with pytest.raises(ValueError, match="not both"):
        parse_target("ws://127.0.0.1:7001/", 7001)


def test_backoff_grows_to_its_maximum() -> None:
    b = Backoff(initial=0.1, maximum=1.0, multiplier=2.0)
    assert b.delay(0) == 0
    for failures, base in [(1, 0.1), (2, 0.2), (3, 0.4), (10, 1.0)]:
        assert base / 2 <= b.delay(failures) <= base


async def test_subscribe_send_receive(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        assert client.connected
        await client.subscribe("t")
        await client.send("t", "hello")
        await client.send("t", "to one", delivery="one", cache=False)
        assert await client.receive() == Message("t", "hello", 0, "all")
        assert await client.receive() == Message("t", "to one", 1, "one")
        assert client.subscriptions == ["t"]
        await client.unsubscribe("t")
        assert client.subscriptions == []
        await client.send("t", "unheard")
        with pytest.raises(trio.WouldBlock):
            client.receive_nowait()
    assert client.closed
    with pytest.raises(ConnectionLost):
        await client.send("t", "after close")


async def test_replay_last_seen_and_no_cache(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        for i in range(5):
            await client.send("t", f"m{i}")
        await client.send("t", "uncached", cache=False)
        await client.subscribe("t", last_seen=2)
        await client.send("t", "live")
        got = [(m.msg, m.index) for m in [await client.receive() for _ in range(3)]]
        assert got == [("m3", 3), ("m4", 4), ("live", 6)]
        await client.subscribe("u", cache=False)
        await client.send("t", "x")
        assert (await client.receive()).msg == "x"


async def test_messages_iterates_and_filters_by_topic(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        await client.subscribe("a")
        await client.subscribe("b")
        for i in range(3):
            await client.send("a", f"a{i}")
            await client.send("b", f"b{i}")
        b_msgs = []
        async for message in client.messages("b"):
            b_msgs.append(message.msg)
            if len(b_msgs) == 3:
                break
        assert b_msgs == ["b0", "b1", "b2"]
        assert client.buffered == 3
        assert [client.receive_nowait().msg for _ in range(3)] == ["a0", "a1", "a2"]


async def test_failure_reply_raises_mq_error_with_reason(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_line_bytes=100, max_pending_bytes=1000)
    async with open_client("127.0.0.1", server.port) as client:
        await client.send("t", "short")
        with pytest.raises(MQError) as info:
            await client.send("t", "x" * 200)
        assert info.value.reason == "Line too long"
        assert not isinstance(info.value, ConnectionLost)
        # The server closes after "Line too long"; without reconnect the client is done.
        with pytest.raises(ConnectionLost):
            await client.receive()
        with pytest.raises(ConnectionLost):
            await client.send("t", "again")


async def test_unreachable_server_raises_connect_error(nursery: trio.Nursery) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nothing listens there now
    with pytest.raises(ConnectError, match="cannot connect to 127.0.0.1:.*refused"):
        async with open_client("127.0.0.1", port):
            pytest.fail("connected to a closed port")


async def test_user_exception_is_not_wrapped_and_tasks_end(server: Server) -> None:
    with pytest.raises(KeyError):
        async with open_client("127.0.0.1", server.port) as client:
            await client.subscribe("t")
            raise KeyError("mine")
    assert client.closed and not client.connected
    # The server saw the connection end (its subscriptions are released).
    with trio.fail_after(5):  # server-side state with no event to wait on: polled
        while server.broker.subscribers("t"):  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_connection_lost_without_reconnect(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    async with open_client("127.0.0.1", server.port) as client:
        await client.subscribe("t")
        await client.send("t", "before")
        server.shutdown()
        assert (await client.receive()).msg == "before"  # buffered deliveries stay readable
        with pytest.raises(ConnectionLost):
            await client.receive()
        assert client.closed


# --- concurrency and reply matching -------------------------------------------------------


async def test_concurrent_sends_with_interleaved_deliveries(server: Server) -> None:
    tasks, per_task = 20, 50
    async with open_client("127.0.0.1", server.port, max_buffered=16) as client:
        await client.subscribe("t")  # the client's own sends come back interleaved
        received: list[Message] = []

        async def consume() -> None:
            async for message in client.messages():
                received.append(message)
                if len(received) == tasks * per_task:
                    return

        async def sender(n: int) -> None:
            for i in range(per_task):
                await client.send("t", f"{n}:{i}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            async with trio.open_nursery() as senders:
                for n in range(tasks):
                    senders.start_soon(sender, n)
    assert [m.index for m in received] == list(range(tasks * per_task))
    for n in range(tasks):  # each task's messages in the order it sent them
        mine = [m.msg for m in received if m.msg.startswith(f"{n}:")]
        assert mine == [f"{n}:{i}" for i in range(per_task)]


async def fake_server(
    nursery: trio.Nursery, handler: Callable[[LineClient], Awaitable[None]]
) -> int:
    """A scripted protocol peer: ``handler`` gets a LineClient wrapping the accepted stream."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await handler(LineClient(stream))
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def read_command(peer: LineClient) -> Any:
    """The fake server reads client commands, which end in \\n (not \\r\\n)."""
    while b"\n" not in peer._buffer:
        data = await peer.stream.receive_some(65536)
        if not data:
            raise EOFError
        peer._buffer += data
    line, peer._buffer = peer._buffer.split(b"\n", 1)
    return json.loads(line)


async def test_replies_matched_in_order_with_failures_and_deliveries(
    nursery: trio.Nursery,
) -> None:
    """Each command gets its own reply, failures included, while deliveries interleave."""

    async def script(peer: LineClient) -> None:
        index = 0
        while True:
            try:
                cmd = await read_command(peer)
            except EOFError:
                return
            # a delivery before every reply, and a failure for every "bad" message
            delivery = {"command": "send", "topic": "echo", "msg": cmd["msg"],
                        "delivery": "all", "index": index}
            index += 1
            reply: dict[str, Any] = {"success": True}
            if cmd["msg"].startswith("bad"):
                reply = {"success": False, "reason": f"Malformed json message {cmd['msg']}"}
            await peer.send_raw(json.dumps(delivery).encode() + b"\r\n")
            await peer.send_raw(json.dumps(reply).encode() + b"\r\n")

    port = await fake_server(nursery, script)
    outcomes: dict[str, str] = {}
    async with open_client("127.0.0.1", port, max_buffered=4) as client:

        async def sender(n: int) -> None:
            for i in range(30):
                msg = f"{'bad' if (n + i) % 3 == 0 else 'ok'}-{n}-{i}"
                try:
                    await client.send("t", msg)
                    outcomes[msg] = "ok"
                except MQError as exc:
                    outcomes[msg] = exc.reason

        async with trio.open_nursery() as senders:
            for n in range(10):
                senders.start_soon(sender, n)
        # Nobody read deliveries: the buffer went past max_buffered while replies were due.
        assert client.buffered == 300
    assert len(outcomes) == 300
    for msg, outcome in outcomes.items():
        expected = f"Malformed json message {msg}" if msg.startswith("bad") else "ok"
        assert outcome == expected


async def test_cancelled_caller_does_not_misalign_replies(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def script(peer: LineClient) -> None:
        first = await read_command(peer)
        await release.wait()  # hold the first reply back
        await peer.send_raw(json.dumps({"success": False, "reason": first["msg"]}).encode()
                            + b"\r\n")
        while True:
            cmd = await read_command(peer)
            await peer.send_raw(json.dumps({"success": False, "reason": cmd["msg"]}).encode()
                                + b"\r\n")

    port = await fake_server(nursery, script)
    async with open_client("127.0.0.1", port) as client:
        with trio.move_on_after(0.05) as scope:
            await client.send("t", "first")
        assert scope.cancelled_caught
        release.set()
        with pytest.raises(MQError) as info:
            await client.send("t", "second")
        assert info.value.reason == "second"


async def test_reader_waits_when_buffer_full_but_replies_still_arrive(server: Server) -> None:
    async with open_client("127.0.0.1", server.port, max_buffered=2) as client:
        await client.subscribe("t")
        for i in range(20):  # far past the buffer: each reply is behind the deliveries
            await client.send("t", str(i))
        assert client.buffered == 20
        got = [(await client.receive()).msg for _ in range(20)]
        assert got == [str(i) for i in range(20)]


# --- reconnect ---------------------------------------------------------------------------


@attrs.define
class RestartableServer:
    """A server that can be stopped and started again on the same port and broker."""

    nursery: trio.Nursery
    config: Config
    broker: Broker
    server: Server | None = None
    scope: trio.CancelScope | None = None

    @classmethod
    async def start_new(cls, nursery: trio.Nursery, **overrides: Any) -> RestartableServer:
        config = make_config(**overrides)
        self = cls(nursery, config, Broker(MemoryHistory(config.cache_size)))
        await self.start()
        # Later starts reuse the port the first ephemeral bind got (trio sets SO_REUSEADDR).
        assert self.server is not None
        self.config = attrs.evolve(config, port=self.server.port)
        return self

    async def start(self) -> None:
        self.server = await self.nursery.start(self._run)

    async def _run(self, *, task_status: trio.TaskStatus[Server]) -> None:
        with trio.CancelScope() as self.scope:
            await serve(self.config, broker=self.broker, task_status=task_status)

    async def stop(self) -> None:
        assert self.scope is not None and self.server is not None
        self.scope.cancel()
        await self.server.stopped.wait()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port


async def test_reconnect_resumes_without_loss_or_duplicates(nursery: trio.Nursery) -> None:
    rs = await RestartableServer.start_new(nursery)
    async with open_client("127.0.0.1", rs.port, reconnect=FAST) as sub:
        await sub.subscribe("t")
        await sub.subscribe("quiet", cache=False)
        async with open_client("127.0.0.1", rs.port) as pub:
            for i in range(10):
                await pub.send("t", f"m{i}")
        got = [await sub.receive() for _ in range(5)]  # 5 more stay buffered

        await rs.stop()
        await rs.start()
        async with open_client("127.0.0.1", rs.port) as pub:
            for i in range(10, 15):  # to the cache or live: the subscriber may be away still
                await pub.send("t", f"m{i}")
            # Commands wait for the reconnect; the resubscribes go before them.
            await sub.subscribe("marker")
            assert sub.reconnects == 1
            for i in range(15, 20):  # certainly live
                await pub.send("t", f"m{i}")
            await pub.send("quiet", "after")
        got += [await sub.receive("t") for _ in range(15)]
        assert [(m.index, m.msg) for m in got] == [(i, f"m{i}") for i in range(20)]
        assert (await sub.receive("quiet")).msg == "after"
        assert sub.buffered == 0
        assert sorted(sub.subscriptions) == ["marker", "quiet", "t"]


async def test_send_in_flight_at_drop_fails_and_later_commands_wait(
    nursery: trio.Nursery,
) -> None:
    dropped = trio.Event()

    async def script(peer: LineClient) -> None:
        cmd = await read_command(peer)
        if cmd["command"] == "send" and cmd["msg"] == "doomed":
            await peer.aclose()  # drop without replying
            dropped.set()
            return
        while True:
            await peer.send_raw(b'{"success": true}\r\n')
            cmd = await read_command(peer)

    port = await fake_server(nursery, script)
    async with open_client("127.0.0.1", port, reconnect=FAST) as client:
        with pytest.raises(ConnectionLost, match="may not have been sent"):
            await client.send("t", "doomed")
        assert dropped.is_set()
        await client.send("t", "fine")  # on the next connection
        assert client.reconnects == 1
        assert not client.closed


async def test_gives_up_after_max_attempts(nursery: trio.Nursery) -> None:
    rs = await RestartableServer.start_new(nursery)
    backoff = Backoff(initial=0.01, maximum=0.02, max_attempts=3)
    async with open_client("127.0.0.1", rs.port, reconnect=backoff) as client:
        await client.subscribe("t")
        await rs.stop()
        with pytest.raises(ConnectionLost, match="refused"), trio.fail_after(10):
            await client.receive()
        assert client.closed


async def test_slow_consumer_is_cut_off_and_resumes_from_the_cache(
    nursery: trio.Nursery,
) -> None:
    """The documented slow-application path: the reader waits, TCP backs up, the server
    disconnects the subscriber, the client reconnects and resumes from its last index.

    The cache is smaller than the stream, so messages evicted while the subscriber was
    away are gone (by design); what must hold: no duplicates, order kept, and everything
    still cached when the application catches up is delivered. (The cache is kept under
    the server's byte budget: a replay bigger than the budget is cut off at once.)
    """
    n, cache = 3000, 32
    server = await start_server(
        nursery, max_line_bytes=2048, max_pending_bytes=64 << 10, cache_size=cache
    )
    payload = "x" * 1000
    async with open_client("127.0.0.1", server.port, reconnect=FAST, max_buffered=1) as sub:
        await sub.subscribe("t")
        published = trio.Event()

        async def publish() -> None:
            async with open_client("127.0.0.1", server.port) as pub:
                for i in range(n):
                    await pub.send("t", f"{i} {payload}")
            published.set()

        nursery.start_soon(publish)
        indexes = [(await sub.receive()).index]
        await published.wait()  # meanwhile the subscriber's reader sat on a full buffer
        while indexes[-1] != n - 1:
            message = await sub.receive()
            assert message.msg == f"{message.index} {payload}"
            indexes.append(message.index)
        assert sub.reconnects >= 1
        assert indexes == sorted(set(indexes))  # in order, no duplicates
        assert indexes[-cache:] == list(range(n - cache, n))


async def test_subscribe_issued_while_disconnected_completes_after_reconnect(
    nursery: trio.Nursery,
) -> None:
    rs = await RestartableServer.start_new(nursery)
    async with open_client("127.0.0.1", rs.port, reconnect=FAST) as client:
        await rs.stop()
        with trio.fail_after(5):  # the client's view of its connection has no event
            while client.connected:  # noqa: ASYNC110
                await trio.sleep(0.005)
        async with trio.open_nursery() as inner:
            inner.start_soon(client.subscribe, "late")
            await trio.sleep(0.05)  # let the subscribe queue up while no server listens
            await rs.start()
        assert client.subscriptions == ["late"]
        await client.wait_connected()


async def test_epoch_resume_after_an_in_memory_restart_takes_the_new_history(
    nursery: trio.Nursery,
) -> None:
    rs = await RestartableServer.start_new(nursery)
    async with open_client("127.0.0.1", rs.port, reconnect=FAST, epoch=True) as sub:
        await sub.subscribe("t")
        await sub.subscribe("u")
        first_epoch = sub.epoch
        assert first_epoch
        async with open_client("127.0.0.1", rs.port) as pub:
            for i in range(5):
                await pub.send("t", f"m{i}")
        assert [(await sub.receive()).index for _ in range(5)] == list(range(5))

        await rs.stop()
        # An in-memory restart: a new history (epoch), indexes from 0 again. What it got
        # before the subscriber is back is only in its cache, at indexes <= 4: a plain
        # resume from last_seen=4 would skip it.
        rs.broker = Broker(MemoryHistory(100))
        for i in range(3):
            rs.broker.publish(Send("t", f"n{i}", "all"))
        await rs.start()
        await sub.subscribe("marker")  # goes out after the resumes
        got = [await sub.receive("t") for _ in range(3)]
        assert [(m.index, m.msg) for m in got] == [(0, "n0"), (1, "n1"), (2, "n2")]
        assert sub.epoch == rs.broker.epoch != first_epoch
        assert sub.gaps == [Gap("t", 4, "history lost"), Gap("u", -1, "history lost")]
        assert sub.buffered == 0


async def test_epoch_resume_reports_evicted_messages(nursery: trio.Nursery) -> None:
    rs = await RestartableServer.start_new(nursery, cache_size=3)
    async with open_client("127.0.0.1", rs.port, reconnect=FAST, epoch=True) as sub:
        await sub.subscribe("t")
        async with open_client("127.0.0.1", rs.port) as pub:
            await pub.send("t", "m0")
        assert (await sub.receive()).msg == "m0"
        await rs.stop()
        for i in range(1, 6):  # while the subscriber is away; m1, m2 fall out of the cache
            rs.broker.publish(Send("t", f"m{i}", "all"))
        await rs.start()
        await sub.subscribe("marker")
        assert [(await sub.receive()).msg for _ in range(3)] == ["m3", "m4", "m5"]
        assert sub.gaps == [Gap("t", 0, "evicted")]
        # Same history, nothing lost: no gap.
        await rs.stop()
        await rs.start()
        await sub.subscribe("marker2")
        assert sub.gaps == [Gap("t", 0, "evicted")] and sub.reconnects == 2


# --- WebSocket ----------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_WS, reason="the server has no WebSocket endpoint yet")
async def test_websocket_url(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, ws_port=0)
    url = f"ws://127.0.0.1:{server.ws_port}/"
    async with open_client(url) as ws_client, open_client("127.0.0.1", server.port) as tcp:
        await ws_client.subscribe("t")
        await tcp.subscribe("t")
        await ws_client.send("t", "from ws")
        await tcp.send("t", "from tcp")
        for client in (ws_client, tcp):
            assert [(await client.receive()).msg for _ in range(2)] == ["from ws", "from tcp"]
        # Over WebSocket an over-long command closes with 1009 rather than a reply.
        with pytest.raises(ConnectionLost, match="1009"):
            await ws_client.send("t", "x" * (2 << 20))


@pytest.mark.skipif(not HAS_WS, reason="the server has no WebSocket endpoint yet")
async def test_websocket_reconnect_resumes(nursery: trio.Nursery) -> None:
    rs = await RestartableServer.start_new(nursery, ws_port=0)
    assert rs.server is not None
    ws_port = rs.server.ws_port
    rs.config = attrs.evolve(rs.config, ws_port=ws_port)
    async with open_client(f"ws://127.0.0.1:{ws_port}/", reconnect=FAST) as sub:
        await sub.subscribe("t")
        async with open_client("127.0.0.1", rs.port) as pub:
            await pub.send("t", "a")
        assert (await sub.receive()).msg == "a"
        await rs.stop()
        await rs.start()
        async with open_client("127.0.0.1", rs.port) as pub:
            await pub.send("t", "b")
        await sub.subscribe("marker")
        assert (await sub.receive()).msg == "b"
        assert sub.reconnects == 1 and sub.buffered == 0


def test_client_rejects_bad_buffer_size() -> None:
    with pytest.raises(ValueError):
        Client(Target("127.0.0.1", 1), reconnect=None, max_buffered=0, connect_timeout=1)
