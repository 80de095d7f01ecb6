"""A Redis pub/sub connection whose intake keeps up with Redis's output.

Redis cuts a subscriber off once its output buffer passes the pub/sub limit (32 MB hard
by default), so a slow reader loses the connection under a burst: coredis's reader took
about 35k messages/s and was cut off after 624 of a 400k burst. Here one task reads 256
KiB at a time and parses every complete reply in it with ``hiredis.Reader``, queueing
messages without an await per message; ``receive()`` takes the whole queue.

Memory is bounded: once ``max_buffered`` messages (or ``max_buffered_bytes`` of data) wait
for ``receive()``, the reader stops parsing and reading until it is called. Backpressure
then goes to the kernel and to Redis, which may cut the connection off per its
``client-output-buffer-limit pubsub``: that shows as RedisUnavailable from ``receive()``,
after the messages received before it.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import hiredis
import trio

from ._address import RedisAddress
from ._wire import (
    NOTHING,
    Command,
    RedisError,
    RedisUnavailable,
    Wire,
    connect,
    encode,
    handshake_commands,
    hosted,
    new_reader,
)

MAX_BUFFERED = 100_000
MAX_BUFFERED_BYTES = 8 << 20

_MESSAGES = frozenset({b"message", b"smessage"})
_CONFIRMATIONS = frozenset({b"subscribe", b"ssubscribe", b"unsubscribe", b"sunsubscribe"})


def _channel(name: str | bytes) -> bytes:
    return name.encode() if isinstance(name, str) else name


class _Waiter:
    """A (un)subscribe waiting for Redis to confirm each of its channels."""

    __slots__ = ("kind", "channels", "done", "error")

    def __init__(self, kind: bytes, channels: set[bytes] | None) -> None:
        self.kind = kind
        self.channels = channels  # None: unsubscribe from all (done when none are left)
        self.done = trio.Event()
        self.error: RedisError | None = None


class Subscription:
    """A pub/sub connection: subscribe to channels, receive messages in batches.

    With ``sharded`` it uses SSUBSCRIBE/SUNSUBSCRIBE and receives ``smessage`` pushes.
    One task at a time may call ``receive()``.
    """

    def __init__(
        self,
        address: RedisAddress,
        wire: Wire,
        *,
        sharded: bool = False,
        max_buffered: int = MAX_BUFFERED,
        max_buffered_bytes: int = MAX_BUFFERED_BYTES,
    ) -> None:
        self.address = address
        self.sharded = sharded
        self.max_buffered = max_buffered
        self.max_buffered_bytes = max_buffered_bytes
        #: the channels Redis confirmed and has not unsubscribed
        self.channels: set[bytes] = set()
        self._wire = wire
        self._reader = new_reader()
        self._messages: list[tuple[bytes, bytes]] = []
        self._bytes = 0
        self._arrived = trio.Event()
        self._room = trio.Event()
        self._waiters: list[_Waiter] = []
        self._send_lock = trio.StrictFIFOLock()
        self._broken: str | None = None
        self._scope: trio.CancelScope | None = None
        #: ``read_inline``: the receiving task reads the socket itself.
        self._inline = False
        self._reader_done = trio.Event()

    @property
    def buffered(self) -> int:
        """Messages received and not yet taken by ``receive()`` (at most ``max_buffered``)."""
        return len(self._messages)

    @property
    def closed(self) -> bool:
        return self._broken is not None

    async def subscribe(self, *channels: str | bytes) -> None:
        """Subscribe; returns once Redis confirmed every channel (RedisError if it refused,
        e.g. CROSSSLOT or MOVED for sharded channels). Confirmations come in the same
        stream as messages: while ``max_buffered`` messages wait, it waits for
        ``receive()`` to make room."""
        await self._command(b"ssubscribe" if self.sharded else b"subscribe", channels)

    async def unsubscribe(self, *channels: str | bytes) -> None:
        """Unsubscribe from these channels (from all without arguments)."""
        await self._command(b"sunsubscribe" if self.sharded else b"unsubscribe", channels)

    async def _command(self, kind: bytes, channels: tuple[str | bytes, ...]) -> None:
        if not channels and kind.endswith(b"subscribe") and not kind.endswith(b"unsubscribe"):
            await trio.lowlevel.checkpoint()
            return
        names = [_channel(c) for c in channels]
        waiter = _Waiter(kind, set(names) if names else None)
        async with self._send_lock:
            if self._broken is not None:
                raise RedisUnavailable(self._broken)
            self._waiters.append(waiter)
            await self._send(encode((kind.decode(), *names)))
        await waiter.done.wait()
        if waiter.error is not None:
            raise RedisError(str(waiter.error))
        if self._broken is not None and (waiter.channels or waiter.channels is None):
            raise RedisUnavailable(self._broken)

    async def _send(self, data: bytes) -> None:
        # Shielded: a half-written command would corrupt the stream. Bounded, though:
        # Redis reads its clients' input even while it cannot write their output.
        with trio.CancelScope(shield=True), trio.move_on_after(10) as timer:
            try:
                await self._wire.send_all(data)
            except RedisUnavailable as exc:
                self._fail(str(exc))
        if timer.cancelled_caught:
            self._fail(f"{self.address} did not read a command for 10 s")

    async def read_inline(self) -> None:
        """From now on ``receive()`` reads the socket itself, and nothing else does: no
        hop through the reader task (one scheduler pass less per batch of messages, on
        the path of every cross-node delivery). For a caller that has subscribed to all
        it needs and now only receives; backpressure is then simply not reading."""
        if self._wire._sock is None:
            return  # TLS: a cancelled read may break an SSLStream, so the task stays
        self._inline = True
        if self._scope is not None:
            self._scope.cancel()
            await self._reader_done.wait()  # (two readers of one socket: an error)

    async def receive(self) -> list[tuple[bytes, bytes]]:
        """``(channel, data)`` pairs: everything received so far (at least one; waits if
        none). Raises RedisUnavailable once the connection is lost and nothing is left."""
        waited = False
        while not self._messages:
            if self._broken is not None:
                raise RedisUnavailable(self._broken)
            waited = True
            if self._inline:
                data = await self._wire.receive()
                if not data:
                    self._fail(f"connection to {self.address} lost")
                    continue
                self._reader.feed(data)  # type: ignore[arg-type]  # any buffer
                self._parse_all()
            else:
                await self._arrived.wait()
        if not waited:
            await trio.lowlevel.checkpoint()
        messages, self._messages, self._bytes = self._messages, [], 0
        self._room.set()
        return messages

    def _parse_all(self) -> None:
        """``read_inline``: every complete reply now (the caller takes them all)."""
        gets = self._reader.gets
        messages = self._messages
        while (reply := gets()) is not NOTHING:
            if type(reply) is list and reply[0] in _MESSAGES and len(reply) == 3:
                messages.append((reply[1], reply[2]))
            else:
                self._control(reply)

    async def _read_loop(self) -> None:
        reader = self._reader
        wire = self._wire
        try:
            while True:
                await self._parse(reader)
                data = await wire.receive()
                if not data:
                    self._fail(f"connection to {self.address} lost")
                    return
                reader.feed(data)  # type: ignore[arg-type]  # any buffer (the stub says bytes)
        except RedisUnavailable as exc:  # a protocol error from the parser
            self._fail(str(exc))

    async def _parse(self, reader: hiredis.Reader) -> None:
        """Every complete reply in the reader's buffer, pausing while the queue is full."""
        gets = reader.gets
        while True:
            messages = self._messages
            limit = self.max_buffered
            limit_bytes = self.max_buffered_bytes
            size = self._bytes
            full = False
            while not full and (reply := gets()) is not NOTHING:
                if type(reply) is list and reply[0] in _MESSAGES and len(reply) == 3:
                    data = reply[2]
                    messages.append((reply[1], data))
                    size += len(data)
                    full = len(messages) >= limit or size >= limit_bytes
                else:
                    self._control(reply)
            self._bytes = size
            if messages:
                self._arrived.set()
                self._arrived = trio.Event()
            if not full:
                return
            room = self._room = trio.Event()
            await room.wait()  # receive() took the queue

    def _control(self, reply: Any) -> None:
        """A confirmation or an error reply: to the (un)subscribe waiting for it."""
        if isinstance(reply, RedisError):
            if self._waiters:
                waiter = self._waiters.pop(0)
                waiter.error = reply
                waiter.done.set()
            return
        if type(reply) is not list or len(reply) != 3 or reply[0] not in _CONFIRMATIONS:
            return  # e.g. a pong: nothing waits for it
        kind, channel, count = reply
        if kind.endswith(b"unsubscribe"):
            self.channels.discard(channel)
        else:
            self.channels.add(channel)
        for i, waiter in enumerate(self._waiters):
            if waiter.kind != kind:
                continue
            if waiter.channels is None:
                if count == 0:
                    del self._waiters[i]
                    waiter.done.set()
                return
            if channel in waiter.channels:
                waiter.channels.discard(channel)
                if not waiter.channels:
                    del self._waiters[i]
                    waiter.done.set()
                return
        # unconfirmed by anyone: Redis unsubscribed us itself (a slot moved away)

    def _fail(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
        for waiter in self._waiters:
            waiter.done.set()
        self._waiters.clear()
        self._arrived.set()
        self._room.set()
        if self._scope is not None:
            self._scope.cancel()

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with trio.CancelScope() as self._scope:
                task_status.started()
                await self._read_loop()
        finally:
            self._reader_done.set()
        if not self._inline or self._broken is not None:
            await self._wire.aclose()

    async def aclose(self) -> None:
        self._fail(f"subscription to {self.address} closed")
        await self._wire.aclose()


@asynccontextmanager
async def open_subscription(
    address: RedisAddress,
    *,
    sharded: bool = False,
    connect_timeout: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
    max_buffered: int = MAX_BUFFERED,
    max_buffered_bytes: int = MAX_BUFFERED_BYTES,
    client_name: str | None = None,
) -> AsyncIterator[Subscription]:
    """A connected :class:`Subscription` (AUTH done, named ``client_name`` if given),
    closed on exit."""
    wire = await connect(address, connect_timeout, ssl_context)
    sub = Subscription(
        address,
        wire,
        sharded=sharded,
        max_buffered=max_buffered,
        max_buffered_bytes=max_buffered_bytes,
    )
    try:
        if commands := handshake_commands(address, client_name):
            with trio.move_on_after(connect_timeout) as timer:
                await _handshake(sub, commands)
            if timer.cancelled_caught:
                raise RedisUnavailable(f"cannot connect to {address}: timed out")
        async with hosted(sub._run):
            try:
                yield sub
            finally:
                await sub.aclose()
    finally:
        await wire.aclose()


async def _handshake(sub: Subscription, commands: list[Command]) -> None:
    """AUTH (and SELECT) before the reader task runs: their replies come first."""
    wire = sub._wire
    await wire.send_all(b"".join([encode(c) for c in commands]))
    replies: list[Any] = []
    while len(replies) < len(commands):
        data = await wire.receive()
        if not data:
            raise RedisUnavailable(f"connection to {sub.address} lost")
        sub._reader.feed(data)  # type: ignore[arg-type]  # any buffer (the stub says bytes)
        while (reply := sub._reader.gets()) is not NOTHING:
            replies.append(reply)
    for reply in replies:
        if isinstance(reply, RedisError):
            raise RedisError(f"{sub.address}: {reply}")
