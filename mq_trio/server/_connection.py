"""One client connection: a reader task and a writer task joined by a memory channel.

The transport (TCP, WebSocket) is the only thing that differs between clients; this
module holds everything else. The shape, from the design card:

* the reader turns incoming lines into commands and applies them to the broker; replies
  and deliveries for this client go into its :class:`Outbox`, in order;
* the writer drains the outbox and hands everything queued to the transport at once;
  what can go without waiting (replies, deliveries the reader's own commands produced)
  the reader hands over itself at the end of each chunk (``Outbox.write_inline``);
* the connection's subscriptions end in the ``finally`` of the reading, inside the
  connection's nursery, so whatever ends the connection (EOF, quit, reset, slow-consumer
  cut-off, server shutdown, a bug) releases them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, MutableSet
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import attrs
import trio

from .. import protocol
from ..broker import (
    PENDING_COST,
    Broker,
    Gate,
    Item,
    QueueFull,
    SendBatch,
    Ticket,
    TooManyTopics,
    send_reply,
)
from ..protocol import (
    JOB_COMMANDS,
    QUIT,
    SUCCESS,
    Ack,
    Auth,
    Batch,
    Failure,
    JobCommand,
    Nack,
    Progress,
    Send,
    SendEx,
    Subscribe,
    Unsubscribe,
)
from ..transports._base import Transport
from ._outbox import Outbox, send_ready
from ._pacer import Pacer
from ._stats import Stats

if TYPE_CHECKING:
    from ..auth import Authenticator, Grant

log = logging.getLogger("mq_trio.connection")
_T = TypeVar("_T")

DEFAULT_MAX_PENDING_BYTES = 8 << 20
DEFAULT_FLUSH_TIMEOUT = 5.0
_INTERNAL_ERROR = Failure(protocol.INTERNAL_ERROR)
_TOO_MANY_TOPICS = protocol.failure_bytes(protocol.TOO_MANY_TOPICS)
_NOT_AUTHENTICATED = protocol.failure_bytes(protocol.NOT_AUTHENTICATED)
_PERMISSION_DENIED = protocol.failure_bytes(protocol.PERMISSION_DENIED)
_AUTH_FAILED = protocol.failure_bytes(protocol.AUTH_FAILED)
_QUEUE_FULL = protocol.failure_bytes(protocol.QUEUE_FULL)
_UNKNOWN_JOB = protocol.failure_bytes(protocol.UNKNOWN_JOB)
_STORAGE_UNAVAILABLE = protocol.failure_bytes(protocol.STORAGE_UNAVAILABLE)
#: Subscriptions released per scheduler pass when a connection with many ends.
_RELEASE_STEP = 2000
#: Bytes of deliveries a reader makes before it checks whether writes wait for turns (and
#: if so, lets them be written before it handles more: ``WriteTurns.wait_room``).
FANOUT_STEP = 4 << 20
#: The writer task's name: a constant, so trio does not build one per connection.
WRITER = "mq_trio.connection.writer"
def _no_fd(_: object) -> int:
    """``wait_fd`` of a transport without one (WebSocket, in-memory streams)."""
    return -1


#: Counters of connections made without a server (tests, embedding): never read.
_UNCOUNTED = Stats()
#: The reasons of the failure replies sent as prepared bytes (``Connection._fail``).
_REASONS = {
    protocol.failure_bytes(r): r
    for r in (protocol.TOO_MANY_TOPICS, protocol.NOT_AUTHENTICATED,
              protocol.PERMISSION_DENIED, protocol.AUTH_FAILED, protocol.QUEUE_FULL,
              protocol.UNKNOWN_JOB)
}


@attrs.define(slots=True, eq=False)
class HeldReplies:
    """A client's replies that wait for the same ticket, as one outbox item: a durable
    store decides a whole commit's jobs and acks with one ticket, so a chunk of them
    costs one item instead of one ``Held`` each (queued, then taken apart by the
    writer). If the ticket fails, each reply is ``Storage unavailable``. ``end``: the
    outbox's ``pending`` right after this item's last reply, to tell whether anything
    was queued after it (``Connection._held_reply``)."""

    payloads: list[bytes]
    ticket: Ticket
    size: int
    end: int = -1

    def __len__(self) -> int:
        return self.size

    def ready(self) -> list[bytes] | None:
        ticket = self.ticket
        if not ticket.done:
            return None
        if ticket.failed:
            return [_STORAGE_UNAVAILABLE] * len(self.payloads)
        return self.payloads

    async def decided(self) -> None:
        await self.ticket.wait()

    async def write(self, send: SendBatch) -> None:
        await self.ticket.wait()
        out = self.ready()
        if out:
            await send(out)

    def discard(self) -> None:
        pass


@attrs.define(eq=False)
class LogThrottle:
    """At most one log line per ``interval`` for an event a flood of clients can cause
    (connections closed for their input), with a count of the lines left out."""

    interval: float = 10.0
    _next: float = float("-inf")
    _unlogged: int = 0

    def allow(self) -> int | None:
        """None: do not log now; else how many were left out since the last line."""
        now = time.monotonic()
        if now < self._next:
            self._unlogged += 1
            return None
        more, self._unlogged = self._unlogged, 0
        self._next = now + self.interval
        return more


class Registry(MutableSet["Connection"]):
    """The server's live connections, which a task can wait on to change (``Server.
    wait_until``: tests, and code that embeds the server). Adding and removing cost a
    check of the parking lot when nobody waits.

    A set whose members are a dict's keys: at 10,000 connections a set's table (grown
    fourfold at 60 % full) was about 100 bytes per connection, a dict's is about 30.
    """

    __slots__ = ("_members", "changed", "stats")

    def __init__(self) -> None:
        self._members: dict[Connection, None] = {}
        self.changed = trio.lowlevel.ParkingLot()
        #: Server-wide counters (metrics); connections add their traffic when they end.
        self.stats = Stats()

    def __contains__(self, connection: object) -> bool:
        return connection in self._members

    def __iter__(self) -> Iterator[Connection]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    @classmethod
    def _from_iterable(cls, it: Iterable[_T]) -> set[_T]:
        """What ``&``, ``|`` and ``-`` make: plain sets."""
        return set(it)

    def add(self, connection: Connection) -> None:
        self._members[connection] = None
        if self.changed:
            self.changed.unpark_all()

    def discard(self, connection: Connection) -> None:
        if self._members.pop(connection, self) is not self:
            self.stats.retire(connection)
        if self.changed:
            self.changed.unpark_all()


@attrs.frozen
class Limits:
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES
    max_line_bytes: int = protocol.DEFAULT_MAX_LINE_BYTES
    #: How long a closing connection may take to flush what was queued for it.
    flush_timeout: float = DEFAULT_FLUSH_TIMEOUT
    #: Seconds a line may stay unfinished after its first byte; 0: no limit.
    line_timeout: float = 0.0
    #: With --auth: seconds a client has to authenticate after connecting.
    auth_timeout: float = 5.0
    #: Shared by the server's connections (one Limits per server).
    closing_log: LogThrottle = attrs.field(factory=LogThrottle, eq=False)
    cutoff_log: LogThrottle = attrs.field(factory=LogThrottle, eq=False)
    auth_log: LogThrottle = attrs.field(factory=LogThrottle, eq=False)


@attrs.define(eq=False)
class Connection:
    transport: Transport
    broker: Broker
    limits: Limits = attrs.field(factory=Limits)
    #: The server's set of live connections: this one is in it while it runs.
    registry: MutableSet[Connection] | None = None
    #: The server's list of outboxes with freshly woken writers (``Outbox.attach``).
    ready: list[Outbox] | None = None
    #: The server's pacer for cancelling cut-off connections, a few per pass (None: at
    #: once).
    reaper: Pacer | None = None
    #: With --auth: checks credentials and makes grants (None: everyone may do anything).
    authenticator: Authenticator | None = None
    outbox: Outbox = attrs.field(init=False)
    #: Set by ``stop``: no more commands are handled.
    _stopping: bool = attrs.field(init=False, default=False)
    _scope: trio.CancelScope | None = attrs.field(init=False, default=None)
    #: With --auth: what this client may do, once authenticated.
    grant: Grant | None = attrs.field(init=False, default=None)
    #: An ``auth`` command waiting for the reader to verify it (off the parsing loop).
    _pending_auth: Auth | None = attrs.field(init=False, default=None)
    #: ``_handle_lines`` stopped for the fan-out so far to be written (``FANOUT_STEP``).
    _fanning: bool = attrs.field(init=False, default=False)
    #: The auth deadline, then the token's expiry: cancelled by a (new) auth.
    _auth_timer: trio.CancelScope | None = attrs.field(init=False, default=None)
    #: Lines received (metrics; counted per chunk).
    lines_in: int = attrs.field(init=False, default=0)
    #: Topics whose jobs this chunk's acks and nacks made room for (``_handle_lines``);
    #: None until a first ack (no set per idle connection).
    _room_made: set[str] | None = attrs.field(init=False, default=None)
    #: The last item of replies waiting for a ticket that this pass of ``_apply_lines``
    #: queued (``_held_reply``); None outside it.
    _replies: HeldReplies | None = attrs.field(init=False, default=None)
    #: When it connected (``time.time()``), for introspection.
    since: float = attrs.field(init=False, factory=time.time)

    def __attrs_post_init__(self) -> None:
        self.outbox = Outbox(self.limits.max_pending_bytes, self)
        self.outbox.attach(self.transport, self.ready)
        if hasattr(self.transport, "turns"):  # a transport that paces its waiting writes
            self.transport.turns = getattr(self.ready, "turns", None)

    @property
    def peer(self) -> str:
        return self.transport.peer

    @property
    def stats(self) -> Stats:
        """The server's counters (a throwaway one without a registry): looked up when
        counted, off the hot paths, rather than a field of every connection."""
        stats = getattr(self.registry, "stats", None)
        return stats if stats is not None else _UNCOUNTED

    @property
    def bytes_in(self) -> int:
        """Bytes received (metrics): counted by the transport's wire state."""
        return int(getattr(getattr(self.transport, "wire", None), "received", 0))

    def _fail(self, reply: bytes) -> None:
        """Count a failure reply by its reason (metrics); off the hot paths."""
        reason = _REASONS.get(reply)
        if reason is None:
            try:
                reason = str(json.loads(reply).get("reason", "?"))
            except ValueError:
                reason = "?"
        self.stats.fail(reason)

    @property
    def log_extra(self) -> dict[str, str]:
        """The peer as a field of this connection's log records (``--log-format json``)."""
        return {"peer": self.transport.peer}

    def stop(self, reason: str = "server shutdown") -> None:
        """Stop reading new commands; what is queued is still flushed (graceful close)."""
        # Not a cancel scope around the reader: that is two sets and two objects for every
        # connection, idle or not. The transport wakes a waiting read instead, and
        # _handle_lines refuses further commands.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("closing %s: %s", self.peer, reason, extra=self.log_extra)
        self._stopping = True
        self.transport.stop_receiving()
        self.outbox.wake_reader()

    def _slow_consumer(self) -> None:
        self.stats.slow_consumers += 1
        # One publish can cut off thousands at once: a log line each was half the stall.
        more = self.limits.cutoff_log.allow()
        if more is not None:
            log.warning(
                "disconnecting %s: slow consumer, more than %d bytes pending%s",
                self.peer,
                self.limits.max_pending_bytes,
                f" ({more} more since the last such line)" if more else "",
                extra=self.log_extra,
            )
        # Unsubscribe at once: until this connection's own cleanup runs, "one" messages
        # would otherwise still be given to an outbox that drops them.
        self.broker.evict(self.outbox)
        if self._scope is not None:
            if self.reaper is not None:
                self.reaper.defer(self._scope.cancel)  # soon: many may overflow at once
            else:
                self._scope.cancel()

    async def _await_own_deliveries(self) -> None:
        """Cluster mode: before a departing client's subscriptions go, its sends' own
        deliveries (still on their way back from Redis) arrive, within the flush time,
        as they would have been queued already on one node. (Cancelled at once if the
        connection is being cut off.)"""
        shared = self.broker.shared
        assert shared is not None
        with trio.move_on_after(self.limits.flush_timeout):
            for ticket in shared.undecided(self.outbox):
                await ticket.wait()

    def _peer_gone(self) -> None:
        # The writer cannot deliver any more: reading on is pointless.
        if self._scope is not None:
            self._scope.cancel()

    # The outbox's owner (``OutboxOwner``): it holds the connection, not bound methods.
    on_overflow = _slow_consumer
    on_peer_gone = _peer_gone

    async def run(self) -> None:
        """Serve the client until it leaves; always closes the transport.

        The reader is this coroutine itself (its loop is not a method it awaits) and the
        writer is one child task: each await level is a coroutine frame that every idle
        connection keeps. A failure stays inside this connection.
        """
        # Few locals: each is a slot in this coroutine's frame and in its frame object,
        # kept by every idle connection (the rare paths are methods).
        if self.registry is not None:
            self.registry.add(self)
        self.stats.connections_total += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connected: %s", self.peer, extra=self.log_extra)
        transport = self.transport
        outbox = self.outbox
        # The class's function, not a bound method: that would be one more object kept.
        wait_fd = getattr(type(transport), "wait_fd", _no_fd)
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(outbox.drain_into, transport, name=WRITER)
                if self.authenticator is not None:
                    self._start_auth(nursery)
                try:
                    while True:
                        if (fd := wait_fd(transport)) >= 0:
                            # An idle connection waits here, not inside receive_lines:
                            # one coroutine frame less per idle connection.
                            try:
                                await trio.lowlevel.wait_readable(fd)
                            except trio.ClosedResourceError:
                                pass  # receive_lines' read finds the descriptor closed
                        if (lines := await transport.receive_lines()) is None:
                            break
                        self.lines_in += len(lines)
                        done = 0
                        while (done := self._handle_lines(lines, done)) >= 0:
                            if self._pending_auth is not None:
                                await self._authenticate(nursery)
                                continue
                            if self._fanning:
                                # What this client's sends fanned out waits for write
                                # turns: it is written before more is handled.
                                self._fanning = False
                                await self._wait_fanout()
                                continue
                            if not outbox.backlogged:
                                break
                            await outbox.wait_drained()
                        if done < 0:
                            break
                        if self.ready:
                            send_ready(self.ready)  # deliveries this chunk produced, first
                        outbox.write_inline(transport)
                        if transport.closing_reply() is not None:
                            self._closing()
                            break
                        del lines  # not kept alive while waiting for more
                finally:
                    # Whatever ended the reading (EOF, quit, reset, cut-off, shutdown, a
                    # bug) releases the subscriptions; a plain finally rather than a
                    # context manager, which would be one more object per connection.
                    try:
                        if self.reaper is not None:
                            # Thousands of clients gone at once (one epoll's EOFs) release
                            # their subscriptions and close over several passes, not in
                            # one that every other client waits for.
                            await self.reaper.turn()
                        if self.broker.shared is not None:
                            await self._await_own_deliveries()
                    finally:
                        if self.broker.subscription_count(outbox) <= _RELEASE_STEP:
                            self.broker.disconnect(outbox)
                        else:
                            await self._release_subscriptions()
                self._flush(nursery.cancel_scope)
        except Exception:
            log.exception("connection %s failed", self.peer, extra=self.log_extra)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await transport.aclose()
            if self.registry is not None:
                self.registry.discard(self)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("disconnected: %s", self.peer, extra=self.log_extra)
            self._release()

    def _flush(self, scope: trio.CancelScope) -> None:
        """Nothing new arrives now: the writer flushes what was queued (replies,
        deliveries) within a bounded time, then the connection closes."""
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        self.outbox.close()
        scope.deadline = min(scope.deadline, trio.current_time() + self.limits.flush_timeout)

    async def _wait_fanout(self) -> None:
        """Write what this client's sends fanned out, then wait for the write turns
        (``WriteTurns.wait_room``) before its reader handles more."""
        ready = self.ready
        if ready:
            send_ready(ready)
        self.outbox.write_inline(self.transport)
        turns = getattr(ready, "turns", None)
        assert turns is not None
        await turns.wait_room()

    def _closing(self) -> None:
        """The transport closes on its own (``Line too long``, an input limit): its
        reply goes last; logged at a bounded rate."""
        closing = self.transport.closing_reply()
        assert closing is not None
        self.outbox.push(closing)
        self._fail(closing)
        more = self.limits.closing_log.allow()
        if more is not None:
            log.info("closing %s: %s%s", self.peer, closing.decode(),
                     f" ({more} more since the last such line)" if more else "",
                     extra=self.log_extra)

    async def _release_subscriptions(self) -> None:
        """Leave many topics in steps, letting other clients run between them (a
        cleanup of a million subscriptions is over a second of work). Shielded: the
        connection's scope may already be cancelled, and the cleanup must finish."""
        with trio.CancelScope(shield=True):
            for _ in self.broker.disconnect_steps(self.outbox, _RELEASE_STEP):
                await trio.lowlevel.checkpoint()

    def _release(self) -> None:
        """Break the reference cycles of a connection that has ended.

        The server raises the collector's threshold, so an object kept only by a cycle can
        stay for a long time, and with it the transport's buffers (an unfinished line, up
        to the line limit). Once ``run`` is over, reference counting alone must free the
        connection: the outbox's overflow callback is this connection's bound method, it
        holds the transport and the server's ready list, and the nursery's cancel scope
        leads to the tasks. Done once per connection, off the per-message paths.
        """
        self._scope = None
        self._auth_timer = None
        self.outbox.detach()

    # --- authentication (docs/security.md) ---------------------------------------------

    def _start_auth(self, nursery: trio.Nursery) -> None:
        """A client certificate the auth file names authenticates at once; any other
        client has --auth-timeout to send a good ``auth``."""
        assert self.authenticator is not None
        subject = getattr(self.transport, "tls_subject", None)
        if subject is not None:
            grant = self.authenticator.certificate_grant(subject)
            if grant is not None:
                self._granted(grant, nursery)
                return
        self._set_timer(nursery, self.limits.auth_timeout, protocol.AUTH_TIMEOUT)

    def _set_timer(self, nursery: trio.Nursery, seconds: float, reason: str) -> None:
        """Close the connection with ``reason`` in ``seconds`` unless a later auth
        replaces this timer."""
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        scope = self._auth_timer = trio.CancelScope()

        async def expire() -> None:
            with scope:
                await trio.sleep(seconds)
                self._close_with(reason)

        nursery.start_soon(expire)

    def _close_with(self, reason: str) -> None:
        """One failure reply, then a graceful close (what was queued is flushed)."""
        self.stats.fail(reason)
        self.outbox.push(protocol.failure_bytes(reason))
        self._refuse(reason)
        self.stop(reason)

    def _refuse(self, reason: str) -> None:
        """Tell a transport that closes with a reason (WebSocket: 1008) why."""
        refuse = getattr(self.transport, "refuse", None)
        if refuse is not None:
            refuse(reason)

    def _granted(self, grant: Grant, nursery: trio.Nursery) -> None:
        self.grant = grant
        if grant.expires is None:
            if self._auth_timer is not None:
                self._auth_timer.cancel()
                self._auth_timer = None
        else:
            self._set_timer(nursery, max(0.0, grant.expires - time.time()),
                            protocol.TOKEN_EXPIRED)

    async def _authenticate(self, nursery: trio.Nursery) -> None:
        """Verify the pending ``auth`` (a password takes a worker thread); success keeps
        reading, failure answers ``Authentication failed`` and ends the connection."""
        from ..auth import AuthFailed

        event = self._pending_auth
        assert event is not None and self.authenticator is not None
        self._pending_auth = None
        self.outbox.write_inline(self.transport)  # earlier replies need not wait for it
        try:
            grant = await self.authenticator.authenticate(
                token=event.token, user=event.user, password=event.password,
                peer=self.peer.rpartition(":")[0],
            )
        except AuthFailed as exc:
            more = self.limits.auth_log.allow()
            if more is not None:
                log.warning("authentication failed for %s: %s%s", self.peer, exc,
                            f" ({more} more since the last such line)" if more else "",
                            extra=self.log_extra)
            self.outbox.queue_reply(_AUTH_FAILED)
            self.stats.fail(protocol.AUTH_FAILED)
            self._refuse(protocol.AUTH_FAILED)
            self._stopping = True
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s authenticated as %s", self.peer, grant.identity,
                      extra=self.log_extra)
        self._granted(grant, nursery)
        self.outbox.queue_reply(SUCCESS)

    def _current_grant(self) -> Grant | None:
        """The grant under the current rules (a reload makes old ones stale); None when
        the identity is gone, which ends the connection."""
        grant = self.grant
        if grant is not None and grant.stale:
            assert self.authenticator is not None
            grant = self.grant = self.authenticator.regrant(grant)
            if grant is None:
                self._refuse(protocol.AUTH_FAILED)
                self._stopping = True
        return grant

    def recheck_grant(self) -> None:
        """After a reload of the auth file: close this connection if its identity is
        gone; end its subscriptions that the new rules deny (logged)."""
        if self.grant is None or self._stopping:
            return
        grant = self._current_grant()
        if grant is None:
            self._close_with(protocol.AUTH_FAILED)
            return
        denied = [t for t in self.broker.topics_of(self.outbox) if not grant.may_subscribe(t)]
        for topic in denied:
            self.broker.unsubscribe(self.outbox, topic)
        if denied:
            log.info("%s (%s): %d subscription(s) ended by the reloaded rules, e.g. %r",
                     self.peer, grant.identity, len(denied), denied[0], extra=self.log_extra)

    def _no_grant_reply(self) -> bytes:
        """Why a command without a grant is refused: not yet authenticated, or no more
        (a reload removed the identity, which also ends the connection)."""
        return _AUTH_FAILED if self._stopping else _NOT_AUTHENTICATED

    def publish_refusal(self, topic: str) -> bytes | None:
        """With --auth: the reply refusing a send to ``topic``, or None to allow it."""
        grant = self._current_grant()
        if grant is None:
            return self._no_grant_reply()
        return None if grant.may_publish(topic) else _PERMISSION_DENIED

    def _subscribe_refusal(self, topic: str) -> bytes | None:
        grant = self._current_grant()
        if grant is None:
            return self._no_grant_reply()
        return None if grant.may_subscribe(topic) else _PERMISSION_DENIED

    def _handle_lines(self, lines: list[bytes], start: int) -> int:
        """``_apply_lines``, then deliver the jobs that this chunk's acks and nacks made
        room for: once per topic and chunk rather than once per ack (after the replies,
        as docs/protocol.md says)."""
        done = self._apply_lines(lines, start)
        room_made = self._room_made
        if room_made:
            for topic in room_made:
                self.broker.room_made(topic)
            room_made.clear()
        return done

    def _apply_lines(self, lines: list[bytes], start: int) -> int:
        """Apply ``lines[start:]``; return how many lines are done, or -1 to stop reading.

        Returns early (with the count so far) when the outbox is over its high-water
        mark (``backlogged``), so the reader can wait for the writer before going on; -1
        when the client quit or was cut off as a slow consumer (the rest is not handled).
        """
        outbox = self.outbox
        # A group of held replies is joined only within one pass (the writer may take
        # the queue between passes).
        self._replies = None
        if outbox.overflowed or self._stopping:  # while the reader waited
            return -1
        high_water = outbox.high_water
        parse_line = protocol.parse_line
        broker = self.broker
        shared = broker.shared is not None
        publish = broker.publish if not shared else partial(broker.publish_shared, outbox)
        reply = outbox.queue_reply
        # With --auth, each send is checked: a lookup in the grant's memo of allowed
        # topics, and the full check only on a miss. The grant is current for the whole
        # chunk: a reload (another task) cannot happen while these lines are handled.
        refusal = memo = None
        if self.authenticator is not None:
            refusal = self.publish_refusal
            grant = self._current_grant()
            if grant is not None:
                memo = grant.publish_memo
        turns = getattr(self.ready, "turns", None)
        fan_limit = broker.fanned + FANOUT_STEP if turns is not None else 1 << 62
        for i in range(start, len(lines)):
            try:
                event = parse_line(lines[i])
            except Exception:  # a bug in parsing costs this line, like one in handling
                log.exception("internal error parsing a line from %s", self.peer,
                              extra=self.log_extra)
                event = _INTERNAL_ERROR
            # Sends are most of the traffic: handled here, not through handle_event's
            # dispatch (two calls a message in the publish profile).
            if type(event) is Send:
                if (refusal is not None
                        and (memo is None or memo.get(event.topic) is not True)
                        and (denied := refusal(event.topic)) is not None):
                    reply(denied)
                    self._fail(denied)
                    if self._stopping:
                        return -1
                else:
                    try:
                        recorded = publish(event)
                        if type(recorded) is int:
                            reply(SUCCESS)
                        elif shared and type(recorded) is not Gate:
                            # A cluster node's send whose sender is not subscribed to
                            # its topic: a reply that only waits (grouped per write);
                            # the bytes it left in the queue for Redis count for it.
                            self._held_reply(SUCCESS, recorded,  # type: ignore[arg-type]
                                             PENDING_COST + len(event.raw))
                        else:
                            outbox.push_deferred(send_reply(recorded))  # type: ignore[arg-type]
                    except TooManyTopics:
                        reply(_TOO_MANY_TOPICS)
                        self.stats.fail(protocol.TOO_MANY_TOPICS)
                    except Exception:
                        self._internal_error()
                    if broker.fanned > fan_limit:
                        # A wide fan-out: if writes already wait for turns, the reader
                        # waits for them before it handles more (memory and fairness).
                        assert turns is not None
                        if turns.busy:
                            self._fanning = True
                            return i + 1
                        fan_limit = broker.fanned + FANOUT_STEP
            elif type(event) in JOB_COMMANDS and refusal is None:
                # (a work queue's other half; with --auth it goes the checked way)
                self._job_command(event)  # type: ignore[arg-type]
            elif type(event) is SendEx and refusal is None:
                try:
                    self._publish_ex(event)
                except TooManyTopics:
                    reply(_TOO_MANY_TOPICS)
                    self.stats.fail(protocol.TOO_MANY_TOPICS)
                except Exception:
                    self._internal_error()
            elif self.handle_event(event):
                return -1
            elif self._pending_auth is not None:
                return i + 1  # the reader verifies it, then handles the rest
            elif self._stopping:
                return -1
            elif broker.fanned > fan_limit:  # (a batch to many subscribers, as above)
                assert turns is not None
                if turns.busy:
                    self._fanning = True
                    return i + 1
                fan_limit = broker.fanned + FANOUT_STEP
            if outbox.overflowed:
                return -1
            if outbox.pending > high_water:
                return i + 1
        return len(lines)

    def _reply(self, item: Item) -> None:
        if type(item) is bytes:
            self.outbox.queue_reply(item)
        else:
            self.outbox.push_deferred(item)  # type: ignore[arg-type]  # a Deferred

    def _internal_error(self) -> None:
        # A bug must cost this one command, not the connection or the server.
        log.exception("internal error handling a command from %s", self.peer,
                      extra=self.log_extra)
        self.outbox.queue_reply(protocol.failure_bytes(protocol.INTERNAL_ERROR))
        self.stats.fail(protocol.INTERNAL_ERROR)

    def _allowed(self, event: protocol.LineEvent) -> bool:
        """With --auth: whether ``event`` may go on; if not, its refusal is queued. An
        ``auth`` is set aside for the reader (``_pending_auth``); unsubscribing needs
        no permission once authenticated."""
        cls = type(event)
        if cls is Auth:
            self._pending_auth = event  # type: ignore[assignment]
            return False
        if isinstance(event, Send | Batch):
            denied = self.publish_refusal(event.topic)
        elif isinstance(event, Subscribe):
            denied = self._subscribe_refusal(event.topic)
        else:  # unsubscribe, ack, nack, progress: the connection's own
            denied = None if self._current_grant() is not None else self._no_grant_reply()
        if denied is None:
            return True
        self.outbox.queue_reply(denied)
        self._fail(denied)
        return False

    def _publish_ex(self, event: SendEx | Batch) -> None:
        """A job, a send with an id, a batch: the reply carries the index."""
        try:
            if self.broker.shared is not None:
                self.outbox.push_deferred(self.broker.publish_ex_shared(self.outbox, event))
                return
            if type(event) is Batch:
                reply, recorded = self.broker.publish_batch(event)
            else:
                reply, recorded = self.broker.publish_ex(event)  # type: ignore[arg-type]
        except QueueFull:
            self.outbox.queue_reply(_QUEUE_FULL)
            self.stats.fail(protocol.QUEUE_FULL)
            return
        if type(recorded) is int:
            self.outbox.queue_reply(reply)
        else:
            self._held_reply(reply, recorded)  # type: ignore[arg-type]

    def _held_reply(self, reply: bytes, ticket: Ticket, cost: int = 0) -> None:
        """Queue a reply that waits for ``ticket`` (``Storage unavailable`` if it fails):
        into the group queued last by this pass if it waits for the same ticket and
        nothing was queued after it (then ``pending`` is still its end: every item
        queued meanwhile has a length, or came from ``handle_event``, which ends the
        group), else as a new group. ``cost``: what it counts against the budget, if
        more than the reply (what the send left queued elsewhere)."""
        outbox = self.outbox
        group = self._replies
        size = max(len(reply), cost)
        if group is not None and group.ticket is ticket and outbox.pending == group.end:
            end = group.end + size
            if end <= outbox.budget:
                group.payloads.append(reply)
                group.size += size
                outbox.pending = group.end = end  # (counted as push_deferred counts)
                return
        group = HeldReplies([reply], ticket, size)
        before = outbox.pending
        outbox.push_deferred(group)
        if outbox.pending == before + size:
            group.end = outbox.pending
            self._replies = group
        else:
            self._replies = None  # refused: the outbox closed
    def _job_command(self, event: JobCommand) -> None:
        jobs = self.broker.jobs
        ticket = None
        cls = type(event)
        if cls is Ack:
            held, ticket = jobs.ack(self.outbox, event.topic, event.index, dispatch=False)
        elif cls is Nack:
            held = jobs.nack(self.outbox, event.topic, event.index,
                             event.seconds, dispatch=False)  # type: ignore[attr-defined]
        else:
            held = self.broker.job_progress(self.outbox, event.topic, event.index)
        if not held:
            self.outbox.queue_reply(_UNKNOWN_JOB)
            self.stats.fail(protocol.UNKNOWN_JOB)
            return
        if ticket is None or ticket.done and not ticket.failed:
            self.outbox.queue_reply(SUCCESS)
        else:
            self._held_reply(SUCCESS, ticket)
        if cls is not Progress:  # the room is filled at the end of the chunk
            if self._room_made is None:
                self._room_made = set()
            self._room_made.add(event.topic)

    def handle_event(self, event: protocol.LineEvent) -> bool:
        """Apply one parsed line; return True when the client asked to quit."""
        if event is None:
            return False
        self._replies = None  # (what it queues may have no length: an EpochReply)
        push = self.outbox.queue_reply  # the reader's loop writes them after the chunk
        cls = type(event)
        if cls is Failure:
            push(protocol.failure_bytes(event.reason))  # type: ignore[union-attr]
            self.stats.fail(event.reason)  # type: ignore[union-attr]
            return False
        if event is QUIT:
            return True
        if self.authenticator is not None and not self._allowed(event):
            return False
        try:
            if cls is Send:
                if self.broker.shared is not None:
                    result = self.broker.publish_shared(self.outbox, event)  # type: ignore[arg-type]
                    if isinstance(result, Gate):
                        self.outbox.push_deferred(result)
                    else:
                        assert isinstance(event, Send)
                        self._held_reply(SUCCESS, result, PENDING_COST + len(event.raw))
                else:
                    self._reply(send_reply(self.broker.publish(event)))  # type: ignore[arg-type]
            elif cls is SendEx or cls is Batch:
                self._publish_ex(event)  # type: ignore[arg-type]
            elif cls in JOB_COMMANDS:
                self._job_command(event)  # type: ignore[arg-type]
            elif cls is Subscribe and event.ack:  # type: ignore[union-attr]
                assert isinstance(event, Subscribe)
                start = self.broker.consume(self.outbox, event.topic, event.prefetch)
                push(protocol.SUCCESS)
                start()  # jobs after the reply
            elif cls is Subscribe and self.broker.shared is not None:
                assert isinstance(event, Subscribe)
                self.outbox.push_deferred(self.broker.join(
                    self.outbox, event.topic, event.last_seen, event.cache, event.epoch))
            elif cls is Subscribe:
                assert isinstance(event, Subscribe)
                replay = self.broker.subscribe(
                    self.outbox, event.topic, event.last_seen, event.cache
                )
                if event.epoch is None:
                    push(protocol.SUCCESS)
                else:
                    self._reply(
                        self.broker.subscribe_reply(event.topic, event.last_seen, event.epoch)
                    )
                self.outbox.queue_replay(replay)
            elif cls is Unsubscribe and self.broker.shared is not None:
                assert isinstance(event, Unsubscribe)
                self._reply(self.broker.leave(self.outbox, event.topic))
            elif cls is Unsubscribe:
                assert isinstance(event, Unsubscribe)
                self.broker.unsubscribe(self.outbox, event.topic)
                push(protocol.SUCCESS)
            elif cls is Auth:
                push(protocol.SUCCESS)  # auth is off: any credentials will do
        except TooManyTopics:
            push(_TOO_MANY_TOPICS)
            self.stats.fail(protocol.TOO_MANY_TOPICS)
        except Exception:
            self._internal_error()
        return False
