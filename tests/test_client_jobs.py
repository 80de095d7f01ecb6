"""The client's work-queue API against real in-process servers over real sockets:
publish with ids, jobs (send_job, consume, ack/nack/progress), batches, and resending
with the same id after a drop (through a relay that loses replies, and across a restart
of a durable server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from support import LineClient, make_config, start_server

import mq_trio
from mq_trio.client import (
    Backoff,
    ConnectionEvent,
    ConnectionLost,
    Job,
    MQError,
    Published,
    QueueFull,
    UnknownJob,
    open_client,
)
from mq_trio.server import Server, serve
from mq_trio.testing import queue_state, restart_server, wait_for_queue

FAST = Backoff(initial=0.01, maximum=0.05)


# --- a relay that can lose the server's replies ------------------------------------------


@attrs.define(eq=False)
class _Link:
    client: trio.SocketStream
    upstream: trio.SocketStream
    #: Server-to-client bytes are dropped (the server's replies "lost in the network").
    hold: bool = False
    #: Client-to-server bytes are dropped too (a server that never gets anything).
    drop: bool = False


@attrs.define(eq=False)
class Cutter:
    """A TCP relay in front of a server. ``hold_replies()`` makes the current connections
    drop what the server sends; ``cut()`` closes them. New connections relay normally
    (to the same port: ``restart_server`` keeps it)."""

    port: int
    server_port: int
    links: list[_Link] = attrs.field(factory=list)
    accepted: int = 0
    #: What new connections start with (see ``_Link``).
    hold_new: bool = False
    drop_new: bool = False

    @classmethod
    async def start(cls, nursery: trio.Nursery, server_port: int) -> Cutter:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self = cls(listener.socket.getsockname()[1], server_port)
        nursery.start_soon(self._accept, listener)
        return self

    async def _accept(self, listener: trio.SocketListener) -> None:
        async with listener, trio.open_nursery() as nursery:
            while True:
                client = await listener.accept()
                self.accepted += 1
                nursery.start_soon(self._relay, client)

    async def _relay(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.server_port)
        except OSError:  # the server is restarting: the client tries again
            await client.aclose()
            return
        link = _Link(client, upstream, self.hold_new, self.drop_new)
        self.links.append(link)
        async with client, upstream, trio.open_nursery() as nursery:

            async def pump(source: trio.SocketStream, sink: trio.SocketStream,
                           replies: bool) -> None:
                try:
                    async for data in source:
                        if not (link.hold if replies else link.drop):
                            await sink.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()  # either side gone: close both

            nursery.start_soon(pump, client, upstream, False)
            nursery.start_soon(pump, upstream, client, True)
        self.links.remove(link)

    def hold_replies(self) -> None:
        for link in self.links:
            link.hold = True

    async def cut(self) -> None:
        for link in list(self.links):
            await link.client.aclose()
            await link.upstream.aclose()


# --- publishing ----------------------------------------------------------------------------


async def test_exports() -> None:
    for name in ("Job", "Published", "UnknownJob", "QueueFull", "SpoolFull", "Consumer",
                 "ConnectionEvent"):
        assert getattr(mq_trio, name) is getattr(mq_trio.client, name)
    assert issubclass(UnknownJob, MQError) and issubclass(QueueFull, MQError)
    assert mq_trio.ConnectionEvent is ConnectionEvent


async def test_publish_with_an_id_is_published_once(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        await client.subscribe("t")
        first = await client.publish("t", "hello", id="order-17")
        assert first == Published(0, 1, False)
        again = await client.publish("t", "hello", id="order-17")
        assert again == Published(0, 1, True)
        other = await client.publish("t", "hello")  # a fresh id each time
        assert other == Published(1, 1, False)
        assert await client.send("t", "plain") is None  # version 1: no index
        assert await client.send("t", "named", id="n-1") == 3
        got = [await client.receive() for _ in range(4)]
        assert [(m.msg, m.index) for m in got] == [
            ("hello", 0), ("hello", 1), ("plain", 2), ("named", 3)]
        assert client.buffered == 0  # the duplicate was not delivered again


async def test_publish_sends_what_it_says(server: Server) -> None:
    """The bytes on the wire, as a raw subscriber sees them (the delivered object is the
    command as received, plus its index)."""
    raw = await LineClient.connect(server.port)
    assert await raw.request({"command": "subscribe", "topic": "t"}) == {"success": True}
    async with open_client("127.0.0.1", server.port) as client:
        await client.publish("t", "x", id="a\u00e9", cache=False)
    assert await raw.receive() == {"command": "send", "topic": "t", "msg": "x",
                                   "delivery": "all", "cache": False, "id": "a\u00e9",
                                   "index": 0}
    await raw.aclose()


async def test_bad_arguments_are_refused_before_sending(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        with pytest.raises(ValueError, match="delivery='one'"):
            await client.publish("t", "x", ack=True)
        with pytest.raises(ValueError, match="1 to 256"):
            await client.publish("t", "x", id="")
        with pytest.raises(ValueError, match="1 to 256"):
            await client.send("t", "x", id="x" * 257)
        with pytest.raises(ValueError, match="1 to 10000"):
            await client.send_batch("t", [])
        with pytest.raises(TypeError):
            await client.send_batch("t", "abc")
        with pytest.raises(ValueError, match="prefetch"):
            client.consume("t", prefetch=0)
        # Nothing reached the server: the next index is still 0.
        assert await client.send("t", "x", id="ok") == 0


async def test_send_batch_is_one_command_with_consecutive_indexes(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        await client.subscribe("t")
        await client.send("t", "before")
        batch = await client.send_batch("t", ["a", "b", "c"], id="batch-1")
        assert batch == Published(1, 3, False)
        assert await client.send_batch("t", ["a", "b", "c"], id="batch-1") == Published(
            1, 3, True)
        got = [await client.receive() for _ in range(4)]
        assert [(m.msg, m.index) for m in got] == [
            ("before", 0), ("a", 1), ("b", 2), ("c", 3)]


# --- jobs ------------------------------------------------------------------------------------


async def test_job_round_trip(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as producer, \
            open_client("127.0.0.1", server.port) as worker:
        assert await producer.send_job("resize", "img-1.png") == 0
        assert await producer.send("resize", "img-2.png", delivery="one", ack=True) == 1
        assert queue_state(server, "resize").waiting == 2
        async with worker.consume("resize", prefetch=2) as jobs:
            first = await jobs.receive()
            second = await jobs.receive()
            assert (first.topic, first.index, first.msg, first.deliveries) == (
                "resize", 0, "img-1.png", 1)
            assert (second.index, second.msg) == (1, "img-2.png")
            state = queue_state(server, "resize")
            assert (state.waiting, state.in_flight, state.consumers) == (0, 2, 1)
            await first.in_progress()
            await first.ack()
            await second.ack()
            assert queue_state(server, "resize").in_flight == 0
            with pytest.raises(UnknownJob) as caught:
                await first.ack()  # done already: the server has forgotten it
            assert caught.value.reason == "Unknown job"
        await producer.send_job("resize", "img-3.png")
        # The consumer has left: the job waits for the next one.
        assert queue_state(server, "resize").waiting == 1


async def test_a_plain_subscriber_gets_no_jobs_and_receive_no_jobs(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        await client.subscribe("t")
        async with client.consume("t") as jobs:
            await client.send_job("t", "job")
            await client.send("t", "news")
            assert (await client.receive()).msg == "news"  # the job is not a Message
            job = await jobs.receive()
            assert job.msg == "job"
            await job.ack()
        assert client.buffered == 0


async def test_nack_redelivers_with_the_count(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        await client.send_job("t", "flaky")
        async for job in client.consume("t"):
            if job.deliveries == 1:
                await job.nack()
                continue
            assert (job.index, job.deliveries) == (0, 2)
            await job.ack()
            break
        state = await wait_for_queue(server, "t", lambda q: q.acked_total == 1)
        assert (state.waiting, state.in_flight, state.redelivered_total) == (0, 0, 1)


async def test_nack_with_a_delay_keeps_it_delayed(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        await client.send_job("t", "later")
        async with client.consume("t") as jobs:
            job = await jobs.receive()
            await job.nack(delay=3600)
            state = queue_state(server, "t")
            assert (state.delayed, state.waiting, state.in_flight) == (1, 0, 0)
            with pytest.raises(trio.WouldBlock):
                jobs.receive_nowait()
            with pytest.raises(ValueError, match="86400"):
                await job.nack(delay=86401)


async def test_leaving_the_consumer_gives_unsettled_jobs_back(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as a, \
            open_client("127.0.0.1", server.port) as b:
        for i in range(3):
            await a.send_job("t", f"job {i}")
        async with a.consume("t", prefetch=3) as jobs:
            taken = await jobs.receive()
            await wait_for_queue(server, "t", lambda q: q.in_flight == 3)
            assert jobs.buffered == 2
        assert queue_state(server, "t").waiting == 3
        with pytest.raises(UnknownJob):
            await taken.ack()  # given back on leaving
        async with b.consume("t", prefetch=3) as jobs:
            again = [await jobs.receive() for _ in range(3)]
            assert sorted(j.index for j in again) == [0, 1, 2]
            assert all(j.deliveries == 2 for j in again)
            for job in again:
                await job.ack()


async def test_queue_full(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_queue_jobs=2)
    async with open_client("127.0.0.1", server.port) as client:
        await client.send_job("t", "1")
        await client.send_job("t", "2")
        with pytest.raises(QueueFull):
            await client.send_job("t", "3")
        with pytest.raises(QueueFull):
            await client.send_batch("t", ["3", "4"], delivery="one", ack=True)
        assert queue_state(server, "t").waiting == 2
        # A refused publish is not remembered: its id can be used again.
        assert await client.send("t", "x", id="after") == 2


async def test_dead_letters_say_where_they_came_from(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_deliveries=1)
    async with open_client("127.0.0.1", server.port) as client:
        await client.send_job("t", "poison")
        async with client.consume("t") as jobs:
            await (await jobs.receive()).nack()
            # (Read while the topic has a consumer: see test_plugin_jobs on idle queues.)
            await wait_for_queue(server, "t", lambda q: q.dead_lettered_total == 1)
        async with client.consume("$dead.t") as dead:
            job = await dead.receive()
            assert (job.msg, job.from_topic, job.from_index) == ("poison", "t", 0)
            assert job.index == 0 and job.deliveries == 1  # a new job of its own topic
            await job.ack()


async def test_jobs_over_websocket(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, ws_port=0)
    assert server.ws_port is not None
    url = f"ws://127.0.0.1:{server.ws_port}/"
    async with open_client(url) as client:
        assert await client.send_batch("t", ["a", "b"], delivery="one", ack=True) == \
            Published(0, 2, False)
        async with client.consume("t", prefetch=2) as jobs:
            got = [await jobs.receive() for _ in range(2)]
            assert [(j.index, j.msg, j.deliveries) for j in got] == [(0, "a", 1), (1, "b", 1)]
            for job in got:
                await job.ack()
            assert queue_state(server, "t").acked_total == 2


# --- drops and reconnects ------------------------------------------------------------------


async def test_a_publish_whose_reply_was_lost_is_resent_with_its_id(
    nursery: trio.Nursery, server: Server
) -> None:
    relay = await Cutter.start(nursery, server.port)
    events: list[ConnectionEvent] = []
    async with open_client("127.0.0.1", server.port) as watcher, open_client(
        "127.0.0.1", relay.port, reconnect=FAST, on_event=events.append
    ) as producer:
        await watcher.subscribe("t")
        await through(producer)
        relay.hold_replies()
        result: list[Published] = []
        async with trio.open_nursery() as tasks:

            async def publish() -> None:
                result.append(await producer.publish("t", "exactly once", id="m-1"))

            tasks.start_soon(publish)
            # The server published it (the watcher has it); the producer has no reply.
            assert (await watcher.receive()).index == 0
            assert not result
            await relay.cut()
        assert result == [Published(0, 1, True)]  # the resend, recognised
        assert producer.reconnects == 1
        assert [e.kind for e in events] == ["lost", "reconnected"]
        await producer.send("t", "next")
        assert (await watcher.receive()).msg == "next"  # no second "exactly once"


async def start_durable(nursery: trio.Nursery, data_dir: Path, port: int = 0
                        ) -> tuple[Server, trio.Event]:
    """A durable server, and an event set once ``serve`` has returned (its store closed).

    Not ``mq_trio.testing.restart_server``: ``Server.stopped`` is set before the store
    is closed, so a new server can find the data directory still locked.
    """
    finished = trio.Event()

    async def run(*, task_status: trio.TaskStatus[Server]) -> None:
        try:
            await serve(make_config(data_dir=str(data_dir), port=port),
                        task_status=task_status)
        finally:
            finished.set()

    server: Server = await nursery.start(run)
    return server, finished


async def through(client: mq_trio.Client) -> None:
    """A round trip: the client's connection is up end to end (through a relay too)."""
    await client.unsubscribe("\x00round-trip")


@pytest.mark.parametrize("durable", [True, False])
async def test_a_job_resent_across_a_server_restart(
    nursery: trio.Nursery, tmp_path: Path, durable: bool
) -> None:
    """In memory the restarted server keeps the broker (``restart_server``), durable it
    reopens the data directory: either way, the index sequence goes on and the resend
    with the same id is recognised."""
    if durable:
        server, finished = await start_durable(nursery, tmp_path)
    else:
        server = await start_server(nursery)
    relay = await Cutter.start(nursery, server.port)
    async with open_client("127.0.0.1", relay.port, reconnect=FAST) as producer:
        assert await producer.send_job("t", "before") == 0
        relay.hold_replies()
        result: list[int] = []
        async with trio.open_nursery() as tasks:

            async def send() -> None:
                result.append(await producer.send_job("t", "lost reply", id="job-1"))

            tasks.start_soon(send)
            await wait_for_queue(server, "t", lambda q: q.waiting == 2)
            if durable:
                port = server.port
                server.shutdown()  # closes every connection
                await finished.wait()
                server, finished = await start_durable(nursery, tmp_path, port)
            else:
                server = await restart_server(nursery, server)
        assert result == [1]
        # (More than once if it reached the relay before the new server was listening.)
        assert producer.reconnects >= 1
        assert queue_state(server, "t").waiting == 2  # not 3: the resend was recognised
        assert await producer.send_job("t", "after") == 2  # the index sequence went on
    async with open_client("127.0.0.1", server.port) as worker:
        async with worker.consume("t", prefetch=3) as jobs:
            got = [await jobs.receive() for _ in range(3)]
            assert [(j.index, j.msg) for j in got] == [
                (0, "before"), (1, "lost reply"), (2, "after")]
            for job in got:
                await job.ack()


async def test_a_publish_without_an_id_is_not_resent(
    nursery: trio.Nursery, server: Server
) -> None:
    relay = await Cutter.start(nursery, server.port)
    async with open_client("127.0.0.1", relay.port, reconnect=FAST) as producer:
        await through(producer)
        relay.hold_replies()
        async with trio.open_nursery() as tasks:
            failed: list[MQError] = []

            async def send() -> None:
                try:
                    await producer.send("t", "job", delivery="one", ack=True)
                except ConnectionLost as exc:
                    failed.append(exc)

            tasks.start_soon(send)
            await wait_for_queue(server, "t", lambda q: q.waiting == 1)
            await relay.cut()
        assert len(failed) == 1 and "may not have been sent" in failed[0].reason
        assert queue_state(server, "t").waiting == 1


async def test_consumer_resumes_after_a_drop_and_old_jobs_are_unknown(
    nursery: trio.Nursery, server: Server
) -> None:
    relay = await Cutter.start(nursery, server.port)
    async with open_client("127.0.0.1", server.port) as producer, open_client(
        "127.0.0.1", relay.port, reconnect=FAST
    ) as worker:
        await producer.send_job("t", "first")
        async with worker.consume("t") as jobs:
            held = await jobs.receive()
            await relay.cut()
            # The server took it back and hands it out again, to the resumed consumer.
            again = await jobs.receive()
            assert (again.index, again.deliveries) == (held.index, 2)
            with pytest.raises(UnknownJob, match="connection this job came on was lost"):
                await held.ack()  # not sent: it would ack the new delivery
            await again.ack()
            await producer.send_job("t", "second")
            job = await jobs.receive()
            assert (job.msg, job.deliveries) == ("second", 1)
            await job.ack()
            assert queue_state(server, "t").acked_total == 2
        assert worker.reconnects == 1


async def test_an_ack_in_flight_when_the_connection_drops_is_unknown(
    nursery: trio.Nursery, server: Server
) -> None:
    relay = await Cutter.start(nursery, server.port)
    async with open_client("127.0.0.1", server.port) as producer, open_client(
        "127.0.0.1", relay.port, reconnect=FAST
    ) as worker:
        await producer.send_job("t", "job")
        async with worker.consume("t") as jobs:
            job = await jobs.receive()
            relay.hold_replies()
            async with trio.open_nursery() as tasks:
                outcome: list[BaseException] = []

                async def ack() -> None:
                    try:
                        await job.ack()
                    except UnknownJob as exc:
                        outcome.append(exc)

                tasks.start_soon(ack)
                await wait_for_queue(server, "t", lambda q: q.acked_total == 1)
                await relay.cut()
            assert len(outcome) == 1  # the ack landed, but the client cannot know it


async def test_a_redelivery_replaces_the_copy_still_buffered(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, ack_timeout=0.05)
    async with open_client("127.0.0.1", server.port) as client:
        await client.send_job("t", "slow")
        async with client.consume("t", prefetch=2) as jobs:
            first = await jobs.receive()  # held, not settled: taken back at the deadline
            await wait_for_queue(server, "t", lambda q: q.redelivered_total >= 3)
            await through(client)  # (its reply comes after the deliveries sent before)
            # The server gave it to this client again (it had room) several times; one
            # copy waits, the latest.
            assert jobs.buffered == 1
            again = jobs.receive_nowait()
            assert again.index == first.index and again.deliveries >= 3
            await again.ack()


async def test_consume_after_close_raises_connection_lost(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        consumer = client.consume("t")
        await consumer.start()
    with pytest.raises(ConnectionLost):
        await consumer.receive()
    with pytest.raises(ConnectionLost):
        await client.publish("t", "x")


async def _iterate(jobs: Any, n: int, into: list[Job]) -> None:
    async for job in jobs:
        into.append(job)
        await job.ack()
        if len(into) == n:
            return


async def test_jobs_go_round_robin_to_consumers(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as a, \
            open_client("127.0.0.1", server.port) as b:
        got_a: list[Job] = []
        got_b: list[Job] = []
        async with a.consume("t") as jobs_a, b.consume("t") as jobs_b:
            for i in range(4):
                await a.send_job("t", str(i))
            async with trio.open_nursery() as tasks:
                tasks.start_soon(_iterate, jobs_a, 2, got_a)
                tasks.start_soon(_iterate, jobs_b, 2, got_b)
            await wait_for_queue(server, "t", lambda q: q.acked_total == 4)
        assert sorted(int(j.msg) for j in got_a + got_b) == [0, 1, 2, 3]

