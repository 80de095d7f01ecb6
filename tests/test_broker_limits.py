"""Issue #11, broker side: --max-topics, --max-cache-bytes (MemoryHistory), cutting off
many slow subscribers at once (Broker.evict), and the stepped disconnect."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from support import Fake
from support import parsed_send as send

from mq_trio.broker import Broker, MemoryHistory, TooManyTopics
from mq_trio.broker._memory import ENTRY_OVERHEAD
from mq_trio.protocol import Send, encode_delivery, splice_index


def indexes(payloads: list[Any]) -> list[int]:
    return [json.loads(p)["index"] for p in payloads]


# --- max_topics ---------------------------------------------------------------------------


def test_publish_beyond_max_topics_raises_and_changes_nothing() -> None:
    b = Broker(MemoryHistory(10), max_topics=3)
    for t in "abc":
        assert b.publish(send(t)) == 0
    assert b.topic_count() == 3
    with pytest.raises(TooManyTopics):
        b.publish(send("d"))
    with pytest.raises(TooManyTopics):
        b.publish(send("d", delivery="one"))
    assert not b.history.has("d") and b.topic_count() == 3
    # existing topics go on, with their own indexes; the refused topic consumed none
    assert b.publish(send("a")) == 1
    assert b.publish(send("c", delivery="one")) == 1
    with pytest.raises(TooManyTopics):
        b.publish(send("d"))
    assert b.history.cached("d") == []


def test_subscribe_beyond_max_topics_raises_and_adds_nothing() -> None:
    b = Broker(MemoryHistory(10), max_topics=2)
    s = Fake()
    b.subscribe(s, "a")
    b.publish(send("b"))
    with pytest.raises(TooManyTopics):
        b.subscribe(s, "c")
    assert b.topics_of(s) == {"a"} and b.subscribers("c") == []
    assert b.subscription_count(s) == 1 and b.topic_count() == 2
    # subscribing to existing topics (with or without history) is still fine
    b.subscribe(Fake(), "a")
    b.subscribe(s, "b")
    assert b.topics_of(s) == {"a", "b"}


def test_subscribed_topic_counts_and_its_first_publish_needs_no_room() -> None:
    b = Broker(MemoryHistory(10), max_topics=2)
    s = Fake()
    b.subscribe(s, "a")
    b.subscribe(s, "b")
    assert b.topic_count() == 2 and not b.history.has("a")
    with pytest.raises(TooManyTopics):
        b.publish(send("c"))
    assert b.publish(send("a")) == 0  # already counted: it gets history, same count
    assert b.topic_count() == 2 and b.history.has("a")
    assert indexes(s.got) == [0]


def test_last_unsubscribe_frees_a_topic_without_history_only() -> None:
    b = Broker(MemoryHistory(10), max_topics=2)
    s, r = Fake("s"), Fake("r")
    b.subscribe(s, "a")
    b.subscribe(r, "a")
    b.subscribe(s, "h")
    b.publish(send("h"))
    b.unsubscribe(s, "a")
    with pytest.raises(TooManyTopics):
        b.subscribe(s, "x")  # "a" still has r
    b.unsubscribe(r, "a")
    assert b.topic_count() == 1
    b.subscribe(s, "x")  # the slot of "a" is free
    b.unsubscribe(s, "h")
    assert b.topic_count() == 2  # "h" has history: never forgotten (its next index is 1)
    with pytest.raises(TooManyTopics):
        b.publish(send("y"))
    b.subscribe(r, "h")
    assert b.publish(send("h")) == 1 and indexes(r.got) == [1]


def test_disconnect_and_evict_free_topics_without_history() -> None:
    b = Broker(MemoryHistory(10), max_topics=4)
    s, r = Fake("s"), Fake("r")
    for t in "ab":
        b.subscribe(s, t)
    for t in "cd":
        b.subscribe(r, t)
    b.publish(send("b"))
    assert b.topic_count() == 4
    b.disconnect(s)
    assert b.topic_count() == 3  # "a" gone, "b" kept (history)
    b.evict(r)
    assert b.topic_count() == 1
    for t in "xyz":
        b.subscribe(s, t)
    with pytest.raises(TooManyTopics):
        b.publish(send("w"))


def test_topics_the_broker_never_saw_count_through_the_history() -> None:
    """A history with topics already (a durable one after a restart)."""
    h = MemoryHistory(10)
    for t in "ab":
        h.record(t, send(t), False, True)
    b = Broker(h, max_topics=3)
    assert b.topic_count() == 2
    assert b.publish(send("a")) == 1  # known to the history: no room needed
    s = Fake()
    assert indexes(b.subscribe(s, "b")) == [0]
    b.unsubscribe(s, "b")
    b.subscribe(s, "c")
    with pytest.raises(TooManyTopics):
        b.subscribe(s, "d")
    with pytest.raises(TooManyTopics):
        b.publish(send("d"))
    assert b.publish(send("b")) == 1


def test_random_operations_keep_the_topic_count_exact() -> None:
    rng = random.Random(11)
    b = Broker(MemoryHistory(3), max_topics=6, random=random.Random(1))
    subs = [Fake(str(i)) for i in range(4)]
    names = [f"t{i}" for i in range(10)]
    published: set[str] = set()
    refused = 0
    for _ in range(3000):
        op = rng.random()
        topic = rng.choice(names)
        subscribed = {t for s in subs for t in b.topics_of(s)}
        before = published | subscribed
        room = topic in before or len(before) < 6
        try:
            if op < 0.4:
                b.publish(send(topic, delivery=rng.choice(["all", "one"])))
                published.add(topic)
            elif op < 0.7:
                b.subscribe(rng.choice(subs), topic, rng.randint(-1, 3))
            elif op < 0.9:
                b.unsubscribe(rng.choice(subs), topic)
            elif op < 0.95:
                b.evict(rng.choice(subs))
            else:
                b.disconnect(rng.choice(subs))
        except TooManyTopics:
            refused += 1
            assert not room
        else:
            assert room or op >= 0.7
        subscribed = {t for s in subs for t in b.topics_of(s)}
        assert b.topic_count() == len(published | subscribed) <= 6
        for t in names:
            assert set(b.subscribers(t)) == {s for s in subs if t in b.topics_of(s)}
    assert refused > 0


# --- max_cache_bytes ----------------------------------------------------------------------


def size_of(history: MemoryHistory) -> tuple[int, int]:
    """(bytes, messages) actually held in the caches of ``history``."""
    logs = history._topics.values()
    held = sum(len(e[2]) + ENTRY_OVERHEAD for log in logs for e in log.cache)
    return held, sum(len(x.cache) for x in logs)


def test_oldest_cached_messages_are_evicted_across_topics() -> None:
    line = send("a", msg="x" * 50)
    size = len(line.raw) + ENTRY_OVERHEAD
    h = MemoryHistory(100, max_cache_bytes=4 * size)
    b = Broker(h)
    for t in "abab":
        b.publish(send(t, msg="x" * 50))
    assert h.cached_bytes == 4 * size
    b.publish(send("c", msg="x" * 50))  # evicts a's index 0, the oldest of all
    assert [m.index for m in h.cached("a")] == [1]
    assert [m.index for m in h.cached("b")] == [0, 1]
    assert [m.index for m in h.cached("c")] == [0]
    assert h.cached_bytes == 4 * size
    assert b.subscribe_reply("a", -1, h.epoch) != b.subscribe_reply("b", -1, h.epoch)
    assert json.loads(b.subscribe_reply("a", -1, h.epoch))["recovered"] is False  # type: ignore[arg-type]
    assert json.loads(b.subscribe_reply("a", 0, h.epoch))["recovered"] is True  # type: ignore[arg-type]
    assert json.loads(b.subscribe_reply("b", -1, h.epoch))["recovered"] is True  # type: ignore[arg-type]
    wide = "x" * (50 + size * 3 // 2)  # between 2 and 3 of the others: evicts three
    b.publish(send("c", msg=wide))
    assert [m.index for m in h.cached("c")] == [0, 1] and h.cached("b") == []
    big = len(send("c", msg=wide).raw) + ENTRY_OVERHEAD
    assert h.cached("a") == [] and h.cached_bytes == size + big


class ReferenceCache:
    """The cache rules written plainly: one list of (seq, topic, index, one, data) in
    global order; the cache-size rule per topic, then the byte rule over all topics."""

    def __init__(self, cache_size: int, max_bytes: int) -> None:
        self.cache_size = cache_size
        self.max_bytes = max_bytes
        self.entries: list[list[Any]] = []
        self.next: dict[str, int] = {}
        self.evicted: dict[str, int] = {}

    def record(self, s: Send, one: bool, cached: bool) -> int:
        index = self.next.get(s.topic, 0)
        self.next[s.topic] = index + 1
        if not cached:
            return index
        mine = [e for e in self.entries if e[0] == s.topic]
        if len(mine) == self.cache_size:
            if not mine:
                self.evicted[s.topic] = index
                return index
            self.entries.remove(mine[0])
            self.evicted[s.topic] = mine[0][1]
        data = s.raw if s.raw else encode_delivery(s, index)
        self.entries.append([s.topic, index, one, data, not s.raw])
        self.limit()
        return index

    def replay(self, topic: str, last_seen: int) -> list[bytes]:
        out = []
        for e in [e for e in self.entries if e[0] == topic and e[1] > last_seen]:
            if not e[4]:
                e[3], e[4] = splice_index(e[3], e[1]), True
            out.append(e[3])
            if e[2]:
                self.entries.remove(e)
        self.limit()
        return out

    def limit(self) -> None:
        while self.size() > self.max_bytes:
            oldest = self.entries.pop(0)
            self.evicted[oldest[0]] = oldest[1]

    def size(self) -> int:
        return sum(len(e[3]) + ENTRY_OVERHEAD for e in self.entries)

    def cached(self, topic: str) -> list[int]:
        return [e[1] for e in self.entries if e[0] == topic]

    def recovered(self, topic: str, last_seen: int) -> bool:
        if topic not in self.next:
            return last_seen <= -1
        return self.evicted.get(topic, -1) <= max(last_seen, -1) < self.next[topic]


@pytest.mark.parametrize("seed", range(6))
def test_byte_accounting_is_exact_against_a_reference(seed: int) -> None:
    rng = random.Random(seed)
    cache_size = rng.choice([0, 1, 3, 8])
    max_bytes = rng.choice([100, 400, 1500]) + 4 * ENTRY_OVERHEAD
    h = MemoryHistory(cache_size, max_cache_bytes=max_bytes)
    ref = ReferenceCache(cache_size, max_bytes)
    for _ in range(1200):
        topic = rng.choice("abcd")
        if rng.random() < 0.75:
            s = send(topic, msg="x" * rng.randint(0, 120), delivery=rng.choice(["all", "one"]))
            if rng.random() < 0.1:  # built in code: encoded when recorded
                s = Send(s.topic, s.msg, s.delivery)
            one, cached = s.delivery == "one", rng.random() < 0.8
            assert h.record(topic, s, one, cached) == ref.record(s, one, cached)
        else:
            last_seen = rng.randint(-1, ref.next.get(topic, 0))
            assert h.replay(topic, last_seen) == ref.replay(topic, last_seen)
        held, count = size_of(h)
        assert (h.cached_bytes, h.cached_count) == (held, count)
        assert held == ref.size() <= max_bytes
        # one heap item per topic at most: the bookkeeping does not grow with traffic
        assert len(h._heads) <= 4  # (built at the first eviction)
        for t in "abcd":
            assert [m.index for m in h.cached(t)] == ref.cached(t)
            ahead = ref.next.get(t, 0)
            for last_seen in {-1, ahead - 1, ahead, rng.randint(-1, ahead)}:
                assert h.recovered(t, last_seen) == ref.recovered(t, last_seen)


def test_order_of_removed_messages_does_not_grow_without_bound() -> None:
    """Cached "one" messages replayed (taken) behind a message that stays: what records
    the global order stays one item per topic, and the bytes return to the one message
    left."""
    h = MemoryHistory(100, max_cache_bytes=1 << 30)
    h.record("t", send(msg="stay"), False, True)
    assert h._heads == []  # no heap until the bound is first reached
    h._evict_oldest()  # as when it is: the heap is built, and kept from then on
    for _ in range(20_000):
        h.record("t", send(msg="o", delivery="one"), True, True)
        assert len(h.replay("t", 0)) == 1
    assert len(h._heads) == 1
    assert h.cached_count == 1
    assert h.cached_bytes == len(send(msg="stay").raw) + ENTRY_OVERHEAD


# --- evict: many subscribers cut off during one fan-out -----------------------------------


class Counted(Fake):
    """Counts hashing: the work the broker's dicts do for this subscriber."""

    hashes = 0

    def __hash__(self) -> int:
        Counted.hashes += 1
        return id(self) >> 4


def test_many_evictions_in_one_fanout_are_safe_linear_and_final() -> None:
    n = 2000
    b = Broker(MemoryHistory(10), random=random.Random(3))

    class Slow(Counted):
        out = False

        def push(self, payload: bytes) -> None:
            super().push(payload)
            if not self.out:
                self.out = True
                b.evict(self)  # cut off by its own push
                victim = subs[(int(self.name) + 7) % n]  # and one further on, maybe
                if isinstance(victim, Slow) and not victim.out:
                    victim.out = True
                    b.evict(victim)

    subs: list[Fake] = [Slow(str(i)) if i % 3 else Counted(str(i)) for i in range(n)]
    for s in subs:
        b.subscribe(s, "t")
        b.subscribe(s, "u")
    Counted.hashes = 0
    b.publish(send("t"))  # no "dictionary changed size during iteration"
    assert Counted.hashes <= 4 * n  # one copy, one removal per subscription (was O(n^2))
    assert all(len(s.got) == 1 for s in subs)  # the fan-out finished, to everyone
    evicted = [s for s in subs if isinstance(s, Slow)]
    assert all(s.out for s in evicted)
    kept = [s for s in subs if not isinstance(s, Slow)]
    assert b.subscribers("t") == kept and b.subscribers("u") == kept
    for s in evicted:
        assert b.topics_of(s) == set()
    for i in range(300):
        topic = "tu"[i % 2]
        b.publish(send(topic, delivery="one"))
        b.publish(send(topic))
    assert all(len(s.got) == 1 for s in evicted)  # nothing more, and no "one" message
    assert sum(len(s.got) for s in kept) == len(kept) * 301 + 300


def test_evict_from_a_fanout_of_a_topics_first_publish() -> None:
    """Subscribers of a topic without history: the fan-out of its first publish."""
    b = Broker(MemoryHistory(10), max_topics=2)

    class Slow(Fake):
        def push(self, payload: bytes) -> None:
            super().push(payload)
            b.evict(self)

    subs = [Slow("0"), Fake("1"), Slow("2")]
    for s in subs:
        b.subscribe(s, "t")
    b.publish(send("t"))
    assert [len(s.got) for s in subs] == [1, 1, 1]
    assert b.subscribers("t") == [subs[1]] and b.topic_count() == 1
    b.unsubscribe(subs[1], "t")
    assert b.topic_count() == 1  # history now: kept
    b.publish(send("t"))
    assert [len(s.got) for s in subs] == [1, 1, 1]


# --- disconnect_steps ---------------------------------------------------------------------


@pytest.mark.parametrize(("count", "step"), [(0, 10), (5, 10), (10, 10), (2500, 1000), (99, 7)])
def test_disconnect_steps(count: int, step: int) -> None:
    b = Broker(MemoryHistory(10))
    s, other = Fake("s"), Fake("other")
    topics = [f"t{i}" for i in range(count)]
    for t in topics:
        b.subscribe(s, t)
        b.subscribe(other, t)
    for t in topics[::2]:
        b.publish(send(t))  # with history: stays a topic
    steps = b.disconnect_steps(s, step)
    yielded = 0
    for _ in steps:
        yielded += 1
        assert b.topics_of(s) == set() and b.subscription_count(s) == 0
        left = [t for t in topics if s in b.subscribers(t)]
        assert len(left) == count - yielded * step  # exactly one step's topics per step
        for t in topics:
            assert other in b.subscribers(t)
    assert yielded == count // step
    assert all(b.subscribers(t) == [other] for t in topics)
    assert b.topic_count() == count
    for _ in b.disconnect_steps(other, step):
        pass
    assert b.topic_count() == len(topics[::2])
    assert all(b.subscribers(t) == [] for t in topics)
