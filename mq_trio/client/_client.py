"""A trio client for mq-trio (and any protocol-v1 server), over TCP or WebSocket.

Usage::

    async with mq_trio.open_client("127.0.0.1", 7000) as client:
        await client.subscribe("news")
        await client.send("news", "hello")
        message = await client.receive()

Shape (see docs/client.md):

* ``open_client`` owns a nursery; the connection task (reader + writer) runs in it, so
  leaving the ``async with`` block closes everything. No threads.
* Replies carry no id: every line that is not a delivery answers the oldest command in
  flight. Callers only *enqueue* a command (synchronously, so the order of the queue is
  the order on the wire); one writer task sends, one reader task matches replies FIFO.
* Deliveries go to a bounded buffer. When it is full the reader stops reading, which
  applies TCP backpressure to the server (whose slow-consumer limit may then cut the
  client off: with ``reconnect`` on, the client resumes from the last index it buffered).
  The reader never waits while a command is in flight, though: the reply may be queued
  behind deliveries, and waiting for the application there could deadlock it.
* Jobs (deliveries with ``"ack": true``) go to a per-topic buffer of their own, bounded
  by the consumer's prefetch; each remembers the connection it came on (``generation``),
  since only that connection may settle it.
* Publishes with an id are the one kind of send resent after a drop (the id makes the
  repeat harmless), and the only kind kept in the spool (``_spool``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import ssl
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Literal

import attrs
import trio

from ..protocol import (
    AUTH_FAILED,
    AUTH_TIMEOUT,
    MALFORMED,
    PARSE_ERROR,
    QUEUE_FULL,
    TOKEN_EXPIRED,
    UNKNOWN_JOB,
    Delivery,
    check_prefetch,
    encode_auth,
    encode_batch,
    encode_consume,
    encode_publish,
    encode_send,
    encode_subscribe,
    encode_unsubscribe,
)
from ._jobs import Job, Published, new_id
from ._spool import DEFAULT_SPOOL_MAX_BYTES, Spool, fsync_and_close
from ._values import (
    DEFAULT_HOST,
    Addresses,
    AuthError,
    Backoff,
    ConnectError,
    ConnectionEvent,
    ConnectionLost,
    Gap,
    Message,
    MQError,
    QueueFull,
    Target,
    UnknownJob,
    parse_targets,
)
from ._wire import BadServer, Wire, describe, open_wire

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found, unused-ignore]

log = logging.getLogger("mq_trio.client")

#: Deliveries buffered for the application before the reader stops reading.
DEFAULT_MAX_BUFFERED = 1000
#: The writer sends at most this many queued commands in one write.
WRITE_BATCH = 1024
DEFAULT_CONNECT_TIMEOUT = 10.0


# --- the client ----------------------------------------------------------------------------


@attrs.define(eq=False, slots=True)
class _Command:
    """A command waiting for its reply; the reader resolves them in order."""

    #: Not in the repr: an ``auth`` line holds a password or a token.
    line: bytes = attrs.field(repr=False)
    #: ``publish``: a send or batch whose reply carries an index (an id, or a job);
    #: ``consume``: a subscribe with ``ack``; ``job``: an ack, nack or progress.
    kind: Literal["subscribe", "unsubscribe", "send", "probe", "auth", "publish", "consume",
                  "job"]
    topic: str
    last_seen: int = -1
    cache: bool = True
    #: Re-sent by the client itself after a reconnect (nobody awaits it).
    resume: bool = False
    done: trio.Event = attrs.field(factory=trio.Event)
    error: MQError | None = None
    #: The success reply, for commands whose reply says more than success.
    reply: dict[str, object] | None = None
    #: A publish with an id: safe to send again on the next connection after a drop.
    resend: bool = False
    #: Its entry in the spool (removed when the reply comes).
    spool_n: int | None = None
    #: Sent from the spool by ``open_client`` (nobody awaits it: failures are logged).
    orphan: bool = False
    #: ``job`` commands: the connection the job came on (only that one may settle it).
    generation: int | None = None
    #: ``consume``: the prefetch asked for.
    prefetch: int = 0

    def fail(self, error: MQError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class _Secret(bytes):
    """An encoded ``auth`` command: bytes whose repr does not show them."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<auth command: hidden>"


#: Failures the server sends on its own just before it closes the connection.
_NOTICES = frozenset((TOKEN_EXPIRED, AUTH_TIMEOUT))


def auth_line(
    token: str | None = None, user: str | None = None, password: str | None = None
) -> bytes | None:
    """The ``auth`` command for these credentials, or None for none; ValueError if
    they do not make one (a token, or a user and a password)."""
    if token is None and user is None and password is None:
        return None
    if token is not None and (user is not None or password is not None):
        raise ValueError("give a token, or a user and a password, not both")
    if token is None and (user is None or password is None):
        raise ValueError("a user needs a password (and a password a user)")
    return _Secret(encode_auth(token=token, user=user, password=password))


#: Subscribed to (without replay) and unsubscribed from at once, to learn the server's
#: epoch before resuming: see Client._probe_epoch.
PROBE_TOPIC = "\x00mq_trio.client.epoch-probe"


@attrs.define(slots=True)
class _Subscription:
    """What a reconnect needs to resume a topic."""

    last_seen: int
    cache: bool
    #: Whether ``last_seen`` is the index of a delivery (not just what was asked for).
    received: bool = False

    def resume_command(self, topic: str, epoch: str | None = None) -> _Command:
        # Having received something, ask the cache for exactly the gap, even if the
        # original subscription skipped the cache (it was never replayed, so no duplicate).
        cache = self.cache or self.received
        return _Command(
            encode_subscribe(topic, self.last_seen, cache, epoch),
            "subscribe",
            topic,
            self.last_seen,
            cache,
            resume=True,
        )


class Client:
    """A connection to an mq-trio server; create it with :func:`open_client`.

    Safe to use from many tasks at once. Every command method awaits the server's reply
    and raises :class:`MQError` on a failure reply, :class:`ConnectionLost` if the
    connection ends first.
    """

    def __init__(
        self,
        target: Target | Sequence[Target],
        *,
        reconnect: Backoff | None,
        max_buffered: int,
        connect_timeout: float,
        epoch: bool = False,
        auth: bytes | None = None,
        ssl_context: ssl.SSLContext | None = None,
        on_event: Callable[[ConnectionEvent], None] | None = None,
        spool: Spool | None = None,
    ) -> None:
        if max_buffered < 1:
            raise ValueError("max_buffered must be >= 1")
        targets = (target,) if isinstance(target, Target) else tuple(target)
        if not targets:
            raise ValueError("no server address given")
        for one in targets:
            if ssl_context is not None and one.url is not None and not one.url.lower(
            ).startswith("wss:"):
                raise ValueError("a ws:// URL is not encrypted: use wss:// with ssl_context")
        #: Every server address, in the order given (one, or the nodes of a cluster).
        self.targets = targets
        #: The address of the connection in use (or the last one used; before the first
        #: connection, the first address).
        self.target = targets[0]
        #: The order of the next attempts: the address in use first; one that failed or
        #: dropped goes last.
        self._order = deque(targets)
        #: The encoded ``auth`` command sent first on every connection (None: no auth).
        #: Private, and in no repr or log: it holds the token or the password.
        self._auth = auth
        self._ssl = ssl_context
        #: Why the server said it is closing (``Token expired``...), answering no command.
        self._notice: str | None = None
        self._backoff = reconnect
        self._connect_timeout = connect_timeout
        self._max_buffered = max_buffered
        self._queue_send, self._queue_receive = trio.open_memory_channel[_Command](math.inf)
        #: Sent on the current connection, reply not yet read: the FIFO replies match.
        self._in_flight: deque[_Command] = deque()
        self._inbox: deque[Message] = deque()
        self._arrived = trio.lowlevel.ParkingLot()
        #: Woken when the buffer has room, or when a command goes out (see _put).
        self._space = trio.lowlevel.ParkingLot()
        self._topics: dict[str, _Subscription] = {}
        #: Topics whose subscribe/unsubscribe is re-sent after a drop (no resume for them).
        self._retried: set[str] = set()
        self._closed: str | None = None
        #: Whether a connection is up right now.
        self.connected = False
        #: How many times the client has reconnected after losing its connection.
        self.reconnects = 0
        self._connected_event = trio.Event()
        self._use_epoch = epoch
        #: The server's history id (epoch extension), once a subscribe reply told it.
        self.epoch: str | None = None
        #: Resumes that could not cover everything (only with ``epoch=True``).
        self.gaps: list[Gap] = []
        #: Resume subscribes worked out from the epoch probe's reply, for the writer.
        self._resumes: list[_Command] | None = None
        self._resumes_ready = trio.Event()
        self._on_event = on_event
        #: Which connection is up (+1 per connection): a job is settled on its own only.
        self._generation = 0
        #: Confirmed consumer subscriptions: topic -> prefetch (resumed on reconnect).
        self._consumers: dict[str, int] = {}
        self._retried_consumers: set[str] = set()
        #: Why a consumer's resume failed (raised to its receivers).
        self._consumer_errors: dict[str, MQError] = {}
        #: Jobs delivered and not yet taken, per topic (at most the prefetch: no bound needed).
        self._jobs: dict[str, deque[Job]] = {}
        self._job_arrived = trio.lowlevel.ParkingLot()
        self._spool = spool
        self._spool_settled = trio.lowlevel.ParkingLot()

    def _event(self, event: ConnectionEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception("on_event callback failed on %r", event)

    # --- commands ---

    async def subscribe(
        self, topic: str, *, last_seen: int | None = None, cache: bool = True
    ) -> None:
        """Subscribe; cached messages with ``index > last_seen`` follow (unless ``cache=False``).

        With ``reconnect`` on, the subscription survives reconnects, resuming after the
        last index delivered.
        """
        seen = -1 if last_seen is None else last_seen
        epoch = (self.epoch or "") if self._use_epoch else None
        await self._call(
            _Command(encode_subscribe(topic, seen, cache, epoch), "subscribe", topic, seen, cache)
        )

    async def unsubscribe(self, topic: str) -> None:
        """Stop deliveries for ``topic`` (deliveries already buffered stay receivable)."""
        await self._call(_Command(encode_unsubscribe(topic), "unsubscribe", topic))

    async def send(
        self,
        topic: str,
        msg: str,
        *,
        delivery: Delivery = "all",
        cache: bool = True,
        ack: bool = False,
        id: str | None = None,
    ) -> int | None:
        """Publish ``msg``: to every subscriber (``"all"``) or to one of them (``"one"``).

        Returns once the server has accepted it. ``cache=False`` keeps it out of the
        topic's replay cache. ``ack=True`` (with ``delivery="one"``) makes it a job for
        a consumer (:meth:`consume`); ``id`` names it so that a repeat is not published
        twice (see :meth:`publish`). With either the server's reply carries the
        message's index, which is returned; a plain send returns None (and is what any
        version-1 server understands).
        """
        # Encoded here, before anything is queued: a bad ``delivery`` raises ValueError.
        if not ack and id is None:
            await self._call(_Command(encode_send(topic, msg, delivery, cache), "send", topic))
            return None
        line = encode_publish(topic, msg, delivery, cache, ack, id)
        return (await self._publish(line, topic, resend=id is not None)).index

    async def publish(
        self,
        topic: str,
        msg: str,
        *,
        delivery: Delivery = "all",
        cache: bool = True,
        ack: bool = False,
        id: str | None = None,
    ) -> Published:
        """Publish with an id (a fresh uuid4 unless given), so that it is safe to send again.

        If the connection drops before the reply, the client (with ``reconnect``) sends it
        again with the same id on the next connection, and the server answers a repeat
        within its ``--dedupe-window`` with the original index (``duplicate=True``)
        instead of publishing it twice. With ``open_client(spool=...)`` it is also kept
        in the spool file until the reply comes. Returns :class:`Published`. mq-trio
        servers only (a version-1 server rejects ``id`` as malformed).
        """
        line = encode_publish(topic, msg, delivery, cache, ack, new_id() if id is None else id)
        return await self._publish(line, topic, resend=True)

    async def send_job(self, topic: str, msg: str, *, id: str | None = None) -> int:
        """Queue a job for one consumer of ``topic`` (``delivery="one"``, ``ack=True``),
        with an id as :meth:`publish` does; returns its index. Raises :class:`QueueFull`
        when the server's queue limits are reached."""
        published = await self.publish(topic, msg, delivery="one", ack=True, id=id)
        return published.index

    async def send_batch(
        self,
        topic: str,
        msgs: Sequence[str],
        *,
        delivery: Delivery = "all",
        cache: bool = True,
        ack: bool = False,
        id: str | None = None,
    ) -> Published:
        """Publish 1 to 10,000 messages as one atomic command: all accepted, with
        consecutive indexes (``.index`` the first, ``.count`` of them), or none. Carries
        an id as :meth:`publish` does (one id names the whole batch)."""
        line = encode_batch(topic, msgs, delivery, cache, ack, new_id() if id is None else id)
        return await self._publish(line, topic, resend=True)

    async def _publish(self, line: bytes, topic: str, *, resend: bool) -> Published:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed is not None:
            raise ConnectionLost(self._closed)
        command = _Command(line, "publish", topic, resend=resend)
        spool = self._spool
        if resend and spool is not None:
            command.spool_n = spool.add(line)  # SpoolFull: nothing taken, nothing sent
            if spool.fsync:
                # In a thread: an fsync can take milliseconds the other tasks need.
                await trio.to_thread.run_sync(fsync_and_close, spool.sync_fd())
        await self._call(command)
        return _published(command.reply)

    # --- consuming jobs ---

    def consume(self, topic: str, prefetch: int = 1) -> Consumer:
        """Jobs of ``topic``, ``prefetch`` of them held at once (1 to 10,000)::

            async with client.consume("resize", prefetch=4) as jobs:
                async for job in jobs:
                    await do(job.msg)
                    await job.ack()

        Subscribes as a consumer on entering (or on the first job asked for) and
        unsubscribes on leaving, which gives the jobs received but not yet settled back
        to the queue. With ``reconnect`` the subscription is resumed after a drop; the
        jobs the old connection held are delivered again by the server (and settling one
        of them raises :class:`UnknownJob`).
        """
        return Consumer(self, topic, check_prefetch(prefetch))

    async def _consume(self, topic: str, prefetch: int) -> None:
        self._consumer_errors.pop(topic, None)
        await self._call(
            _Command(encode_consume(topic, prefetch), "consume", topic, prefetch=prefetch)
        )

    async def _receive_job(self, topic: str) -> Job:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            jobs = self._jobs.get(topic)
            if jobs:
                job = jobs.popleft()
                await trio.lowlevel.cancel_shielded_checkpoint()
                return job
            error = self._consumer_errors.get(topic)
            if error is not None:
                raise error
            if self._closed is not None:
                raise ConnectionLost(self._closed)
            await self._job_arrived.park()

    def _receive_job_nowait(self, topic: str) -> Job:
        jobs = self._jobs.get(topic)
        if jobs:
            return jobs.popleft()
        error = self._consumer_errors.get(topic)
        if error is not None:
            raise error
        if self._closed is not None:
            raise ConnectionLost(self._closed)
        raise trio.WouldBlock

    async def _settle_job(self, line: bytes, topic: str, generation: int) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if generation != self._generation:
            raise UnknownJob(_LOST_JOB)
        await self._call(_Command(line, "job", topic, generation=generation))

    # --- the spool ---

    @property
    def spooled(self) -> int:
        """Publishes in the spool (taken, not yet accepted by the server); 0 without one."""
        return 0 if self._spool is None else len(self._spool)

    async def flush_spool(self) -> None:
        """Wait until the spool is empty: every publish in it accepted (or refused) by the
        server, those a previous run left included. Raises :class:`ConnectionLost` if the
        client closes (or gives up reconnecting) first; the rest stays spooled."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._spool is not None and len(self._spool):
            if self._closed is not None:
                raise ConnectionLost(f"{self._closed}; {len(self._spool)} publishes stay "
                                     "in the spool")
            await self._spool_settled.park()

    def _resend_spool(self) -> None:
        """Queue what the spool holds (a previous run's publishes) before anything else."""
        if self._spool is None:
            return
        for n, line in self._spool.pending():
            try:
                topic = json.loads(line)["topic"]
            except (ValueError, KeyError, TypeError):  # pragma: no cover - written by us
                topic = ""
            self._queue_send.send_nowait(
                _Command(line, "publish", str(topic), resend=True, spool_n=n, orphan=True)
            )
        if len(self._spool):
            log.info("resending %d publishes from the spool %s", len(self._spool),
                     self._spool.path)

    async def authenticate(
        self, *, token: str | None = None, user: str | None = None, password: str | None = None
    ) -> None:
        """Authenticate again on the open connection, e.g. with a fresh token before the
        old one expires; the new credentials are used for every reconnect after that.

        Raises :class:`AuthError` if the server refuses them (it then closes the
        connection; with ``reconnect`` on, the client reconnects with the credentials
        it had before).
        """
        line = auth_line(token, user, password)
        if line is None:
            raise ValueError("authenticate needs a token, or a user and a password")
        await self._call(_Command(line, "auth", ""))

    async def _call(self, command: _Command) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed is not None:
            raise ConnectionLost(self._closed)
        # Enqueueing is synchronous: the queue's order is the order on the wire, which is
        # the order replies come back in, whatever the number of tasks calling.
        self._queue_send.send_nowait(command)
        # If this task is cancelled now, the command still goes out; its reply is read
        # and dropped, so the FIFO stays aligned.
        await command.done.wait()
        if command.error is not None:
            raise command.error

    # --- deliveries ---

    async def receive(self, topic: str | None = None) -> Message:
        """The next buffered delivery (of ``topic``, if given), waiting for one.

        Raises :class:`ConnectionLost` once the connection is gone for good and nothing
        (matching) is left in the buffer.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            message = self._take(topic)
            if message is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return message
            if self._closed is not None:
                raise ConnectionLost(self._closed)
            await self._arrived.park()

    def receive_nowait(self, topic: str | None = None) -> Message:
        """A buffered delivery, or ``trio.WouldBlock`` (``ConnectionLost`` once closed)."""
        message = self._take(topic)
        if message is not None:
            return message
        if self._closed is not None:
            raise ConnectionLost(self._closed)
        raise trio.WouldBlock

    def messages(self, topic: str | None = None) -> AsyncIterator[Message]:
        """``async for message in client.messages():`` — :meth:`receive` in a loop."""
        return _Messages(self, topic)

    @property
    def buffered(self) -> int:
        """Deliveries received and not yet taken by the application."""
        return len(self._inbox)

    def _take(self, topic: str | None) -> Message | None:
        inbox = self._inbox
        if not inbox:
            return None
        if topic is None:
            message = inbox.popleft()
        else:
            for i, candidate in enumerate(inbox):
                if candidate.topic == topic:
                    del inbox[i]
                    message = candidate
                    break
            else:
                return None
        if len(inbox) < self._max_buffered:
            self._space.unpark_all()
        return message

    async def _put(self, message: Message) -> None:
        """Buffer one delivery; wait while full, unless a reply is awaited (see module doc)."""
        while len(self._inbox) >= self._max_buffered and not self._in_flight:
            await self._space.park()
        self._inbox.append(message)
        self._arrived.unpark_all()

    async def wait_connected(self) -> None:
        """Wait until a connection is up (returns at once if it is)."""
        while not self.connected:
            if self._closed is not None:
                raise ConnectionLost(self._closed)
            await self._connected_event.wait()
        await trio.lowlevel.checkpoint()

    # --- the connection task ---

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, and (with a backoff) reconnect until cancelled or giving up.

        Every attempt goes to the first address of ``_order``; one that fails, or whose
        connection drops, goes last. A round (every address tried once, without waiting
        between them) is what the backoff spaces and ``max_attempts`` counts.
        """
        first = True
        order = self._order
        failed_rounds = 0  # consecutive rounds without a connection: what max_attempts counts
        failed_attempts = 0  # ... and the attempts in them (an event tells it)
        tried = 0  # addresses tried in this round
        streak = 0  # failed rounds and connections that dropped at once: the delay grows
        first_errors: list[ConnectError] = []
        preamble: list[_Command] = []
        while True:
            served = False
            target = order[0]
            # Connecting, the TLS handshake and authenticating: all within the timeout.
            deadline = trio.current_time() + self._connect_timeout
            try:
                async with open_wire(target, self._connect_timeout, self._ssl) as wire:
                    # Credentials first, on every connection: nothing else (not even the
                    # resumes) goes out before the server accepted them.
                    await self._authenticate(wire, deadline, target)
                    self.target = target
                    if first:
                        task_status.started()
                        first = False
                    else:
                        self.reconnects += 1
                        log.info("reconnected to %s", target)
                        self._event(ConnectionEvent("reconnected", attempts=failed_attempts + 1,
                                                    target=target))
                    failed_attempts = failed_rounds = tried = 0
                    self._generation += 1
                    connected_at = trio.current_time()
                    self.connected = True
                    self._connected_event.set()
                    served = True
                    try:
                        reason = await self._serve(wire, preamble)
                    finally:
                        self.connected = False
                        self._connected_event = trio.Event()
                # A server that accepts and drops at once (e.g. a slow-consumer cut-off
                # on every resume) must not be hammered: only a connection that held
                # for a while resets the delay.
                if self._backoff is not None and (
                    trio.current_time() - connected_at >= self._backoff.maximum
                ):
                    streak = 0
            except ConnectError as exc:
                if isinstance(exc, AuthError):
                    # The same credentials would be refused again (the nodes of a cluster
                    # share them too): never retry them, at this address or another.
                    if first:
                        raise
                    log.warning("reconnecting to %s: %s; giving up", target, exc.reason)
                    self._give_up(f"{exc.reason} (on reconnecting)", preamble)
                    return
                reason = exc.reason
                failed_attempts += 1
                tried += 1
                order.rotate(-1)  # the one that failed goes last
                if first:
                    first_errors.append(exc)
                    if tried < len(order):
                        log.info("%s; trying %s", reason, order[0])
                        continue
                    if len(first_errors) == 1:
                        raise
                    raise _none_reached(first_errors) from exc
                if tried < len(order):
                    log.info("reconnecting: %s; trying %s", reason, order[0])
                    continue  # the next address of this round, at once
                tried = 0
                failed_rounds += 1
            streak += 1
            backoff = self._backoff
            if backoff is None or (
                backoff.max_attempts is not None and failed_rounds >= backoff.max_attempts
            ):
                self._give_up(reason, [] if served else preamble)
                return
            if served:
                order.rotate(-1)  # the next attempt goes to the next address
                log.info("connection to %s lost (%s); reconnecting", target, reason)
                self._event(ConnectionEvent("lost", reason=reason, target=target))
                # (After a failed attempt the preamble still waits to be sent: keep it.)
                preamble = self._after_drop(reason)
            else:
                log.info("cannot connect (%s); reconnecting", reason)
            await trio.sleep(backoff.delay(streak))

    def _give_up(self, reason: str, unsent: list[_Command]) -> None:
        for command in unsent:
            command.fail(ConnectionLost(reason))
        self._shut(reason)

    async def _authenticate(self, wire: Wire, deadline: float, target: Target) -> None:
        """Send the credentials and read the verdict; raise AuthError if refused."""
        line = self._auth
        if line is None:
            return
        reply: bytes | None = None
        try:
            with trio.fail_at(deadline):
                await wire.send([line])
                while reply is None:
                    items = await wire.receive()
                    if items is None:
                        raise ConnectError(
                            f"{target} closed the connection during authentication"
                        )
                    for item in items:
                        if item.strip():
                            reply = item
                            break
        except trio.TooSlowError:
            raise ConnectError(
                f"{target}: not authenticated within {self._connect_timeout:g} s of "
                "connecting (no reply to the auth command)"
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectError(
                f"{target}: connection broken during authentication ({describe(exc)})"
            ) from exc
        try:
            obj = json.loads(reply)
        except ValueError:
            obj = None
        if type(obj) is not dict or "success" not in obj:
            raise AuthError(f"{target}: unexpected reply to authentication: {reply[:80]!r}")
        if obj["success"] is True:
            return
        reason = obj.get("reason")
        if reason == AUTH_FAILED:
            raise AuthError(AUTH_FAILED)
        if reason in (MALFORMED, PARSE_ERROR):
            raise AuthError(
                f"{target} does not support authentication (it answered {reason!r})"
            )
        raise AuthError(str(reason) if reason else f"authentication refused: {obj!r}")

    async def _serve(self, wire: Wire, preamble: list[_Command]) -> str:
        """Run one connection's reader and writer; return why it ended."""
        reason = "connection closed by the server"
        # In flight before anything can fail, so a drop right away still retries them.
        self._in_flight.extend(preamble)
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                nonlocal reason
                try:
                    await self._write(wire, preamble)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    reason = f"connection broken ({describe(exc)})"
                    nursery.cancel_scope.cancel()

            nursery.start_soon(write)
            self._notice = None
            try:
                await self._read(wire)
                reason = self._notice or getattr(wire, "close_reason", None) or reason
            except BadServer as exc:
                reason = f"protocol error from the server: {exc}"
            nursery.cancel_scope.cancel()
        return reason

    async def _write(self, wire: Wire, preamble: list[_Command]) -> None:
        if preamble:
            await wire.send([c.line for c in preamble])
        if any(c.kind == "probe" for c in preamble):
            # Nothing else goes out before the resumes, which wait for the probe's reply.
            await self._resumes_ready.wait()
            resumes, self._resumes = self._resumes or [], None
            if resumes:
                self._in_flight.extend(resumes)
                await wire.send([c.line for c in resumes])
        queue = self._queue_receive
        while True:
            batch = [await queue.receive()]
            while len(batch) < WRITE_BATCH:
                try:
                    batch.append(queue.receive_nowait())
                except trio.WouldBlock:
                    break
            if any(c.generation is not None for c in batch):
                batch = self._current(batch)
                if not batch:
                    continue
            # In flight before the bytes leave, so a fast reply finds its command; and a
            # reader waiting on a full buffer must read on to find the reply.
            self._in_flight.extend(batch)
            self._space.unpark_all()
            await wire.send([c.line for c in batch])

    def _current(self, batch: list[_Command]) -> list[_Command]:
        """Drop (failing them) job commands for jobs of an earlier connection: the server
        has taken those jobs back, and the same index may be this connection's again."""
        keep = []
        for command in batch:
            if command.generation is not None and command.generation != self._generation:
                command.fail(UnknownJob(_LOST_JOB))
            else:
                keep.append(command)
        return keep

    async def _read(self, wire: Wire) -> None:
        while True:
            items = await wire.receive()
            if items is None:
                return
            for raw in items:
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except ValueError as exc:
                    raise BadServer(f"not JSON: {raw[:80]!r}") from exc
                if type(obj) is not dict:
                    raise BadServer(f"not a JSON object: {raw[:80]!r}")
                if obj.get("command") == "send":
                    await self._deliver(obj)
                else:
                    self._reply(obj)

    async def _deliver(self, obj: dict[str, object]) -> None:
        topic, msg, index = obj.get("topic"), obj.get("msg"), obj.get("index")
        delivery = obj.get("delivery", "all")
        if (
            type(topic) is not str
            or type(msg) is not str
            or type(index) is not int
            or (delivery != "all" and delivery != "one")
        ):
            raise BadServer(f"malformed delivery: {obj!r}")
        if obj.get("ack") is True:
            self._deliver_job(obj, topic, msg, index)
            return
        if topic == PROBE_TOPIC and topic not in self._topics:
            return  # published while the probe was subscribed
        await self._put(Message(topic, msg, index, delivery))
        # Only once buffered: a delivery lost to a drop mid-way is replayed on resume.
        sub = self._topics.get(topic)
        if sub is not None:
            sub.last_seen = index
            sub.received = True

    def _deliver_job(self, obj: dict[str, object], topic: str, msg: str, index: int) -> None:
        deliveries, from_topic, from_index = (
            obj.get("deliveries"), obj.get("from_topic"), obj.get("from_index"))
        if (
            type(deliveries) is not int
            or (from_topic is not None and type(from_topic) is not str)
            or (from_index is not None and type(from_index) is not int)
        ):
            raise BadServer(f"malformed job: {obj!r}")
        job = Job(topic, index, msg, deliveries, from_topic, from_index,
                  client=self, generation=self._generation)
        jobs = self._jobs.setdefault(topic, deque())
        if deliveries > 1:
            # Taken back (its ack timeout passed) and given to this client again while the
            # first copy still waits here: keep only the new one, so it is done once.
            for i, old in enumerate(jobs):
                if old.index == index:
                    del jobs[i]
                    break
        jobs.append(job)
        self._job_arrived.unpark_all()

    def _reply(self, obj: dict[str, object]) -> None:
        reason = obj.get("reason")
        if (
            reason in _NOTICES
            and obj.get("success") is False
            and not (self._in_flight and self._in_flight[0].kind == "auth")
        ):
            # Sent by the server just before it closes the connection, answering no
            # command: the commands in flight are settled when the connection ends.
            self._notice = f"closed by the server: {reason}"
            log.warning("%s: %s", self.target, self._notice)
            return
        try:
            command = self._in_flight.popleft()
        except IndexError:
            raise BadServer(f"a reply to no command: {obj!r}") from None
        epoch = obj.get("epoch")
        if command.kind == "probe":
            self._probed(epoch if isinstance(epoch, str) else None)
            return
        if isinstance(epoch, str) and obj.get("success") is True:
            if command.resume and obj.get("recovered") is False and epoch == self.epoch:
                self._gap(Gap(command.topic, command.last_seen, "evicted"))
            self.epoch = epoch
        if command.spool_n is not None:
            self._unspool(command.spool_n)
        if obj.get("success") is True:
            if command.kind == "subscribe" and not command.resume:
                # Replayed messages follow this reply in the stream: track from here.
                self._topics[command.topic] = _Subscription(command.last_seen, command.cache)
            elif command.kind == "consume":
                self._consumers[command.topic] = command.prefetch
            elif command.kind == "unsubscribe":
                self._topics.pop(command.topic, None)
                self._consumers.pop(command.topic, None)
                # The server gave them back to the queue with the subscription.
                self._jobs.pop(command.topic, None)
            elif command.kind == "auth":
                self._auth = _Secret(command.line)
            command.reply = obj
            command.done.set()
        else:
            text = reason if isinstance(reason, str) else f"failure: {obj!r}"
            if command.kind == "auth":
                error: MQError = AuthError(text)
            elif text == UNKNOWN_JOB:
                error = UnknownJob(text)
            elif text == QUEUE_FULL:
                error = QueueFull(text)
            else:
                error = MQError(text)
            command.fail(error)
            if command.orphan:
                log.warning("%r from the spool refused: %s (dropped from the spool)",
                            command.topic, text)
            if command.resume:
                log.warning("resubscribing to %r failed: %s", command.topic, reason)
                if command.kind == "consume":
                    self._consumers.pop(command.topic, None)
                    self._consumer_errors[command.topic] = error
                    self._job_arrived.unpark_all()

    def _unspool(self, n: int) -> None:
        assert self._spool is not None
        try:
            self._spool.done(n)
        except OSError as exc:  # (the entry is resent, and deduplicated, next time)
            log.warning("spool %s: cannot record a reply: %s", self._spool.path, exc)
        if not len(self._spool):
            self._spool_settled.unpark_all()

    def _after_drop(self, reason: str) -> list[_Command]:
        """Settle the commands of a lost connection; return what the next one sends first.

        A ``send`` in flight fails (resending could publish it twice). Subscribe and
        unsubscribe are idempotent, so they are simply sent again on the next connection,
        after a resume-subscribe for every confirmed topic not touched by them.
        """
        retry: list[_Command] = []
        for command in self._in_flight:
            if command.resume or command.done.is_set():
                continue
            if command.kind == "send" or (command.kind == "publish" and not command.resend):
                command.fail(ConnectionLost(f"{reason}; the message may not have been sent"))
            elif command.kind == "job":
                command.fail(UnknownJob(f"{reason} before the server answered; the job was "
                                        "settled, or goes back to the queue"))
            else:
                # Idempotent (subscriptions), or made so by an id (publishes).
                retry.append(command)
        self._in_flight.clear()
        self._retried = {c.topic for c in retry if c.kind in ("subscribe", "unsubscribe")}
        self._retried_consumers = {c.topic for c in retry if c.kind in ("consume", "unsubscribe")}
        # Jobs of the lost connection: the server gives them to the queue again.
        self._jobs.clear()
        if self._use_epoch and self._topics:
            # Which last_seen to resume from depends on the server's epoch: ask first.
            self._resumes, self._resumes_ready = None, trio.Event()
            probe = encode_subscribe(PROBE_TOPIC, -1, False, self.epoch or "")
            unprobe = encode_unsubscribe(PROBE_TOPIC)
            return [
                _Command(probe, "probe", PROBE_TOPIC, resume=True),
                _Command(unprobe, "unsubscribe", PROBE_TOPIC, resume=True),
                *retry,
            ]
        return self._resume_commands(None) + retry

    def _resume_commands(self, epoch: str | None) -> list[_Command]:
        resumes = [
            sub.resume_command(topic, epoch)
            for topic, sub in self._topics.items()
            if topic not in self._retried
        ]
        resumes += [
            _Command(encode_consume(topic, prefetch), "consume", topic, resume=True,
                     prefetch=prefetch)
            for topic, prefetch in self._consumers.items()
            if topic not in self._retried_consumers
        ]
        return resumes

    def _probed(self, epoch: str | None) -> None:
        """The epoch probe's reply: work out the resumes the writer is waiting for."""
        if epoch is None:
            log.warning("%s does not support the epoch extension; resuming without it",
                        self.target)
            self._use_epoch = False
            self._resumes = self._resume_commands(None)
        elif epoch == self.epoch:
            self._resumes = self._resume_commands(epoch)
        else:
            # A new history (indexes restarted): our last_seen values mean nothing there,
            # so take everything it has cached; what the old one had after them is lost.
            for topic, sub in self._topics.items():
                if topic not in self._retried:
                    self._gap(Gap(topic, sub.last_seen, "history lost"))
                    sub.last_seen, sub.cache, sub.received = -1, True, False
            self.epoch = epoch
            self._resumes = self._resume_commands(epoch)
        self._resumes_ready.set()

    def _gap(self, gap: Gap) -> None:
        # Logged at warning unless the application hears of it through on_event.
        level = logging.INFO if self._on_event is not None else logging.WARNING
        log.log(level, "resume of %r after index %d: %s", gap.topic, gap.last_seen, gap.reason)
        self.gaps.append(gap)
        self._event(ConnectionEvent("gap", gap=gap, target=self.target))

    def _shut(self, reason: str) -> None:
        """No connection any more: fail everything waiting, wake every receiver."""
        if self._closed is not None:
            return
        self._closed = reason
        self.connected = False
        for command in self._in_flight:
            command.fail(ConnectionLost(reason))
        self._in_flight.clear()
        while True:
            try:
                self._queue_receive.receive_nowait().fail(ConnectionLost(reason))
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        self._jobs.clear()
        self._arrived.unpark_all()
        self._space.unpark_all()
        self._job_arrived.unpark_all()
        self._spool_settled.unpark_all()
        self._connected_event.set()

    @property
    def closed(self) -> bool:
        """True once the client will not connect again (closed, or gave up)."""
        return self._closed is not None

    @property
    def subscriptions(self) -> Sequence[str]:
        """Topics with a confirmed subscription."""
        return list(self._topics)


def _none_reached(errors: list[ConnectError]) -> ConnectError:
    """The first connection failed at every address (several): one error saying so."""
    return ConnectError(f"no server of {len(errors)} could be reached: "
                        + "; ".join(e.reason for e in errors))


_LOST_JOB = (
    "the connection this job came on was lost: the server gives it back to the queue "
    "(it will be delivered again, maybe to another consumer)"
)


def _published(reply: dict[str, object] | None) -> Published:
    """The reply of a publish, checked: it must carry the index (docs/protocol.md)."""
    index = None if reply is None else reply.get("index")
    count = 1 if reply is None else reply.get("count", 1)
    if type(index) is not int or type(count) is not int:
        # A server without the extensions would have refused the command instead.
        raise MQError(f"the server's reply carries no index: {reply!r}")
    return Published(index, count, (reply or {}).get("duplicate") is True)


class Consumer:
    """Jobs of one topic for one client: ``client.consume(topic, prefetch)``.

    An async context manager (subscribes on entry, unsubscribes on exit) and an async
    iterator of :class:`Job` (subscribing on the first job if not entered).
    """

    def __init__(self, client: Client, topic: str, prefetch: int) -> None:
        self.client = client
        self.topic = topic
        self.prefetch = prefetch
        self._started = False
        self._stopped = False

    @property
    def started(self) -> bool:
        """Whether the consumer subscription was confirmed by the server."""
        return self._started

    async def start(self) -> None:
        """Subscribe as a consumer (at once: jobs may arrive before the first ``receive``)."""
        if not self._started:
            await self.client._consume(self.topic, self.prefetch)
            self._started = True

    async def set_prefetch(self, prefetch: int) -> None:
        """Hold at most ``prefetch`` unsettled jobs from now on (subscribes again)."""
        self.prefetch = check_prefetch(prefetch)
        if self._started and not self._stopped:
            await self.client._consume(self.topic, self.prefetch)

    async def stop(self) -> None:
        """Unsubscribe: the jobs not yet settled (taken or not) go back to the queue.

        Shielded (a cancelled worker still returns its jobs), bounded by the client's
        connect timeout; a client already closed has nothing to undo.
        """
        if self._stopped:
            return
        self._stopped = True
        if not self._started:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(self.client._connect_timeout):
            try:
                await self.client.unsubscribe(self.topic)
            except ConnectionLost:
                pass

    async def receive(self) -> Job:
        """The next job, waiting for one. Raises :class:`ConnectionLost` once the
        connection is gone for good (and the resume's failure if a reconnect could not
        subscribe again)."""
        if self._stopped:
            raise RuntimeError(f"the consumer of {self.topic!r} was stopped")
        await self.start()
        return await self.client._receive_job(self.topic)

    def receive_nowait(self) -> Job:
        """A job already received, or ``trio.WouldBlock``."""
        return self.client._receive_job_nowait(self.topic)

    @property
    def buffered(self) -> int:
        """Jobs received and not yet taken."""
        return len(self.client._jobs.get(self.topic, ()))

    async def __aenter__(self) -> Consumer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> Job:
        if self._stopped:
            raise StopAsyncIteration
        return await self.receive()


class _Messages:
    def __init__(self, client: Client, topic: str | None) -> None:
        self._client = client
        self._topic = topic

    def __aiter__(self) -> _Messages:
        return self

    async def __anext__(self) -> Message:
        return await self._client.receive(self._topic)


@asynccontextmanager
async def open_client(
    host_or_url: Addresses = DEFAULT_HOST,
    port: int | None = None,
    *,
    reconnect: bool | Backoff = False,
    shuffle: bool = False,
    max_buffered: int = DEFAULT_MAX_BUFFERED,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    epoch: bool = False,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    on_event: Callable[[ConnectionEvent], None] | None = None,
    spool: str | os.PathLike[str] | None = None,
    spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
    spool_fsync: bool = False,
) -> AsyncIterator[Client]:
    """Connect to an mq-trio server; the block's end closes the connection.

    ``open_client("127.0.0.1", 7000)``, ``open_client("ws://127.0.0.1:7001/")``.
    ``reconnect=True`` (or a :class:`Backoff`) reconnects after a drop and resumes every
    subscription.

    Several servers (the nodes of a cluster): a list, ``open_client(["10.0.0.1:7000",
    "10.0.0.2:7000"])``, or one string with commas, ``"10.0.0.1:7000,10.0.0.2:7000"``;
    each address is ``host:port``, a host (``port``, else 7000), or a ``tcp://``,
    ``ws://``, ``wss://`` URL. The first that accepts the connection is used, in order
    (``shuffle=True``: in a random order, which spreads many clients over the nodes);
    after a drop the next one is tried first, the one that dropped going last; the
    backoff is between rounds of the whole list. ``client.target`` is the address in
    use. ``epoch=True`` (mq-trio servers only: version-1 servers reject the key)
    uses the epoch extension to notice lost history on resume: see ``Client.gaps``.

    ``token=...``, or ``user=...`` and ``password=...``: the ``auth`` command is sent
    first on every connection (reconnects too, before resubscribing); a refusal raises
    :class:`AuthError` and is never retried. ``ssl_context=...``: TLS over TCP (the
    certificate must be valid for ``host``), or for a ``wss://`` URL (which uses the
    system's CAs without one); ``ssl.create_default_context(cafile=...)`` makes one.

    ``on_event=callback``: called (synchronously; it must not block) with a
    :class:`ConnectionEvent` when a connection is lost and will be retried, when the
    client has reconnected, and for every :class:`Gap`.

    ``spool=PATH``: publishes with ids (``publish``, ``send_job``, ``send_batch``,
    ``send(id=...)``) are kept in this file until the server accepted them, and what a
    previous run left there is sent first (same ids: the server deduplicates). The file
    stays under ``spool_max_bytes`` (beyond it a publish raises :class:`SpoolFull`);
    ``spool_fsync=True`` fsyncs every publish (else a write per publish, which survives
    the process being killed but not the machine crashing). See docs/client.md.

    Raises :class:`ConnectError` if the first connection fails at every address
    (:class:`AuthError` if the credentials are refused: the other addresses are not
    tried), ValueError for a malformed address.
    """
    targets = list(parse_targets(host_or_url, port))
    if shuffle:
        random.shuffle(targets)
    backoff = Backoff() if reconnect is True else (reconnect or None)
    opened: Spool | None = None
    if spool is not None:
        opened = Spool(spool, spool_max_bytes, spool_fsync)
        opened.open()  # SpoolError: locked by another process, unreadable
    try:
        async with _open_client(targets, backoff, max_buffered, connect_timeout, epoch,
                                auth_line(token, user, password), ssl_context, on_event,
                                opened) as client:
            yield client
    finally:
        if opened is not None:
            opened.close()


@asynccontextmanager
async def _open_client(
    targets: Sequence[Target],
    backoff: Backoff | None,
    max_buffered: int,
    connect_timeout: float,
    epoch: bool,
    auth: bytes | None,
    ssl_context: ssl.SSLContext | None,
    on_event: Callable[[ConnectionEvent], None] | None,
    spool: Spool | None,
) -> AsyncIterator[Client]:
    client = Client(
        targets,
        reconnect=backoff,
        max_buffered=max_buffered,
        connect_timeout=connect_timeout,
        epoch=epoch,
        auth=auth,
        ssl_context=ssl_context,
        on_event=on_event,
        spool=spool,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run)
            client._resend_spool()
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
                client._shut("client closed")
    except BaseExceptionGroup as group:
        # The client's own tasks do not raise, so a group holds the caller's exception
        # (or a Cancelled): re-raise it as the caller would have seen it without us.
        if len(group.exceptions) == 1:
            exc = group.exceptions[0]
            context = exc.__context__
            try:
                raise exc
            finally:
                exc.__context__ = context
                del exc, context
        raise
