"""What docs/protocol.md means when the history is shared by several nodes (cluster).

With a :class:`~mq_trio.broker.SharedHistory` the index is given out remotely, and
every local delivery, the sender's own included, comes back through the history's
intake in index order (``SharedTopics.deliver``). Three rules of the protocol then
need care, and this module is where they are kept:

* **A sender's own delivery before its success.** The reply is a :class:`Gate` queued
  in command order; deliveries of the same topic that reach the sender before the
  intake has passed the sender's message (they precede it in index order) are written
  *inside* the gate, ahead of the reply, instead of behind it.
* **A subscribe replies once the subscription counts everywhere** (a "one" message
  sent anywhere after the reply may go to it) and replays the cache from that same
  moment: a :class:`Join` holds the reply and the replay; live deliveries that arrive
  while it is pending are :class:`AfterJoin` items, written only if their index is not
  covered by the replay (``index >= next_index``).
* **"one" goes to exactly one subscriber**: the history picks a node (weighted by each
  node's subscriber count); that node picks one of its own subscribers.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs

from ._history import SendBatch, Ticket, TopicHistory, epoch_reply, nothing_lost

#: What an undecided reply stands for in memory (the item, its ticket, the queued
#: operation), counted against its client's output budget like bytes.
PENDING_COST = 64
JOIN_COST = 256


class SharedWrite(Ticket, Protocol):
    """One remote write (a batch of one topic's messages), decided later. ``done``
    once the node's intake delivered it (``passed``), or it failed, or its reply came
    while the intake is down."""

    @property
    def first(self) -> int:
        """The first message's index, once done and not failed."""

    @property
    def passed(self) -> bool:
        """The node's intake has delivered this write's messages locally."""

    def result(self, offset: int) -> tuple[int, int, bool]:
        """(index, batch size, repeated) of the message at ``offset``."""


class JoinResult(Ticket, Protocol):
    """A subscribe's remote step, once ``done``: the topic's next index, the highest
    evicted one, the epoch, and the cached entries after ``last_seen``."""

    @property
    def next_index(self) -> int: ...

    @property
    def evicted(self) -> int: ...

    @property
    def epoch(self) -> str: ...

    @property
    def entries(self) -> list[tuple[int, bytes]]:
        """(index, delivery) of the replay, in index order."""


class FrameSink(Protocol):
    """What a shared history's intake delivers to (the broker)."""

    def deliver_frame(self, topic: str, first: int, entries: list[tuple[bytes, bytes]],
                      own: SharedWrite | None = None) -> None:
        """``own``: the frame is of this node's write."""

    def jobs_waiting(self, topic: str) -> None:
        """Jobs wait on ``topic`` in the shared history (added, or given back)."""

    def poll_jobs(self) -> None:
        """Now and then: take jobs wherever this node's consumers have room."""


class SharedHistory(TopicHistory, Protocol):
    """A history several nodes share (cluster mode). It gives out indexes remotely,
    so ``record`` is not used: messages go in with ``publish_shared``/``publish_many``
    and come back, in index order, through the sink given to ``attach``."""

    #: This node's id among the nodes ("one" targets name it).
    node: str
    shared: bool

    def attach(self, sink: FrameSink) -> None: ...

    def publish_shared(self, topic: str, command: bytes, one: bool, cached: bool,
                       message_id: str | None = None) -> tuple[SharedWrite, int]:
        """Queue one message: its write and its place in it."""

    def publish_many(self, topic: str, commands: list[bytes], one: bool, cached: bool,
                     message_id: str | None = None) -> tuple[SharedWrite, int]:
        """Queue a batch, in one write (all or none)."""

    def join(self, topic: str, count: int, last_seen: int, replay: bool,
             on_fail: Callable[[], None] | None = None) -> JoinResult:
        """The node has ``count`` subscribers of ``topic`` now; with ``replay``, the
        cache after ``last_seen``. ``on_fail``: called if it cannot be done."""

    def publish_jobs(self, topic: str, commands: list[bytes], message_id: str | None
                     ) -> tuple[SharedWrite, int]:
        """Queue jobs (a batch: all or none); the write's index is -1 if the topic's
        queue is full."""

    def take(self, topic: str, count: int,
             on_taken: Callable[[list[tuple[int, int, bytes]]], None]) -> bool:
        """Ask for up to ``count`` waiting jobs for this node's consumers: ``on_taken``
        gets (index, deliveries before, command) of each (maybe none). False: cannot."""

    def job_touched(self, topic: str, index: int) -> None:
        """A held job's consumer reported progress."""

    def job_back(self, topic: str, index: int) -> None:
        """A job this node will not deliver, for the other nodes."""

    def leave(self, topic: str, count: int, drains: bool = False,
              on_done: Callable[[], None] | None = None) -> SharedWrite | None:
        """The node has ``count`` subscribers of ``topic`` now. ``drains`` (an
        unsubscribe): a ticket decided once every message before the change was
        delivered here, then ``on_done`` is called (None: nothing to wait for)."""


class Receiver(Protocol):
    """A subscriber as the shared path needs it (a connection's outbox)."""

    def push(self, payload: bytes) -> None: ...

    def push_deferred(self, item: object) -> None: ...

    def grow(self, size: int) -> None:
        """``size`` more bytes went into an item already queued (a gate's prefix)."""


@attrs.define(slots=True, eq=False)
class Gate:
    """A sender's reply to a shared write: the deliveries that precede the sender's
    message in index order (``prefix``), then the reply, once the write is decided."""

    ticket: SharedWrite
    #: The message's place in its write (its index is ``ticket.first + offset``).
    offset: int
    #: The reply: fixed bytes, or made from (index, count, repeated) (a send with an
    #: id, a batch; a repeated id gives the original's index and count).
    reply: Callable[[int, int, bool], bytes] | bytes
    failure: bytes
    #: The subscription's join that was pending when the gate was queued: deliveries
    #: into the gate are filtered by it (the replay covers what came before it).
    after: Join | None = None
    #: Deliveries, or the :class:`AfterJoin` of a subscription whose join was pending
    #: (decided before this gate: the join's write went to Redis first).
    prefix: list[bytes | AfterJoin] = attrs.field(factory=list)
    #: Counted against the outbox's budget: the reply and what stands behind it until
    #: decided (a client pipelining sends without reading is paused by it), plus the
    #: deliveries in ``prefix`` (``Receiver.grow``).
    size: int = PENDING_COST

    def __len__(self) -> int:
        return self.size

    def _reply(self) -> bytes:
        ticket = self.ticket
        if ticket.failed:
            return self.failure
        reply = self.reply
        if type(reply) is bytes:
            return reply
        return reply(*ticket.result(self.offset))  # type: ignore[operator]

    def ready(self) -> list[bytes] | None:
        if not self.ticket.done:
            return None
        if not self.prefix:
            return [self._reply()]
        out: list[bytes] = []
        for item in self.prefix:
            if type(item) is bytes:
                out.append(item)
            else:
                out.extend(item.ready() or ())  # type: ignore[union-attr]
        out.append(self._reply())
        return out

    async def write(self, send: SendBatch) -> None:
        await self.ticket.wait()
        await send(self.ready() or [])

    async def decided(self) -> None:
        await self.ticket.wait()

    def discard(self) -> None:
        self.prefix = []


@attrs.define(slots=True, eq=False)
class Join:
    """A subscribe's reply and replay, once the history has counted the subscription
    (and read the cache) remotely. ``epoch``: the client's (the epoch extension), or
    None for a version-1 reply."""

    result: JoinResult
    last_seen: int
    epoch: str | None
    failure: bytes

    def __len__(self) -> int:
        # The replay, like any replay, is beyond the budget; the pending subscribe is
        # not: a client pipelining subscribes without reading is paused by them.
        return JOIN_COST

    def ready(self) -> list[bytes] | None:
        result = self.result
        if not result.done:
            return None
        if result.failed:
            return [self.failure]
        if self.epoch is None:
            reply = b'{"success": true}'
        else:
            recovered = self.epoch == result.epoch and nothing_lost(
                result.evicted, result.next_index, self.last_seen)
            reply = epoch_reply(result.epoch, recovered)
        return [reply, *(delivery for _, delivery in result.entries)]

    async def write(self, send: SendBatch) -> None:
        await self.result.wait()
        await send(self.ready() or [])

    async def decided(self) -> None:
        await self.result.wait()

    def discard(self) -> None:
        pass


@attrs.define(slots=True, eq=False)
class AfterJoin:
    """A live delivery that reached a subscription whose :class:`Join` is pending:
    written only if the replay does not cover it (and the join did not fail)."""

    payload: bytes
    index: int
    join: Join

    def __len__(self) -> int:
        return len(self.payload)

    def ready(self) -> list[bytes] | None:
        result = self.join.result
        if not result.done:
            return None
        if result.failed or self.index < result.next_index:
            return []
        return [self.payload]

    async def write(self, send: SendBatch) -> None:
        await self.join.result.wait()
        out = self.ready()
        if out:
            await send(out)

    async def decided(self) -> None:
        await self.join.result.wait()

    def discard(self) -> None:
        pass


Key = tuple[object, str]


@attrs.define(eq=False)
class SharedTopics:
    """The per-subscriber state of the shared path: open gates and pending joins.

    ``gates[(subscriber, topic)]``: the subscriber's undecided replies to its own sends
    on a topic it was subscribed to when sending, oldest first. ``joins``: its pending
    subscribes. ``gated``/``joining`` count them per topic, so a delivery to a topic
    with neither (nearly all of them) is a plain push per subscriber.
    """

    node: bytes
    random: random.Random = attrs.field(factory=random.Random)
    gates: dict[Key, deque[Gate]] = attrs.field(factory=dict)
    joins: dict[Key, Join] = attrs.field(factory=dict)
    gated: dict[str, int] = attrs.field(factory=dict)
    joining: dict[str, int] = attrs.field(factory=dict)
    #: Unsubscribes waiting for the intake to pass their mark.
    leaving: dict[Key, object] = attrs.field(factory=dict)
    #: How many of a topic's subscribers are leaving (not counted in Redis any more).
    departing: dict[str, int] = attrs.field(factory=dict)
    #: "one" messages this node was picked for when none of its subscribers was left
    #: (they left in the moment between the pick and the delivery).
    ones_lost: int = 0
    #: While ``deliver`` walks this node's own write: the write and the offset of the
    #: message at hand (the gates of its earlier messages are passed).
    _own: SharedWrite | None = None
    _offset: int = 0

    def gate(self, subscriber: object, topic: str, gate: Gate) -> None:
        """``gate`` is the reply of a subscriber subscribed to ``topic``."""
        key = (subscriber, topic)
        gate.after = self._settle(subscriber, topic)
        queue = self.gates.get(key)
        if queue is None:
            queue = self.gates[key] = deque()
            self.gated[topic] = self.gated.get(topic, 0) + 1
        else:
            while queue and queue[0].ticket.done:
                queue.popleft()
        queue.append(gate)

    def join(self, subscriber: object, topic: str, join: Join) -> None:
        """A (re)subscribe: deliveries from now on wait for ``join`` and are filtered
        by it; gates already queued keep theirs. A pending unsubscribe is called off."""
        key = (subscriber, topic)
        self.stay(key)
        if self.joins.get(key) is None:
            self.joining[topic] = self.joining.get(topic, 0) + 1
        self.joins[key] = join

    def leave(self, subscriber: object, topic: str) -> object:
        """An unsubscribe is under way: the token ``left`` must match."""
        token = self.leaving[(subscriber, topic)] = object()
        self.departing[topic] = self.departing.get(topic, 0) + 1
        return token

    def undecided(self, subscriber: object) -> list[SharedWrite]:
        """The subscriber's replies still waiting for the intake (a client that quits
        right after its sends still gets their deliveries: they come into these)."""
        return [gate.ticket for (who, _), queue in self.gates.items() if who is subscriber
                for gate in queue if not gate.ticket.done]

    def stay(self, key: Key) -> None:
        """A pending unsubscribe is called off (a subscribe came after it)."""
        if self.leaving.pop(key, None) is not None:
            self._uncount(self.departing, key[1])

    def left(self, subscriber: object, topic: str, token: object) -> bool:
        """Whether the unsubscribe of ``token`` still stands (no subscribe since)."""
        return self.leaving.get((subscriber, topic)) is token

    def drop(self, subscriber: object, topic: str) -> None:
        """The subscription ended: its gates and join are forgotten (they still decide
        and write as queued)."""
        key = (subscriber, topic)
        self.stay(key)
        if self.gates.pop(key, None) is not None:
            self._uncount(self.gated, topic)
        if self.joins.pop(key, None) is not None:
            self._uncount(self.joining, topic)

    @staticmethod
    def _uncount(counts: dict[str, int], topic: str) -> None:
        n = counts[topic] - 1
        if n:
            counts[topic] = n
        else:
            del counts[topic]

    def _settle(self, subscriber: object, topic: str) -> Join | None:
        """The pending join of the subscription, forgotten once decided."""
        key = (subscriber, topic)
        join = self.joins.get(key)
        if join is not None and join.result.done:
            del self.joins[key]
            self._uncount(self.joining, topic)
            return None
        return join

    def _to(self, subscriber: Receiver, topic: str, index: int, payload: bytes) -> None:
        """One delivery to a subscriber with a gate or a join on ``topic``: into its
        first gate not yet passed, if any (filtered by the join pending when that gate
        was queued), else at the end (filtered by the join pending now)."""
        if topic in self.gated:
            key = (subscriber, topic)
            queue = self.gates.get(key)
            if queue is not None:
                own = self._own
                while queue:
                    ticket = queue[0].ticket
                    if not (ticket.passed or ticket.done
                            or ticket is own and queue[0].offset < self._offset):
                        break
                    queue.popleft()
                if queue:
                    gate = queue[0]
                    after = gate.after
                    gate.prefix.append(
                        payload if after is None else AfterJoin(payload, index, after))
                    gate.size += len(payload)
                    subscriber.grow(len(payload))
                    return
                del self.gates[key]
                self._uncount(self.gated, topic)
        if topic in self.joining:
            join = self._settle(subscriber, topic)
            if join is not None:
                subscriber.push_deferred(AfterJoin(payload, index, join))
                return
        subscriber.push(payload)

    def deliver(self, subs: Iterable[Any], topic: str, first: int,
                entries: list[tuple[bytes, bytes]], splice: Callable[[bytes, int], bytes],
                own: SharedWrite | None = None) -> int:
        """Deliver a frame's messages (``(target, command)`` from index ``first``) to
        this node's subscribers ``subs`` of the topic; returns the deliveries made.
        ``own``: the frame is this node's write (each message's delivery goes into its
        own sender's gate, not the gate of an earlier message of the same write)."""
        try:
            self._own = own
            return self._deliver(list(subs), topic, first, entries, splice)
        finally:
            self._own = None

    def _deliver(self, receivers: list[Receiver], topic: str, first: int,
                 entries: list[tuple[bytes, bytes]], splice: Callable[[bytes, int], bytes]
                 ) -> int:
        node = self.node
        made = 0
        plain = topic not in self.gated and topic not in self.joining
        for offset, (target, command) in enumerate(entries):
            self._offset = offset
            if target == b"*":
                if not receivers:
                    continue
                index = first + offset
                payload = splice(command, index)
                made += len(receivers)
                if plain:
                    for subscriber in receivers:
                        subscriber.push(payload)
                else:
                    for subscriber in receivers:
                        self._to(subscriber, topic, index, payload)
            elif target == node:
                chosen = self._pick(receivers, topic)
                if chosen is None:
                    self.ones_lost += 1
                    continue
                index = first + offset
                self._to(chosen, topic, index, splice(command, index))
                made += 1
        return made

    def _pick(self, subs: list[Receiver], topic: str) -> Receiver | None:
        """A random subscriber, preferring those whose join is decided (a pending one
        may turn out to have joined after the message)."""
        if not subs:
            return None
        if topic in self.joining:
            settled = [s for s in subs if self._settle(s, topic) is None]
            if settled:
                return self.random.choice(settled)
        return self.random.choice(subs)
