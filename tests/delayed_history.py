"""A test-only history that decides everything late: proof that the broker's semantics
do not depend on a history answering at once (issue #10, "prove the seam").

:class:`DelayedHistory` wraps a :class:`~mq_trio.broker.MemoryHistory` (which keeps the
indexes and the cache) and answers through the seam's "index now, decided later" handles:

* ``record`` returns the inner index with a :class:`DelayedTicket` (or, now and then, no
  ticket at all when nothing is pending, as a memory history would);
* ``replay`` returns the inner replay as :class:`~mq_trio.broker.Held` items with delayed
  tickets, sometimes a whole run of them as one :class:`DelayedChunk` that streams its
  messages in several writes once decided;
* ``recovered`` sometimes returns a :class:`DelayedAnswer` decided later.

A ticket is decided after a random number (0..``max_delay``) of trio scheduler passes of
:meth:`Decider.run` (start it in a nursery), and tickets are decided in the order they
were made, like the sequence numbers of a real store. The random choices come from the
``random.Random`` given, so a seed reproduces them.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Collection

import attrs
import trio

from mq_trio.broker import (
    Answer,
    CachedMessage,
    Held,
    HistoryStats,
    Item,
    MemoryHistory,
    Recorded,
    SendBatch,
    StoredId,
    StoredJob,
    Ticket,
    TopicInfo,
)
from mq_trio.protocol import Send


@attrs.define(eq=False)
class DelayedTicket:
    """A :class:`~mq_trio.broker.Ticket` the :class:`Decider` decides (never failed)."""

    _event: trio.Event = attrs.field(factory=trio.Event)

    @property
    def done(self) -> bool:
        return self._event.is_set()

    @property
    def failed(self) -> bool:
        return False

    async def wait(self) -> None:
        await self._event.wait()

    def decide(self) -> None:
        self._event.set()


@attrs.define(eq=False)
class DelayedAnswer(DelayedTicket):
    """A :class:`~mq_trio.broker.Answer` known now, told only once decided."""

    answer: bool = False

    def value(self) -> bool:
        assert self.done, "value() of an undecided answer"
        return self.answer


@attrs.define(eq=False)
class DelayedRecord(DelayedTicket):
    """A :class:`~mq_trio.broker.Recorded`: an index now, decided later."""

    index: int = -1


@attrs.define(eq=False)
class DelayedChunk:
    """A run of replayed deliveries as one :class:`~mq_trio.broker.Deferred`: nothing
    leaves before ``ticket`` is decided, then the payloads go out in ``parts`` writes."""

    payloads: list[bytes]
    ticket: Ticket
    parts: int = 1
    discarded: bool = False

    def __len__(self) -> int:
        return sum(len(p) for p in self.payloads)

    def ready(self) -> list[bytes] | None:
        if not self.ticket.done:
            return None
        return list(self.payloads)

    async def write(self, send: SendBatch) -> None:
        await self.ticket.wait()
        size = max(1, -(-len(self.payloads) // self.parts))
        for start in range(0, len(self.payloads), size):
            await send(self.payloads[start : start + size])
            await trio.lowlevel.checkpoint()  # let others run between the parts

    def discard(self) -> None:
        self.discarded = True


@attrs.define(eq=False)
class _Pending:
    left: int  # scheduler passes until its time comes
    ticket: DelayedTicket


@attrs.define(eq=False)
class Decider:
    """Decides tickets after their countdown of scheduler passes, in creation order."""

    rng: random.Random
    max_delay: int = 16
    #: Oldest first.
    _pending: deque[_Pending] = attrs.field(factory=deque)
    _wake: trio.Event = attrs.field(factory=trio.Event)
    decided: int = 0

    def ticket(self, ticket: DelayedTicket | None = None) -> DelayedTicket:
        """A new undecided ticket (or ``ticket``) that the next passes will decide."""
        if ticket is None:
            ticket = DelayedTicket()
        self._pending.append(_Pending(self.rng.randint(0, self.max_delay), ticket))
        self._wake.set()
        return ticket

    @property
    def idle(self) -> bool:
        return not self._pending

    async def run(self) -> None:
        """Forever: one scheduler pass, then decide the oldest tickets whose time came."""
        while True:
            if not self._pending:
                self._wake = trio.Event()
                await self._wake.wait()
            await trio.lowlevel.checkpoint()
            for entry in self._pending:
                entry.left -= 1
            # In order: a ticket whose time came waits for every older one.
            while self._pending and self._pending[0].left <= 0:
                self._pending.popleft().ticket.decide()
                self.decided += 1


@attrs.define(eq=False)
class DelayedHistory:
    """A :class:`~mq_trio.broker.TopicHistory` that answers everything late."""

    inner: MemoryHistory
    decider: Decider
    epoch: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.epoch = self.inner.epoch

    @property
    def rng(self) -> random.Random:
        return self.decider.rng

    def record(self, topic: str, send: Send, one: bool, cached: bool) -> int | Recorded:
        index = self.inner.record(topic, send, one, cached)
        if self.decider.idle and self.rng.random() < 0.2:
            return index  # already as durable as it will be
        recorded = DelayedRecord(index=index)
        self.decider.ticket(recorded)
        return recorded

    def replay(self, topic: str, last_seen: int) -> list[Item]:
        payloads = self.inner.replay(topic, last_seen)
        items: list[Item] = []
        i = 0
        while i < len(payloads):
            payload = payloads[i]
            assert isinstance(payload, bytes)  # memory replays bytes only
            roll = self.rng.random()
            if roll < 0.25 and len(payloads) - i > 1:
                n = self.rng.randint(2, len(payloads) - i)
                chunk = [p for p in payloads[i : i + n] if isinstance(p, bytes)]
                items.append(DelayedChunk(chunk, self.decider.ticket(),
                                          parts=self.rng.randint(1, n)))
                i += n
                continue
            if roll < 0.35:
                items.append(payload)  # already decided: plain bytes between held ones
            else:
                items.append(Held(payload, self.decider.ticket()))
            i += 1
        return items

    def recovered(self, topic: str, last_seen: int) -> bool | Answer:
        # Decided from the state at the time of the subscribe, told later.
        value = self.inner.recovered(topic, last_seen)
        if self.rng.random() < 0.3:
            return value
        answer = DelayedAnswer(answer=value)
        self.decider.ticket(answer)
        return answer

    def cached(self, topic: str) -> list[CachedMessage]:
        return self.inner.cached(topic)

    def has(self, topic: str) -> bool:
        return self.inner.has(topic)

    def topic_count(self) -> int:
        return self.inner.topic_count()

    def topic_names(self) -> Collection[str]:
        return self.inner.topic_names()

    def topic_info(self, topic: str) -> TopicInfo | None:
        return self.inner.topic_info(topic)

    def stats(self) -> HistoryStats:
        return self.inner.stats()

    def record_job(self, topic: str, base: bytes) -> int:
        return self.inner.record_job(topic, base)

    def job_delivered(self, topic: str, index: int, deliveries: int) -> None:
        pass

    def job_done(self, topic: str, index: int) -> None:
        return None

    def stored_jobs(self) -> list[StoredJob]:
        return []

    def remember_id(self, topic: str, message_id: str, reply: bytes, window: float) -> None:
        pass

    def stored_ids(self) -> list[StoredId]:
        return []
