"""A client's outbox: its queued replies and deliveries, and who may write them.

The one rule of writing, in one place: the writer task drains the outbox into the
transport, except that the reader may write what is queued itself at the end of a chunk
(``write_inline``) when the writer is idle and nothing queued has to wait. Items a
history decides later (:class:`~mq_trio.broker.Deferred`, durable mode) are always the
writer's: it waits for them in order, so the reply order holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

from ..broker import Deferred, Held, Item
from ..transports._base import Transport

if TYPE_CHECKING:
    from ._pacer import WriteTurns

#: The writer stops collecting queued items for one write at about this many bytes.
WRITE_BATCH_BYTES = 256 << 10
#: The most a reader writes itself (``Outbox.write_inline``); more is the writer's job.
SEND_NOW_BYTES = 64 << 10


class OutboxOwner(Protocol):
    """What an outbox reports to its connection. The connection itself, not two bound
    methods: those were two more objects per idle connection."""

    def on_overflow(self) -> None:
        """A push was refused: over the budget (the outbox has closed)."""

    def on_peer_gone(self) -> None:
        """The writer's transport broke: nothing more can be delivered."""


#: ``budget // 2`` per budget: one int per server, not one per outbox.
_HIGH_WATER: dict[int, int] = {}


class Ready(list["Outbox"]):
    """The server's list of idle outboxes something was pushed to (``Outbox.attach``),
    with the turns their writes take (``WriteTurns``: a big fan-out is written over
    several passes)."""

    def __init__(self, turns: WriteTurns | None = None) -> None:
        super().__init__()
        self.turns = turns
        if turns is not None:
            turns.ready = self


class Outbox:
    """A client's queue of encoded objects, bounded in bytes, never blocking a producer.

    ``push`` is what the broker calls. Going over the byte budget does not wait and does
    not drop silently: the outbox closes and tells its owner, which disconnects the client
    (NATS and Redis do the same with slow consumers). The client's own replies count too,
    but the reader pauses at half the budget, so a client that pipelines without reading
    is slowed by TCP backpressure instead of being cut off.

    A subscribe's cache replay is the client's own request, so it does not count against
    the budget while it drains (:meth:`push_replay`): a replay larger than the budget is
    delivered, and a client cut off as a slow consumer can always resume from
    ``last_seen``. Memory per client stays bounded by the budget plus one replay (at most
    ``cache_size`` messages).
    """

    # A list and one waiting writer rather than a memory channel: a channel ``send_nowait``
    # per reply and per delivery was a visible share of the publish/fanout profiles, and
    # the writer only ever needs "wake me when something is queued". A list, not a deque:
    # the writer takes it whole, and an idle connection then holds an empty list (56
    # bytes) instead of a deque's 64-slot block (about 1.2 KiB with the one clear() makes).
    # The reader's wait for the writer to catch up is a single task slot too, not a
    # ParkingLot (an OrderedDict per connection, idle or not). The queue is None while
    # empty (an empty list is 56 bytes per idle connection).
    __slots__ = ("_queue", "_closed", "_waiter", "_reader", "pending", "budget", "high_water",
                 "_limit", "overflowed", "_owner", "_sending", "_leftover", "transport",
                 "_ready", "_listed", "_deferred", "sent", "sent_bytes", "__weakref__")

    def __init__(self, budget: int, owner: OutboxOwner | None = None) -> None:
        self._queue: list[Item] | None = None
        self._closed = False
        #: The writer, while it waits for something to send.
        self._waiter: trio.lowlevel.Task | None = None
        #: The reader, while it waits for the writer to bring ``pending`` down.
        self._reader: trio.lowlevel.Task | None = None
        self.pending = 0
        self.budget = budget
        #: Over this, the reader waits for the writer before handling more.
        self.high_water = _HIGH_WATER.setdefault(budget, budget // 2)
        #: The overflow threshold: the budget plus replay bytes still queued.
        self._limit = budget
        self.overflowed = False
        #: Told of an overflow and of a broken transport (the connection).
        self._owner = owner
        #: The writer is between taking items and handing them all to the transport.
        self._sending = False
        #: A ``send_now`` left part of its write with the transport: the writer sends it.
        self._leftover = False
        #: See ``attach``.
        self.transport: Transport | None = None
        self._ready: list[Outbox] | None = None
        self._listed = False
        #: The queue holds a :class:`Deferred` item: only the writer may write it.
        self._deferred = False
        #: Metrics: objects (replies, deliveries) and bytes handed to the transport;
        #: counted per write, not per push (a deferred item counts as one object).
        self.sent = 0
        self.sent_bytes = 0

    def push(self, payload: bytes) -> None:
        # The hot path of every reply and delivery (fanout: once per subscriber), so the
        # common case is one comparison, an append and a flag test.
        pending = self.pending + len(payload)
        if pending > self._limit or self._closed:
            self._refuse(pending)
            return
        self.pending = pending
        queue = self._queue
        if queue is None:
            self._queue = [payload]
        else:
            queue.append(payload)
        if self._waiter is not None and not self._listed:
            self._notify()

    def push_deferred(self, item: Deferred) -> None:
        """Queue an item a history decides later; the writer waits for it in order."""
        pending = self.pending + len(item)
        if pending > self._limit or self._closed:
            item.discard()
            self._refuse(pending)
            return
        self.pending = pending
        queue = self._queue
        if queue is None:
            self._queue = [item]
        else:
            queue.append(item)
        self._deferred = True
        if self._waiter is not None and not self._listed:
            self._notify()

    def grow(self, size: int) -> None:
        """``size`` more bytes went into an item already queued (a cluster gate takes
        the deliveries that must precede its reply): counted like a push."""
        pending = self.pending + size
        if pending > self._limit or self._closed:
            self._refuse(pending)
            return
        self.pending = pending

    def queue_reply(self, payload: bytes) -> None:
        """Queue one of the reader's own replies without waking the writer: the reader
        writes or wakes at the end of its chunk (``write_inline``, ``wait_drained``), and
        a wake-up per reply would cost a scheduler pass per round trip. (A copy of
        ``push``'s first lines, not a call from it: ``push`` is the fan-out hot path.)
        A reply a history decides later goes through ``push_deferred``."""
        pending = self.pending + len(payload)
        if pending > self._limit or self._closed:
            self._refuse(pending)
            return
        self.pending = pending
        queue = self._queue
        if queue is None:
            self._queue = [payload]
        else:
            queue.append(payload)

    def _refuse(self, pending: int) -> None:
        if self.overflowed:
            return
        # Checked before counting, so ``pending`` itself never exceeds the limit.
        if pending > self._limit:
            self.overflowed = True
            self.close()
            if self._owner is not None:
                self._owner.on_overflow()
        # else closed for flushing: the client is leaving and gets nothing new

    def queue_replay(self, items: list[Item]) -> None:
        """Queue a subscribe's cache replay, allowed on top of the budget."""
        if not items:
            return
        if self._closed:
            discard(items)
            return
        self._limit += sum(len(p) for p in items)
        for item in items:
            if type(item) is bytes:
                self.push(item)
            else:
                self.push_deferred(item)  # type: ignore[arg-type]

    def written(self, size: int) -> None:
        """The writer handed ``size`` queued bytes to the transport."""
        self.sent_bytes += size
        pending = self.pending = self.pending - size
        if self._limit > self.budget:
            # Replay credit only shrinks: at most what is still queued remains allowed.
            self._limit = self.budget + min(self._limit - self.budget, pending)
        if pending <= self.high_water and self._reader is not None:
            self.wake_reader()

    def close(self) -> None:
        """No more items; the writer flushes what is queued and stops."""
        self._closed = True
        self._wake()
        self.wake_reader()

    def _wake(self) -> None:
        """Wake the waiting writer."""
        task = self._waiter
        if task is not None:
            self._waiter = None
            trio.lowlevel.reschedule(task)

    def _notify(self) -> None:
        """Something new for an idle writer. On a running server the outbox only goes on
        the ready list: whoever flushes it (the reader whose command pushed, at the end
        of its chunk, else the server's turns task) writes it or wakes the writer.
        Elsewhere the writer is woken, and a ready list still lets a reader write early.
        """
        ready = self._ready
        if ready is None:
            self._wake()
            return
        turns = getattr(ready, "turns", None)
        if turns is None:  # a plain list: wake, and a reader may still write it early
            self._wake()
        elif not turns.running:  # nothing would flush the list: wake, do not list
            self._wake()
            return
        elif not ready:
            turns.poke()  # if no reader flushes it in this pass, the turns task will
        self._listed = True
        ready.append(self)

    # A cancelled wait clears its slot at once, not in the woken task's ``finally``: in
    # between, a close or push (another task, the same scheduler pass) would otherwise
    # reschedule a task that is already scheduled, which trio refuses (an AssertionError
    # that took the server down at shutdown). The writer's abort function is the outbox
    # itself: a bound method would be one more object while every idle writer waits.
    def __call__(self, _: object) -> trio.lowlevel.Abort:
        """The writer's abort function (``drain_into``'s wait)."""
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _abort_reader(self, _: object) -> trio.lowlevel.Abort:
        self._reader = None
        return trio.lowlevel.Abort.SUCCEEDED

    def attach(self, transport: Transport, ready: list[Outbox] | None) -> None:
        """Let the reader whose command pushed to this idle outbox write it.

        A push to an idle writer does not wake it: the outbox puts itself on ``ready``
        (one list per server), and the reader that caused it calls :func:`send_ready` at
        the end of its chunk, so a delivery leaves in the same scheduling pass as the
        command that produced it, without a task switch; the writer is woken only for
        what has to wait (a full socket, a big or deferred item). Past the pass's write
        budget, the server's turns task writes the rest in later passes (``WriteTurns``).
        """
        self.transport = transport
        self._ready = ready

    def detach(self) -> None:
        """The connection has ended: drop what refers back to it (its overflow callback,
        its transport, the server's ready list, and this outbox's place on it), so that
        no reference cycle keeps it, or this outbox, alive until a garbage-collection
        pass. Anything pushed later is refused, and what is still queued is released."""
        self._closed = True
        self._owner = None
        self.transport = None
        if self._listed:
            # Woken at close: no reader may call send_ready for a while, and the list
            # would keep this outbox until then.
            self._listed = False
            if self._ready is not None and self in self._ready:
                self._ready.remove(self)
        self._ready = None
        if self._queue:
            if self._deferred:
                self._deferred = False
                discard(self._queue)
        self._queue = None

    def wake_reader(self) -> None:
        """End the reader's ``wait_drained`` now (it re-checks why it waited)."""
        task = self._reader
        if task is not None:
            self._reader = None
            trio.lowlevel.reschedule(task)

    @property
    def backlogged(self) -> bool:
        """Over the high-water mark: the reader should wait before handling more."""
        return self.pending > self.high_water and not self._closed

    async def wait_drained(self) -> None:
        """Wait until the writer brings ``pending`` under the high-water mark, the outbox
        closes, or ``wake_reader`` is called."""
        self._wake()  # replies pushed without a wake-up are queued
        if self.backlogged:
            self._reader = trio.lowlevel.current_task()
            try:
                await trio.lowlevel.wait_task_rescheduled(self._abort_reader)
            finally:
                self._reader = None

    def write_inline(self, transport: Transport) -> None:
        """Hand what is queued to the transport from the reader's task, if nothing is
        being sent, nothing queued has to wait, and it is small (the reader's replies at
        the end of a chunk).

        The writer would send it only in trio's next scheduling batch: one more
        epoll_wait and task switch between a request and its reply, most of the round
        trip's gap to Redis. Only a non-blocking write happens here; what the kernel does
        not take stays with the transport, and the writer sends it.
        """
        items = self._queue
        if not items:
            return
        if self._sending or self._leftover or self._deferred or self.pending > SEND_NOW_BYTES:
            self._wake()  # the writer's job (when it is busy, it comes back for these)
            return
        self._queue = None
        size = self.pending
        self.sent += len(items)
        if not transport.send_nowait(items):  # type: ignore[arg-type]  # all bytes
            self._leftover = True
            self._wake()
        self.written(size)

    async def drain_into(
        self, transport: Transport, peer_gone: Callable[[], None] | None = None
    ) -> None:
        """The writer task: one transport write for everything queued, until closed.

        When the transport breaks, calls ``peer_gone``, or else tells the owner
        (``on_peer_gone``: what a connection's writer does, with no callable per
        connection kept while it waits). The waits are written out here
        rather than in a helper coroutine: every await level is a coroutine frame that
        each idle connection keeps, and idle connections are what memory is spent on.
        """
        turns = getattr(self._ready, "turns", None)
        try:
            while True:
                while not self._queue and not self._leftover:
                    if self._closed:
                        return
                    self._waiter = trio.lowlevel.current_task()
                    try:
                        await trio.lowlevel.wait_task_rescheduled(self)
                    finally:
                        self._waiter = None  # already None unless cancelled
                if turns is not None and not turns.take(self.pending):
                    # A burst of writers (a big fan-out): wait in line. A reader may
                    # write what is queued meanwhile (write_inline): then nothing is left.
                    await turns.wait_turn(self.pending)
                    if not self._queue and not self._leftover:
                        continue
                items = self._queue or []
                self._queue = None
                self._leftover = False
                self._sending = True
                self.sent += len(items)
                if self._deferred:
                    self._deferred = False
                    await self._send_deferred(transport, items)
                elif self.pending <= WRITE_BATCH_BYTES:
                    size = self.pending
                    await transport.send_batch(items)  # type: ignore[arg-type]  # all bytes
                    self.written(size)
                else:
                    await self._send_in_parts(transport, items)  # type: ignore[arg-type]
                self._sending = False
                del items  # not kept alive while idle
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if peer_gone is not None:
                peer_gone()
            elif self._owner is not None:
                self._owner.on_peer_gone()
        finally:
            if self._deferred:
                # What the writer never reached releases what it holds (snapshots).
                self._deferred = False
                discard(self._queue or [])

    async def _send_deferred(self, transport: Transport, items: list[Item]) -> None:
        """Write items in order, waiting at each one that is not decided yet; bytes and
        decided items between waits go out in one write."""
        batch: list[bytes] = []
        size = 0
        done = 0
        try:
            for item in items:
                cls = type(item)
                if cls is bytes:
                    size += len(item)
                    batch.append(item)  # type: ignore[arg-type]
                elif (cls is Held and item.ticket.done  # type: ignore[union-attr]
                      and item.requires is None and not item.ticket.failed):  # type: ignore[union-attr]
                    # The common deferred item, decided: its bytes, without two calls
                    # (a durable server's replies and deliveries, one each per message).
                    payload = item.payload  # type: ignore[union-attr]
                    size += len(payload)
                    batch.append(payload)
                else:
                    assert not isinstance(item, bytes)
                    out = item.ready()
                    if out is None:
                        if batch:
                            await transport.send_batch(batch)
                            batch = []
                        decided = getattr(item, "decided", None)
                        if decided is not None:
                            # Wait, then write it with what follows (the items after
                            # it are usually decided by the same commit): one write.
                            await decided()
                            out = item.ready()
                        if out is None:
                            await item.write(transport.send_batch)  # (it streams)
                            out = []
                    # (counted once decided: a cluster gate grows until then)
                    size += len(item)
                    batch.extend(out)
                done += 1
                if size >= WRITE_BATCH_BYTES:
                    if batch:
                        await transport.send_batch(batch)
                        batch = []
                    self.written(size)
                    size = 0
            if batch:
                await transport.send_batch(batch)
            self.written(size)
        finally:
            if done < len(items):
                discard(items[done:])

    async def _send_in_parts(self, transport: Transport, items: list[bytes]) -> None:
        start = size = 0
        last = len(items) - 1
        for i, item in enumerate(items):
            size += len(item)
            if size >= WRITE_BATCH_BYTES or i == last:
                await transport.send_batch(items[start : i + 1])
                self.written(size)
                start, size = i + 1, 0


def send_ready(ready: list[Outbox]) -> None:
    """Write the outboxes whose writers were woken since the last call (``attach``), as
    many as there are turns for (``Ready.turns``); the writers, already woken, write the
    others when their turn comes."""
    turns = getattr(ready, "turns", None)
    while ready:
        outbox = ready[-1]
        if turns is not None and not turns.take(outbox.pending):
            turns.poke()  # the rest in later passes
            return
        ready.pop()
        outbox._listed = False
        if outbox.transport is not None:
            outbox.write_inline(outbox.transport)


def discard(items: list[Item]) -> None:
    """Release the deferred items among ``items`` (they will not be written)."""
    for item in items:
        if type(item) is not bytes:
            item.discard()  # type: ignore[union-attr]
