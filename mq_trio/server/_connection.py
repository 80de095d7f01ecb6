"""One client connection: a reader task and a writer task joined by a memory channel.

The transport (TCP, WebSocket) is the only thing that differs between clients; this
module holds everything else. The shape, from the design card:

* the reader turns incoming lines into commands and applies them to the broker; replies
  and deliveries for this client go into its :class:`Outbox`, in order;
* the writer drains the outbox and hands everything queued to the transport at once;
  what can go without waiting (replies, deliveries the reader's own commands produced)
  the reader hands over itself at the end of each chunk (``Outbox.send_now``);
* the connection's subscriptions end in the ``finally`` of the reading, inside the
  connection's nursery, so whatever ends the connection (EOF, quit, reset, slow-consumer
  cut-off, server shutdown, a bug) releases them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from .. import protocol
from ..broker import Broker
from ..protocol import QUIT, Failure, Send, Subscribe, Unsubscribe

log = logging.getLogger("mq_trio.connection")

DEFAULT_MAX_PENDING_BYTES = 8 << 20
DEFAULT_FLUSH_TIMEOUT = 5.0
#: The writer stops collecting queued items for one write at about this many bytes.
WRITE_BATCH_BYTES = 256 << 10
_INTERNAL_ERROR = Failure(protocol.INTERNAL_ERROR)
#: The most a reader sends itself (``Outbox.send_now``); more is the writer's job.
SEND_NOW_BYTES = 64 << 10
#: The writer task's name: a constant, so trio does not build one per connection.
WRITER = "mq_trio.connection.writer"


class Transport(Protocol):
    """What a connection needs from its byte carrier.

    Transport errors (a reset, a closed WebSocket) surface as ``None`` from
    ``receive_lines`` and as ``trio.BrokenResourceError`` from ``send_batch``.
    """

    @property
    def peer(self) -> str:
        """The client's address, for logs."""

    @property
    def line_too_long(self) -> bool:
        """True once the client sent a line over the limit (after the lines before it)."""

    async def receive_lines(self) -> list[bytes] | None:
        """The next complete lines (maybe none yet), or ``None`` at end of input."""

    async def send_batch(self, items: list[bytes]) -> None:
        """Send encoded JSON objects (no terminators), in order, after anything a
        ``send_nowait`` left over (``items`` may be empty to send only that)."""

    def send_nowait(self, items: list[bytes]) -> bool:
        """Send what can go without waiting; False if the rest waits for ``send_batch``."""

    def stop_receiving(self) -> None:
        """Make a waiting or later ``receive_lines`` return None soon (graceful close)."""

    async def aclose(self) -> None: ...


@attrs.frozen
class Limits:
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES
    max_line_bytes: int = protocol.DEFAULT_MAX_LINE_BYTES
    #: How long a closing connection may take to flush what was queued for it.
    flush_timeout: float = DEFAULT_FLUSH_TIMEOUT


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
    # ParkingLot (an OrderedDict per connection, idle or not).
    __slots__ = ("_queue", "_closed", "_waiter", "_reader", "pending", "budget", "high_water",
                 "_limit", "overflowed", "_on_overflow", "_sending", "_leftover", "transport",
                 "_ready", "_listed", "__weakref__")

    def __init__(self, budget: int, on_overflow: Callable[[], None] | None = None) -> None:
        self._queue: list[bytes] = []
        self._closed = False
        #: The writer, while it waits for something to send.
        self._waiter: trio.lowlevel.Task | None = None
        #: The reader, while it waits for the writer to bring ``pending`` down.
        self._reader: trio.lowlevel.Task | None = None
        self.pending = 0
        self.budget = budget
        #: Over this, the reader waits for the writer before handling more.
        self.high_water = budget // 2
        #: The overflow threshold: the budget plus replay bytes still queued.
        self._limit = budget
        self.overflowed = False
        self._on_overflow = on_overflow
        #: The writer is between taking items and handing them all to the transport.
        self._sending = False
        #: A ``send_now`` left part of its write with the transport: the writer sends it.
        self._leftover = False
        #: See ``attach``.
        self.transport: Transport | None = None
        self._ready: list[Outbox] | None = None
        self._listed = False

    def push(self, payload: bytes) -> None:
        # The hot path of every reply and delivery (fanout: once per subscriber), so the
        # common case is one comparison, an append and a flag test.
        pending = self.pending + len(payload)
        if pending > self._limit or self._closed:
            self._refuse(pending)
            return
        self.pending = pending
        self._queue.append(payload)
        if self._waiter is not None:
            self._wake()

    def push_reply(self, payload: bytes) -> None:
        """``push`` for the reader's own replies, without waking the writer: the reader
        sends or wakes at the end of its batch (``send_now``, ``wait_drained``), and a
        wake-up per reply would cost a scheduler pass per round trip. (A copy of
        ``push``'s first lines, not a call from it: ``push`` is the fan-out hot path.)"""
        pending = self.pending + len(payload)
        if pending > self._limit or self._closed:
            self._refuse(pending)
            return
        self.pending = pending
        self._queue.append(payload)

    def _refuse(self, pending: int) -> None:
        if self.overflowed:
            return
        # Checked before counting, so ``pending`` itself never exceeds the limit.
        if pending > self._limit:
            self.overflowed = True
            self.close()
            if self._on_overflow is not None:
                self._on_overflow()
        # else closed for flushing: the client is leaving and gets nothing new

    def push_replay(self, payloads: list[bytes]) -> None:
        """Queue a subscribe's cache replay, allowed on top of the budget."""
        if payloads and not self._closed:
            self._limit += sum(len(p) for p in payloads)
            for payload in payloads:
                self.push(payload)

    def written(self, size: int) -> None:
        """The writer handed ``size`` queued bytes to the transport."""
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
        task = self._waiter
        if task is not None:
            self._waiter = None
            trio.lowlevel.reschedule(task)
            ready = self._ready
            if ready is not None and not self._listed:
                self._listed = True
                ready.append(self)

    def attach(self, transport: Transport, ready: list[Outbox] | None) -> None:
        """Let the reader whose command woke this outbox's writer write it early.

        When a push wakes the idle writer, the outbox also puts itself on ``ready`` (one
        list per server); the reader that caused it calls :func:`send_ready` at the end of
        its chunk, so a delivery leaves in the same scheduling pass as the command that
        produced it instead of the next one. The woken writer then finds nothing left
        and sleeps again; it still does everything that has to wait.
        """
        self.transport = transport
        self._ready = ready

    def wake_reader(self) -> None:
        """End the reader's ``wait_drained`` now (it re-checks why it waited)."""
        task = self._reader
        if task is not None:
            self._reader = None
            trio.lowlevel.reschedule(task)

    async def _wait(self) -> None:
        """Sleep until the next push or close (only the writer waits here)."""
        if self._waiter is not None:
            raise trio.BusyResourceError("another task is already draining this outbox")
        self._waiter = trio.lowlevel.current_task()
        try:
            await trio.lowlevel.wait_task_rescheduled(_abort)
        finally:
            self._waiter = None  # already None unless cancelled

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
                await trio.lowlevel.wait_task_rescheduled(_abort)
            finally:
                self._reader = None

    async def take(self) -> list[bytes]:
        """Wait for queued items and take them all; ``[]`` once closed and drained.

        Only the writer calls this. Right after it returns, ``pending`` is exactly the
        size of what it returned (everything earlier was reported by ``written``).
        """
        while not self._queue:
            if self._closed:
                return []
            await self._wait()
        items = self._queue
        self._queue = []
        return items

    def send_now(self, transport: Transport) -> None:
        """Hand what is queued to the transport from the reader's task, if nothing is
        being sent and it is small (the reader's replies at the end of a batch).

        The writer would send it only in trio's next scheduling batch: one more
        epoll_wait and task switch between a request and its reply, most of the round
        trip's gap to Redis. Only a non-blocking write happens here; what the kernel does
        not take stays with the transport, and the writer sends it.
        """
        if not self._queue:
            return
        if self._sending or self._leftover or self.pending > SEND_NOW_BYTES:
            self._wake()  # the writer's job (when it is busy, it comes back for these)
            return
        items = self._queue
        self._queue = []
        size = self.pending
        if not transport.send_nowait(items):
            self._leftover = True
            self._wake()
        self.written(size)

    async def drain_into(self, transport: Transport, peer_gone: Callable[[], None]) -> None:
        """The writer task: one transport write for everything queued, until closed.

        Calls ``peer_gone`` when the transport breaks. The waits are written out here
        rather than ``await self.take()``: every await level is a coroutine frame that
        each idle connection keeps, and idle connections are what memory is spent on.
        """
        try:
            while True:
                while not self._queue and not self._leftover:
                    if self._closed:
                        return
                    self._waiter = trio.lowlevel.current_task()
                    try:
                        await trio.lowlevel.wait_task_rescheduled(_abort)
                    finally:
                        self._waiter = None  # already None unless cancelled
                items = self._queue
                self._queue = []
                self._leftover = False
                self._sending = True
                if self.pending <= WRITE_BATCH_BYTES:
                    size = self.pending
                    await transport.send_batch(items)
                    self.written(size)
                else:
                    await self._send_in_parts(transport, items)
                self._sending = False
                del items  # not kept alive while idle
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            peer_gone()

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
    """Write the outboxes whose writers were woken since the last call (``attach``)."""
    while ready:
        outbox = ready.pop()
        outbox._listed = False
        if outbox.transport is not None:
            outbox.send_now(outbox.transport)


def _abort(_: object) -> trio.lowlevel.Abort:
    # The waiter slots are cleared by the waits' own ``finally``.
    return trio.lowlevel.Abort.SUCCEEDED


@attrs.define(eq=False)
class Connection:
    transport: Transport
    broker: Broker
    limits: Limits = attrs.field(factory=Limits)
    #: Builds the outbox: (byte budget, overflow callback). Durable mode passes an
    #: outbox whose writer waits for the store (mq_trio.store.DurableOutbox).
    outbox_factory: Callable[[int, Callable[[], None] | None], Outbox] = Outbox
    #: The server's set of live connections: this one is in it while it runs.
    registry: set[Connection] | None = None
    #: The server's list of outboxes with freshly woken writers (``Outbox.attach``).
    ready: list[Outbox] | None = None
    outbox: Outbox = attrs.field(init=False)
    #: Set by ``stop``: no more commands are handled.
    _stopping: bool = attrs.field(init=False, default=False)
    _scope: trio.CancelScope | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.outbox = self.outbox_factory(self.limits.max_pending_bytes, self._slow_consumer)
        self.outbox.attach(self.transport, self.ready)

    @property
    def peer(self) -> str:
        return self.transport.peer

    def stop(self, reason: str = "server shutdown") -> None:
        """Stop reading new commands; what is queued is still flushed (graceful close)."""
        # Not a cancel scope around the reader: that is two sets and two objects for every
        # connection, idle or not. The transport wakes a waiting read instead, and
        # _handle_lines refuses further commands.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("closing %s: %s", self.peer, reason)
        self._stopping = True
        self.transport.stop_receiving()
        self.outbox.wake_reader()

    def _slow_consumer(self) -> None:
        log.warning(
            "disconnecting %s: slow consumer, more than %d bytes pending",
            self.peer,
            self.limits.max_pending_bytes,
        )
        # Unsubscribe at once: until this connection's own cleanup runs, "one" messages
        # would otherwise still be given to an outbox that drops them.
        self.broker.evict(self.outbox)
        if self._scope is not None:
            self._scope.cancel()

    def _peer_gone(self) -> None:
        # The writer cannot deliver any more: reading on is pointless.
        if self._scope is not None:
            self._scope.cancel()

    async def run(self) -> None:
        """Serve the client until it leaves; always closes the transport.

        The reader is this coroutine itself (its loop is not a method it awaits) and the
        writer is one child task: each await level is a coroutine frame that every idle
        connection keeps. A failure stays inside this connection.
        """
        registry = self.registry
        if registry is not None:
            registry.add(self)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connected: %s", self.peer)
        transport = self.transport
        outbox = self.outbox
        ready = self.ready
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(outbox.drain_into, transport, self._peer_gone, name=WRITER)
                try:
                    while (lines := await transport.receive_lines()) is not None:
                        done = 0
                        while (done := self._handle_lines(lines, done)) >= 0:
                            if not outbox.backlogged:
                                break
                            await outbox.wait_drained()
                        if done < 0:
                            break
                        if ready:
                            send_ready(ready)  # deliveries this chunk produced, first
                        outbox.send_now(transport)
                        if transport.line_too_long:
                            outbox.push(protocol.failure_bytes(protocol.LINE_TOO_LONG))
                            log.info("closing %s: line over %d bytes", self.peer,
                                     self.limits.max_line_bytes)
                            break
                        del lines  # not kept alive while waiting for more
                finally:
                    # Whatever ended the reading (EOF, quit, reset, cut-off, shutdown, a
                    # bug) releases the subscriptions; a plain finally rather than a
                    # context manager, which would be one more object per connection.
                    self.broker.disconnect(outbox)
                # Nothing new arrives now; flush what was queued (replies, deliveries)
                # within a bounded time, then close.
                outbox.close()
                nursery.cancel_scope.deadline = min(
                    nursery.cancel_scope.deadline,
                    trio.current_time() + self.limits.flush_timeout,
                )
        except Exception:
            log.exception("connection %s failed", self.peer)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await transport.aclose()
            if registry is not None:
                registry.discard(self)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("disconnected: %s", self.peer)

    def _handle_lines(self, lines: list[bytes], start: int) -> int:
        """Apply ``lines[start:]``; return how many lines are done, or -1 to stop reading.

        Returns early (with the count so far) when the outbox is over its high-water
        mark (``backlogged``), so the reader can wait for the writer before going on; -1
        when the client quit or was cut off as a slow consumer (the rest is not handled).
        """
        outbox = self.outbox
        if outbox.overflowed or self._stopping:  # while the reader waited
            return -1
        high_water = outbox.high_water
        parse_line = protocol.parse_line
        broker = self.broker
        publish = broker.publish
        reply = outbox.push_reply
        for i in range(start, len(lines)):
            try:
                event = parse_line(lines[i])
            except Exception:  # a bug in parsing costs this line, like one in handling
                log.exception("internal error parsing a line from %s", self.peer)
                event = _INTERNAL_ERROR
            # Sends are most of the traffic: handled here, not through handle_event's
            # dispatch (two calls a message in the publish profile).
            if type(event) is Send:
                try:
                    publish(event)
                    reply(broker.send_reply)
                except Exception:
                    self._internal_error()
            elif self.handle_event(event):
                return -1
            if outbox.overflowed:
                return -1
            if outbox.pending > high_water:
                return i + 1
        return len(lines)

    def _internal_error(self) -> None:
        # A bug must cost this one command, not the connection or the server.
        log.exception("internal error handling a command from %s", self.peer)
        self.outbox.push_reply(protocol.failure_bytes(protocol.INTERNAL_ERROR))

    def handle_event(self, event: protocol.LineEvent) -> bool:
        """Apply one parsed line; return True when the client asked to quit."""
        if event is None:
            return False
        push = self.outbox.push_reply  # the reader's loop calls send_now after the batch
        cls = type(event)
        if cls is Failure:
            push(protocol.failure_bytes(event.reason))  # type: ignore[union-attr]
            return False
        if event is QUIT:
            return True
        try:
            if cls is Send:
                broker = self.broker
                broker.publish(event)  # type: ignore[arg-type]
                push(broker.send_reply)
            elif cls is Subscribe:
                assert isinstance(event, Subscribe)
                replay = self.broker.subscribe(
                    self.outbox, event.topic, event.last_seen, event.cache
                )
                if event.epoch is None:
                    push(protocol.SUCCESS)
                else:
                    push(self.broker.subscribe_reply(event.topic, event.last_seen, event.epoch))
                self.outbox.push_replay(replay)
            elif cls is Unsubscribe:
                assert isinstance(event, Unsubscribe)
                self.broker.unsubscribe(self.outbox, event.topic)
                push(protocol.SUCCESS)
        except Exception:
            self._internal_error()
        return False
