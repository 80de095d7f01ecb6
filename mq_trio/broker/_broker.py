"""The topic supervisor: the one owner of subscriptions, and of what history means.

Plain synchronous Python. It hands deliveries to subscribers' outboxes and never waits
for one, so a slow peer can never stall a topic. This is the only place the semantics of
docs/protocol.md ("Semantics") are written; histories behind the
:class:`~mq_trio.broker.TopicHistory` seam only store.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Collection, Iterator
from typing import Protocol

import attrs

from ..protocol import (
    QUEUE_FULL,
    STORAGE_UNAVAILABLE,
    SUCCESS,
    Batch,
    Send,
    SendEx,
    encode_command,
    encode_delivery,
    failure_bytes,
    index_reply,
)
from ._dedupe import Dedupe
from ._history import (
    Deferred,
    EpochReply,
    Held,
    HeldMany,
    Item,
    Recorded,
    TooManyTopics,
    TopicHistory,
    epoch_reply,
)
from ._jobs import (
    DEAD_PREFIX,
    JOB_OVERHEAD,
    Job,
    JobQueues,
    QueueFull,
    QueueInfo,
)
from ._memory import MemoryHistory
from ._shared import (
    Gate,
    SharedHistory,
    SharedTopics,
)
from ._shared_path import _NO_SUBS, SharedPath

log = logging.getLogger("mq_trio.broker")

_STORAGE_UNAVAILABLE = failure_bytes(STORAGE_UNAVAILABLE)
_QUEUE_FULL = failure_bytes(QUEUE_FULL)
DEFAULT_MAX_TOPICS = 1_000_000


def send_reply(recorded: int | Recorded | Gate) -> Item:
    """The sender's reply to a send: success once the message is as durable as it will
    be; ``Storage unavailable`` if its write failed. (A shared history's send is its
    own reply: a :class:`Gate`.)"""
    if type(recorded) is int:
        return SUCCESS
    if type(recorded) is Gate:
        return recorded
    global _last_reply
    held = _last_reply
    if held is None or held.ticket is not recorded:
        # A history may decide many sends with one ticket (a durable store: one per
        # commit): their replies are one shared item (an allocation less per send).
        held = _last_reply = Held(SUCCESS, recorded, _STORAGE_UNAVAILABLE)  # type: ignore[arg-type]
    return held


#: The reply ``send_reply`` made last (it is shared while the ticket is the same).
_last_reply: Held | None = None


class Subscriber(Protocol):
    """Anything that takes deliveries without blocking (a connection's outbox)."""

    def push(self, payload: bytes) -> None:
        """Queue a delivery."""

    def push_deferred(self, item: Deferred) -> None:
        """Queue a delivery that may leave only once decided (see :class:`Deferred`)."""


@attrs.define(eq=False)
class Broker(SharedPath):
    """Subscriptions plus history; every method runs to completion without awaiting.

    Topics, for ``max_topics``: those with state in the history (which never forgets a
    topic: an index must never be reused within an epoch) plus those with subscribers
    and no history yet. Unsubscribing the last subscriber of a topic without history
    frees its slot. The broker knows which is which without asking the history on the
    publish path: ``_subscribers`` holds every topic it has seen with history (with
    ``_NO_SUBS`` when none is subscribed), ``_unrecorded`` the subscribed topics without
    history; only a topic in neither costs a ``history.has`` and the count.
    """

    history: TopicHistory = attrs.field(factory=MemoryHistory)
    _subscribers: dict[str, dict[Subscriber, None]] = attrs.field(factory=dict)
    #: Topics with subscribers and no history (yet): each takes a slot of ``max_topics``.
    _unrecorded: dict[str, dict[Subscriber, None]] = attrs.field(factory=dict)
    _topics_of: dict[Subscriber, set[str]] = attrs.field(factory=dict)
    _random: random.Random = attrs.field(factory=random.Random)
    #: The subscriber dict the last fan-out iterated (maybe still does: a push can evict
    #: its own subscriber). ``_drop`` copies it once instead of mutating it.
    _fanout: dict[Subscriber, None] | None = None
    #: Bytes of "all" deliveries so far: a reader compares it before and after its
    #: commands to tell a wide fan-out (which then waits for write turns).
    fanned: int = attrs.field(default=0, init=False)
    #: Messages handed to subscribers' outboxes (metrics; replays not included).
    delivered: int = attrs.field(default=0, init=False)
    #: Topics with state (history or subscribers); one more is ``TooManyTopics``.
    max_topics: int = attrs.field(default=DEFAULT_MAX_TOPICS, kw_only=True)
    #: Acknowledged jobs (docs/protocol.md): queues, consumers, deadlines.
    jobs: JobQueues = attrs.field(init=False)
    #: Message ids of idempotent sends, per topic, for the dedupe window.
    dedupe: Dedupe = attrs.field(init=False, factory=Dedupe)
    #: Topics with consumers and no history yet: each takes a slot of ``max_topics``.
    _consumed_only: set[str] = attrs.field(init=False, factory=set)
    #: With a shared history (cluster): the gates and joins of docs/cluster.md.
    shared: SharedTopics | None = attrs.field(init=False, default=None)
    #: Topics with a ``take`` out to the shared history.
    _taking: set[str] = attrs.field(init=False, factory=set)
    _shared_history: SharedHistory | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        if getattr(self.history, "shared", False):
            history: SharedHistory = self.history  # type: ignore[assignment]
            self._shared_history = history
            self.shared = SharedTopics(history.node.encode(), self._random)
            history.attach(self)
        self.jobs = JobQueues(self.history, dead_letter=self._dead_letter,
                              keep_counts=not isinstance(self.history, MemoryHistory),
                              on_idle=self._consumed_only.discard,
                              on_unconsumed=self._unconsumed if self.shared else None)
        for stored in self.history.stored_jobs():  # a durable history's, after a restart
            self.jobs.add(stored.topic, stored.index, stored.base, None, stored.deliveries)
            self._subscribers.setdefault(stored.topic, _NO_SUBS)

    def configure_jobs(self, *, ack_timeout: float, max_deliveries: int, max_queue_jobs: int,
                       max_job_bytes: int, dedupe_window: float,
                       clock: Callable[[], float] | None = None) -> None:
        """The server's settings for jobs and ids (and trio's clock)."""
        jobs = self.jobs
        jobs.ack_timeout = ack_timeout
        jobs.max_deliveries = max_deliveries
        jobs.max_queue_jobs = max_queue_jobs
        jobs.max_job_bytes = max_job_bytes
        self.dedupe.window = dedupe_window
        if clock is not None:
            jobs.clock = clock
            self.dedupe.clock = clock
        for stored in self.history.stored_ids():  # a durable history's, after a restart
            self.dedupe.restore(stored.topic, stored.id, stored.reply, stored.remaining)

    @property
    def epoch(self) -> str:
        """The history's id for the epoch extension (docs/protocol.md)."""
        return self.history.epoch

    def topic_count(self) -> int:
        """Topics counted against ``max_topics``."""
        return self.history.topic_count() + len(self._unrecorded) + len(self._consumed_only)

    def _room(self) -> None:
        """Raise ``TooManyTopics`` unless one more topic fits (before any change)."""
        if self.topic_count() >= self.max_topics:
            raise TooManyTopics

    def _add_subscription(self, subscriber: Subscriber, topic: str
                          ) -> dict[Subscriber, None]:
        """The subscription, in place; the topic's subscribers. ``TooManyTopics``
        (nothing changed) if the topic is new and there is no room."""
        subs = self._subscribers.get(topic)
        if subs is None:
            subs = self._unrecorded.get(topic)
            if subs is None:
                if self.history.has(topic):
                    subs = self._subscribers[topic] = {}
                else:
                    self._room()
                    subs = self._unrecorded[topic] = {}
        elif subs is _NO_SUBS:
            subs = self._subscribers[topic] = {}
        subs[subscriber] = None
        self._topics_of.setdefault(subscriber, set()).add(topic)
        return subs

    def subscribe(
        self, subscriber: Subscriber, topic: str, last_seen: int = -1, cache: bool = True
    ) -> list[Item]:
        """Add the subscription; return the cached deliveries to send after the reply.
        ``TooManyTopics`` (nothing changed) if the topic is new and there is no room."""
        self._add_subscription(subscriber, topic)
        if not cache:
            return []
        return self.history.replay(topic, last_seen)

    def unsubscribe(self, subscriber: Subscriber, topic: str) -> None:
        self.jobs.unconsume(subscriber, topic)
        topics = self._topics_of.get(subscriber)
        if topics is None or topic not in topics:
            return
        topics.discard(topic)
        self._drop(subscriber, topic)

    def disconnect(self, subscriber: Subscriber) -> None:
        """Remove every subscription of a departing connection."""
        for topic in self._topics_of.pop(subscriber, ()):
            self._drop(subscriber, topic)
        self.jobs.disconnect(subscriber)

    def disconnect_steps(self, subscriber: Subscriber, step: int = 1000) -> Iterator[None]:
        """``disconnect`` in steps of ``step`` topics: the caller yields to other tasks at
        each ``next`` (a client with a million subscriptions must not stall the rest).
        The subscriber leaves every topic at once in ``_topics_of``; its remaining
        entries in the topics' dicts may still get deliveries until their step."""
        yield from self.jobs.disconnect_steps(subscriber, step)
        topics = self._topics_of.pop(subscriber, None)
        if not topics:
            return
        drop = self._drop
        n = 0
        # Popped one by one, not iterated: the set may hold the last reference to each
        # name, and freeing a million names when it goes was one stall of its own.
        while topics:
            drop(subscriber, topics.pop())
            n += 1
            if n % step == 0:
                yield

    def subscription_count(self, subscriber: Subscriber) -> int:
        """Subscriptions and consumers of the subscriber (what leaving releases)."""
        return len(self._topics_of.get(subscriber, ())) + self.jobs.consumer_count(subscriber)

    def evict(self, subscriber: Subscriber) -> None:
        """Remove every subscription now, even from inside a fan-out to this subscriber
        (a slow consumer cut off mid-publish): the fan-out in progress finishes over its
        dict, which ``_drop`` replaces by a copy once rather than mutating it. O(1) per
        subscription, so cutting off N subscribers of one fan-out is O(N) in all (it was
        a copy per eviction, O(N^2)). The fan-out in progress still pushes to the evicted
        subscribers after it in its dict (an outbox that cut off drops those); nothing
        later reaches them, and no "one" message is given to them. Jobs it held go back
        to their queues."""
        for topic in self._topics_of.pop(subscriber, ()):
            self._drop(subscriber, topic)
        self.jobs.disconnect(subscriber)

    def _drop(self, subscriber: Subscriber, topic: str) -> None:
        if self.shared is not None:
            self._shared_drop(subscriber, topic)
            return
        subs = self._subscribers.get(topic)
        if subs is not None:
            if subs is self._fanout:  # maybe being iterated: leave it to the fan-out
                self._fanout = None
                subs = self._subscribers[topic] = dict(subs)
            del subs[subscriber]
            if not subs:  # the topic has history: keep it known, for publish
                self._subscribers[topic] = _NO_SUBS
        else:
            subs = self._unrecorded[topic]
            if subs is self._fanout:  # (a topic's first publish is delivered from here)
                self._fanout = None
                subs = self._unrecorded[topic] = dict(subs)
            del subs[subscriber]
            if not subs:  # no history, no subscribers: the topic is gone
                del self._unrecorded[topic]

    def _new_topic(self, topic: str) -> dict[Subscriber, None]:
        """publish to a topic not in ``_subscribers``: it is about to have history."""
        if self._consumed_only:
            self._consumed_only.discard(topic)  # (its slot is now the history's)
        subs = self._unrecorded.pop(topic, None)
        if subs is None:
            if not self.history.has(topic):
                self._room()
            subs = _NO_SUBS
        self._subscribers[topic] = subs
        return subs

    def publish(self, send: Send) -> int | Recorded:
        """Index, deliver and cache one message: its index, or (a history that writes
        later) a ticket carrying it, which deliveries wait for (:class:`Held`); the
        sender's reply is :func:`send_reply` of it. ``TooManyTopics`` (nothing changed)
        if the topic is new and there is no room."""
        topic = send.topic
        subs = self._subscribers.get(topic)
        if subs is None:  # only a topic's first publish (or the first since a restart)
            subs = self._new_topic(topic)
        if send.delivery == "all":
            recorded = self.history.record(topic, send, False, send.cache)
            if subs:
                # a push may evict (a slow consumer): _drop then copies, not mutates
                self._fanout = subs
                self.delivered += len(subs)
                if type(recorded) is int:
                    payload = encode_delivery(send, recorded)  # once, the same for all
                    self.fanned += len(subs) * len(payload)
                    for subscriber in subs:
                        subscriber.push(payload)
                else:
                    # (mypy does not narrow on ``type() is``, the cheaper test)
                    held = Held(encode_delivery(send, recorded.index), recorded)  # type: ignore[union-attr, arg-type]
                    self.fanned += len(subs) * len(held)
                    for subscriber in subs:
                        subscriber.push_deferred(held)
        else:
            # "one": to a random subscriber, or cached for a later one if there is none
            recorded = self.history.record(topic, send, True, send.cache and not subs)
            if subs:
                self.delivered += 1
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

    # --- acknowledged jobs, batches, ids (docs/protocol.md, extensions) ---

    def _topic_room(self, topic: str) -> None:
        """``TooManyTopics`` unless ``topic`` exists or one more fits."""
        if (topic not in self._subscribers and topic not in self._unrecorded
                and not self.history.has(topic)):
            self._room()

    def consume(self, subscriber: Subscriber, topic: str, prefetch: int
                ) -> Callable[[], None]:
        """Make ``subscriber`` a consumer of the topic's jobs (``TooManyTopics`` if new
        and there is no room); returns what starts its deliveries, to call after the
        reply. With a shared history, the jobs come from it (``_feed``)."""
        if self.shared is not None:
            start = self.jobs.consume(subscriber, topic, prefetch)

            def start_shared() -> None:
                start()
                self._feed(topic)
            return start_shared
        if (topic not in self.jobs.queues and topic not in self._subscribers
                and topic not in self._unrecorded and not self.history.has(topic)):
            self._room()
            self._consumed_only.add(topic)  # until it has history, or no consumer
        return self.jobs.consume(subscriber, topic, prefetch)

    def _repeat(self, topic: str, message_id: str | None) -> tuple[bytes, int | Recorded] | None:
        """The original's reply for a repeated id (and its pending write, or -1)."""
        if message_id is None or not self.dedupe.enabled:
            return None
        seen = self.dedupe.lookup(topic, message_id)
        if seen is None:
            return None
        return seen.reply, seen.ticket if seen.ticket is not None else -1  # type: ignore[return-value]

    def _remember(self, topic: str, message_id: str | None, reply: bytes,
                  recorded: int | Recorded) -> None:
        if message_id is not None and self.dedupe.enabled:
            self.dedupe.remember(topic, message_id, reply,
                                 None if type(recorded) is int else recorded)  # type: ignore[arg-type]
            # (after the message's own write: the same transaction, never without it)
            self.history.remember_id(topic, message_id, reply, self.dedupe.window)

    def publish_ex(self, send: SendEx) -> tuple[bytes, int | Recorded]:
        """A send with extension keys (a job, an id): its reply (with the index, or the
        original's for a repeated id) and what it recorded (for a repeat: the original's
        pending write, or -1)."""
        if send.id is not None:
            repeat = self._repeat(send.topic, send.id)
            if repeat is not None:
                return repeat
        if send.ack:
            recorded = self._publish_job(send.topic, send.raw or encode_command(
                send.topic, send.msg, "one", send.cache, True))
        else:
            recorded = self.publish(send)
        index = recorded if type(recorded) is int else recorded.index  # type: ignore[union-attr]
        if send.id is not None:
            self._remember(send.topic, send.id, index_reply(index, duplicate=True), recorded)
        return index_reply(index), recorded

    def _publish_job(self, topic: str, base: bytes) -> int | Recorded:
        jobs = self.jobs
        # jobs.check_room(topic, 1, len(base)), written out (once per job)
        if jobs.total_bytes + len(base) + JOB_OVERHEAD > jobs.max_job_bytes:
            raise QueueFull
        queue = jobs.queues.get(topic)
        if queue is not None and len(queue.jobs) >= jobs.max_queue_jobs:
            raise QueueFull
        if topic not in self._subscribers:
            self._new_topic(topic)
        recorded = self.history.record_job(topic, base)
        if type(recorded) is int:
            jobs.add(topic, recorded, base)
        else:
            jobs.add(topic, recorded.index, base, recorded)  # type: ignore[union-attr, arg-type]
        return recorded

    def publish_batch(self, batch: Batch) -> tuple[bytes, int | Recorded]:
        """All of a batch's messages with consecutive indexes, or none (``QueueFull``,
        ``TooManyTopics`` before anything changed). The reply, and the last message's
        record: a history writes a batch in one transaction, so its ticket decides all."""
        topic = batch.topic
        repeat = self._repeat(topic, batch.id)
        if repeat is not None:
            return repeat
        self._topic_room(topic)
        indexes: list[int] = []
        recorded: int | Recorded = -1
        if batch.ack:
            bases = [encode_command(topic, m, "one", batch.cache, True) for m in batch.msgs]
            self.jobs.check_room(topic, len(bases), sum(map(len, bases)))
            for base in bases:
                recorded = self._publish_job(topic, base)
                indexes.append(recorded if type(recorded) is int else recorded.index)  # type: ignore[union-attr]
        elif batch.delivery == "all":
            recorded = self._publish_all_batch(batch, indexes)
        else:  # "one": each message to one subscriber, as sent alone
            for msg in batch.msgs:
                recorded = self.publish(Send(topic, msg, batch.delivery, batch.cache))
                indexes.append(recorded if type(recorded) is int else recorded.index)  # type: ignore[union-attr]
        count = len(indexes)
        self._remember(topic, batch.id, index_reply(indexes[0], count, True), recorded)
        return index_reply(indexes[0], count), recorded

    def _publish_all_batch(self, batch: Batch, indexes: list[int]) -> int | Recorded:
        """A batch to every subscriber: each message indexed and cached as if sent
        alone, and the deliveries pushed as one shared item per subscriber
        (``HeldMany``). Returns the last message's record."""
        topic = batch.topic
        subs = self._subscribers.get(topic)
        if subs is None:
            subs = self._new_topic(topic)
        record = self.history.record
        payloads: list[bytes] = []
        recorded: int | Recorded = -1
        for msg in batch.msgs:
            send = Send(topic, msg, "all", batch.cache)
            recorded = record(topic, send, False, batch.cache)
            index = recorded if type(recorded) is int else recorded.index  # type: ignore[union-attr]
            indexes.append(index)
            payloads.append(encode_delivery(send, index))
        if subs:
            size = sum(map(len, payloads))
            item = HeldMany(payloads, size,
                            None if type(recorded) is int else recorded)  # type: ignore[arg-type]
            self._fanout = subs  # a push may evict (a slow consumer): _drop copies
            self.fanned += len(subs) * size
            self.delivered += len(subs) * len(payloads)
            for subscriber in subs:
                subscriber.push_deferred(item)
        return recorded

    def _dead_letter(self, job: Job) -> None:
        """A job out of deliveries: a new job on its dead-letter topic."""
        topic = DEAD_PREFIX + job.topic
        try:
            msg = json.loads(job.head + b"}").get("msg", "")
            base = encode_command(topic, msg, "one", True, True, from_topic=job.topic,
                                  from_index=job.index)
            self._topic_room(topic)
            if self._shared_history is not None:
                # (the id makes a second forwarding of the same dead job harmless)
                self._shared_history.publish_jobs(topic, [base],
                                                  f"dead:{job.index}:{job.topic}"[:200])
            else:
                self._publish_job(topic, base)
        except (QueueFull, TooManyTopics) as exc:
            self.jobs.dead_letters_dropped += 1
            log.warning("job %d of %r dropped: its dead-letter topic %r is full (%s)",
                        job.index, job.topic, topic, type(exc).__name__)

    def queue_info(self, topic: str) -> QueueInfo:
        """A topic's jobs: waiting, in flight, delayed, consumers, totals."""
        return self.jobs.info(topic)

    # --- inspection (tests, metrics) ---

    def topic_names(self) -> list[str]:
        """Every topic with state (a copy: safe to page through across awaits)."""
        names = list(self.history.topic_names())
        names.extend(self._unrecorded)
        names.extend(self._consumed_only)
        return names

    def subscribed_only_topics(self) -> Collection[str]:
        """Topics with subscribers or consumers and no history yet (a copy); with
        ``history.topic_names()``, every topic."""
        return [*self._unrecorded, *self._consumed_only]

    def subscriber_count(self, topic: str) -> int:
        subs = self._subscribers.get(topic)
        if subs is None:
            subs = self._unrecorded.get(topic, _NO_SUBS)
        return len(subs)

    @property
    def subscription_total(self) -> int:
        """Subscriptions across all connections (O(connections))."""
        return sum(len(t) for t in self._topics_of.values())

    def subscribers(self, topic: str) -> list[Subscriber]:
        subs = self._subscribers.get(topic)
        if subs is None:
            subs = self._unrecorded.get(topic, {})
        return list(subs)

    def topics_of(self, subscriber: Subscriber) -> set[str]:
        return set(self._topics_of.get(subscriber, ()))
