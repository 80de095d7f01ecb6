"""The topic supervisor: the one owner of subscriptions, and of what history means.

Plain synchronous Python. It hands deliveries to subscribers' outboxes and never waits
for one, so a slow peer can never stall a topic. This is the only place the semantics of
docs/protocol.md ("Semantics") are written; histories behind the
:class:`~mq_trio.broker.TopicHistory` seam only store.
"""

from __future__ import annotations

import random
from typing import Protocol

import attrs

from ..protocol import STORAGE_UNAVAILABLE, SUCCESS, Send, encode_delivery, failure_bytes
from ._history import Deferred, EpochReply, Held, Item, TopicHistory, epoch_reply
from ._memory import MemoryHistory

_STORAGE_UNAVAILABLE = failure_bytes(STORAGE_UNAVAILABLE)


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

    def handle_send(self, send: Send) -> tuple[int, Item]:
        """Index, deliver and cache one message: (its index, the sender's reply).

        With a history that writes later, deliveries and the reply are :class:`Held`
        for its ticket: nothing that depends on the message leaves before it is decided.
        """
        topic = send.topic
        subs = self._subscribers.get(topic)
        if send.delivery == "all":
            index, ticket = self.history.record(topic, send, False, send.cache)
            if subs:
                payload = encode_delivery(send, index)  # once, the same bytes for all
                # push never re-enters the broker, so iterating the live dict is safe
                if ticket is None:
                    for subscriber in subs:
                        subscriber.push(payload)
                else:
                    held = Held(payload, ticket)
                    for subscriber in subs:
                        subscriber.push_deferred(held)
        else:
            # "one": to a random subscriber, or cached for a later one if there is none
            index, ticket = self.history.record(topic, send, True, send.cache and not subs)
            if subs:
                chosen = self._random.choice(list(subs))
                if ticket is None:
                    chosen.push(encode_delivery(send, index))
                else:
                    chosen.push_deferred(Held(encode_delivery(send, index), ticket))
        if ticket is None:
            return index, SUCCESS
        return index, Held(SUCCESS, ticket, _STORAGE_UNAVAILABLE)

    def publish(self, send: Send) -> int:
        """``handle_send`` for code that embeds the broker: the message's index."""
        return self.handle_send(send)[0]

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
