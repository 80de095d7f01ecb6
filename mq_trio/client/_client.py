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
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Literal, Protocol
from urllib.parse import urlsplit

import attrs
import trio

from ..protocol import Delivery, LineBuffer

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found, unused-ignore]

log = logging.getLogger("mq_trio.client")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7000
#: Deliveries buffered for the application before the reader stops reading.
DEFAULT_MAX_BUFFERED = 1000
#: Longest line accepted from a server: a delivery is a command (up to the server's
#: line limit, 1 MiB by default) plus its index, so leave plenty of room.
MAX_INCOMING_BYTES = 64 << 20
RECEIVE_BYTES = 64 << 10
#: The writer sends at most this many queued commands in one write.
WRITE_BATCH = 1024
DEFAULT_CONNECT_TIMEOUT = 10.0


# --- errors and values ---------------------------------------------------------------


class MQError(Exception):
    """A command failed; ``reason`` is the server's failure text (PROTOCOL.md section 2)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectError(MQError):
    """The client could not connect to the server (raised by ``open_client``)."""


class ConnectionLost(MQError):
    """The connection ended (or the client closed) before the command got its reply.

    A ``send`` that raises this may or may not have been published; the server cannot
    say, so the client does not resend it.
    """


@attrs.frozen(slots=True)
class Message:
    """One delivery: a message published to a topic this client subscribed to."""

    topic: str
    msg: str
    #: The topic's message index (increasing per topic, never reused by the server).
    index: int
    delivery: Delivery = "all"


@attrs.frozen(slots=True)
class Gap:
    """A resume that could not cover everything (``open_client(..., epoch=True)``).

    ``"history lost"``: the server's epoch changed (e.g. an in-memory server restarted),
    so messages after ``last_seen`` of the old history may be gone; the client resumed
    from the start of the new history. ``"evicted"``: same history, but messages after
    ``last_seen`` fell out of the cache before the client came back.
    """

    topic: str
    last_seen: int
    reason: Literal["history lost", "evicted"]


@attrs.frozen
class Backoff:
    """How ``open_client(..., reconnect=True)`` spaces its reconnection attempts.

    The first attempt after a drop waits about ``initial``; each consecutive failure
    (a failed attempt, or a connection that dropped within ``maximum`` seconds) multiplies
    the delay up to ``maximum``, with jitter. After ``max_attempts`` consecutive failed
    attempts to connect (``None``: never) the client gives up and every waiting call
    raises :class:`ConnectionLost`.
    """

    initial: float = 0.05
    maximum: float = 2.0
    multiplier: float = 2.0
    max_attempts: int | None = None

    def delay(self, failures: int) -> float:
        """Seconds to wait before the next attempt after ``failures`` failures in a row."""
        if failures <= 0:
            return 0.0
        base = min(self.maximum, self.initial * self.multiplier ** (failures - 1))
        return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not crypto


@attrs.frozen
class Target:
    """Where to connect: ``host:port`` over TCP, or a ``ws://``/``wss://`` URL."""

    host: str
    port: int
    url: str | None = None

    def __str__(self) -> str:
        return self.url if self.url is not None else f"{self.host}:{self.port}"


def parse_target(host_or_url: str, port: int | None = None) -> Target:
    """``("127.0.0.1", 7000)``, ``"ws://127.0.0.1:7001/"`` or ``"tcp://127.0.0.1:7000"``."""
    if "://" not in host_or_url:
        return Target(host_or_url or DEFAULT_HOST, DEFAULT_PORT if port is None else port)
    if port is not None:
        raise ValueError("give either a URL or a host and a port, not both")
    parts = urlsplit(host_or_url)
    scheme = parts.scheme.lower()
    try:
        url_port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in {host_or_url!r}") from exc
    host = parts.hostname or DEFAULT_HOST
    if scheme in ("ws", "wss"):
        default = 443 if scheme == "wss" else 80
        return Target(host, url_port or default, url=host_or_url)
    if scheme == "tcp":
        return Target(host, url_port or DEFAULT_PORT)
    raise ValueError(f"unsupported URL scheme {scheme!r} (use ws://, wss:// or tcp://)")


# --- wires: the byte carriers ----------------------------------------------------------


class _Wire(Protocol):
    async def send(self, items: list[bytes]) -> None:
        """Send encoded commands; raise ``trio.BrokenResourceError`` if the peer is gone."""

    async def receive(self) -> list[bytes] | None:
        """The next complete JSON texts (maybe none yet), or ``None`` once closed."""


class _BadServer(Exception):
    """The server sent something that is not protocol v1: drop the connection."""


class _TCPWire:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._lines = LineBuffer(MAX_INCOMING_BYTES)

    async def send(self, items: list[bytes]) -> None:
        items.append(b"")
        await self._stream.send_all(b"\n".join(items))

    async def receive(self) -> list[bytes] | None:
        try:
            data = await self._stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        if not data:
            return None
        lines = self._lines.feed(data)
        if self._lines.too_long:
            raise _BadServer(f"a line over {MAX_INCOMING_BYTES} bytes")
        return lines


class _WebSocketWire:
    def __init__(self, ws: object) -> None:
        from trio_websocket import WebSocketConnection

        assert isinstance(ws, WebSocketConnection)
        self._ws = ws
        self.close_reason: str | None = None

    async def send(self, items: list[bytes]) -> None:
        from trio_websocket import ConnectionClosed

        try:
            for item in items:
                await self._ws.send_message(item.decode())
        except ConnectionClosed as exc:
            raise trio.BrokenResourceError(self._closed_by(exc)) from exc

    async def receive(self) -> list[bytes] | None:
        from trio_websocket import ConnectionClosed

        try:
            message = await self._ws.get_message()
        except ConnectionClosed as exc:
            self._closed_by(exc)
            return None
        return [message.encode() if isinstance(message, str) else message]

    def _closed_by(self, exc: Exception) -> str:
        close = getattr(exc, "reason", None)
        code = getattr(close, "code", "?")
        text = getattr(close, "reason", None) or getattr(close, "name", "")
        self.close_reason = f"WebSocket closed: {code} {text}".rstrip()
        return self.close_reason


def _describe(exc: BaseException) -> str:
    """A short human reason: "Connection refused" rather than a chain of wrappers."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        # trio's "all attempts to connect failed" wraps one error per address tried.
        reasons = dict.fromkeys(_describe(e) for e in cause.exceptions)
        return "; ".join(reasons)
    if cause is not None and not str(exc):
        return _describe(cause)
    return str(exc) or type(exc).__name__


@asynccontextmanager
async def _open_wire(target: Target, connect_timeout: float) -> AsyncIterator[_Wire]:
    """Connect; raise :class:`ConnectError` (only) when that fails."""
    if target.url is not None:
        try:
            import trio_websocket
        except ImportError as exc:  # pragma: no cover - trio-websocket is a dependency
            raise ConnectError("ws:// URLs need the trio-websocket package") from exc
        try:
            manager = trio_websocket.open_websocket_url(
                target.url,
                max_message_size=MAX_INCOMING_BYTES,
                connect_timeout=connect_timeout,
                disconnect_timeout=1.0,
            )
            ws = await manager.__aenter__()
        except (OSError, trio_websocket.HandshakeError) as exc:
            raise ConnectError(f"cannot connect to {target}: {_describe(exc)}") from exc
        try:
            yield _WebSocketWire(ws)
        except BaseException as exc:
            if not await manager.__aexit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            try:
                await manager.__aexit__(None, None, None)
            except trio_websocket.HandshakeError:
                pass  # a slow close handshake: the connection is over anyway
        return
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(target.host, target.port)
    except (OSError, trio.TooSlowError) as exc:
        raise ConnectError(f"cannot connect to {target}: {_describe(exc)}") from exc
    try:
        yield _TCPWire(stream)
    finally:
        await trio.aclose_forcefully(stream)


# --- the client ----------------------------------------------------------------------------


@attrs.define(eq=False, slots=True)
class _Command:
    """A command waiting for its reply; the reader resolves them in order."""

    line: bytes
    kind: Literal["subscribe", "unsubscribe", "send", "probe"]
    topic: str
    last_seen: int = -1
    cache: bool = True
    #: Re-sent by the client itself after a reconnect (nobody awaits it).
    resume: bool = False
    done: trio.Event = attrs.field(factory=trio.Event)
    error: MQError | None = None

    def fail(self, error: MQError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


def _subscribe_line(topic: str, last_seen: int, cache: bool, epoch: str | None = None) -> bytes:
    obj: dict[str, object] = {"command": "subscribe", "topic": topic}
    if last_seen != -1:
        obj["last_seen"] = last_seen
    if not cache:
        obj["cache"] = False
    if epoch is not None:
        obj["epoch"] = epoch
    return json.dumps(obj).encode()


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
            _subscribe_line(topic, self.last_seen, cache, epoch),
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
        target: Target,
        *,
        reconnect: Backoff | None,
        max_buffered: int,
        connect_timeout: float,
        epoch: bool = False,
    ) -> None:
        if max_buffered < 1:
            raise ValueError("max_buffered must be >= 1")
        self.target = target
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
            _Command(_subscribe_line(topic, seen, cache, epoch), "subscribe", topic, seen, cache)
        )

    async def unsubscribe(self, topic: str) -> None:
        """Stop deliveries for ``topic`` (deliveries already buffered stay receivable)."""
        line = json.dumps({"command": "unsubscribe", "topic": topic}).encode()
        await self._call(_Command(line, "unsubscribe", topic))

    async def send(
        self, topic: str, msg: str, *, delivery: Delivery = "all", cache: bool = True
    ) -> None:
        """Publish ``msg``: to every subscriber (``"all"``) or to one of them (``"one"``).

        Returns once the server has accepted it. ``cache=False`` keeps it out of the
        topic's replay cache.
        """
        if delivery != "all" and delivery != "one":
            raise ValueError(f"delivery must be 'all' or 'one', not {delivery!r}")
        obj: dict[str, object] = {
            "command": "send",
            "topic": topic,
            "msg": msg,
            "delivery": delivery,
        }
        if not cache:
            obj["cache"] = False
        await self._call(_Command(json.dumps(obj).encode(), "send", topic))

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
        """Connect, serve, and (with a backoff) reconnect until cancelled or giving up."""
        first = True
        failed_attempts = 0  # consecutive failed connects: what max_attempts counts
        streak = 0  # ... and connections that dropped at once: what the delay grows with
        preamble: list[_Command] = []
        while True:
            try:
                async with _open_wire(self.target, self._connect_timeout) as wire:
                    if first:
                        task_status.started()
                        first = False
                    else:
                        self.reconnects += 1
                        log.info("reconnected to %s", self.target)
                    failed_attempts = 0
                    connected_at = trio.current_time()
                    self.connected = True
                    self._connected_event.set()
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
                if first:
                    raise
                reason = exc.reason
                failed_attempts += 1
            streak += 1
            backoff = self._backoff
            if backoff is None or (
                backoff.max_attempts is not None and failed_attempts >= backoff.max_attempts
            ):
                self._shut(reason)
                return
            log.info("connection to %s lost (%s); reconnecting", self.target, reason)
            preamble = self._after_drop(reason)
            await trio.sleep(backoff.delay(streak))

    async def _serve(self, wire: _Wire, preamble: list[_Command]) -> str:
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
                    reason = f"connection broken ({_describe(exc)})"
                    nursery.cancel_scope.cancel()

            nursery.start_soon(write)
            try:
                await self._read(wire)
                reason = getattr(wire, "close_reason", None) or reason
            except _BadServer as exc:
                reason = f"protocol error from the server: {exc}"
            nursery.cancel_scope.cancel()
        return reason

    async def _write(self, wire: _Wire, preamble: list[_Command]) -> None:
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
            # In flight before the bytes leave, so a fast reply finds its command; and a
            # reader waiting on a full buffer must read on to find the reply.
            self._in_flight.extend(batch)
            self._space.unpark_all()
            await wire.send([c.line for c in batch])

    async def _read(self, wire: _Wire) -> None:
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
                    raise _BadServer(f"not JSON: {raw[:80]!r}") from exc
                if type(obj) is not dict:
                    raise _BadServer(f"not a JSON object: {raw[:80]!r}")
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
            raise _BadServer(f"malformed delivery: {obj!r}")
        if topic == PROBE_TOPIC and topic not in self._topics:
            return  # published while the probe was subscribed
        await self._put(Message(topic, msg, index, delivery))
        # Only once buffered: a delivery lost to a drop mid-way is replayed on resume.
        sub = self._topics.get(topic)
        if sub is not None:
            sub.last_seen = index
            sub.received = True

    def _reply(self, obj: dict[str, object]) -> None:
        try:
            command = self._in_flight.popleft()
        except IndexError:
            raise _BadServer(f"a reply to no command: {obj!r}") from None
        epoch = obj.get("epoch")
        if command.kind == "probe":
            self._probed(epoch if isinstance(epoch, str) else None)
            return
        if isinstance(epoch, str) and obj.get("success") is True:
            if command.resume and obj.get("recovered") is False and epoch == self.epoch:
                self._gap(Gap(command.topic, command.last_seen, "evicted"))
            self.epoch = epoch
        if obj.get("success") is True:
            if command.kind == "subscribe" and not command.resume:
                # Replayed messages follow this reply in the stream: track from here.
                self._topics[command.topic] = _Subscription(command.last_seen, command.cache)
            elif command.kind == "unsubscribe":
                self._topics.pop(command.topic, None)
            command.done.set()
        else:
            reason = obj.get("reason")
            command.fail(MQError(reason if isinstance(reason, str) else f"failure: {obj!r}"))
            if command.resume:
                log.warning("resubscribing to %r failed: %s", command.topic, reason)

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
            if command.kind == "send":
                command.fail(ConnectionLost(f"{reason}; the message may not have been sent"))
            else:
                retry.append(command)
        self._in_flight.clear()
        self._retried = {c.topic for c in retry}
        if self._use_epoch and self._topics:
            # Which last_seen to resume from depends on the server's epoch: ask first.
            self._resumes, self._resumes_ready = None, trio.Event()
            probe = _subscribe_line(PROBE_TOPIC, -1, False, self.epoch or "")
            unprobe = json.dumps({"command": "unsubscribe", "topic": PROBE_TOPIC}).encode()
            return [
                _Command(probe, "probe", PROBE_TOPIC, resume=True),
                _Command(unprobe, "unsubscribe", PROBE_TOPIC, resume=True),
                *retry,
            ]
        return self._resume_commands(None) + retry

    def _resume_commands(self, epoch: str | None) -> list[_Command]:
        return [
            sub.resume_command(topic, epoch)
            for topic, sub in self._topics.items()
            if topic not in self._retried
        ]

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
        log.warning("resume of %r after index %d: %s", gap.topic, gap.last_seen, gap.reason)
        self.gaps.append(gap)

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
        self._arrived.unpark_all()
        self._space.unpark_all()
        self._connected_event.set()

    @property
    def closed(self) -> bool:
        """True once the client will not connect again (closed, or gave up)."""
        return self._closed is not None

    @property
    def subscriptions(self) -> Sequence[str]:
        """Topics with a confirmed subscription."""
        return list(self._topics)


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
    host_or_url: str = DEFAULT_HOST,
    port: int | None = None,
    *,
    reconnect: bool | Backoff = False,
    max_buffered: int = DEFAULT_MAX_BUFFERED,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    epoch: bool = False,
) -> AsyncIterator[Client]:
    """Connect to an mq-trio server; the block's end closes the connection.

    ``open_client("127.0.0.1", 7000)``, ``open_client("ws://127.0.0.1:7001/")``.
    ``reconnect=True`` (or a :class:`Backoff`) reconnects after a drop and resumes every
    subscription. ``epoch=True`` (mq-trio servers only: version-1 servers reject the key)
    uses the epoch extension to notice lost history on resume: see ``Client.gaps``.
    Raises :class:`ConnectError` if the first connection fails.
    """
    target = parse_target(host_or_url, port)
    backoff = Backoff() if reconnect is True else (reconnect or None)
    client = Client(
        target,
        reconnect=backoff,
        max_buffered=max_buffered,
        connect_timeout=connect_timeout,
        epoch=epoch,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run)
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
