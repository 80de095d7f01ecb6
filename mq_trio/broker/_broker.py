"""The topic supervisor: the one owner of subscriptions, and of what history means.

Plain synchronous Python. It hands deliveries to subscribers' outboxes and never waits
for one, so a slow peer can never stall a topic. This is the only place the semantics of
docs/protocol.md ("Semantics") are written; histories behind the
:class:`~mq_trio.broker.TopicHistory` seam only store.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Protocol

import attrs

from ..protocol import STORAGE_UNAVAILABLE, SUCCESS, Send, encode_delivery, failure_bytes
from ._history import Deferred, EpochReply, Held, Item, Recorded, TopicHistory, epoch_reply
from ._memory import MemoryHistory

_STORAGE_UNAVAILABLE = failure_bytes(STORAGE_UNAVAILABLE)
DEFAULT_MAX_TOPICS = 1_000_000


def send_reply(recorded: int | Recorded) -> Item:
    """The sender's reply to a send: success once the message is as durable as it will
    be; ``Storage unavailable`` if its write failed."""
    if type(recorded) is int:
        return SUCCESS
    return Held(SUCCESS, recorded, _STORAGE_UNAVAILABLE)  # type: ignore[arg-type]


class Subscriber(Protocol):
    """Anything that takes deliveries without blocking (a connection's outbox)."""

    def push(self, payload: bytes) -> None:
        """Queue a delivery."""

    def push_deferred(self, item: Deferred) -> None:
        """Queue a delivery that may leave only once decided (see :class:`Deferred`)."""


@attrs.define(eq=False)
class Broker:
    """Subscriptions plus history; every method runs to completion without awaiting."""

    history: TopicHistory = attrs.field(factory=MemoryHistory)
    _subscribers: dict[str, dict[Subscriber, None]] = attrs.field(factory=dict)
    _topics_of: dict[Subscriber, set[str]] = attrs.field(factory=dict)
    _random: random.Random = attrs.field(factory=random.Random)
    #: Topics with state (history or subscribers); one more is ``TooManyTopics``.
    max_topics: int = attrs.field(default=DEFAULT_MAX_TOPICS, kw_only=True)

    @property
    def epoch(self) -> str:
        """The history's id for the epoch extension (docs/protocol.md)."""
        return self.history.epoch

    def subscribe(
        self, subscriber: Subscriber, topic: str, last_seen: int = -1, cache: bool = True
    ) -> list[Item]:
        """Add the subscription; return the cached deliveries to send after the reply."""
        subs = self._subscribers.get(topic)
        if subs is None:
            subs = self._subscribers[topic] = {}
        subs[subscriber] = None
        self._topics_of.setdefault(subscriber, set()).add(topic)
        if not cache:
            return []
        return self.history.replay(topic, last_seen)

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

    def disconnect_steps(self, subscriber: Subscriber, step: int = 1000) -> Iterator[None]:
        """``disconnect`` in steps of ``step`` topics: the caller yields to other tasks at
        each ``next`` (a client with a million subscriptions must not stall the rest).
        The subscriber leaves every topic at once in ``_topics_of``; its remaining
        entries in the topics' dicts may still get deliveries until their step."""
        topics = self._topics_of.pop(subscriber, ())
        drop = self._drop
        for n, topic in enumerate(topics, 1):
            drop(subscriber, topic)
            if n % step == 0:
                yield

    def subscription_count(self, subscriber: Subscriber) -> int:
        return len(self._topics_of.get(subscriber, ()))

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

    def publish(self, send: Send) -> int | Recorded:
        """Index, deliver and cache one message: its index, or (a history that writes
        later) a ticket carrying it, which deliveries wait for (:class:`Held`); the
        sender's reply is :func:`send_reply` of it."""
        topic = send.topic
        subs = self._subscribers.get(topic)
        if send.delivery == "all":
            recorded = self.history.record(topic, send, False, send.cache)
            if subs:
                if type(recorded) is int:
                    payload = encode_delivery(send, recorded)  # once, the same for all
                    # push never re-enters the broker: iterating the live dict is safe
                    for subscriber in subs:
                        subscriber.push(payload)
                else:
                    # (mypy does not narrow on ``type() is``, the cheaper test)
                    held = Held(encode_delivery(send, recorded.index), recorded)  # type: ignore[union-attr, arg-type]
                    for subscriber in subs:
                        subscriber.push_deferred(held)
        else:
            # "one": to a random subscriber, or cached for a later one if there is none
            recorded = self.history.record(topic, send, True, send.cache and not subs)
            if subs:
                chosen = self._random.choice(list(subs))
                if type(recorded) is int:
                    chosen.push(encode_delivery(send, recorded))
                else:
                    chosen.push_deferred(
                        Held(encode_delivery(send, recorded.index), recorded)  # type: ignore[union-attr, arg-type]
                    )
        return recorded

    def subscribe_reply(self, topic: str, last_seen: int, epoch: str) -> Item:
        """The reply to a subscribe that carries ``epoch`` (the epoch extension)."""
        mine = self.history.epoch
        if epoch != mine:
            return epoch_reply(mine, False)
        answer = self.history.recovered(topic, last_seen)
        if answer is True or answer is False:
            return epoch_reply(mine, answer)
        return EpochReply(mine, answer)

    # --- inspection (tests, metrics) ---

    def subscribers(self, topic: str) -> list[Subscriber]:
        return list(self._subscribers.get(topic, ()))

    def topics_of(self, subscriber: Subscriber) -> set[str]:
        return set(self._topics_of.get(subscriber, ()))
