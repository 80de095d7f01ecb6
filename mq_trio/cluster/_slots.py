"""Redis Cluster: key slots, which master owns which slot, and routing commands by slot.

A Lua script may only touch keys of one slot, so the history puts a topic's keys under
one hash tag (``{tag}``); ``slot_tags()`` gives, for every slot, a tag that lands in it.
"""

from __future__ import annotations

import binascii
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import cache
from itertools import product
from typing import Any

import attrs
import trio

from ._address import RedisAddress
from ._resp import RedisConnection, Script, is_noscript, load_scripts, open_redis
from ._wire import Command, RedisError, RedisUnavailable, hosted

SLOTS = 16384

_TAG_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def key_slot(key: str | bytes) -> int:
    """The key's slot, as Redis computes it: CRC16 (XMODEM) mod 16384 of the key, or of
    its hash tag (the part between the first ``{`` and the next ``}``, if not empty)."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS  # crc_hqx with 0: CRC-16/XMODEM


@cache
def slot_tags() -> list[str]:
    """For each slot a short tag (1-4 characters of ``[0-9a-z]``) whose key_slot is that
    slot: the key ``"{" + tag + "}..."`` lands in it. Computed once."""
    tags: list[str | None] = [None] * SLOTS
    missing = SLOTS
    for length in range(1, 5):
        for chars in product(_TAG_ALPHABET, repeat=length):
            tag = "".join(chars)
            slot = binascii.crc_hqx(tag.encode(), 0) % SLOTS
            if tags[slot] is None:
                tags[slot] = tag
                missing -= 1
                if not missing:
                    return [t for t in tags if t is not None]
    raise AssertionError("some slot has no tag of up to 4 characters")  # pragma: no cover


@attrs.frozen
class ClusterMap:
    """Which master owns which slot (from CLUSTER SLOTS)."""

    _masters: tuple[RedisAddress, ...]
    _owners: bytes  # per slot, an index into _masters (255: no owner)

    @classmethod
    async def discover(
        cls,
        seed: RedisAddress,
        *,
        connect_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> ClusterMap:
        """Ask ``seed`` (over a short connection) for CLUSTER SLOTS."""
        async with open_redis(
            attrs.evolve(seed, db=0), connect_timeout=connect_timeout, ssl_context=ssl_context
        ) as conn:
            reply = await conn.call("CLUSTER", "SLOTS")
        return cls.from_slots(seed, reply)

    @classmethod
    def from_slots(cls, seed: RedisAddress, reply: Any) -> ClusterMap:
        """The map from a CLUSTER SLOTS reply: ``[start, end, [host, port, id...], replicas...]``.
        The masters inherit the seed's TLS and credentials."""
        masters: list[RedisAddress] = []
        owners = bytearray(b"\xff") * SLOTS
        for start, end, master, *_ in reply:
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            if host in ("", "?"):  # "unknown endpoint": the one we asked
                host = seed.host
            address = attrs.evolve(seed, host=host, port=int(master[1]), db=0)
            if address not in masters:
                masters.append(address)
            owners[int(start) : int(end) + 1] = bytes([masters.index(address)]) * (
                int(end) - int(start) + 1
            )
        if len(masters) > 255:
            raise ValueError("more than 255 masters")
        return cls(tuple(masters), bytes(owners))

    def address_for_slot(self, slot: int) -> RedisAddress:
        """The master owning the slot; RedisUnavailable if none does (cluster not ready)."""
        owner = self._owners[slot]
        if owner == 255:
            raise RedisUnavailable(f"no Redis Cluster master owns slot {slot}")
        return self._masters[owner]

    def masters(self) -> list[RedisAddress]:
        return list(self._masters)

    def slots_of(self, master: RedisAddress) -> list[int]:
        if master not in self._masters:
            return []
        index = self._masters.index(master)
        return [slot for slot, owner in enumerate(self._owners) if owner == index]


def _redirect(reply: object) -> tuple[str, int, str, int] | None:
    """``(kind, slot, host, port)`` of a MOVED or ASK error reply, else None."""
    if not isinstance(reply, RedisError):
        return None
    kind, _, rest = str(reply).partition(" ")
    if kind not in ("MOVED", "ASK"):
        return None
    slot, _, endpoint = rest.partition(" ")
    host, _, port = endpoint.rpartition(":")
    return kind, int(slot), host, int(port)


class ClusterConnections:
    """One RedisConnection per master; a command goes to its slot's master.

    A MOVED or ASK reply (a slot moved, or is moving) refreshes the map once and retries
    the commands it concerns; a master whose connection broke is reconnected on next use
    (the call that found it broken raised RedisUnavailable).
    """

    def __init__(
        self,
        seed: RedisAddress,
        cluster_map: ClusterMap,
        nursery: trio.Nursery,
        *,
        connect_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.seed = seed
        self.map = cluster_map
        self._nursery = nursery
        self._connect_timeout = connect_timeout
        self._ssl_context = ssl_context
        self._conns: dict[RedisAddress, RedisConnection] = {}
        self._closers: dict[RedisAddress, trio.Event] = {}  # ends a replaced one's task
        self._connecting: dict[RedisAddress, trio.Event] = {}

    async def connection(self, address: RedisAddress) -> RedisConnection:
        """The open connection to that master (opened now if needed)."""
        while True:
            conn = self._conns.get(address)
            if conn is not None and not conn.closed:
                await trio.lowlevel.checkpoint()
                return conn
            connecting = self._connecting.get(address)
            if connecting is None:
                break
            await connecting.wait()  # another task is opening it
        self._connecting[address] = event = trio.Event()
        try:
            if address in self._closers:
                self._closers.pop(address).set()
            self._conns[address] = await self._nursery.start(self._hold, address)
            return self._conns[address]
        finally:
            del self._connecting[address]
            event.set()

    async def _hold(
        self, address: RedisAddress, *, task_status: trio.TaskStatus[RedisConnection]
    ) -> None:
        """Keep one connection open until it is replaced or the cluster is closed."""
        closer = trio.Event()
        async with open_redis(
            address, connect_timeout=self._connect_timeout, ssl_context=self._ssl_context
        ) as conn:
            self._closers[address] = closer
            task_status.started(conn)
            await closer.wait()

    async def refresh(self) -> None:
        """Read the map again, from any master that answers (the seed first)."""
        error: RedisUnavailable | None = None
        for address in [self.seed, *self.map.masters()]:
            try:
                self.map = await ClusterMap.discover(
                    address, connect_timeout=self._connect_timeout, ssl_context=self._ssl_context
                )
                return
            except RedisUnavailable as exc:
                error = exc
        assert error is not None
        raise error

    async def call_slot(self, slot: int, *args: bytes | str | int | float) -> Any:
        """One command to the slot's master; an error reply raises RedisError."""
        (reply,) = await self.pipeline([(slot, args)])
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[tuple[int, Command]]) -> list[Any]:
        """``(slot, command)`` pairs: one pipeline per master, concurrently; the replies in
        the original order (error replies as RedisError instances)."""
        replies = await self._send(list(range(len(commands))), commands, {}, False)
        redirects = {i: r for i, reply in enumerate(replies) if (r := _redirect(reply))}
        if not redirects:
            return replies
        if any(kind == "MOVED" for kind, *_ in redirects.values()):
            await self.refresh()
        for asking in (False, True):  # MOVED: the slot's new owner; ASK: the migration target
            targets = {
                i: attrs.evolve(self.seed, host=host or self.seed.host, port=port, db=0)
                for i, (kind, _, host, port) in redirects.items()
                if (kind == "ASK") == asking
            }
            if targets:
                order = list(targets)
                again = await self._send(order, commands, targets, asking)
                for i, reply in zip(order, again, strict=True):
                    replies[i] = reply
        return replies

    async def _send(
        self,
        indexes: list[int],
        commands: Sequence[tuple[int, Command]],
        targets: dict[int, RedisAddress],
        asking: bool,
    ) -> list[Any]:
        """The commands at ``indexes``, grouped per master (or sent to their ``targets``,
        each after ASKING if ``asking``); their replies in the order of ``indexes``."""
        groups: dict[RedisAddress, list[int]] = {}
        for i in indexes:
            address = targets.get(i) or self.map.address_for_slot(commands[i][0])
            groups.setdefault(address, []).append(i)
        results: dict[int, Any] = {}

        async def one(address: RedisAddress, group: list[int]) -> None:
            conn = await self.connection(address)
            if asking:  # during a slot migration: ASKING makes the target take it
                batch: list[Command] = []
                for i in group:
                    batch += [("ASKING",), commands[i][1]]
                got = (await conn.pipeline(batch))[1::2]
            else:
                got = await conn.pipeline([commands[i][1] for i in group])
            results.update(zip(group, got, strict=True))

        if len(groups) == 1:
            ((address, group),) = groups.items()
            await one(address, group)
            return [results[i] for i in indexes]
        errors: list[Exception] = []

        async def caught(address: RedisAddress, group: list[int]) -> None:
            try:
                await one(address, group)
            except (RedisUnavailable, RedisError) as exc:  # raised below, not as a group
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for address, group in groups.items():
                nursery.start_soon(caught, address, group)
        if errors:
            raise errors[0]
        return [results[i] for i in indexes]

    async def run_script(
        self,
        script: Script,
        keys: Sequence[str | bytes],
        args: Sequence[bytes | str | int | float],
    ) -> Any:
        """EVALSHA on the master of the keys' slot (they must share one: a hash tag), with
        the NOSCRIPT fallback of :meth:`Script.run`; an error reply raises RedisError."""
        if not keys:
            raise ValueError("a script run on a cluster needs a key to route it")
        slot = key_slot(keys[0])
        reply = (await self.pipeline([(slot, script.command(keys, args))]))[0]
        if is_noscript(reply):
            await self.call_slot(slot, "SCRIPT", "LOAD", script.source)
            reply = (await self.pipeline([(slot, script.command(keys, args))]))[0]
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def load_scripts(self, scripts: Sequence[Script]) -> None:
        """SCRIPT LOAD each one on every master (pipelined per master)."""
        for master in self.map.masters():
            await load_scripts(await self.connection(master), scripts)

    def close(self) -> None:
        """Close every connection (their tasks end)."""
        self._nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_cluster(
    seed: RedisAddress,
    *,
    connect_timeout: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[ClusterConnections]:
    """Discover the cluster from ``seed`` and connect to every master; closed on exit.
    RedisUnavailable if the seed or a master cannot be reached."""
    cluster_map = await ClusterMap.discover(
        seed, connect_timeout=connect_timeout, ssl_context=ssl_context
    )
    holder: list[ClusterConnections] = []

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            conns = ClusterConnections(
                seed, cluster_map, nursery,
                connect_timeout=connect_timeout, ssl_context=ssl_context,
            )
            for master in cluster_map.masters():
                await conns.connection(master)
            holder.append(conns)
            task_status.started()
            await trio.sleep_forever()  # until close(): the connections live in here

    async with hosted(run):
        (conns,) = holder
        try:
            yield conns
        finally:
            conns.close()
