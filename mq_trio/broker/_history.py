"""The history seam: what a topic history (memory, SQLite, Redis, ...) provides.

A history owns indexes and caches; :class:`~mq_trio.broker.Broker` owns their meaning.
A history that must wait (for a disk, for a remote store) still answers at once, with
"index now, durable later" handles: a :class:`Ticket` for a write, outbox items
(:class:`Deferred`) for what can only be sent once it is decided. The outbox writer
waits for those; the reader and the broker never wait.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Collection
from typing import Protocol

import attrs

from ..protocol import Send

#: What a transport's send takes: encoded objects, no terminators.
SendBatch = Callable[[list[bytes]], Awaitable[None]]


class Ticket(Protocol):
    """A history operation that is decided later (a durable write, a removal)."""

    @property
    def done(self) -> bool:
        """Decided: written, or failed."""

    @property
    def failed(self) -> bool:
        """Meaningful once ``done``: the operation did not take effect."""

    async def wait(self) -> None:
        """Return once ``done``."""


class Recorded(Ticket, Protocol):
    """A message's index, handed out now, with its write decided later."""

    @property
    def index(self) -> int:
        """The message's index (consumed: never handed out again)."""


class Answer(Ticket, Protocol):
    """A yes/no a history can give only later (the epoch extension's ``recovered``)."""

    def value(self) -> bool:
        """The answer, once ``done``."""


class Deferred(Protocol):
    """An outbox item whose bytes are known only later.

    ``ready`` is the cheap check the writer makes first; ``write`` is the slow path;
    ``discard`` is called when the item is dropped unsent (its connection ended), so it
    can release what it holds (a database snapshot).
    """

    def __len__(self) -> int:
        """Bytes it counts against the connection's budget."""

    def ready(self) -> list[bytes] | None:
        """What to write now, if already decided (maybe nothing); None if not yet."""

    async def write(self, send: SendBatch) -> None:
        """Wait until decided, then send what the item stands for."""

    def discard(self) -> None:
        """The item will not be written."""


Item = bytes | Deferred


@attrs.define(slots=True, eq=False)
class Held:
    """Bytes that may leave only once ``ticket`` is decided.

    A delivery of a message not yet durable is written once its write succeeded (and
    dropped if it failed); the sender's reply says which (``failure``). ``requires``:
    another ticket that must not have failed (a replayed "one" message waits for its
    removal from the cache, and is dropped if the message itself was never written).
    """

    payload: bytes
    ticket: Ticket
    #: Written instead when the ticket failed; None: nothing is written.
    failure: bytes | None = None
    requires: Ticket | None = None

    def __len__(self) -> int:
        return len(self.payload)

    def ready(self) -> list[bytes] | None:
        if not self.ticket.done:
            return None
        return self._outcome()

    def _outcome(self) -> list[bytes]:
        requires = self.requires
        if requires is not None and requires.failed:
            return []
        if not self.ticket.failed:
            return [self.payload]
        return [] if self.failure is None else [self.failure]

    async def write(self, send: SendBatch) -> None:
        await self.ticket.wait()
        out = self._outcome()
        if out:
            await send(out)

    async def decided(self) -> None:
        """Return once ``ready()`` gives the outcome (the writer then sends it with the
        items after it, in one write)."""
        await self.ticket.wait()

    def discard(self) -> None:
        pass


@attrs.define(slots=True, eq=False)
class HeldMany:
    """A batch's deliveries to one subscriber, as one outbox item that every subscriber
    shares: one push per subscriber instead of one per message each (a batch of 10,000
    messages to 6,000 subscribers was 60 million pushes, a 10 s stall). With a
    ``ticket`` (a durable batch: one transaction) they leave once it is decided, and not
    at all if it failed."""

    payloads: list[bytes]
    size: int
    ticket: Ticket | None = None

    def __len__(self) -> int:
        return self.size

    def ready(self) -> list[bytes] | None:
        ticket = self.ticket
        if ticket is None:
            return self.payloads
        if not ticket.done:
            return None
        return [] if ticket.failed else self.payloads

    async def write(self, send: SendBatch) -> None:
        await self.decided()
        out = self.ready()
        if out:
            await send(out)

    async def decided(self) -> None:
        if self.ticket is not None:
            await self.ticket.wait()

    def discard(self) -> None:
        pass


def epoch_reply(epoch: str, recovered: bool) -> bytes:
    """The reply to a subscribe that carries an epoch (docs/protocol.md, epoch extension)."""
    return json.dumps({"success": True, "epoch": epoch, "recovered": recovered}).encode()


@attrs.define(slots=True, eq=False)
class EpochReply:
    """An epoch reply whose ``recovered`` the history can tell only later."""

    epoch: str
    answer: Answer

    def __len__(self) -> int:
        return 0

    def ready(self) -> list[bytes] | None:
        if not self.answer.done:
            return None
        return [epoch_reply(self.epoch, self.answer.value())]

    async def write(self, send: SendBatch) -> None:
        await self.answer.wait()
        await send([epoch_reply(self.epoch, self.answer.value())])

    async def decided(self) -> None:
        await self.answer.wait()

    def discard(self) -> None:
        pass


@attrs.define(slots=True)
class CachedMessage:
    """A cached message as a history shows it for inspection (``cached``)."""

    index: int
    one: bool  # a "one" message goes to a single subscriber, so replay consumes it
    payload: bytes


@attrs.frozen
class TopicInfo:
    """One topic as a history shows it for introspection (``GET /topics``)."""

    #: The index the next message gets.
    next_index: int
    #: Cached messages (in memory and, for a durable history, on disk).
    cached: int
    #: Bytes of the cached messages held in memory.
    cached_bytes: int


@attrs.frozen
class HistoryStats:
    """What a history reports for health and metrics (``GET /healthz``, ``/metrics``)."""

    #: False while writes fail (a durable store's disk or database is unavailable).
    available: bool = True
    #: Batches committed by a store, failed batches, and the commit latency histogram:
    #: ``commit_buckets[i]`` counts commits that took at most ``COMMIT_BUCKETS[i]`` s
    #: (cumulative, as Prometheus wants), ``commit_seconds`` their total time.
    commits: int = 0
    failed_commits: int = 0
    commit_buckets: tuple[int, ...] = ()
    commit_seconds: float = 0.0
    #: Bytes cached in memory across all topics.
    cached_bytes: int = 0


@attrs.frozen
class StoredJob:
    """A job a history kept across a restart."""

    topic: str
    index: int
    base: bytes
    deliveries: int


@attrs.frozen
class StoredId:
    """A message id a history kept across a restart, with the seconds left."""

    topic: str
    id: str
    reply: bytes
    remaining: float


#: Upper bounds (seconds) of the store commit latency histogram's buckets (+Inf implied).
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class TopicHistory(Protocol):
    """Per-topic indexes and caches: the one extension point for a new backend."""

    #: The history's id for the epoch extension; a new one whenever history may be lost.
    epoch: str

    def record(self, topic: str, send: Send, one: bool, cached: bool) -> int | Recorded:
        """Consume the topic's next index (never reused); if ``cached``, add the message
        to the topic's cache (a "one" message if ``one``), evicting the oldest beyond the
        cache size. Its delivery is ``encode_delivery(send, index)``.

        Returns the index when the message is as durable as it will be (memory), else a
        ticket carrying it, decided when the write is: deliveries and the sender's reply
        wait for it. One call per message: a remote store can do it in one round trip;
        a plain int for memory, because a tuple per message was a visible cost. The
        ticket may be shared by the messages written together (a durable store: one per
        commit), like ``record_job``'s: its ``index`` is this message's only until the
        next call, so read it at once.
        """

    def replay(self, topic: str, last_seen: int) -> list[Item]:
        """Outbox items for the cached messages with ``index > last_seen``, in index
        order; the "one" messages among them leave the cache."""

    def recovered(self, topic: str, last_seen: int) -> bool | Answer:
        """Whether nothing after ``last_seen`` was lost to eviction (the cache-size rule, or
        a bound on the bytes cached)."""

    def cached(self, topic: str) -> list[CachedMessage]:
        """The topic's cache (the part in memory), for inspection and tests."""

    def has(self, topic: str) -> bool:
        """Whether the history keeps state for ``topic`` (it counts toward --max-topics)."""

    def topic_count(self) -> int:
        """Topics the history keeps state for."""

    def topic_names(self) -> Collection[str]:
        """The topics the history keeps state for (a live view: copy it before
        awaiting)."""

    def topic_info(self, topic: str) -> TopicInfo | None:
        """Introspection of one topic (None: no state for it)."""

    def stats(self) -> HistoryStats:
        """Availability and store counters, for health and metrics."""

    # --- acknowledged jobs (docs/protocol.md; the broker's JobQueues owns their meaning)

    def record_job(self, topic: str, base: bytes) -> int | Recorded:
        """Consume the topic's next index for a job and keep the job (its command,
        ``base``) until ``job_done``; like ``record``, a ticket when written later. The
        ticket may be shared by the jobs written together (one per commit rather than
        per job): its ``index`` is this job's only until the next call, so read it at
        once."""

    def job_delivered(self, topic: str, index: int, deliveries: int) -> None:
        """The job was delivered for the ``deliveries``-th time (a durable history keeps
        the count, so a restart marks redeliveries)."""

    def job_done(self, topic: str, index: int) -> Ticket | None:
        """The job is acknowledged (or dead-lettered): forget it; a ticket when that is
        written later."""

    def stored_jobs(self) -> list[StoredJob]:
        """Jobs kept from before a restart, in index order per topic (durable)."""

    def remember_id(self, topic: str, message_id: str, reply: bytes, window: float) -> None:
        """Keep a message id with the reply its repeats get for ``window`` seconds,
        written with the message (a durable history: so a resend after a crash is
        still recognised)."""

    def stored_ids(self) -> list[StoredId]:
        """Message ids kept from before a restart, oldest first (durable)."""


class TooManyTopics(Exception):
    """A command would create a topic beyond the broker's ``max_topics``; the client
    gets ``Too many topics`` and nothing changed."""


def nothing_lost(evicted: int, next_index: int, last_seen: int) -> bool:
    """The epoch extension's rule: nothing after ``last_seen`` was lost to the cache-size
    rule (``evicted``: the highest index it dropped, -1 if none), and ``last_seen`` is not
    ahead of the history."""
    return evicted <= max(last_seen, -1) < next_index


def new_epoch() -> str:
    """A random id for a history; a new one whenever history may have been lost."""
    return uuid.uuid4().hex
