"""Limits on connections and their unfinished input (issue #11: slowloris and friends).

--line-timeout, --max-input-bytes (TCP), --max-connections (TCP and WebSocket together),
``Too many topics`` from the broker, and the WebSocket port's accept loop under EMFILE.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
import wsproto
import wsproto.events
from support import ExhaustedSocket, LineClient, make_config, start_server

from mq_trio.broker import Broker, MemoryHistory, Subscriber, TooManyTopics
from mq_trio.broker._history import Recorded
from mq_trio.protocol import LineConnection, Send, Subscribe, parse_line
from mq_trio.server import Config, Server, serve
from mq_trio.server._connection import Connection, LogThrottle
from mq_trio.server._pacer import Pacer
from mq_trio.transports import _websocket as websocket
from mq_trio.transports._input import InputGuard
from mq_trio.transports._tcp import TCPTransport

OK = {"success": True}


def failure(reason: str) -> dict[str, Any]:
    return {"success": False, "reason": reason}


SUBSCRIBE = b'{"command": "subscribe", "topic": "t"}\n'


def snd(topic: str, msg: str) -> dict[str, Any]:
    return {"command": "send", "topic": topic, "msg": msg, "delivery": "all"}


def delivered(topic: str, msg: str, index: int) -> dict[str, Any]:
    return {**snd(topic, msg), "index": index}


async def memory_client(server: Server, nursery: trio.Nursery) -> trio.abc.Stream:
    """A client over in-memory streams, served as the accept loop serves a TCP client
    (with the server's input guard): deterministic under the autojump clock."""
    client, server_side = trio.testing.memory_stream_pair()
    transport = TCPTransport(server_side, server.config.max_line_bytes, server.input_guard)
    nursery.start_soon(server.handle_transport, transport)
    return client


async def read_all(stream: trio.abc.Stream) -> bytes:
    chunks = []
    while data := await stream.receive_some(65536):
        chunks.append(data)
    return b"".join(chunks)


async def read_replies(stream: trio.abc.Stream, n: int, buffer: bytearray) -> list[Any]:
    while buffer.count(b"\r\n") < n:
        data = await stream.receive_some(65536)
        assert data, f"closed early: {bytes(buffer)!r}"
        buffer += data
    lines = bytes(buffer).split(b"\r\n")
    del buffer[: sum(len(x) + 2 for x in lines[:n])]
    return [json.loads(x) for x in lines[:n]]


def guard_is_empty(server: Server) -> bool:
    return server.input_guard.total == 0 and not server.input_guard.deadlines


# --- the sans-IO part -------------------------------------------------------------------


def test_line_connection_abort_drops_the_partial_line_and_ends_input() -> None:
    wire = LineConnection(100)
    assert wire.receive_data(b'{"a": 1}\n{"b"') == [b'{"a": 1}']
    assert wire.pending_bytes == 4
    wire.abort("Line timeout")
    assert wire.pending_bytes == 0
    assert wire.closing_reply() == b'{"success": false, "reason": "Line timeout"}'
    assert wire.receive_data(b': 2}\n') == []
    assert wire.receive_eof() == []


# --- --line-timeout -------------------------------------------------------------------


async def test_partial_line_times_out_and_idle_subscriber_is_untouched(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = await start_server(nursery, line_timeout=30)
    subscriber = await memory_client(server, nursery)
    await subscriber.send_all(SUBSCRIBE)
    sub_buffer = bytearray()
    assert await read_replies(subscriber, 1, sub_buffer) == [OK]

    slow = await memory_client(server, nursery)
    start = trio.current_time()
    await slow.send_all(b'{"command": "send", "topic": "t", "msg')
    await trio.testing.wait_all_tasks_blocked()
    assert server.input_guard.total == len(b'{"command": "send", "topic": "t", "msg')
    with trio.fail_after(100):
        output = await read_all(slow)  # the server closes it
    assert output == b'{"success": false, "reason": "Line timeout"}\r\n'
    assert trio.current_time() - start >= 30
    assert guard_is_empty(server)

    # Long after the timeout, the subscriber without a partial line is still served.
    await trio.sleep(1000)
    publisher = await memory_client(server, nursery)
    await publisher.send_all(json.dumps(snd("t", "m1")).encode() + b"\n")
    assert await read_replies(publisher, 1, bytearray()) == [OK]
    delivery = await read_replies(subscriber, 1, sub_buffer)
    assert delivery == [delivered("t", "m1", 0)]
    assert guard_is_empty(server)


async def test_deadline_counts_from_the_first_byte_of_each_line(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = await start_server(nursery, line_timeout=30)
    client = await memory_client(server, nursery)
    buffer = bytearray()
    # A line may take its time within the timeout, in pieces.
    await client.send_all(b'{"command": "subscribe", ')
    await trio.sleep(20)
    # It ends here, and a new line starts in the same chunk: its own 30 s start now.
    await client.send_all(b'"topic": "a"}\n{"command": ')
    await trio.sleep(25)
    await client.send_all(b'"subscribe", "topic": "b"}\n')
    assert await read_replies(client, 2, buffer) == [OK, OK]
    assert guard_is_empty(server)
    # More bytes of the same line do not extend it.
    start = trio.current_time()
    await client.send_all(b'{"command": ')
    await trio.sleep(20)
    await client.send_all(b'"subscribe", ')
    with trio.fail_after(100):
        output = await read_all(client)
    assert output == b'{"success": false, "reason": "Line timeout"}\r\n'
    assert 30 <= trio.current_time() - start < 31
    assert guard_is_empty(server)


async def test_line_timeout_zero_is_off(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = await start_server(nursery, line_timeout=0)
    client = await memory_client(server, nursery)
    await client.send_all(b'{"command": "subscribe", ')
    await trio.sleep(10_000)
    await client.send_all(b'"topic": "a"}\n')
    assert await read_replies(client, 1, bytearray()) == [OK]


async def test_line_timeout_over_a_real_socket(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, line_timeout=0.05)
    idle = await LineClient.connect(server.port)
    assert await idle.request({"command": "subscribe", "topic": "t"}) == OK
    slow = await LineClient.connect(server.port)
    await slow.send_raw(b'{"command": "send"')
    with trio.fail_after(10):
        output = await slow.read_to_eof()
    assert output == b'{"success": false, "reason": "Line timeout"}\r\n'
    # Others are still served; the idle subscriber too (its request is a whole line).
    with trio.fail_after(10):
        assert await idle.request({"command": "subscribe", "topic": "u"}) == OK
    assert guard_is_empty(server)
    await slow.aclose()


# --- --max-input-bytes ----------------------------------------------------------------


async def test_input_budget_refuses_the_connection_that_passes_it(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    server = await start_server(nursery, max_line_bytes=1000, max_input_bytes=2500,
                                max_pending_bytes=4000)
    a, b, c = [await memory_client(server, nursery) for _ in range(3)]
    head = b'{"command": "send", "topic": "u", "delivery": "all", "msg": "'
    part = head + b"x" * (900 - len(head))
    await a.send_all(part)
    await b.send_all(part)
    await trio.testing.wait_all_tasks_blocked()
    assert server.input_guard.total == 1800
    # c's whole lines still count; its partial line would pass the budget.
    await c.send_all(SUBSCRIBE + part)
    with trio.fail_after(100):
        output = await read_all(c)
    assert output == (b'{"success": true}\r\n'
                      b'{"success": false, "reason": "Too much unfinished input"}\r\n')
    assert server.input_guard.total == 1800
    # a and b are still served: their lines complete.
    await a.send_all(b'"}\n')
    await b.send_all(b'"}\n')
    assert await read_replies(a, 1, bytearray()) == [OK]
    assert await read_replies(b, 1, bytearray()) == [OK]
    assert guard_is_empty(server)
    # Closing with a partial line releases it too.
    await a.send_all(part)
    await trio.testing.wait_all_tasks_blocked()
    assert server.input_guard.total == 900
    await a.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert guard_is_empty(server)


async def test_input_budget_over_real_sockets(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_line_bytes=1000, max_input_bytes=2500,
                                max_pending_bytes=4000, line_timeout=0)
    head = b'{"command": "send", "topic": "u", "delivery": "all", "msg": "'
    part = head + b"x" * (900 - len(head))
    holders = []
    for _ in range(2):
        client = await LineClient.connect(server.port)
        # One write: the reply to the whole line says the chunk was read.
        await client.send_raw(SUBSCRIBE + part)
        with trio.fail_after(10):
            assert await client.receive() == OK
        holders.append(client)
    third = await LineClient.connect(server.port)
    await third.send_raw(part)
    with trio.fail_after(10):
        output = await third.read_to_eof()
    assert output == b'{"success": false, "reason": "Too much unfinished input"}\r\n'
    for client in holders:
        await client.send_raw(b'"}\n')
        with trio.fail_after(10):
            assert await client.receive() == OK
    assert guard_is_empty(server)
    for client in (*holders, third):
        await client.aclose()


def test_input_guard_accounting() -> None:
    class Holder:
        def __init__(self) -> None:
            self.held = 0
            self.aborted: list[str] = []

        def abort_input(self, reason: str) -> None:
            self.aborted.append(reason)

    guard = InputGuard(max_input_bytes=100, line_timeout=0)
    a, b = Holder(), Holder()
    assert guard.update(a, 60, False)
    assert guard.update(a, 50, False)  # shrinking is always allowed
    assert guard.update(b, 50, False)
    assert guard.total == 100
    assert not guard.update(b, 51, False)  # refused, and released
    assert (guard.total, b.held) == (50, 0)
    assert guard.update(a, 0, True)
    assert guard.total == 0
    assert not guard.deadlines  # no timeout: nothing is tracked


# --- --max-connections ----------------------------------------------------------------


async def wait_open(server: Server, n: int) -> None:
    with trio.fail_after(10):
        await server.wait_until(lambda: server.open_connections == n)


async def test_max_connections_refuses_tcp_and_counts_back(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_connections=2)
    first = await LineClient.connect(server.port)
    second = await LineClient.connect(server.port)
    with trio.fail_after(10):
        assert await first.request({"command": "subscribe", "topic": "t"}) == OK
        assert await second.request({"command": "subscribe", "topic": "t"}) == OK
    assert server.open_connections == 2
    extra = await LineClient.connect(server.port)
    with trio.fail_after(10):
        output = await extra.read_to_eof()
    assert output == b'{"success": false, "reason": "Too many connections"}\r\n'
    # The others are still served.
    with trio.fail_after(10):
        await first.send(snd("t", "m1"))
        # its own delivery first (it is subscribed too), then the reply
        assert await first.receive_many(2) == [delivered("t", "m1", 0), OK]
        assert await second.receive() == delivered("t", "m1", 0)
    await first.aclose()
    await wait_open(server, 1)
    again = await LineClient.connect(server.port)
    with trio.fail_after(10):
        assert await again.request({"command": "subscribe", "topic": "t"}) == OK
    for client in (second, again, extra):
        await client.aclose()
    await wait_open(server, 0)
    assert server.refused == 1


@pytest.fixture
def short_close_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(websocket, "CLOSE_TIMEOUT", 0.05)


async def test_max_connections_counts_websockets_and_refuses_them_with_1013(
    nursery: trio.Nursery, short_close_timeout: None
) -> None:
    server = await start_server(nursery, ws_port=0, max_connections=2)
    url = f"ws://127.0.0.1:{server.ws_port}/"
    tcp = await LineClient.connect(server.port)
    with trio.fail_after(10):
        assert await tcp.request({"command": "subscribe", "topic": "t"}) == OK
        ws = await trio_websocket.connect_websocket_url(nursery, url)
        await ws.send_message(json.dumps({"command": "subscribe", "topic": "t"}))
        assert json.loads(await ws.get_message()) == OK
    assert server.open_connections == 2
    # A third, over TCP or WebSocket, is refused.
    extra = await LineClient.connect(server.port)
    with trio.fail_after(10):
        assert await extra.read_to_eof() == (
            b'{"success": false, "reason": "Too many connections"}\r\n')
        refused = await trio_websocket.connect_websocket_url(nursery, url)
        assert json.loads(await refused.get_message()) == failure("Too many connections")
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await refused.get_message()
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1013
    # The page is refused with 503 too.
    stream = await trio.open_tcp_stream("127.0.0.1", server.ws_port or 0)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(10):
        assert (await read_all(stream)).startswith(b"HTTP/1.1 503")
    await ws.aclose()
    await wait_open(server, 1)
    await tcp.aclose()
    await extra.aclose()
    await wait_open(server, 0)


# --- Too many topics ------------------------------------------------------------------


class FullBroker(Broker):
    """A broker that has no room for topics named "full*"."""

    def publish(self, send: Send) -> int | Recorded:
        if send.topic.startswith("full"):
            raise TooManyTopics(send.topic)
        return super().publish(send)

    def subscribe(self, subscriber: Subscriber, topic: str, last_seen: int = -1,
                  cache: bool = True) -> list[Any]:
        if topic.startswith("full"):
            raise TooManyTopics(topic)
        return super().subscribe(subscriber, topic, last_seen, cache)


async def test_too_many_topics_is_a_reply_and_the_connection_stays(
    nursery: trio.Nursery,
) -> None:
    server: Server = await nursery.start(
        partial(serve, make_config(), broker=FullBroker(MemoryHistory(10)))
    )
    client = await LineClient.connect(server.port)
    with trio.fail_after(10):
        assert await client.request(
            snd("full", "m")) == failure("Too many topics")
        assert await client.request(
            {"command": "subscribe", "topic": "full"}) == failure("Too many topics")
        assert await client.request({"command": "subscribe", "topic": "t"}) == OK
        await client.send(snd("t", "m2"))
        assert await client.receive_many(2) == [delivered("t", "m2", 0), OK]
    await client.aclose()


async def test_too_many_topics_through_handle_event() -> None:
    client, server_side = trio.testing.memory_stream_pair()
    conn = Connection(TCPTransport(server_side), FullBroker(MemoryHistory(10)))
    send = parse_line(json.dumps(snd("full", "m")).encode())
    assert isinstance(send, Send)
    assert conn.handle_event(send) is False
    assert conn.handle_event(Subscribe("full")) is False
    replies = list(conn.outbox._queue or [])
    assert replies == [b'{"success": false, "reason": "Too many topics"}'] * 2


# --- the WebSocket port's accept loop under EMFILE --------------------------------------


class ExhaustedListener(trio.abc.AsyncResource):
    def __init__(self, failures: int) -> None:
        self.socket = ExhaustedSocket(failures)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_websocket_accept_failures_are_logged_at_a_bounded_rate(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    listener = ExhaustedListener(failures=250)  # 25 virtual seconds of retries
    server = Server(Config(), Broker(MemoryHistory(10)), [],
                    [listener])  # type: ignore[list-item]
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await trio.sleep(30)
        server.shutdown()
    assert listener.socket.calls == 251  # it kept retrying, then waited
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert 1 <= len(errors) <= 4, errors
    assert "Too many open files" in errors[0]


# --- WebSocket: a message received in part is unfinished input too ---------------------


async def raw_ws_partial(port: int, fragment: str) -> tuple[list[str], int | None]:
    """Open a WebSocket, send the first fragment of a text message (no FIN), and
    collect what the server sends until it closes: (texts, close code)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(ws.send(wsproto.events.Request(host=f"127.0.0.1:{port}", target="/")))
    texts: list[str] = []
    code = None
    while True:
        for event in ws.events():
            if isinstance(event, wsproto.events.AcceptConnection):
                message = wsproto.events.Message(data=fragment, message_finished=False)
                await stream.send_all(ws.send(message))
            elif isinstance(event, wsproto.events.TextMessage):
                texts.append(event.data)
            elif isinstance(event, wsproto.events.CloseConnection):
                code = event.code
                await stream.send_all(ws.send(event.response()))
        if code is not None:
            await stream.aclose()
            return texts, code
        data = await stream.receive_some(65536)
        if not data:
            return texts, code
        ws.receive_data(data)


async def test_websocket_partial_message_times_out(
    nursery: trio.Nursery, short_close_timeout: None
) -> None:
    server = await start_server(nursery, ws_port=0, line_timeout=0.05)
    idle = await trio_websocket.connect_websocket_url(
        nursery, f"ws://127.0.0.1:{server.ws_port}/")
    await idle.send_message(json.dumps({"command": "subscribe", "topic": "t"}))
    with trio.fail_after(10):
        assert json.loads(await idle.get_message()) == OK
        texts, code = await raw_ws_partial(server.ws_port or 0, '{"command": "subscr')
    assert [json.loads(t) for t in texts] == [failure("Line timeout")]
    assert code == 1008
    with trio.fail_after(10):
        await idle.send_message(json.dumps({"command": "subscribe", "topic": "u"}))
        assert json.loads(await idle.get_message()) == OK
    assert guard_is_empty(server)
    await idle.aclose()


async def test_websocket_partial_messages_count_toward_the_input_budget(
    nursery: trio.Nursery, short_close_timeout: None
) -> None:
    server = await start_server(nursery, ws_port=0, line_timeout=0, max_line_bytes=1000,
                                max_input_bytes=1000, max_pending_bytes=4000)
    with trio.fail_after(10):
        # one TCP partial line of 600 bytes; the WebSocket's 600 would pass 1000
        tcp = await LineClient.connect(server.port)
        await tcp.send_raw(SUBSCRIBE + b"x" * 600)
        assert await tcp.receive() == OK
        texts, code = await raw_ws_partial(server.ws_port or 0, "y" * 600)
    assert [json.loads(t) for t in texts] == [failure("Too much unfinished input")]
    assert code == 1008
    assert server.input_guard.total == 600
    await tcp.aclose()
    await wait_open(server, 0)
    assert guard_is_empty(server)


def test_log_throttle_lets_one_line_through_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr("mq_trio.server._connection.time.monotonic", lambda: now[0])
    throttle = LogThrottle(interval=10.0)
    assert throttle.allow() == 0
    assert throttle.allow() is None
    assert throttle.allow() is None
    now[0] += 10.0
    assert throttle.allow() == 2  # the two left out are counted on the next line
    assert throttle.allow() is None


async def test_a_flood_of_refused_lines_logs_one_line(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(nursery, max_line_bytes=100, max_pending_bytes=1000)
    caplog.set_level(logging.INFO, logger="mq_trio.connection")
    for _ in range(5):
        client = await LineClient.connect(server.port)
        await client.send_raw(b"x" * 200)
        with trio.fail_after(10):
            assert await client.read_to_eof() == (
                b'{"success": false, "reason": "Line too long"}\r\n'
            )
        await client.aclose()
    closing = [r for r in caplog.records if r.getMessage().startswith("closing ")]
    assert len(closing) == 1
    assert "Line too long" in closing[0].getMessage()


# --- big lines take turns (one per scheduler pass) ---------------------------------------


async def test_big_lines_take_turns_one_per_scheduler_pass() -> None:
    guard = InputGuard(1 << 30, 0)
    passes = 0
    seen: list[int] = []

    async def count_passes() -> None:
        nonlocal passes
        while True:  # runs once in every pass of the scheduler
            passes += 1
            await trio.lowlevel.checkpoint()

    async def big_line() -> None:
        await guard.turn()
        seen.append(passes)  # where its line would be handled

    async with trio.open_nursery() as nursery:
        nursery.start_soon(count_passes)
        await trio.lowlevel.checkpoint()
        async with trio.open_nursery() as lines:
            for _ in range(20):
                lines.start_soon(big_line)
        nursery.cancel_scope.cancel()
    assert len(seen) == 20
    assert len(set(seen)) == 20  # never two big lines in one pass


@pytest.fixture
def turns(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """One entry per ``InputGuard.turn`` taken."""
    taken: list[None] = []
    real_turn = InputGuard.turn

    async def counting_turn(self: InputGuard) -> None:
        taken.append(None)
        await real_turn(self)

    monkeypatch.setattr(InputGuard, "turn", counting_turn)
    return taken


async def test_big_lines_finished_or_cut_by_eof_wait_for_their_turn(
    nursery: trio.Nursery, turns: list[None]
) -> None:
    server = await start_server(nursery, max_line_bytes=1 << 20, max_pending_bytes=4 << 20)
    head = b'{"command": "send", "topic": "t", "delivery": "all", "msg": "'
    big = head + b"x" * (200_000 - len(head))
    finished = await LineClient.connect(server.port)
    await finished.send_raw(big[:100_000])
    await finished.send_raw(big[100_000:] + b'"}\n')
    with trio.fail_after(10):
        assert await finished.receive() == OK
    cut = await LineClient.connect(server.port)
    await cut.send_raw(big)
    await cut.stream.send_eof()  # EOF: the unfinished line still counts
    with trio.fail_after(10):
        output = await cut.read_to_eof()
    assert output == b'{"success": false, "reason": "Could not parse json"}\r\n'
    small = await LineClient.connect(server.port)
    assert await small.request({"command": "subscribe", "topic": "u"}) == OK
    assert len(turns) == 2  # the two big lines, not the small one
    assert guard_is_empty(server)
    for client in (finished, cut, small):
        await client.aclose()


async def test_big_websocket_messages_wait_for_their_turn(
    nursery: trio.Nursery, turns: list[None]
) -> None:
    server = await start_server(nursery, ws_port=0, max_line_bytes=1 << 20,
                                max_pending_bytes=4 << 20)
    url = f"ws://127.0.0.1:{server.ws_port}/"
    with trio.fail_after(10):
        ws = await trio_websocket.connect_websocket_url(nursery, url)
        big = {"command": "send", "topic": "t", "msg": "x" * 200_000, "delivery": "all"}
        await ws.send_message(json.dumps(big))
        assert json.loads(await ws.get_message()) == OK
        await ws.send_message(json.dumps({"command": "subscribe", "topic": "u"}))
        assert json.loads(await ws.get_message()) == OK
        await ws.aclose()
    assert len(turns) == 1  # the big message, not the small one


# --- bursts of work: a few per scheduler pass --------------------------------------


async def test_pacer_runs_a_few_per_scheduler_pass() -> None:
    reaper = Pacer(per_pass=2)
    scopes = [trio.CancelScope() for _ in range(20)]
    steps: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reaper.run)
        await trio.testing.wait_all_tasks_blocked()  # the reaper waits for work
        for scope in scopes:
            reaper.defer(scope.cancel)
        done = 0
        while done < len(scopes):
            await trio.lowlevel.checkpoint()  # one scheduler pass
            now = sum(scope.cancel_called for scope in scopes)
            steps.append(now - done)
            done = now
        nursery.cancel_scope.cancel()
    # Passes run tasks in random order, so between two of this task's passes the reaper
    # may have run twice: at most 2 x per_pass, never all at once.
    assert max(steps) <= 4
    assert len([step for step in steps if step]) >= 5


async def test_pacer_turns_let_a_crowd_through_a_few_per_pass() -> None:
    """``Pacer.turn`` (a crowd of departing connections): everyone gets a turn, a few
    per scheduler pass, not all in one."""
    reaper = Pacer(per_pass=2)
    through: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reaper.run)
        await trio.testing.wait_all_tasks_blocked()

        async def leave(n: int) -> None:
            await reaper.turn()
            through.append(n)

        for n in range(20):
            nursery.start_soon(leave, n)
        steps: list[int] = []
        done = 0
        while done < 20:
            await trio.lowlevel.checkpoint()  # one scheduler pass
            steps.append(len(through) - done)
            done = len(through)
        nursery.cancel_scope.cancel()
    assert sorted(through) == list(range(20))
    assert max(steps) <= 4  # (as above: at most two of the reaper's passes per ours)
    assert len([step for step in steps if step]) >= 5


async def test_pacer_turn_without_a_running_pacer_is_at_once() -> None:
    with trio.fail_after(1):
        await Pacer(2).turn()


def test_pacer_not_running_runs_at_once() -> None:
    scope = trio.CancelScope()
    Pacer(2).defer(scope.cancel)
    assert scope.cancel_called



async def test_wait_until_wakes_when_connections_change(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    woke: list[int] = []

    async def waiter() -> None:
        await server.wait_until(lambda: server.open_connections == 2)
        woke.append(server.open_connections)

    nursery.start_soon(waiter)
    await trio.testing.wait_all_tasks_blocked()
    client = await LineClient.connect(server.port)
    assert await client.request({"command": "subscribe", "topic": "t"}) == OK
    assert woke == []  # one connection: still waiting
    server.ws_handshakes += 1  # a WebSocket stream in its handshake counts too
    await trio.testing.wait_all_tasks_blocked()
    assert woke == [2]
    server.ws_handshakes -= 1
    await client.aclose()
