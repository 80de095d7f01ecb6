"""The broker's side of a shared history (cluster mode, docs/cluster.md).

:class:`SharedPath` is part of :class:`~mq_trio.broker.Broker` (a base class, so that
the one place of the protocol's semantics stays one object, and this half of it can be
read on its own): what ``publish``, ``subscribe``, ``unsubscribe`` and the jobs become
when indexes are given out by Redis and every delivery comes back through the history's
intake. The per-subscriber state (gates, joins, leaves) is :class:`SharedTopics`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..protocol import (
    QUEUE_FULL,
    STORAGE_UNAVAILABLE,
    SUCCESS,
    Batch,
    Send,
    SendEx,
    encode_command,
    failure_bytes,
    index_reply,
    splice_index,
)
from ._history import Item
from ._jobs import DEAD_PREFIX, Job, JobQueues, TopicQueue
from ._shared import PENDING_COST, Gate, Join, SharedHistory, SharedTopics, SharedWrite

if TYPE_CHECKING:
    from ._broker import Subscriber

_STORAGE_UNAVAILABLE = failure_bytes(STORAGE_UNAVAILABLE)
_QUEUE_FULL = failure_bytes(QUEUE_FULL)

#: The subscribers of a topic that has history and no subscribers: shared, never mutated
#: (``subscribe`` puts a new dict in its place, ``_drop`` puts it back).
_NO_SUBS: dict[Subscriber, None] = {}


class SharedPath:
    """The shared-history half of the broker (see the module's docstring)."""

    # The broker's state this half works on (declared here for the type checker).
    jobs: JobQueues
    shared: SharedTopics | None
    _shared_history: SharedHistory | None
    _taking: set[str]
    _subscribers: dict[str, dict[Subscriber, None]]
    _unrecorded: dict[str, dict[Subscriber, None]]
    _topics_of: dict[Subscriber, set[str]]
    _fanout: dict[Subscriber, None] | None
    delivered: int

    def _new_topic(self, topic: str) -> dict[Subscriber, None]:
        raise NotImplementedError  # (the broker's)

    def _add_subscription(self, subscriber: Subscriber, topic: str
                          ) -> dict[Subscriber, None]:
        raise NotImplementedError  # (the broker's)

    def unsubscribe(self, subscriber: Subscriber, topic: str) -> None:
        raise NotImplementedError  # (the broker's)

    def _dead_letter(self, job: Job) -> None:
        raise NotImplementedError  # (the broker's)

    def publish_shared(self, sender: Subscriber, send: Send) -> Gate | SharedWrite:
        """``publish`` with a shared history: the message goes to the history; its
        deliveries come back through ``deliver_frame``. The sender's reply: the
        returned gate if it is subscribed to the topic (its own delivery comes first),
        else success once the returned write is decided (``TooManyTopics`` as for
        ``publish``)."""
        topic = send.topic
        subs = self._subscribers.get(topic)
        if subs is None:
            subs = self._new_topic(topic)
        command = send.raw or encode_command(topic, send.msg, send.delivery, send.cache)
        write, offset = self._shared_history.publish_shared(  # type: ignore[union-attr]
            topic, command, send.delivery == "one", send.cache)
        if subs and sender in subs:
            shared: SharedTopics = self.shared  # type: ignore[assignment]
            if (sender, topic) not in shared.leaving:
                # (its bytes wait in the node's queue for Redis: they count for it)
                gate = Gate(write, offset, SUCCESS, _STORAGE_UNAVAILABLE, None, [],
                            PENDING_COST + len(command))
                shared.gate(sender, topic, gate)
                return gate
        return write

    def publish_ex_shared(self, sender: Subscriber, event: SendEx | Batch) -> Gate:
        """A send with an id, or a batch, with a shared history: the id is kept in
        Redis for the window (a repeat on any node gets the original's index); a batch
        is one write, so all or none. Jobs: kept in the history (``_publish_jobs_shared``)."""
        topic = event.topic
        if event.ack:
            return self._publish_jobs_shared(event)
        subs = self._subscribers.get(topic)
        if subs is None:
            subs = self._new_topic(topic)
        history = self._shared_history
        assert history is not None and self.shared is not None
        if type(event) is Batch:
            commands = [encode_command(topic, m, event.delivery, event.cache)
                        for m in event.msgs]
            write, offset = history.publish_many(
                topic, commands, event.delivery == "one", event.cache, event.id)
            count = len(commands)
            size = sum(map(len, commands))

            def reply(index: int, counted: int, repeated: bool) -> bytes:
                return index_reply(index, counted if repeated else count, repeated)
        else:
            assert isinstance(event, SendEx)
            command = event.raw or encode_command(topic, event.msg, event.delivery,
                                                  event.cache)
            write, offset = history.publish_shared(
                topic, command, event.delivery == "one", event.cache, event.id)
            size = len(command)

            def reply(index: int, counted: int, repeated: bool) -> bytes:
                return index_reply(index, duplicate=True) if repeated else index_reply(index)
        gate = Gate(write, offset, reply, _STORAGE_UNAVAILABLE, size=PENDING_COST + size)
        if sender in subs and (sender, topic) not in self.shared.leaving:
            self.shared.gate(sender, topic, gate)
        return gate

    def _publish_jobs_shared(self, event: SendEx | Batch) -> Gate:
        """Jobs with a shared history: kept in it, taken by the nodes with consumers."""
        topic = event.topic
        if topic not in self._subscribers:
            self._new_topic(topic)
        history = self._shared_history
        assert history is not None
        if type(event) is Batch:
            commands = [encode_command(topic, m, "one", event.cache, True)
                        for m in event.msgs]
            count: int | None = len(commands)
        else:
            assert isinstance(event, SendEx)
            commands = [event.raw or encode_command(topic, event.msg, "one", event.cache,
                                                    True)]
            count = None
        write, offset = history.publish_jobs(topic, commands, event.id)

        def reply(index: int, counted: int, repeated: bool) -> bytes:
            if index < 0:
                return _QUEUE_FULL
            if count is None:
                return index_reply(index, duplicate=True) if repeated else index_reply(index)
            return index_reply(index, counted if repeated else count, repeated)
        return Gate(write, offset, reply, _STORAGE_UNAVAILABLE,
                    size=PENDING_COST + sum(map(len, commands)))

    def room_made(self, topic: str) -> None:
        """Acks or nacks made room for ``topic``'s consumers: dispatch what waits here,
        and (a shared history) take more from it."""
        self.jobs.dispatch_topic(topic)
        if self.shared is not None:
            self._feed(topic)

    def job_progress(self, subscriber: Subscriber, topic: str, index: int) -> bool:
        """A consumer's ``progress``: its deadline moves (and the claim in a shared
        history)."""
        held = self.jobs.progress(subscriber, topic, index)
        if held and self._shared_history is not None:
            self._shared_history.job_touched(topic, index)
        return held

    def _feed(self, topic: str) -> None:
        """Take jobs from the shared history for this node's consumers of ``topic``, as
        many as they have room for; one request per topic at a time."""
        if topic in self._taking:
            return
        room = self.jobs.room(topic)
        if room <= 0:
            return
        assert self._shared_history is not None
        self._taking.add(topic)
        if not self._shared_history.take(topic, room, lambda taken: self._fed(topic, taken,
                                                                               room)):
            self._taking.discard(topic)

    def _fed(self, topic: str, taken: list[tuple[int, int, bytes]], asked: int) -> None:
        self._taking.discard(topic)
        history = self._shared_history
        assert history is not None
        jobs = self.jobs
        queue = jobs.queues.get(topic)
        for index, before, command in taken:
            if queue is None or not queue.consumers or index in queue.jobs:
                history.job_back(topic, index)  # (its consumers left meanwhile)
            elif before >= jobs.max_deliveries and not topic.startswith(DEAD_PREFIX):
                # Its holder died at its last delivery: out of deliveries, as the one
                # node would have found when the connection dropped.
                history.job_done(topic, index)
                jobs.dead_lettered_total += 1
                self._dead_letter(Job(topic, index, command[:-1], before))
            else:
                jobs.add(topic, index, command, None, before)
        if len(taken) >= asked:
            self._feed(topic)  # (there may be more, and room for them)

    def jobs_waiting(self, topic: str) -> None:
        """The shared history says jobs wait on ``topic``."""
        if topic in self.jobs.queues:
            self._feed(topic)

    def poll_jobs(self) -> None:
        """Now and then: take jobs for every topic with room (claims of a dead node end
        in Redis without a word to anyone)."""
        for topic in list(self.jobs.queues):
            self._feed(topic)

    def _unconsumed(self, queue: TopicQueue) -> None:
        """The last consumer of a topic left this node: its jobs go back to the shared
        history, for the other nodes' consumers."""
        assert self._shared_history is not None
        # Newest first: each goes to the front of the queue there, so the oldest leads.
        for job in sorted(self.jobs.surrender(queue), key=lambda j: -j.index):
            self._shared_history.job_back(queue.topic, job.index)

    def join(self, subscriber: Subscriber, topic: str, last_seen: int = -1,
             cache: bool = True, epoch: str | None = None) -> Join:
        """``subscribe`` with a shared history: the reply (with ``epoch``: the epoch
        extension's) and the replay, as one item decided once the subscription counts
        in Redis. If that fails, the reply is ``Storage unavailable`` and the
        subscription is undone."""
        subs = self._add_subscription(subscriber, topic)
        assert self._shared_history is not None and self.shared is not None
        self.shared.stay((subscriber, topic))
        result = self._shared_history.join(
            topic, len(subs) - self.shared.departing.get(topic, 0), last_seen, cache,
            on_fail=lambda: self.unsubscribe(subscriber, topic))
        item = Join(result, last_seen, epoch, _STORAGE_UNAVAILABLE)
        if not result.done:  # (failed at once: already undone)
            self.shared.join(subscriber, topic, item)
        return item

    def leave(self, subscriber: Subscriber, topic: str) -> Item:
        """``unsubscribe`` with a shared history: the reply once every message sent
        before the unsubscribe reached Redis has been delivered (they come first);
        the subscription ends then."""
        topics = self._topics_of.get(subscriber)
        assert self._shared_history is not None and self.shared is not None
        if topics is None or topic not in topics or (subscriber, topic) in self.shared.leaving:
            return SUCCESS
        subs = self._subscribers.get(topic) or self._unrecorded.get(topic) or {}
        token = self.shared.leave(subscriber, topic)

        def left() -> None:
            if self.shared is not None and self.shared.left(subscriber, topic, token):
                self._end_subscription(subscriber, topic, tell=False)

        staying = len(subs) - self.shared.departing.get(topic, 0)
        ticket = self._shared_history.leave(topic, staying, drains=True,
                                            on_done=left)
        if ticket is None or ticket.done:
            self._end_subscription(subscriber, topic, tell=ticket is None)
            return SUCCESS
        gate = Gate(ticket, 0, SUCCESS, SUCCESS)
        self.shared.gate(subscriber, topic, gate)
        return gate

    def _end_subscription(self, subscriber: Subscriber, topic: str, tell: bool) -> None:
        topics = self._topics_of.get(subscriber)
        if topics is None or topic not in topics:
            return
        topics.discard(topic)
        self._shared_drop(subscriber, topic, tell)

    def deliver_frame(self, topic: str, first: int, entries: list[tuple[bytes, bytes]],
                      own: SharedWrite | None = None) -> None:
        """Messages of ``topic`` from index ``first`` (``(target, command)``), as the
        shared history's intake received them: to this node's subscribers."""
        subs = self._subscribers.get(topic)
        if subs is None:
            subs = self._unrecorded.get(topic)
            if subs is None:
                return
        if not subs:
            return
        assert self.shared is not None
        self.delivered += self.shared.deliver(subs, topic, first, entries, splice_index, own)

    def _shared_drop(self, subscriber: Subscriber, topic: str, tell: bool = True) -> None:
        """``_drop`` with a shared history: the node's count goes to Redis (unless
        ``tell`` is false: an unsubscribe sent it already)."""
        subs = self._subscribers.get(topic)
        where = self._subscribers if subs is not None else self._unrecorded
        if subs is None:
            subs = self._unrecorded[topic]
        if subs is self._fanout:
            self._fanout = None
            subs = where[topic] = dict(subs)
        del subs[subscriber]
        assert self.shared is not None and self._shared_history is not None
        self.shared.drop(subscriber, topic)
        if tell:
            self._shared_history.leave(topic, len(subs) - self.shared.departing.get(topic, 0))
        if not subs:
            if where is self._subscribers:
                self._subscribers[topic] = _NO_SUBS
            else:
                del self._unrecorded[topic]
