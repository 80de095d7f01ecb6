"""The topic supervisor: the one owner of subscriptions, caches and indexes.

Plain synchronous Python. It hands encoded bytes to subscribers' outboxes and never waits
for one, so a slow peer can never stall a topic. History (indexes and caches) sits behind
the small :class:`TopicHistory` interface so that a durable or remote store can replace
the in-memory one without touching delivery.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import attrs

from .protocol import SUCCESS, Send, encode_delivery

DEFAULT_CACHE_SIZE = 100


class Subscriber(Protocol):
    """Anything that can take an encoded delivery without blocking (an outbox)."""

    def push(self, payload: bytes) -> None: ...


@attrs.frozen(slots=True)
class CachedMessage:
    index: int
    one: bool  # a "one" message goes to a single subscriber, so replay consumes it
    payload: bytes


class TopicHistory(Protocol):
    """Per-topic indexes and caches: what a durable or shared store must provide."""

    def next_index(self, topic: str) -> int:
        """Consume and return the topic's next index (never reused)."""

    def append(self, topic: str, message: CachedMessage) -> None:
        """Add to the topic's cache, evicting the oldest beyond the cache size."""

    def replay(self, topic: str, last_seen: int) -> list[CachedMessage]:
        """Cached messages with ``index > last_seen`` in order; "one" ones are removed."""

    def recovered(self, topic: str, last_seen: int) -> bool:
        """Whether nothing after ``last_seen`` was lost to the cache-size rule (epoch ext.)."""


def new_epoch() -> str:
    """A random id for a history; a new one whenever history may have been lost."""
    return uuid.uuid4().hex


@attrs.define
class MemoryHistory:
    """In-memory history: a bounded deque and a counter per topic."""

    cache_size: int = DEFAULT_CACHE_SIZE
    _caches: dict[str, deque[CachedMessage]] = attrs.field(factory=dict)
    _indexes: dict[str, int] = attrs.field(factory=dict)
    #: Per topic, the highest index the cache-size rule dropped (for the epoch extension).
    _evicted: dict[str, int] = attrs.field(factory=dict)

    def next_index(self, topic: str) -> int:
        index = self._indexes.get(topic, 0)
        self._indexes[topic] = index + 1
        return index

    def append(self, topic: str, message: CachedMessage) -> None:
        cache = self._caches.get(topic)
        if cache is None:
            cache = self._caches[topic] = deque(maxlen=self.cache_size)
        if len(cache) == self.cache_size:
            self._evicted[topic] = cache[0].index if cache else message.index
        cache.append(message)

    def replay(self, topic: str, last_seen: int) -> list[CachedMessage]:
        cache = self._caches.get(topic)
        if not cache:
            return []
        if last_seen < 0:
            sent = list(cache)
        else:
            sent = [m for m in cache if m.index > last_seen]
        if any(m.one for m in sent):
            self._caches[topic] = deque(
                (m for m in cache if not (m.one and m.index > last_seen)),
                maxlen=self.cache_size,
            )
        return sent

    def recovered(self, topic: str, last_seen: int) -> bool:
        return self._evicted.get(topic, -1) <= max(last_seen, -1) < self._indexes.get(topic, 0)

    def cached(self, topic: str) -> list[CachedMessage]:
        """A copy of the topic's cache, for inspection and tests."""
        return list(self._caches.get(topic, ()))


@attrs.define(eq=False)
class Broker:
    """Subscriptions plus history; every method runs to completion without awaiting."""

    history: TopicHistory = attrs.field(factory=MemoryHistory)
    _subscribers: dict[str, dict[Subscriber, None]] = attrs.field(factory=dict)
    _topics_of: dict[Subscriber, set[str]] = attrs.field(factory=dict)
    _random: random.Random = attrs.field(factory=random.Random)
    #: The history's id for the epoch extension (docs/protocol.md).
    epoch: str = attrs.field(factory=new_epoch, kw_only=True)
    #: What the sender gets once ``publish`` returns; a durable broker sets a reply that
    #: waits for the store (mq_trio.store.Pending).
    send_reply: bytes = attrs.field(default=SUCCESS, init=False)

    def subscribe(
        self, subscriber: Subscriber, topic: str, last_seen: int = -1, cache: bool = True
    ) -> list[bytes]:
        """Add the subscription; return the cached deliveries to send after the reply."""
        subs = self._subscribers.get(topic)
        if subs is None:
            subs = self._subscribers[topic] = {}
        subs[subscriber] = None
        self._topics_of.setdefault(subscriber, set()).add(topic)
        if not cache:
            return []
        return [m.payload for m in self.history.replay(topic, last_seen)]

    def unsubscribe(self, subscriber: Subscriber, topic: str) -> None:
        topics = self._topics_of.get(subscriber)
        if topics is None or topic not in topics:
            return
        topics.discard(topic)
        self._drop(subscriber, topic)

    def disconnect(self, subscriber: Subscriber) -> None:
        """Remove every subscription of a departing connection."""
        for topic in self._topics_of.pop(subscriber, ()):
            self._drop(subscriber, topic)

    def evict(self, subscriber: Subscriber) -> None:
        """Remove every subscription now, even from inside a fan-out to this subscriber
        (a slow consumer cut off mid-publish): the topics' subscriber dicts are replaced,
        not mutated, so a fan-out in progress finishes over the old one. O(subscribers),
        which is fine for a rare event; ``disconnect`` stays O(1) per topic."""
        for topic in self._topics_of.pop(subscriber, ()):
            rest = {s: None for s in self._subscribers[topic] if s is not subscriber}
            if rest:
                self._subscribers[topic] = rest
            else:
                del self._subscribers[topic]

    def _drop(self, subscriber: Subscriber, topic: str) -> None:
        subs = self._subscribers[topic]
        del subs[subscriber]
        if not subs:
            del self._subscribers[topic]

    def publish(self, send: Send) -> int:
        """Index, deliver and cache one message; return its index."""
        topic = send.topic
        index = self.history.next_index(topic)
        payload = encode_delivery(send, index)
        subs = self._subscribers.get(topic)
        if send.delivery == "all":
            if subs:
                # push never re-enters the broker, so iterating the live dict is safe
                for subscriber in subs:
                    subscriber.push(payload)
            if send.cache:
                self.history.append(topic, CachedMessage(index, False, payload))
        elif subs:
            self._random.choice(list(subs)).push(payload)
        elif send.cache:
            self.history.append(topic, CachedMessage(index, True, payload))
        return index

    def subscribe_reply(self, topic: str, last_seen: int, epoch: str) -> bytes:
        """The reply to a subscribe that carries ``epoch`` (the epoch extension)."""
        recovered = epoch == self.epoch and self.history.recovered(topic, last_seen)
        return json.dumps({"success": True, "epoch": self.epoch, "recovered": recovered}).encode()

    @contextmanager
    def attached(self, subscriber: Subscriber) -> Iterator[Subscriber]:
        """Scope a connection's subscriptions: whatever ends the block releases them."""
        try:
            yield subscriber
        finally:
            self.disconnect(subscriber)

    # --- inspection (tests, metrics) ---

    def subscribers(self, topic: str) -> list[Subscriber]:
        return list(self._subscribers.get(topic, ()))

    def topics_of(self, subscriber: Subscriber) -> set[str]:
        return set(self._topics_of.get(subscriber, ()))
