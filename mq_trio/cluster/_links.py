"""How a node reaches Redis: one server, or a Redis Cluster (sharded pub/sub).

The history speaks in ``(slot, command)`` pairs and asks :class:`Layout` where a topic's
epoch copy and frames channel are; one server has a single epoch key and channel (slot
0 for everything), a Redis Cluster one of each per slot, so that every script touches
one slot and publishes with SPUBLISH on that slot's channel.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import attrs

from . import _scripts as lua
from ._address import RedisAddress
from ._resp import RedisConnection, Script, load_scripts, open_redis
from ._slots import SLOTS, ClusterConnections, ClusterMap, key_slot, open_cluster, slot_tags
from ._wire import Command, RedisError

MOVE_EPOCH = Script(lua.MOVE_EPOCH)


@attrs.frozen
class Layout:
    """Where a topic's epoch copy and frames channel are."""

    sharded: bool

    def slot(self, topic: str) -> int:
        return key_slot(topic.encode().hex()) if self.sharded else 0

    def epoch_key(self, slot: int) -> str:
        return lua.slot_epoch_key(slot_tags()[slot]) if self.sharded else lua.EPOCH_KEY

    def channel(self, slot: int) -> str:
        return lua.slot_channel(slot_tags()[slot]) if self.sharded else lua.CHANNEL


class Links(Protocol):
    """A node's command connection(s) to Redis."""

    layout: Layout

    async def pipeline(self, commands: Sequence[tuple[int, Command]]) -> list[Any]:
        """One round trip (per master); the replies in order, errors as values."""

    async def load(self, scripts: Sequence[Script]) -> None:
        """SCRIPT LOAD on every server."""


@attrs.define(eq=False)
class OneServer:
    """A single Redis server."""

    conn: RedisConnection
    layout: Layout = Layout(sharded=False)

    async def pipeline(self, commands: Sequence[tuple[int, Command]]) -> list[Any]:
        return await self.conn.pipeline([command for _, command in commands])

    async def load(self, scripts: Sequence[Script]) -> None:
        await load_scripts(self.conn, scripts)


@attrs.define(eq=False)
class Shards:
    """A Redis Cluster: a connection per master, commands routed by slot."""

    conns: ClusterConnections
    layout: Layout = Layout(sharded=True)

    async def pipeline(self, commands: Sequence[tuple[int, Command]]) -> list[Any]:
        return await self.conns.pipeline(commands)

    async def load(self, scripts: Sequence[Script]) -> None:
        await self.conns.load_scripts(scripts)


@asynccontextmanager
async def open_links(address: RedisAddress, name: str | None = None
                     ) -> AsyncIterator[Links]:
    """Connected to the server (named ``name``), or to every master of the cluster
    (RedisUnavailable if not)."""
    if address.cluster:
        async with open_cluster(address) as conns:
            yield Shards(conns)
    else:
        async with open_redis(address, client_name=name) as conn:
            yield OneServer(conn)


async def intake_channels(address: RedisAddress) -> list[tuple[RedisAddress, list[str]]]:
    """Which channels to subscribe to, on which server: the one channel, or every
    slot's channel on its master."""
    layout = Layout(sharded=address.cluster)
    if not address.cluster:
        return [(address, [layout.channel(0)])]
    cluster = await ClusterMap.discover(address)
    return [(master, [layout.channel(slot) for slot in cluster.slots_of(master)])
            for master in cluster.masters()]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _copy_epoch(links: Links, epoch: str, only_missing: bool) -> int:
    """Every slot's copy of the epoch (Redis Cluster); how many were set (with
    ``only_missing``: how many were missing)."""
    layout = links.layout
    extra = ("NX",) if only_missing else ()
    written = 0
    for start in range(0, SLOTS, 4096):
        replies = await links.pipeline([
            (slot, ("SET", layout.epoch_key(slot), epoch, *extra))
            for slot in range(start, min(start + 4096, SLOTS))])
        for reply in replies:
            if isinstance(reply, RedisError):
                raise reply
            written += reply is not None
    return written


async def start_epoch(links: Links, candidate: str) -> str:
    """The cluster's epoch: the one in Redis, or ``candidate`` if there is none.

    With Redis Cluster every slot must hold a copy: with none at slot 0 (a new cluster,
    or slot 0's shard lost its data) the epoch is ``candidate`` everywhere; with one
    there, a slot without a copy is a shard that lost its data, so the cluster moves
    to ``candidate`` (``move_epoch``) rather than fill the gap with the old epoch.
    """
    key = links.layout.epoch_key(0)
    made, epoch = await links.pipeline([(0, ("SET", key, candidate, "NX")),
                                        (0, ("GET", key))])
    text = _text(epoch)
    if not links.layout.sharded:
        return text
    if made is not None:  # (no epoch at slot 0: this one, in every slot)
        await _copy_epoch(links, text, only_missing=False)
        return text
    if await _copy_epoch(links, text, only_missing=True):
        return await move_epoch(links, text, candidate)  # some slot had lost its copy
    return text


async def move_epoch(links: Links, old: str, new: str) -> str:
    """History was lost somewhere (a script found a slot without its epoch and set
    ``new``): move the epoch from ``old`` to ``new`` unless another node did first, in
    every slot; the epoch now."""
    key = links.layout.epoch_key(0)
    (epoch,) = await links.pipeline([(0, MOVE_EPOCH.command((key,), (old, new)))])
    if isinstance(epoch, RedisError):
        raise epoch
    text = _text(epoch)
    if links.layout.sharded:
        await _copy_epoch(links, text, only_missing=False)
    return text


async def read_epoch(links: Links) -> str:
    """The epoch as Redis has it now (slot 0's, with Redis Cluster)."""
    (epoch,) = await links.pipeline([(0, ("GET", links.layout.epoch_key(0)))])
    return _text(epoch)
