"""Unit tests of the topic supervisor: docs/protocol.md "Semantics", with fake subscribers."""

from __future__ import annotations

import json
import random
from typing import Any, Literal

import pytest
from support import Fake
from support import parsed_send as send

from mq_trio.broker import Broker, Item, MemoryHistory
from mq_trio.protocol import Send, encode_delivery


def make_broker(cache_size: int = 100, seed: int = 0) -> Broker:
    return Broker(MemoryHistory(cache_size), random=random.Random(seed))




def plain(items: list[Item]) -> list[bytes]:
    """A memory history's replay: plain bytes, never a deferred item."""
    out = []
    for item in items:
        assert isinstance(item, bytes), item
        out.append(item)
    return out


def replayed(payloads: list[Item]) -> list[int]:
    return [json.loads(p)["index"] for p in plain(payloads)]


def cached_indexes(broker: Broker, topic: str = "t") -> list[int]:
    history = broker.history
    assert isinstance(history, MemoryHistory)
    return [m.index for m in history.cached(topic)]


# --- send: indexes ----------------------------------------------------------------------


def test_index_per_topic_starts_at_zero() -> None:
    b = make_broker()
    assert [b.publish(send("a")) for _ in range(3)] == [0, 1, 2]
    assert [b.publish(send("b")) for _ in range(2)] == [0, 1]
    assert b.publish(send("a")) == 3
    assert b.publish(send("")) == 0


def test_every_send_consumes_an_index() -> None:
    b = make_broker(cache_size=0)
    s = Fake()
    assert b.publish(send(delivery="one", cache=False)) == 0  # dropped
    assert b.publish(send(cache=False)) == 1  # nobody, not cached
    assert b.publish(send(delivery="one")) == 2  # cache size 0: evicted at once
    b.subscribe(s, "t")
    assert b.publish(send(delivery="one")) == 3  # delivered
    assert b.publish(send()) == 4  # delivered and cached
    assert s.indexes == [3, 4]


def test_delivery_is_object_as_received_plus_index() -> None:
    b = make_broker()
    s = Fake()
    b.subscribe(s, "t")
    b.publish(send(msg="x", cache=False))
    b.publish(send(msg="y", cache=True, delivery="one"))
    b.publish(send(msg="z"))
    assert s.objects == [
        {"command": "send", "topic": "t", "msg": "x", "delivery": "all", "cache": False,
         "index": 0},
        {"command": "send", "topic": "t", "msg": "y", "delivery": "one", "cache": True,
         "index": 1},
        {"command": "send", "topic": "t", "msg": "z", "delivery": "all", "index": 2},
    ]


# --- send all ---------------------------------------------------------------------------


def test_all_reaches_every_subscriber_including_sender_and_only_that_topic() -> None:
    b = make_broker()
    subs = [Fake(str(i)) for i in range(5)]
    other = Fake("other")
    for s in subs:
        b.subscribe(s, "t")
    b.subscribe(other, "u")
    b.publish(send(msg="hello"))
    for s in subs:
        assert s.msgs == ["hello"]
    assert other.got == []


def test_all_encoded_once_same_bytes_for_everyone() -> None:
    b = make_broker()
    subs = [Fake() for _ in range(3)]
    for s in subs:
        b.subscribe(s, "t")
    b.publish(send())
    assert subs[0].got[0] is subs[1].got[0] is subs[2].got[0]


def test_all_is_cached_unless_cache_false() -> None:
    b = make_broker()
    b.publish(send(msg="a"))
    b.publish(send(msg="b", cache=False))
    b.publish(send(msg="c", cache=True))
    assert cached_indexes(b) == [0, 2]
    s = Fake()
    assert [json.loads(p)["msg"] for p in plain(b.subscribe(s, "t"))] == ["a", "c"]


@pytest.mark.parametrize("size", [0, 1, 3, 100])
def test_cache_eviction_at_configured_size(size: int) -> None:
    b = make_broker(cache_size=size)
    for _ in range(size + 5):
        b.publish(send())
    expected = list(range(5, size + 5))
    assert cached_indexes(b) == expected
    assert replayed(b.subscribe(Fake(), "t")) == expected


def test_cache_is_per_topic() -> None:
    b = make_broker(cache_size=2)
    for t in "abab":
        b.publish(send(t, msg=t))
    b.publish(send("a"))
    assert cached_indexes(b, "a") == [1, 2]
    assert cached_indexes(b, "b") == [0, 1]


# --- send one ---------------------------------------------------------------------------


def test_one_delivered_to_exactly_one_and_never_cached() -> None:
    b = make_broker()
    subs = [Fake(str(i)) for i in range(4)]
    for s in subs:
        b.subscribe(s, "t")
    for i in range(50):
        b.publish(send(msg=str(i), delivery="one"))
        assert sum(len(s.got) for s in subs) == i + 1
    assert cached_indexes(b) == []
    assert sorted(i for s in subs for i in s.indexes) == list(range(50))


def test_one_with_single_subscriber_goes_to_it() -> None:
    b = make_broker()
    s = Fake()
    b.subscribe(s, "t")
    b.publish(send(delivery="one", cache=True))
    assert s.indexes == [0]
    assert cached_indexes(b) == []


def test_one_without_subscriber_is_cached_or_dropped() -> None:
    b = make_broker()
    b.publish(send(msg="kept", delivery="one"))
    b.publish(send(msg="dropped", delivery="one", cache=False))
    b.publish(send(msg="kept too", delivery="one", cache=True))
    assert cached_indexes(b) == [0, 2]


def test_one_is_uniformly_random() -> None:
    b = make_broker(seed=1234)
    subs = [Fake(str(i)) for i in range(4)]
    for s in subs:
        b.subscribe(s, "t")
    n = 4000
    for _ in range(n):
        b.publish(send(delivery="one"))
    counts = [len(s.got) for s in subs]
    assert sum(counts) == n
    # expected 1000 each, sd ~27: +-150 is > 5 sd yet catches any real bias
    assert all(850 <= c <= 1150 for c in counts), counts


def test_one_is_random_by_default_too() -> None:
    b = Broker(MemoryHistory(10))
    subs = [Fake(), Fake()]
    for s in subs:
        b.subscribe(s, "t")
    for _ in range(400):
        b.publish(send(delivery="one"))
    assert all(100 <= len(s.got) <= 300 for s in subs)


# --- subscribe ----------------------------------------------------------------------------


def test_subscribe_replays_cache_in_index_order() -> None:
    b = make_broker()
    for i in range(5):
        b.publish(send(msg=str(i)))
    s = Fake()
    assert replayed(b.subscribe(s, "t")) == [0, 1, 2, 3, 4]
    assert s.got == []  # replay is returned, to be sent after the success reply


@pytest.mark.parametrize(
    "last_seen, expected",
    [(-1, [0, 1, 2, 3, 4]), (-100, [0, 1, 2, 3, 4]), (0, [1, 2, 3, 4]), (2, [3, 4]),
     (4, []), (99, []), (10**50, []), (-(10**50), [0, 1, 2, 3, 4])],
)
def test_last_seen_filters_replay(last_seen: int, expected: list[int]) -> None:
    b = make_broker()
    for _ in range(5):
        b.publish(send())
    assert replayed(b.subscribe(Fake(), "t", last_seen)) == expected
    assert cached_indexes(b) == [0, 1, 2, 3, 4]


def test_last_seen_filters_after_eviction() -> None:
    b = make_broker(cache_size=3)
    for _ in range(6):
        b.publish(send())
    assert replayed(b.subscribe(Fake(), "t", 1)) == [3, 4, 5]
    assert replayed(b.subscribe(Fake(), "t", 4)) == [5]


def test_one_removed_from_cache_once_replayed_all_kept() -> None:
    b = make_broker()
    b.publish(send(msg="a0"))
    b.publish(send(msg="o1", delivery="one"))
    b.publish(send(msg="a2"))
    b.publish(send(msg="o3", delivery="one"))
    first = b.subscribe(Fake(), "t")
    assert replayed(first) == [0, 1, 2, 3]
    assert cached_indexes(b) == [0, 2]
    assert replayed(b.subscribe(Fake(), "t")) == [0, 2]


def test_one_with_index_at_or_below_last_seen_is_kept() -> None:
    b = make_broker()
    for i in range(4):
        b.publish(send(msg=str(i), delivery="one"))
    assert replayed(b.subscribe(Fake(), "t", last_seen=1)) == [2, 3]
    assert cached_indexes(b) == [0, 1]
    assert replayed(b.subscribe(Fake(), "t")) == [0, 1]
    assert cached_indexes(b) == []


def test_one_removal_keeps_the_cache_bound() -> None:
    b = make_broker(cache_size=3)
    b.publish(send(delivery="one"))
    b.subscribe(Fake(), "t")
    b.unsubscribe(Fake(), "t")
    b.disconnect(Fake())
    for _ in range(5):
        b.publish(send("u"))
    s = Fake()
    b.subscribe(s, "t")
    b.unsubscribe(s, "t")
    for _ in range(5):
        b.publish(send())
    assert cached_indexes(b) == [3, 4, 5]


def test_subscribe_cache_false_neither_sends_nor_changes_cache() -> None:
    b = make_broker()
    b.publish(send())
    b.publish(send(delivery="one"))
    assert b.subscribe(Fake(), "t", cache=False) == []
    assert b.subscribe(Fake(), "t", last_seen=-1, cache=False) == []
    assert cached_indexes(b) == [0, 1]


def test_subscribe_cache_false_still_subscribes() -> None:
    b = make_broker()
    s = Fake()
    b.subscribe(s, "t", cache=False)
    b.publish(send())
    assert s.indexes == [0]


def test_subscribe_twice_is_once() -> None:
    b = make_broker()
    s = Fake()
    b.subscribe(s, "t")
    b.publish(send())
    assert replayed(b.subscribe(s, "t")) == [0]  # replays again, as asked
    b.publish(send())
    assert s.indexes == [0, 1]  # but delivered once
    assert b.subscribers("t") == [s]
    b.unsubscribe(s, "t")
    b.publish(send())
    assert s.indexes == [0, 1]  # one unsubscribe undoes both


def test_subscribe_twice_is_one_candidate_for_one() -> None:
    b = make_broker()
    a, c = Fake(), Fake()
    b.subscribe(a, "t")
    b.subscribe(a, "t")
    b.subscribe(a, "t")
    b.subscribe(c, "t")
    for _ in range(400):
        b.publish(send(delivery="one"))
    assert 100 <= len(c.got) <= 300


def test_cached_one_replayed_to_exactly_one_subscriber() -> None:
    b = make_broker()
    b.publish(send(delivery="one"))
    assert replayed(b.subscribe(Fake(), "t")) == [0]
    assert replayed(b.subscribe(Fake(), "t")) == []


# --- unsubscribe and disconnect --------------------------------------------------------


def test_unsubscribe_stops_deliveries() -> None:
    b = make_broker()
    s, other = Fake(), Fake()
    b.subscribe(s, "t")
    b.subscribe(s, "u")
    b.subscribe(other, "t")
    b.unsubscribe(s, "t")
    b.publish(send("t"))
    b.publish(send("u"))
    assert s.objects[0]["topic"] == "u" and len(s.got) == 1
    assert other.indexes == [0]
    assert b.topics_of(s) == {"u"}


def test_unsubscribe_when_not_subscribed_is_fine() -> None:
    b = make_broker()
    s = Fake()
    b.unsubscribe(s, "t")  # never subscribed anywhere
    b.subscribe(s, "u")
    b.unsubscribe(s, "t")  # subscribed elsewhere
    b.unsubscribe(s, "u")
    b.unsubscribe(s, "u")  # twice
    b.disconnect(s)
    b.disconnect(s)
    assert b.topics_of(s) == set()
    assert b.subscribers("u") == []


def test_unsubscribed_one_goes_to_cache_again() -> None:
    b = make_broker()
    s = Fake()
    b.subscribe(s, "t")
    b.unsubscribe(s, "t")
    b.publish(send(delivery="one"))
    assert s.got == []
    assert cached_indexes(b) == [0]


def test_disconnect_removes_all_subscriptions_but_not_history() -> None:
    b = make_broker()
    s, stay = Fake(), Fake()
    for t in ("a", "b", "c"):
        b.subscribe(s, t)
        b.publish(send(t))
    b.subscribe(stay, "a")
    b.disconnect(s)
    assert b.topics_of(s) == set()
    assert b.subscribers("b") == [] and b.subscribers("a") == [stay]
    for t in ("a", "b", "c"):
        assert b.publish(send(t)) == 1  # indexes go on
    assert s.indexes == [0, 0, 0]  # one per topic before the disconnect, none after
    assert cached_indexes(b, "a") == [0, 1]
    assert stay.indexes == [1]


# --- ordering ----------------------------------------------------------------------------


def test_each_subscriber_sees_increasing_indexes() -> None:
    """Replay then live deliveries, across both kinds and evictions: strictly increasing."""
    rng = random.Random(7)
    b = make_broker(cache_size=5)
    subs: list[Fake] = []
    for step in range(600):
        if step % 60 == 0:
            s = Fake(str(step))
            s.got.extend(plain(b.subscribe(s, "a", rng.randint(-1, step // 3))))
            s.got.extend(plain(b.subscribe(s, "b", rng.randint(-1, step // 3))))
            subs.append(s)
        b.publish(send(rng.choice("ab"), delivery=rng.choice(["all", "one"]),
                       cache=rng.choice([None, True, False])))
    for s in subs:
        assert s.got
        for t in "ab":
            idx = [o["index"] for o in s.objects if o["topic"] == t]
            assert idx == sorted(set(idx))


def test_evict_during_fanout_is_safe_and_immediate() -> None:
    """A subscriber cut off while a message is being fanned out (a slow consumer)."""
    b = make_broker()

    class Evicting(Fake):
        def push(self, payload: bytes) -> None:
            super().push(payload)
            b.evict(self)

    subs = [Fake("a"), Evicting("x"), Fake("b"), Fake("c")]
    for s in subs:
        b.subscribe(s, "t")
        b.subscribe(s, "u")
    b.publish(send())  # no "dictionary changed size during iteration"
    assert [len(s.got) for s in subs] == [1, 1, 1, 1]
    assert subs[1] not in b.subscribers("t") and b.subscribers("u") == [subs[0], *subs[2:]]
    assert b.topics_of(subs[1]) == set()
    for _ in range(50):
        b.publish(send(delivery="one"))
    assert len(subs[1].got) == 1
    b.disconnect(subs[1])  # the connection's own cleanup afterwards is a no-op
    assert len(b.subscribers("t")) == 3


# --- against a reference: the straightforward eager implementation ----------------------


class Reference:
    """The broker's rules written plainly: encode at publish, cache the delivered bytes.

    MemoryHistory encodes a cached message only when it is first replayed; nothing of that
    may show: the same indexes, deliveries, replays, caches and ``recovered`` answers.
    """

    def __init__(self, cache_size: int, seed: int) -> None:
        self.cache_size = cache_size
        self.random = random.Random(seed)
        self.subs: dict[str, dict[Any, None]] = {}
        self.next: dict[str, int] = {}
        self.cache: dict[str, list[tuple[int, bool, bytes]]] = {}
        self.evicted: dict[str, int] = {}

    def _cache(self, topic: str, index: int, one: bool, payload: bytes) -> None:
        cache = self.cache.setdefault(topic, [])
        cache.append((index, one, payload))
        if len(cache) > self.cache_size:
            self.evicted[topic] = cache.pop(0)[0]

    def publish(self, s: Send) -> int:
        index = self.next.get(s.topic, 0)
        self.next[s.topic] = index + 1
        payload = encode_delivery(s, index)
        subs = list(self.subs.get(s.topic, ()))
        if s.delivery == "all":
            for sub in subs:
                sub.push(payload)
            if s.cache:
                self._cache(s.topic, index, False, payload)
        elif subs:
            self.random.choice(subs).push(payload)
        elif s.cache:
            self._cache(s.topic, index, True, payload)
        return index

    def subscribe(self, sub: Any, topic: str, last_seen: int, cache: bool) -> list[bytes]:
        self.subs.setdefault(topic, {})[sub] = None
        if not cache:
            return []
        cached = self.cache.get(topic, [])
        sent = [p for i, _, p in cached if i > last_seen]
        self.cache[topic] = [(i, o, p) for i, o, p in cached if not (o and i > last_seen)]
        return sent

    def unsubscribe(self, sub: Any, topic: str) -> None:
        self.subs.get(topic, {}).pop(sub, None)

    def recovered(self, topic: str, last_seen: int) -> bool:
        return self.evicted.get(topic, -1) <= max(last_seen, -1) < self.next.get(topic, 0)


@pytest.mark.parametrize("cache_size", [0, 1, 3, 10])
def test_matches_the_eager_reference(cache_size: int) -> None:
    rng = random.Random(cache_size)
    b = make_broker(cache_size, seed=7)
    ref = Reference(cache_size, seed=7)
    history = b.history
    assert isinstance(history, MemoryHistory)
    ours = [Fake(str(i)) for i in range(3)]
    theirs = [Fake(str(i)) for i in range(3)]
    topics = ["a", "b"]
    for step in range(3000):
        r = rng.random()
        topic = rng.choice(topics)
        if r < 0.6:
            code_built = rng.random() < 0.1  # no raw: encoded at once, not lazily
            delivery: Literal["all", "one"] = rng.choice(["all", "one"])
            cache = rng.choice([None, True, False])
            s = (Send(topic, str(step), delivery, cache is not False) if code_built
                 else send(topic, str(step), delivery, cache))
            assert b.publish(s) == ref.publish(s)
        elif r < 0.8:
            i = rng.randrange(3)
            last_seen = rng.randint(-2, step)
            cache_flag = rng.random() < 0.9
            got = b.subscribe(ours[i], topic, last_seen, cache_flag)
            assert got == ref.subscribe(theirs[i], topic, last_seen, cache_flag)
        elif r < 0.95:
            i = rng.randrange(3)
            b.unsubscribe(ours[i], topic)
            ref.unsubscribe(theirs[i], topic)
        else:
            last_seen = rng.randint(-2, step)
            assert history.recovered(topic, last_seen) == ref.recovered(topic, last_seen)
        for topic in topics:
            assert [(m.index, m.one, m.payload) for m in history.cached(topic)] == (
                ref.cache.get(topic, [])
            )
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.got == reference.got


def test_replayed_messages_are_encoded_once_and_shared() -> None:
    b = make_broker()
    for i in range(3):
        b.publish(send(msg=str(i)))
    first = b.subscribe(Fake(), "t")
    second = b.subscribe(Fake(), "t", last_seen=0)
    assert replayed(first) == [0, 1, 2]
    assert second[0] is first[1] and second[1] is first[2]
