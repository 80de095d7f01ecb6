"""Acknowledged jobs, batches and message ids in the broker (issue 14), sans-IO: fake
subscribers and a fake clock; docs/protocol.md "Acknowledged jobs" is the contract."""

from __future__ import annotations

import json
from typing import Any

import pytest
from support import Fake

from mq_trio.broker import Broker, MemoryHistory, QueueFull, TooManyTopics
from mq_trio.broker._jobs import JOB_OVERHEAD
from mq_trio.protocol import Batch, SendEx, index_reply, parse_line


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_broker(clock: Clock | None = None, **settings: Any) -> Broker:
    broker = Broker(MemoryHistory(), max_topics=settings.pop("max_topics", 1000))
    defaults: dict[str, Any] = dict(ack_timeout=30.0, max_deliveries=5,
                                    max_queue_jobs=1000, max_job_bytes=1 << 20,
                                    dedupe_window=120.0)
    defaults.update(settings)
    broker.configure_jobs(clock=clock or Clock(), **defaults)
    return broker


def job(topic: str, msg: str, id: str | None = None) -> SendEx:
    line = {"command": "send", "topic": topic, "msg": msg, "delivery": "one", "ack": True}
    if id is not None:
        line["id"] = id
    event = parse_line(json.dumps(line).encode())
    assert isinstance(event, SendEx)
    return event


def publish(broker: Broker, topic: str, *msgs: str) -> list[int]:
    out = []
    for msg in msgs:
        reply, recorded = broker.publish_ex(job(topic, msg))
        assert isinstance(recorded, int)
        assert reply == index_reply(recorded)
        out.append(recorded)
    return out


def consume(broker: Broker, sub: Fake, topic: str, prefetch: int = 1) -> None:
    broker.consume(sub, topic, prefetch)()


def jobs_of(sub: Fake) -> list[tuple[str, int]]:
    return [(o["msg"], o["deliveries"]) for o in sub.objects]


def test_a_job_waits_for_a_consumer_and_goes_to_exactly_one() -> None:
    broker = make_broker()
    publish(broker, "q", "a", "b")
    assert broker.queue_info("q").waiting == 2
    one, two = Fake("one"), Fake("two")
    consume(broker, one, "q")
    consume(broker, two, "q")
    assert jobs_of(one) == [("a", 1)] and jobs_of(two) == [("b", 1)]
    info = broker.queue_info("q")
    assert (info.waiting, info.in_flight, info.consumers) == (0, 2, 2)


def test_the_delivery_is_the_command_plus_index_and_deliveries() -> None:
    broker = make_broker()
    sub = Fake()
    consume(broker, sub, "q")
    [index] = publish(broker, "q", "x")
    assert sub.objects == [{"command": "send", "topic": "q", "msg": "x",
                              "delivery": "one", "ack": True, "index": index,
                              "deliveries": 1}]


def test_prefetch_bounds_what_a_consumer_holds() -> None:
    broker = make_broker()
    sub = Fake()
    consume(broker, sub, "q", prefetch=2)
    indexes = publish(broker, "q", *"abcde")
    assert [m for m, _ in jobs_of(sub)] == ["a", "b"]
    assert broker.jobs.ack(sub, "q", indexes[0])[0]
    assert [m for m, _ in jobs_of(sub)] == ["a", "b", "c"]
    consume(broker, sub, "q", prefetch=4)  # subscribing again changes the prefetch
    assert [m for m, _ in jobs_of(sub)] == list("abcde")


def test_jobs_go_round_robin_to_consumers_with_room() -> None:
    broker = make_broker()
    subs = [Fake(str(i)) for i in range(3)]
    for sub in subs:
        consume(broker, sub, "q", prefetch=2)
    publish(broker, "q", *[f"m{i}" for i in range(6)])
    assert [[m for m, _ in jobs_of(s)] for s in subs] == [
        ["m0", "m3"], ["m1", "m4"], ["m2", "m5"]
    ]


def test_ack_only_of_a_job_this_consumer_holds() -> None:
    broker = make_broker()
    one, two = Fake(), Fake()
    consume(broker, one, "q")
    consume(broker, two, "q")
    [a, b] = publish(broker, "q", "a", "b")
    assert broker.jobs.ack(two, "q", a) == (False, None)  # not its job
    assert broker.jobs.ack(one, "q", 99) == (False, None)  # no such job
    assert broker.jobs.ack(one, "other", a) == (False, None)
    assert broker.jobs.ack(one, "q", a) == (True, None)
    assert broker.jobs.ack(one, "q", a) == (False, None)  # acknowledged already
    assert not broker.jobs.progress(one, "q", a)
    assert not broker.jobs.nack(one, "q", a, 0)
    assert broker.queue_info("q").acked_total == 1


def test_nack_redelivers_first_and_counts_the_delivery() -> None:
    broker = make_broker()
    sub = Fake()
    consume(broker, sub, "q")
    [a, _] = publish(broker, "q", "a", "b")
    assert broker.jobs.nack(sub, "q", a, 0.0)
    # the nacked job comes back ahead of the one never delivered
    assert jobs_of(sub) == [("a", 1), ("a", 2)]
    assert broker.queue_info("q").redelivered_total == 1


def test_nack_with_a_delay_waits_for_the_clock() -> None:
    clock = Clock()
    broker = make_broker(clock)
    sub = Fake()
    consume(broker, sub, "q")
    [a] = publish(broker, "q", "a")
    assert broker.jobs.nack(sub, "q", a, 5.0)
    assert broker.queue_info("q").delayed == 1
    clock.now = 4.9
    assert broker.jobs.expire() == 5.0  # not yet; the next timer is the delay's end
    assert jobs_of(sub) == [("a", 1)]
    clock.now = 5.0
    broker.jobs.expire()
    assert jobs_of(sub) == [("a", 1), ("a", 2)]
    assert broker.queue_info("q").delayed == 0


def test_an_unacknowledged_job_is_redelivered_after_the_ack_timeout() -> None:
    clock = Clock()
    broker = make_broker(clock, ack_timeout=10.0)
    sub = Fake()
    consume(broker, sub, "q", prefetch=2)
    [a, b] = publish(broker, "q", "a", "b")
    clock.now = 6.0
    assert broker.jobs.progress(sub, "q", b)  # b's deadline is now 16
    clock.now = 10.0
    broker.jobs.expire()
    assert jobs_of(sub) == [("a", 1), ("b", 1), ("a", 2)]
    clock.now = 15.9
    broker.jobs.expire()
    assert len(sub.objects) == 3
    clock.now = 16.0
    broker.jobs.expire()
    assert jobs_of(sub)[3:] == [("b", 2)]
    assert broker.jobs.ack(sub, "q", a)[0] and broker.jobs.ack(sub, "q", b)[0]
    assert broker.queue_info("q").in_flight == 0


def test_a_late_ack_after_the_deadline_is_unknown() -> None:
    clock = Clock()
    broker = make_broker(clock, ack_timeout=1.0)
    slow, other = Fake(), Fake()
    consume(broker, slow, "q")
    [a] = publish(broker, "q", "a")
    consume(broker, other, "q")
    clock.now = 1.0
    broker.jobs.expire()
    assert jobs_of(other) == [("a", 2)]
    assert broker.jobs.ack(slow, "q", a) == (False, None)
    assert broker.jobs.ack(other, "q", a)[0]


def test_a_departing_consumer_gives_its_jobs_back_in_order() -> None:
    broker = make_broker()
    gone, stays = Fake(), Fake()
    consume(broker, gone, "q", prefetch=3)
    publish(broker, "q", "a", "b", "c", "d")
    broker.disconnect(gone)
    consume(broker, stays, "q", prefetch=10)
    assert jobs_of(stays) == [("a", 2), ("b", 2), ("c", 2), ("d", 1)]


def test_unsubscribe_ends_the_consumer_and_gives_jobs_back() -> None:
    broker = make_broker()
    sub, other = Fake(), Fake()
    consume(broker, sub, "q")
    consume(broker, other, "q")
    publish(broker, "q", "a", "b", "c")
    broker.unsubscribe(sub, "q")
    assert [m for m, _ in jobs_of(other)] == ["b"]
    [b] = [o["index"] for o in other.objects]
    broker.jobs.ack(other, "q", b)
    assert [m for m, _ in jobs_of(other)] == ["b", "a"]
    assert broker.queue_info("q").consumers == 1


def test_out_of_deliveries_a_job_moves_to_the_dead_letter_topic() -> None:
    clock = Clock()
    broker = make_broker(clock, max_deliveries=2, ack_timeout=1.0)
    sub = Fake()
    consume(broker, sub, "q")
    [a] = publish(broker, "q", "a")
    broker.jobs.nack(sub, "q", a, 0)
    clock.now = 1.0
    broker.jobs.expire()  # the second delivery timed out: no third
    assert jobs_of(sub) == [("a", 1), ("a", 2)]
    info = broker.queue_info("q")
    assert (info.waiting, info.in_flight, info.dead_lettered_total) == (0, 0, 1)
    dead = Fake()
    consume(broker, dead, "$dead.q")
    [letter] = dead.objects
    assert letter["topic"] == "$dead.q" and letter["msg"] == "a"
    assert (letter["from_topic"], letter["from_index"], letter["deliveries"]) == ("q", a, 1)
    # a dead-letter topic's jobs are never dead-lettered again
    for _ in range(4):
        broker.jobs.nack(dead, "$dead.q", letter["index"], 0)
    assert [o["deliveries"] for o in dead.objects] == [1, 2, 3, 4, 5]
    assert "$dead.$dead.q" not in broker.jobs.queues


def test_version_one_subscribers_never_see_jobs_and_consumers_see_only_jobs() -> None:
    broker = make_broker()
    plain, consumer = Fake(), Fake()
    broker.subscribe(plain, "q")
    consume(broker, consumer, "q")
    publish(broker, "q", "job")
    line = b'{"command": "send", "topic": "q", "msg": "plain", "delivery": "all"}'
    send = parse_line(line)
    broker.publish(send)  # type: ignore[arg-type]
    assert plain.msgs == ["plain"]
    assert consumer.msgs == ["job"]
    # and a job is never cached: a new subscriber replays only the plain message
    late = Fake()
    assert len(broker.subscribe(late, "q")) == 1


def test_queue_full_per_topic_and_in_total() -> None:
    broker = make_broker(max_queue_jobs=3, max_job_bytes=3 * (JOB_OVERHEAD + 120))
    publish(broker, "q", "a", "b", "c")
    with pytest.raises(QueueFull):
        broker.publish_ex(job("q", "d"))
    assert broker.queue_info("q").waiting == 3
    with pytest.raises(QueueFull):  # the bytes of all topics together
        broker.publish_ex(job("other", "x" * 100))
    assert broker.history.topic_info("q").next_index == 3  # type: ignore[union-attr]
    sub = Fake()
    consume(broker, sub, "q", prefetch=3)
    for o in sub.objects:
        broker.jobs.ack(sub, "q", o["index"])
    publish(broker, "q", "d")  # room again


def test_a_batch_of_jobs_is_all_or_nothing() -> None:
    broker = make_broker(max_queue_jobs=4)
    publish(broker, "q", "a", "b")
    with pytest.raises(QueueFull):
        broker.publish_batch(Batch("q", ("c", "d", "e"), "one", ack=True))
    assert broker.queue_info("q").waiting == 2
    assert broker.history.topic_info("q").next_index == 2  # type: ignore[union-attr]
    reply, _ = broker.publish_batch(Batch("q", ("c", "d"), "one", ack=True))
    assert json.loads(reply) == {"success": True, "index": 2, "count": 2}


def test_a_batch_has_consecutive_indexes_and_is_delivered_in_order() -> None:
    broker = make_broker()
    sub = Fake()
    broker.subscribe(sub, "t")
    broker.publish(parse_line(b'{"command":"send","topic":"t","msg":"x","delivery":"all"}'))  # type: ignore[arg-type]
    reply, recorded = broker.publish_batch(Batch("t", ("a", "b", "c"), "all", cache=False))
    assert json.loads(reply) == {"success": True, "index": 1, "count": 3}
    assert recorded == 3
    assert sub.objects[1:] == [
        {"command": "send", "topic": "t", "msg": m, "delivery": "all", "cache": False,
         "index": i} for i, m in ((1, "a"), (2, "b"), (3, "c"))
    ]


def test_a_batch_beyond_max_topics_changes_nothing() -> None:
    broker = make_broker(max_topics=1)
    publish(broker, "q", "a")
    with pytest.raises(TooManyTopics):
        broker.publish_batch(Batch("new", ("a", "b"), "all"))
    assert not broker.history.has("new")


def test_a_repeated_id_gets_the_original_reply_and_is_not_delivered_again() -> None:
    clock = Clock()
    broker = make_broker(clock, dedupe_window=10.0)
    sub = Fake()
    consume(broker, sub, "q", prefetch=10)
    reply, first = broker.publish_ex(job("q", "a", id="k1"))
    assert json.loads(reply) == {"success": True, "index": first}
    reply, again = broker.publish_ex(job("q", "a", id="k1"))
    assert json.loads(reply) == {"success": True, "index": first, "duplicate": True}
    assert again == -1  # nothing recorded
    assert len(sub.objects) == 1
    # another topic, another id space
    _, other = broker.publish_ex(job("r", "a", id="k1"))
    assert other == 0
    clock.now = 10.0  # the window is over: a new message
    _, later = broker.publish_ex(job("q", "a", id="k1"))
    assert isinstance(first, int) and later == first + 1
    assert len(sub.objects) == 2


def test_a_repeated_batch_id_gets_the_original_batch_reply() -> None:
    broker = make_broker()
    reply, _ = broker.publish_batch(Batch("t", ("a", "b"), "all", id="b1"))
    again, recorded = broker.publish_batch(Batch("t", ("a", "b"), "all", id="b1"))
    assert json.loads(again) == {**json.loads(reply), "duplicate": True}
    assert recorded == -1
    assert broker.history.topic_info("t").next_index == 2  # type: ignore[union-attr]


def test_ids_beyond_the_bound_forget_the_oldest_early() -> None:
    broker = make_broker()
    broker.dedupe.max_ids = 3
    for i in range(4):
        broker.publish_ex(job("q", "x", id=f"id{i}"))
    assert len(broker.dedupe) == 3
    assert broker.dedupe.forgotten_early == 1
    _, recorded = broker.publish_ex(job("q", "x", id="id0"))  # forgotten: new again
    assert recorded == 4


def test_a_consumer_cut_off_by_its_own_delivery_gives_the_job_back() -> None:
    """The push of a job may overflow the consumer's outbox, which evicts it from the
    broker in the middle of the dispatch: the job goes to the next consumer."""
    broker = make_broker()

    class Overflowing(Fake):
        def push(self, payload: bytes) -> None:
            broker.evict(self)  # what Outbox overflow -> Connection._slow_consumer does

    bad, good = Overflowing("bad"), Fake("good")
    consume(broker, bad, "q")
    consume(broker, good, "q")
    publish(broker, "q", "a", "b")
    assert jobs_of(good) == [("a", 2)]  # its prefetch is 1: "b" waits
    info = broker.queue_info("q")
    assert (info.consumers, info.in_flight, info.waiting) == (1, 1, 1)


def test_acknowledged_jobs_leave_no_timers_behind() -> None:
    broker = make_broker(max_queue_jobs=100_000)
    sub = Fake()
    consume(broker, sub, "q", prefetch=3)
    for i in range(10_000):
        indexes = publish(broker, "q", f"m{i}", f"n{i}")
        for index in indexes:
            assert broker.jobs.ack(sub, "q", index)[0]
        sub.got.clear()
    assert not broker.jobs._deadlines and not broker.jobs._timers
    assert broker.jobs.total_jobs == 0 and broker.jobs.total_bytes == 0
    assert broker.jobs.next_timer() == float("inf")


def test_totals_outlive_an_idle_queue() -> None:
    broker = make_broker()
    sub = Fake()
    consume(broker, sub, "q")
    [a] = publish(broker, "q", "a")
    broker.jobs.ack(sub, "q", a)
    broker.unsubscribe(sub, "q")
    assert "q" not in broker.jobs.queues  # no jobs, no consumers: the queue is gone
    info = broker.queue_info("q")
    assert (info.delivered_total, info.acked_total, info.consumers) == (1, 1, 0)
    publish(broker, "q", "b")  # and it continues from them
    consume(broker, sub, "q")
    assert broker.queue_info("q").delivered_total == 2


def test_consumers_of_new_topics_count_toward_max_topics() -> None:
    broker = make_broker(max_topics=2)
    sub = Fake()
    consume(broker, sub, "a")
    consume(broker, sub, "b")
    assert broker.topic_count() == 2
    with pytest.raises(TooManyTopics):
        broker.consume(sub, "c", 1)
    assert "c" not in broker.jobs.queues
    broker.unsubscribe(sub, "a")  # its queue goes: the slot is free again
    assert broker.topic_count() == 1
    consume(broker, sub, "c")
    publish(broker, "c", "x")  # the topic gets history: still one slot
    assert broker.topic_count() == 2
    assert sorted(broker.topic_names()) == ["b", "c"]


def test_a_batch_is_one_push_per_subscriber() -> None:
    """A batch to many subscribers shares one outbox item: pushes grow with the
    subscribers, not with subscribers x messages (60 million pushes were a 10 s stall)."""
    broker = make_broker()

    class Counting(Fake):
        pushes = 0

        def push(self, payload: bytes) -> None:
            Counting.pushes += 1
            super().push(payload)

        def push_deferred(self, item: Any) -> None:
            Counting.pushes += 1
            super().push_deferred(item)

    subs = [Counting(str(i)) for i in range(50)]
    for sub in subs:
        broker.subscribe(sub, "t")
    broker.publish_batch(Batch("t", tuple(f"m{i}" for i in range(200)), "all"))
    assert Counting.pushes == 50
    for sub in subs:
        assert sub.indexes == list(range(200))
    assert broker.delivered == 50 * 200


def test_a_consumer_of_many_topics_leaves_in_steps() -> None:
    broker = make_broker(max_topics=10_000)
    sub, other = Fake(), Fake()
    for i in range(5_000):
        consume(broker, sub, f"q{i}")
    consume(broker, other, "q0")
    publish(broker, "q0", "a")
    assert broker.subscription_count(sub) == 5_000
    steps = list(broker.disconnect_steps(sub, 1_000))
    assert len(steps) == 5  # the caller yields to other tasks between them
    assert broker.subscription_count(sub) == 0
    assert jobs_of(other) == [("a", 2)]  # "a" went to sub first (its turn came first)
    assert broker.topic_count() == 1  # the other topics' queues went with it
