"""Write turns (server/_pacer.py WriteTurns): a wide fan-out is written over several
scheduler passes, a bounded number of bytes per pass, so one publish to thousands of
subscribers does not freeze everyone else (issue 11, point 8)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
from support import LineClient, start_server
from test_connection_io import RecordingTransport

from mq_trio.server import _connection
from mq_trio.server._outbox import Outbox, Ready, send_ready
from mq_trio.server._pacer import WriteTurns

OK = {"success": True}


def snd(msg: str, topic: str = "t") -> dict[str, Any]:
    return {"command": "send", "topic": topic, "msg": msg, "delivery": "all"}


async def test_a_burst_is_written_a_budget_per_pass_in_order(nursery: trio.Nursery) -> None:
    turns = WriteTurns(per_pass=250)
    ready = Ready(turns)
    nursery.start_soon(turns.run)
    outboxes = [Outbox(1 << 20) for _ in range(10)]
    transports = [RecordingTransport(room=1 << 20) for _ in outboxes]
    for outbox, transport in zip(outboxes, transports, strict=True):
        outbox.attach(transport, ready)
        nursery.start_soon(outbox.drain_into, transport, lambda: None)
    await trio.testing.wait_all_tasks_blocked()
    for i, outbox in enumerate(outboxes):
        outbox.push(b"%03d" % i + b"x" * 97)  # 100 bytes each, as one publish fans out
    # idle writers are not woken: the outboxes wait on the ready list
    assert len(ready) == 10
    send_ready(ready)  # the budget covers three (250 bytes: 100, 100, 100)
    written = [bool(t.wire) for t in transports]
    assert sum(written) == 3
    passes = 0
    while not all(t.wire for t in transports):
        before = sum(bool(t.wire) for t in transports)
        await trio.lowlevel.checkpoint()  # one scheduler pass
        passes += 1
        # trio may run the turns task before this task in one pass and after it in the
        # next: at most two of its passes between two looks
        assert sum(bool(t.wire) for t in transports) - before <= 6
        assert passes < 20
    assert passes >= 2
    for i, transport in enumerate(transports):
        assert transport.wire == b"%03d" % i + b"x" * 97 + b"\n"
    # the writers themselves were never needed
    assert all(t.batch_calls == 0 for t in transports)
    assert not turns.busy


async def test_without_the_turns_task_pushes_wake_the_writers(nursery: trio.Nursery) -> None:
    """A server not running (an embedder driving the broker directly) still delivers."""
    ready = Ready(WriteTurns())
    outbox = Outbox(1 << 20)
    transport = RecordingTransport(room=1 << 20)
    outbox.attach(transport, ready)
    nursery.start_soon(outbox.drain_into, transport, lambda: None)
    await trio.testing.wait_all_tasks_blocked()
    outbox.push(b"d")
    await trio.testing.wait_all_tasks_blocked()
    assert transport.wire == b"d\n"


async def test_a_delivery_pushed_outside_any_reader_is_flushed(nursery: trio.Nursery) -> None:
    """No reader calls send_ready after this publish: the turns task does."""
    from mq_trio.protocol import Send, parse_line

    server = await start_server(nursery)
    sub = await LineClient.connect(server.port)
    assert await sub.request({"command": "subscribe", "topic": "t"}) == OK
    event = parse_line(json.dumps(snd("from a task")).encode())
    assert isinstance(event, Send)
    server.broker.publish(event)
    with trio.fail_after(5):
        assert (await sub.receive())["msg"] == "from a task"


async def test_a_wide_fanout_under_a_small_budget_is_complete_and_in_order(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publisher's reader stops after FANOUT_STEP bytes of deliveries while writes
    wait for turns and goes on after them: every subscriber still gets every message, in
    order, and the publisher every reply."""
    monkeypatch.setattr(_connection, "FANOUT_STEP", 5000)  # bytes
    server = await start_server(nursery)
    turns = server._ready.turns
    assert turns is not None
    turns.per_pass = 2000  # about 20 deliveries per pass
    subs = [await LineClient.connect(server.port) for _ in range(60)]
    for sub in subs:
        assert await sub.request({"command": "subscribe", "topic": "t"}) == OK
    pub = await LineClient.connect(server.port)
    n = 40
    waited = 0
    wait_room = turns.wait_room

    async def counting_wait_room() -> None:
        nonlocal waited
        waited += 1
        await wait_room()

    turns.wait_room = counting_wait_room  # type: ignore[method-assign]
    await pub.send_raw(b"".join(json.dumps(snd(f"{i:02d}" + "y" * 80)).encode() + b"\n"
                                for i in range(n)))
    assert await pub.receive_many(n) == [OK] * n
    for sub in subs:
        got = await sub.receive_many(n)
        assert [m["index"] for m in got] == list(range(n))
    assert waited > 0  # the publisher did wait for the writes it caused
    assert not turns.busy


async def test_a_round_trip_does_not_wait_behind_a_fanout(nursery: trio.Nursery) -> None:
    """While writes wait for turns, another client's reply is written by its own reader:
    it takes no turn."""
    server = await start_server(nursery)
    turns = server._ready.turns
    assert turns is not None
    probe = await LineClient.connect(server.port)
    assert await probe.request({"command": "subscribe", "topic": "p"}) == OK
    turns._left = 0  # as if a burst had spent this pass's budget
    turns.ready.append(Outbox(1 << 20))  # and something waits
    assert turns.busy
    await probe.send(snd("ping", "p"))
    # own delivery and reply, written by the probe's reader even though turns are spent
    assert (await probe.receive())["msg"] == "ping"
    assert await probe.receive() == OK
