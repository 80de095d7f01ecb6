"""Integration tests over real TCP sockets on 127.0.0.1: framing, replies, deliveries."""

from __future__ import annotations

import json
import logging
import random
import string
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from support import LineClient, start_server

from mq_trio import protocol
from mq_trio.broker import Broker, Recorded
from mq_trio.protocol import QUIT, Failure, LineBuffer, parse_line
from mq_trio.server import Server

Connect = Callable[[], Awaitable[LineClient]]

OK = {"success": True}
REASONS = {
    "Could not decode input as UTF-8",
    "Could not parse json",
    "Malformed json message",
    "Internal exception",
    "Line too long",
}


def fail(reason: str) -> dict[str, Any]:
    return {"success": False, "reason": reason}


def sub(topic: str = "t", **extra: Any) -> dict[str, Any]:
    return {"command": "subscribe", "topic": topic, **extra}


def snd(topic: str = "t", msg: str = "m", delivery: str = "all", **extra: Any) -> dict[str, Any]:
    return {"command": "send", "topic": topic, "msg": msg, "delivery": delivery, **extra}


def enc(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def delivered(obj: dict[str, Any], index: int) -> dict[str, Any]:
    return {**obj, "index": index}


async def test_replies_are_crlf_terminated_json(connect: Connect) -> None:
    c = await connect()
    await c.send_raw(enc(sub()) + b"{\n")
    data = b""
    while data.count(b"\r\n") < 2:
        data += await c.stream.receive_some(1000)
    first, second, rest = data.split(b"\r\n")
    assert json.loads(first) == OK
    assert json.loads(second) == fail("Could not parse json")
    assert rest == b""


async def test_each_failure_keeps_the_connection(connect: Connect) -> None:
    c = await connect()
    await c.send_raw(b"\xff\xfe\n{nope\n[]\n" + enc({"command": "send"}) + enc(sub()))
    assert await c.receive_many(5) == [
        fail("Could not decode input as UTF-8"),
        fail("Could not parse json"),
        fail("Malformed json message"),
        fail("Malformed json message"),
        OK,
    ]


async def test_blank_lines_get_no_reply_and_lf_or_crlf(connect: Connect) -> None:
    c = await connect()
    await c.send_raw(b"\n\r\n   \r\n\t\n" + json.dumps(sub()).encode() + b"\r\n  \n")
    await c.send_raw(b"  " + json.dumps(snd()).encode() + b"  \r\n")
    assert await c.receive_many(3) == [OK, delivered(snd(), 0), OK]


async def test_pipelining_10000_commands_in_one_write(connect: Connect) -> None:
    c = await connect()
    lines: list[bytes] = []
    expected: list[Any] = []
    for i in range(10_000):
        kind = i % 4
        if kind == 0:
            lines.append(enc(snd("p", msg=str(i))))
            expected.append(OK)
        elif kind == 1:
            lines.append(b"not json %d\n" % i)
            expected.append(fail("Could not parse json"))
        elif kind == 2:
            lines.append(enc({"command": "unsubscribe", "topic": str(i)}))
            expected.append(OK)
        else:
            lines.append(b"[%d]\r\n" % i)
            expected.append(fail("Malformed json message"))
    lines.append(enc(sub("p", last_seen=2497)))
    expected += [OK] + [delivered(snd("p", msg=str(i)), i // 4) for i in (9992, 9996)]
    payload = b"".join(lines)
    got: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.send_raw, payload)
        got = await c.receive_many(len(expected))
    assert got == expected


async def test_command_split_byte_by_byte(connect: Connect, server: Server) -> None:
    c = await connect()
    data = enc(sub("é☃")) + json.dumps(snd("é☃", msg="ü"), ensure_ascii=False).encode() + b"\r\n"
    for i in range(len(data)):
        await c.send_raw(data[i : i + 1])
    assert await c.receive_many(3) == [OK, delivered(snd("é☃", msg="ü"), 0), OK]


async def test_sender_sees_its_delivery_before_its_success(connect: Connect) -> None:
    a, b = await connect(), await connect()
    assert await a.request(sub()) == OK
    assert await b.request(sub()) == OK
    await a.send_raw(enc(snd(msg="1")) + enc(snd(msg="2")) + enc(sub("u")) + enc(snd(msg="3")))
    assert await a.receive_many(7) == [
        delivered(snd(msg="1"), 0), OK,
        delivered(snd(msg="2"), 1), OK,
        OK,
        delivered(snd(msg="3"), 2), OK,
    ]
    assert await b.receive_many(3) == [delivered(snd(msg=m), i) for i, m in enumerate("123")]


async def test_deliveries_interleave_with_replies(connect: Connect) -> None:
    a, b = await connect(), await connect()
    assert await a.request(sub()) == OK
    assert await b.request(snd(msg="x")) == OK
    assert await a.receive() == delivered(snd(msg="x"), 0)
    assert await a.request({"command": "unsubscribe", "topic": "t"}) == OK
    assert await b.request(snd(msg="y")) == OK
    assert await a.request({"command": "unsubscribe", "topic": "t"}) == OK  # nothing between


async def test_subscribe_replay_follows_the_success_reply(connect: Connect) -> None:
    pub, c = await connect(), await connect()
    for i in range(5):
        assert await pub.request(snd(msg=str(i), delivery="one" if i % 2 else "all")) == OK
    await c.send_raw(enc(sub(last_seen=1)) + enc(snd("other")))
    assert await c.receive_many(5) == [
        OK,
        delivered(snd(msg="2"), 2),
        delivered(snd(msg="3", delivery="one"), 3),
        delivered(snd(msg="4"), 4),
        OK,
    ]
    await c.send_raw(enc(sub()) + enc(sub(cache=False)))
    assert await c.receive_many(5) == [
        OK,
        delivered(snd(msg="0"), 0),
        delivered(snd(msg="1", delivery="one"), 1),
        delivered(snd(msg="2"), 2),
        delivered(snd(msg="4"), 4),
    ]
    assert await c.receive() == OK


async def test_quit_flushes_then_closes(connect: Connect, server: Server) -> None:
    c = await connect()
    n = 2000
    cmds = enc(sub()) + b"".join(enc(snd(msg=str(i))) for i in range(n))
    await c.send_raw(cmds + b"  quit \r\n" + enc(snd(msg="after quit")))
    data = await c.read_to_eof()
    replies = [json.loads(x) for x in data.split(b"\r\n")[:-1]]
    assert data.endswith(b"\r\n")
    assert replies[0] == OK
    assert replies[1:] == [r for i in range(n) for r in (delivered(snd(msg=str(i)), i), OK)]
    assert server.broker.subscribers("t") == []
    # the line after quit was never processed
    other = await connect()
    assert await other.request(sub(last_seen=n - 1)) == OK
    assert await other.request(sub("z")) == OK


async def test_eof_flushes_pending_output(connect: Connect, server: Server) -> None:
    c = await connect()
    n = 3000
    await c.send_raw(enc(sub()) + b"".join(enc(snd(msg="x" * 100)) for _ in range(n)))
    await c.stream.send_eof()
    data = await c.read_to_eof()
    assert data.count(b"\r\n") == 1 + 2 * n
    assert json.loads(data.split(b"\r\n")[-2]) == OK
    assert server.broker.subscribers("t") == []


async def test_last_line_without_newline_before_eof(connect: Connect) -> None:
    c = await connect()
    await c.send_raw(enc(sub()) + b"  " + json.dumps(snd()).encode() + b" \r")
    await c.stream.send_eof()
    data = await c.read_to_eof()
    assert [json.loads(x) for x in data.split(b"\r\n")[:-1]] == [OK, delivered(snd(), 0), OK]


async def test_last_line_quit_without_newline(connect: Connect) -> None:
    c = await connect()
    await c.send_raw(enc(sub()) + b"quit")
    await c.stream.send_eof()
    assert await c.read_to_eof() == protocol.SUCCESS + b"\r\n"


def expected_replies(data: bytes) -> list[dict[str, Any]]:
    """What the contract says a client sending ``data`` then EOF gets back."""
    buf = LineBuffer()
    lines = buf.feed(data) + ([buf.pending] if buf.pending else [])
    out: list[dict[str, Any]] = []
    for line in lines:
        event = parse_line(line)
        assert event is not QUIT, "the seed produced a quit line; run with another"
        if event is None:
            continue
        assert isinstance(event, Failure), event
        out.append(fail(event.reason))
    return out


def garbage(rng: random.Random, size: int, printable: bool) -> bytes:
    if printable:
        return "".join(rng.choice(string.printable) for _ in range(size)).encode()
    return rng.randbytes(size)


@pytest.mark.parametrize("size", [100, 1024, 10 * 1024, 64 * 1024])
@pytest.mark.parametrize("printable", [False, True], ids=["bytes", "printable"])
async def test_garbage_gets_failures_and_nothing_breaks(
    connect: Connect, server: Server, size: int, printable: bool, rng: random.Random
) -> None:
    data = garbage(rng, size, printable)
    expected = expected_replies(data + b"\n")
    assert expected  # some line was processed
    c = await connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.send_raw, data + b"\n" + enc(sub()))
        got = await c.receive_many(len(expected) + 1)
    assert all(r in [fail(x) for x in REASONS] for r in got[:-1])
    assert got == expected + [OK]
    other = await connect()
    assert await other.request(snd()) == OK
    assert await c.receive() == delivered(snd(), 0)
    await c.send_raw(data[: size // 2])  # half a line, then EOF
    await c.stream.send_eof()
    tail = await c.read_to_eof()
    assert [json.loads(x) for x in tail.split(b"\r\n")[:-1]] == expected_replies(
        b"\n" + data[: size // 2]
    )
    assert await other.request(sub("still up")) == OK


async def test_line_over_the_limit(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_line_bytes=100)
    c = await LineClient.connect(server.port)
    other = await LineClient.connect(server.port)
    assert await other.request(sub()) == OK
    long_line = json.dumps(snd(msg="x" * 100)).encode()
    await c.send_raw(enc(sub()) + enc(snd(msg="ok")) + long_line + b"\n" + enc(snd(msg="late")))
    data = await c.read_to_eof()
    assert [json.loads(x) for x in data.split(b"\r\n")[:-1]] == [
        OK,
        delivered(snd(msg="ok"), 0),
        OK,
        fail("Line too long"),
    ]
    assert await other.receive() == delivered(snd(msg="ok"), 0)
    assert server.broker.subscribers("t") != []
    await other.send(snd(msg="next"))
    # "late" was never processed: "next" gets index 1
    assert await other.receive_many(2) == [delivered(snd(msg="next"), 1), OK]


async def test_close_with_unread_input_is_clean_not_a_reset(nursery: trio.Nursery) -> None:
    """After "Line too long" the server half-closes and discards the rest of the input, so
    the client reads the reply and a normal EOF instead of losing both to a TCP reset."""
    server = await start_server(nursery, max_line_bytes=100)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(b"x" * 200 + b"\n" + b"y" * 300_000)  # more than one read
    received = b""
    with trio.fail_after(10):
        while data := await stream.receive_some(65536):  # a reset would raise here
            received += data
    assert received == protocol.failure_bytes("Line too long") + b"\r\n"
    await stream.aclose()


async def test_line_over_the_limit_without_newline(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_line_bytes=100)
    c = await LineClient.connect(server.port)
    base = len(json.dumps(snd(msg="")))
    exact = json.dumps(snd(msg="x" * (100 - base))).encode()
    assert len(exact) == 100  # exactly at the limit is accepted
    await c.send_raw(exact + b"\n" + b"y" * 50)
    assert await c.receive() == OK
    await c.send_raw(b"y" * 51)  # the pending line is now over the limit, no newline yet
    assert await c.read_to_eof() == protocol.failure_bytes("Line too long") + b"\r\n"


async def test_internal_exception_keeps_connection_and_server(
    connect: Connect, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    if server.broker.shared is not None:  # (a cluster node publishes another way)
        real_shared = Broker.publish_shared

        def flaky_shared(self: Broker, sender: Any, send: protocol.Send) -> Any:
            if send.msg == "boom":
                raise RuntimeError("injected bug")
            return real_shared(self, sender, send)

        monkeypatch.setattr(Broker, "publish_shared", flaky_shared)
    real_publish = Broker.publish

    def flaky_publish(self: Broker, send: protocol.Send) -> int | Recorded:
        if send.msg == "boom":
            raise RuntimeError("injected bug")
        return real_publish(self, send)

    monkeypatch.setattr(Broker, "publish", flaky_publish)
    a, b = await connect(), await connect()
    assert await b.request(sub()) == OK
    await a.send_raw(enc(snd(msg="boom")) + enc(snd(msg="fine")))
    assert await a.receive_many(2) == [fail("Internal exception"), OK]
    assert await b.receive() == delivered(snd(msg="fine"), 0)
    assert await a.request(snd(msg="boom")) == fail("Internal exception")
    c = await connect()
    assert await c.request(sub()) == OK


async def test_internal_exception_in_parsing(
    connect: Connect, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_parse = protocol.parse_line

    def flaky_parse(line: bytes) -> protocol.LineEvent:
        if b"boom" in line:
            raise RuntimeError("injected bug")
        return real_parse(line)

    monkeypatch.setattr(protocol, "parse_line", flaky_parse)
    a = await connect()
    await a.send_raw(enc(snd(msg="boom")) + enc(sub()))
    assert await a.receive_many(2) == [fail("Internal exception"), OK]


async def test_disconnect_removes_subscriptions_keeps_cache(
    connect: Connect, server: Server
) -> None:
    a, b = await connect(), await connect()
    assert await a.request(sub()) == OK
    assert await a.request(sub("u")) == OK
    assert len(server.broker.subscribers("t")) == 1
    await a.aclose()
    await trio.testing.wait_all_tasks_blocked()  # the server has read the EOF and cleaned up
    assert server.broker.subscribers("t") == server.broker.subscribers("u") == []
    assert await b.request(snd(delivery="one")) == OK
    assert await b.request(sub(last_seen=-1)) == OK
    assert await b.receive() == delivered(snd(delivery="one"), 0)  # was cached, not lost


async def test_reset_with_output_pending_is_quiet(
    connect: Connect, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that vanishes (RST) mid-stream ends only its own connection, no errors."""
    import socket
    import struct

    victim, pub, other = await connect(), await connect(), await connect()
    assert await victim.request(sub()) == OK
    assert await other.request(sub()) == OK
    await pub.send_raw(b"".join(enc(snd(msg="x" * 1000)) for _ in range(2000)))
    assert (await victim.receive())["index"] == 0
    victim.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await victim.aclose()  # RST, with lots still queued for it
    with trio.fail_after(30):
        got = [await other.receive() for _ in range(2000)]
        assert [r["index"] for r in got] == list(range(2000))
        assert await pub.receive_many(2000) == [OK] * 2000
    await trio.testing.wait_all_tasks_blocked()  # the victim's connection has ended
    assert len(server.broker.subscribers("t")) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_shutdown_flushes_closes_and_stops_accepting(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    c = await LineClient.connect(server.port)
    await c.send_raw(enc(sub()) + b"".join(enc(snd(msg=str(i))) for i in range(500)))
    assert await c.receive() == OK
    server.shutdown()
    with trio.fail_after(10):
        rest = await c.read_to_eof()
        await server.stopped.wait()
    assert rest.endswith(b"\r\n")
    with pytest.raises(OSError):
        await LineClient.connect(server.port)
