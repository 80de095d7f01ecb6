"""The Redis history: one more implementation of the broker's history seam, shared by
every node of a cluster (docs/cluster.md).

What the broker asks of it goes into a queue and leaves in group commits: one pipeline
of script calls per round trip, one call per run of a topic's messages (``_scripts``).
Every message comes back through the intake, the node's one subscription to the
frames channel, in index order, and is delivered from there (``Broker.deliver_frame``);
a write is decided once its reply is in and the intake has passed it (so a sender
subscribed to its topic gets its own delivery before its success). Nothing here
awaits on the broker's behalf: the flusher and the intake are this object's tasks.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Collection
from typing import Any

import attrs
import trio

from ..broker import (
    CachedMessage,
    FrameSink,
    HistoryStats,
    Item,
    StoredId,
    StoredJob,
    TopicInfo,
    new_epoch,
)
from ..protocol import Send, splice_index
from . import _scripts as lua
from ._links import MOVE_EPOCH, Layout, Links, move_epoch, read_epoch, start_epoch
from ._ops import JobOp, JoinOp, Write, failed_write, message_flags
from ._resp import RedisAddress, RedisError, Script, open_subscription

log = logging.getLogger("mq_trio.cluster")

PUBLISH = Script(lua.PUBLISH)
JOIN = Script(lua.JOIN)
RENEW = Script(lua.RENEW)
READ = Script(lua.READ)
JOB_ADD = Script(lua.JOB_ADD)
JOB_TAKE = Script(lua.JOB_TAKE)
JOB_SET = Script(lua.JOB_SET)
#: With Redis Cluster: the same, publishing with SPUBLISH.
PUBLISH_SHARDED = Script(lua.sharded(lua.PUBLISH))
JOIN_SHARDED = Script(lua.sharded(lua.JOIN))
JOB_ADD_SHARDED = Script(lua.sharded(lua.JOB_ADD))
JOB_SET_SHARDED = Script(lua.sharded(lua.JOB_SET))
SCRIPTS = (PUBLISH, JOIN, RENEW, READ, JOB_ADD, JOB_TAKE, JOB_SET, PUBLISH_SHARDED,
           JOIN_SHARDED, JOB_ADD_SHARDED, JOB_SET_SHARDED, MOVE_EPOCH)

#: How long a node's subscriber counts stay valid without renewal (a dead node's
#: subscribers stop being picked for "one" messages after at most this); a live node
#: renews them three times per lease.
LEASE_SECONDS = 15.0
#: Bytes of messages queued for Redis beyond which sends fail at once.
MAX_QUEUED_BYTES = 64 << 20
#: How often a node's consumers with room look for jobs whose claims ended.
JOB_POLL_SECONDS = 1.0
#: Keys per lease renewal call.
RENEW_CHUNK = 500


def _entry(raw: bytes) -> tuple[int, bytes]:
    """A cache entry (``<flag><index> <command>``) as (index, delivery)."""
    space = raw.index(b" ")
    index = int(raw[1:space])
    return index, splice_index(raw[space + 1 :], index)


@attrs.define(eq=False)
class RedisHistory:
    """Indexes, caches and subscriber counts in Redis; see the module's docstring."""

    address: RedisAddress
    cache_size: int = 100
    dedupe_window: float = 120.0
    #: Seconds this node's subscriber counts stay valid without renewal.
    lease: float = LEASE_SECONDS
    #: Seconds a job taken by this node stays its own in Redis without news: the ack
    #: timeout plus a margin, so the node's own deadline comes first.
    claim: float = 35.0
    max_queue_jobs: int = 100_000
    #: This node's id in Redis (counts, frames): random per process.
    node: str = attrs.field(factory=lambda: os.urandom(8).hex())
    epoch: str = attrs.field(factory=new_epoch)
    shared: bool = attrs.field(default=True, init=False)
    layout: Layout = attrs.field(init=False)
    #: ``node`` as frames carry it.
    _node_bytes: bytes = attrs.field(init=False, default=b"")
    #: The command links while connected (the intake's resync reads through them).
    _links: Links | None = attrs.field(default=None, init=False)
    #: Intake subscriptions needed (one per server) and up now.
    intakes: int = attrs.field(default=1, init=False)
    _intakes_up: int = attrs.field(default=0, init=False)
    #: A script found the epoch missing and set this one (history was lost): the
    #: flusher moves the cluster to it. ``_reread``: another node moved it.
    _moving: str | None = attrs.field(default=None, init=False)
    _reread: bool = attrs.field(default=False, init=False)
    #: Called after the intake delivered a batch of frames (the server writes the
    #: outboxes it filled, as a reader does at the end of its chunk).
    after_deliveries: Callable[[], None] | None = None
    _sink: FrameSink | None = None
    _ops: list[Write | JoinOp | JobOp] = attrs.field(factory=list)
    _open: dict[str, Write] = attrs.field(factory=dict)
    _queued_bytes: int = 0
    _wake: trio.Event = attrs.field(factory=trio.Event)
    _seq: int = 0
    _in_flight: dict[int, Write | JoinOp | JobOp] = attrs.field(factory=dict)
    #: Topics this node published to or has subscribers of: what it counts as its own.
    _topics: set[str] = attrs.field(factory=set)
    #: Local subscriber counts per topic (renewed as leases).
    _counts: dict[str, int] = attrs.field(factory=dict)
    #: Topics with unsubscribes waiting for their mark (deliveries go on until then).
    _draining: dict[str, int] = attrs.field(factory=dict)
    #: The last index the intake delivered per topic with local subscribers (resync).
    _last: dict[str, int] = attrs.field(factory=dict)
    #: The command link is up (the flusher runs).
    _link_up: bool = False
    _epoch_known: bool = False
    #: Set in Redis by whichever script finds the epoch missing (Redis lost its data):
    #: never an epoch any client has seen.
    _candidate: str = attrs.field(factory=new_epoch)
    #: Times the intake subscribed (the first, and every resubscription).
    subscriptions: int = 0
    commits: int = 0
    failed_commits: int = 0
    _random: random.Random = attrs.field(factory=random.Random)

    # --- the seam (broker side) ---

    def __attrs_post_init__(self) -> None:
        self.layout = Layout(sharded=self.address.cluster)
        self._node_bytes = self.node.encode()

    @property
    def _intake_up(self) -> bool:
        return self._intakes_up == self.intakes

    @property
    def available(self) -> bool:
        """Sends are taken: the command link and every intake subscription are up (a
        send accepted while frames cannot come back would miss its local subscribers
        and its own delivery)."""
        return self._link_up and self._intakes_up == self.intakes

    def attach(self, sink: FrameSink) -> None:
        self._sink = sink

    def publish_shared(self, topic: str, command: bytes, one: bool, cached: bool,
                       message_id: str | None = None) -> tuple[Write, int]:
        """Queue one message; its write (shared with the topic's other messages in the
        same commit) and its place in it."""
        # The path of every send on a node (written out: a call less per message).
        size = len(command)
        if not self._link_up or self._intakes_up != self.intakes or (
                self._queued_bytes + size > MAX_QUEUED_BYTES):
            return failed_write(), 0  # (as _refused says)
        self._queued_bytes += size
        write = self._open.get(topic) or self._new_write(topic)
        offset = len(write.args) // 3
        write.args += ((1 if one else 0) | (2 if cached else 0), message_id or "", command)
        write.size += size
        return write, offset

    def publish_many(self, topic: str, commands: list[bytes], one: bool, cached: bool,
                     message_id: str | None = None) -> tuple[Write, int]:
        """Queue a batch: in one script call, so all or none of it is written."""
        size = sum(map(len, commands))
        refused = self._refused(size)
        if refused is not None:
            return refused, 0
        write = self._open.get(topic) or self._new_write(topic)
        offset = write.count
        args = write.args
        args += (message_flags(one, cached, count=len(commands)), message_id or "", commands[0])
        rest = message_flags(one, cached, rest=True)
        for command in commands[1:]:
            args += (rest, "", command)
        write.size += size
        return write, offset

    def _refused(self, size: int) -> Write | None:
        """A failed write, not queued, if Redis is down or this would take the bytes
        queued for it beyond ``MAX_QUEUED_BYTES`` (only this send fails, not the ones
        already queued); else None, and the bytes are counted."""
        if not self.available or self._queued_bytes + size > MAX_QUEUED_BYTES:
            return failed_write()
        self._queued_bytes += size
        return None

    def _new_write(self, topic: str) -> Write:
        write = self._open[topic] = Write(topic=topic)
        self._topics.add(topic)
        self._queue(write)
        return write

    def join(self, topic: str, count: int, last_seen: int, replay: bool,
             on_fail: Callable[[], None] | None = None) -> JoinOp:
        """This node now has ``count`` subscribers of ``topic``; read the cache after
        ``last_seen`` if ``replay``. ``on_fail``: called if it could not be done."""
        self._topics.add(topic)
        self._set_count(topic, count)
        op = JoinOp(topic=topic, count=count, last_seen=last_seen, replay=replay,
                    on_fail=on_fail)
        self._open.pop(topic, None)  # later sends: after it, in a new write
        self._queue(op)
        if not self.available:
            self._fail_queued()
        return op

    def leave(self, topic: str, count: int, drains: bool = False,
              on_done: Callable[[], None] | None = None) -> JoinOp | None:
        """This node now has ``count`` subscribers of ``topic``. ``marked`` (an
        unsubscribe): until its mark passes, the topic's frames are still delivered
        (None: Redis is down, nothing to wait for)."""
        self._set_count(topic, count)
        if not self.available:
            return None
        self._open.pop(topic, None)
        op = JoinOp(topic=topic, count=count, on_done=on_done)
        if drains:  # its subscriber still gets what comes before the mark
            self._draining[topic] = self._draining.get(topic, 0) + 1
            op.on_done = lambda: self._drained(topic, on_done)
        self._queue(op)
        return op

    def _drained(self, topic: str, then: Callable[[], None] | None) -> None:
        n = self._draining[topic] - 1
        if n:
            self._draining[topic] = n
        else:
            del self._draining[topic]
        if then is not None:
            then()

    def _set_count(self, topic: str, count: int) -> None:
        if count:
            self._counts[topic] = count
        else:
            self._counts.pop(topic, None)
            self._last.pop(topic, None)

    def _queue(self, op: Write | JoinOp | JobOp) -> None:
        self._ops.append(op)
        self._wake.set()

    def _fail_queued(self) -> None:
        ops, self._ops = self._ops, []
        self._open.clear()
        self._queued_bytes = 0
        for op in ops:
            self._fail(op)

    def _fail(self, op: Write | JoinOp | JobOp) -> None:
        op._decide(failed=True)
        if type(op) is JobOp and op.on_taken is not None:
            op.on_taken([])
        if type(op) is JoinOp:
            if op.on_fail is not None:
                op.on_fail()
            op._ended()

    # --- the rest of the seam: a node's own view ---

    def record(self, topic: str, send: Send, one: bool, cached: bool) -> int:
        raise NotImplementedError("a shared history is published to by publish_shared")

    def replay(self, topic: str, last_seen: int) -> list[Item]:
        raise NotImplementedError("a shared history replays through join")

    def recovered(self, topic: str, last_seen: int) -> bool:
        raise NotImplementedError("a shared history answers through join")

    def cached(self, topic: str) -> list[CachedMessage]:
        return []  # in Redis: read it there (docs/cluster.md)

    def has(self, topic: str) -> bool:
        return topic in self._topics

    def topic_count(self) -> int:
        return len(self._topics)

    def topic_names(self) -> Collection[str]:
        return self._topics

    def topic_info(self, topic: str) -> TopicInfo | None:
        if topic not in self._topics:
            return None
        return TopicInfo(self._last.get(topic, -1) + 1, 0, 0)

    def stats(self) -> HistoryStats:
        return HistoryStats(available=self.available, commits=self.commits,
                            failed_commits=self.failed_commits)

    def record_job(self, topic: str, base: bytes) -> int:
        raise NotImplementedError("a shared history takes jobs through publish_jobs")

    def publish_jobs(self, topic: str, commands: list[bytes], message_id: str | None
                     ) -> tuple[Write, int]:
        """Queue jobs (one, or a batch: one script call, all or none)."""
        size = sum(map(len, commands))
        refused = self._refused(size)
        if refused is not None:
            return refused, 0
        key = "\x00jobs\x00" + topic  # (not in the same write as messages)
        write = self._open.get(key)
        if write is None:
            write = self._open[key] = Write(topic=topic, jobs=True)
            self._topics.add(topic)
            self._queue(write)
        offset = write.count
        args = write.args
        many = len(commands) > 1
        args += (message_flags(False, False, count=len(commands) if many else 0),
                 message_id or "", commands[0])
        for command in commands[1:]:
            args += (message_flags(False, False, rest=True), "", command)
        write.size += size
        return write, offset

    def take(self, topic: str, count: int,
             on_taken: Callable[[list[tuple[int, int, bytes]]], None]) -> bool:
        """Ask for up to ``count`` waiting jobs of ``topic`` for this node's consumers
        (False: Redis is down)."""
        if not self._link_up:
            return False
        self._queue(JobOp(topic=topic, what="take", count=count, on_taken=on_taken))
        return True

    def job_delivered(self, topic: str, index: int, deliveries: int) -> None:
        self._job_news(topic, "touch", index, deliveries)

    def job_touched(self, topic: str, index: int) -> None:
        """A consumer reported progress: the claim in Redis is extended too."""
        self._job_news(topic, "touch", index, -1)

    def job_done(self, topic: str, index: int) -> JobOp:
        return self._job_news(topic, "done", index, -1)

    def job_back(self, topic: str, index: int) -> None:
        """A job this node will not deliver (its consumers left): for the others."""
        self._job_news(topic, "back", index, -1)

    def _job_news(self, topic: str, what: str, index: int, count: int) -> JobOp:
        op = JobOp(topic=topic, what=what, index=index, count=count)
        if not self._link_up:
            op._decide(failed=True)
        else:
            self._queue(op)
        return op

    def stored_jobs(self) -> list[StoredJob]:
        return []

    def remember_id(self, topic: str, message_id: str, reply: bytes, window: float) -> None:
        pass

    def stored_ids(self) -> list[StoredId]:
        return []

    # --- the tasks ---

    def _command(self, op: Write | JoinOp | JobOp, seed: int) -> tuple[int, Any]:
        layout = self.layout
        slot = layout.slot(op.topic)
        meta, cache, subs = lua.topic_keys(op.topic)
        keys = (meta, cache, subs, layout.epoch_key(slot))
        channel = layout.channel(slot)
        if type(op) is Write:
            if op.jobs:
                script = JOB_ADD_SHARDED if layout.sharded else JOB_ADD
                jw, jb = lua.job_keys(op.topic)[:2]
                return slot, script.command((meta, jw, jb, keys[3]), [
                    self._candidate, seed, self.node, op.seq, self.max_queue_jobs, channel,
                    op.topic, int(self.dedupe_window * 1000), *op.args])
            script = PUBLISH_SHARDED if layout.sharded else PUBLISH
            return slot, script.command(keys, [
                self._candidate, seed, self.node, op.seq, self.cache_size, channel,
                op.topic, int(self.dedupe_window * 1000), *op.args])
        if type(op) is JobOp:
            jkeys = lua.job_keys(op.topic)
            if op.what == "take":
                return slot, JOB_TAKE.command(jkeys, [self.node, op.count,
                                                      int(self.claim * 1000)])
            script = JOB_SET_SHARDED if layout.sharded else JOB_SET
            return slot, script.command((*jkeys, meta), [
                self.node, op.index, op.what, int(self.claim * 1000),
                "" if op.count < 0 else op.count, channel, op.topic])
        assert type(op) is JoinOp
        script = JOIN_SHARDED if layout.sharded else JOIN
        return slot, script.command(keys, [
            self._candidate, seed, self.node, op.count, int(self.lease * 1000),
            op.last_seen, 1 if op.replay else 0, op.seq, channel, op.topic])

    async def run_flusher(self, links: Links) -> None:
        """Group commits until the connection breaks (then RedisUnavailable)."""
        self._link_up = True
        self._links = links
        try:
            while True:
                if self._moving is not None or self._reread:
                    await self._follow_epoch(links)
                if not self._ops:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                ops, self._ops = self._ops, []
                self._open.clear()
                self._queued_bytes = 0
                commands = []
                rand = self._random.randrange
                for op in ops:
                    # (every op is passed by the intake: its frame, or its mark)
                    op.seq = self._seq
                    self._seq += 1
                    op.awaits_intake = (self._intake_up and type(op) is not JobOp
                                        and not (type(op) is Write and op.jobs))
                    if op.awaits_intake:
                        self._in_flight[op.seq] = op
                    commands.append(self._command(op, rand(1 << 30)))
                try:
                    replies = await links.pipeline(commands)
                except BaseException:
                    for op in ops:
                        self._fail(op)
                        self._in_flight.pop(op.seq, None)
                    raise
                self.commits += 1
                for op, reply in zip(ops, replies, strict=True):
                    self._settle(op, reply)
        finally:
            self._link_up = False
            self._links = None
            self._fail_queued()

    def _settle_job(self, op: JobOp, reply: Any) -> None:
        if isinstance(reply, RedisError):
            log.error("cluster: job %s of %r failed in Redis: %s", op.what, op.topic, reply)
            self.failed_commits += 1
            op._decide(failed=True)
            if op.on_taken is not None:
                op.on_taken([])
            return
        if op.what == "take":
            taken = [(int(reply[i]), int(reply[i + 1]), reply[i + 2])
                     for i in range(0, len(reply), 3)]
            op._decide()
            if op.on_taken is not None:
                op.on_taken(taken)
            return
        op._decide(failed=reply != 1)

    async def _follow_epoch(self, links: Links) -> None:
        """Move the cluster to the epoch a script set (history was lost), or take the
        one another node moved it to."""
        moving, self._moving, self._reread = self._moving, None, False
        if moving is not None:
            epoch = await move_epoch(links, self.epoch, moving)
        else:
            epoch = await read_epoch(links)
        self._adopt(epoch)

    def _settle(self, op: Write | JoinOp | JobOp, reply: Any) -> None:
        if type(op) is JobOp:
            self._settle_job(op, reply)
            return
        if isinstance(reply, RedisError):
            log.error("cluster: %s of %r failed in Redis: %s",
                      "publish" if type(op) is Write else "subscribe", op.topic, reply)
            self.failed_commits += 1
            self._in_flight.pop(op.seq, None)
            self._fail(op)
            return
        raw_epoch = reply[1] if type(op) is Write else reply[2]
        epoch = raw_epoch.decode() if isinstance(raw_epoch, bytes) else str(raw_epoch)
        self._check_epoch(epoch, bool(reply[3]))
        if type(op) is Write:
            op.first = int(reply[0])
            if len(reply) > 4:
                op.results = list(reply[4:])
            if not reply[2]:  # every message a repeat: nothing was published
                op.awaits_intake = False
                self._in_flight.pop(op.seq, None)
            op.replied = True
            op._settle()
            if op.done:
                self._in_flight.pop(op.seq, None)
            return
        assert type(op) is JoinOp
        op.next_index = int(reply[0])
        op.evicted = int(reply[1])
        # The epoch of the topic's own slot: what its indexes belong to (with Redis
        # Cluster the node's own view may be a moment behind a move).
        op.epoch = epoch
        op.entries = [_entry(raw) for raw in reply[4:]]
        op.replied = True
        op._settle()
        if op.done:
            self._in_flight.pop(op.seq, None)

    def _check_epoch(self, epoch: str, created: bool = False) -> None:
        """A script's view of the epoch. ``created``: it found none and set the node's
        candidate, so history was lost (Redis, or one shard, lost its data)."""
        if created and self.layout.sharded and self._epoch_known:
            self._moving = epoch  # every slot must move to it, and the flusher does
            self._wake.set()
        elif epoch != self.epoch and self._epoch_known and self.layout.sharded:
            self._reread = True  # another node moved it (or is moving it)
            self._wake.set()
        else:
            self._adopt(epoch)
        if epoch == self._candidate:
            self._candidate = new_epoch()

    def _adopt(self, epoch: str) -> None:
        if not self._epoch_known:  # (the first answer: the cluster's, adopted)
            self._epoch_known = True
        elif epoch != self.epoch:
            log.warning("cluster: the epoch in Redis is %s, was %s: Redis lost data "
                        "(restarted without it?); indexes start again", epoch, self.epoch)
            self._last.clear()
        self.epoch = epoch

    async def run_intake(self, address: RedisAddress, channels: list[str],
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        """Deliver every frame of ``channels`` (on the server at ``address``), in channel
        order; RedisUnavailable when cut off."""
        async with open_subscription(address, sharded=self.layout.sharded,
                                     client_name=f"mq-trio:{self.node}:frames") as sub:
            if self.layout.sharded:  # (SSUBSCRIBE takes the channels of one slot)
                for channel in channels:
                    await sub.subscribe(channel)
            else:
                await sub.subscribe(*channels)
            await sub.read_inline()  # (this task reads the frames itself from now on)
            self._intakes_up += 1
            self.subscriptions += 1
            task_status.started()
            try:
                if self._intake_up:
                    await self._resync()
                while True:
                    for _, data in await sub.receive():
                        self._frame(data)
                    if self.after_deliveries is not None:
                        self.after_deliveries()
            finally:
                self._intakes_up -= 1
                # Writes whose frames will not come: decided by their replies alone.
                for write in list(self._in_flight.values()):
                    write.awaits_intake = False
                    write._settle()
                self._in_flight.clear()

    def _frame(self, data: bytes) -> None:
        end = data.index(b"\n")
        origin, seq, first_, count_, length = data[:end].split(b" ")
        first = int(first_)
        count = int(count_)
        pos = end + 1 + int(length)
        topic = data[end + 1 : pos].decode()
        if count < 0:  # jobs wait on the topic (added, or given back by a node)
            if self._sink is not None:
                self._sink.jobs_waiting(topic)
            return
        write = None
        if origin == self._node_bytes:
            write = self._in_flight.pop(int(seq), None)
        if topic in self._counts or topic in self._draining:
            entries = []
            index = data.index
            for _ in range(count):
                end = index(b"\n", pos)
                target, size = data[pos:end].split(b" ")
                pos = end + 1 + int(size)
                entries.append((target, data[end + 1 : pos]))
            if count:
                self._last[topic] = first + count - 1
            if self._sink is not None and entries:
                self._sink.deliver_frame(topic, first, entries, write)  # type: ignore[arg-type]
        if write is not None:
            if type(write) is Write and write.first < 0:
                write.first = first
            write.passed = True
            write._settle()

    async def _resync(self) -> None:
        """After the intake was down: deliver what the caches hold beyond the last index
        delivered per topic (what was evicted meanwhile is a gap, as for any subscriber
        that falls behind the cache)."""
        links = self._links
        if not self._last or links is None:
            return
        topics = list(self._last.items())
        commands = []
        for topic, last in topics:
            meta, cache, _ = lua.topic_keys(topic)
            slot = self.layout.slot(topic)
            commands.append((slot, READ.command((meta, cache, self.layout.epoch_key(slot)),
                                                [last])))
        replies = await links.pipeline(commands)
        for (topic, _), reply in zip(topics, replies, strict=True):
            if isinstance(reply, RedisError) or self._sink is None:
                continue
            for raw in reply[3:]:
                if raw[:1] != b"0":
                    continue  # a "one" message nobody took: it waits for a subscriber
                space = raw.index(b" ")
                index = int(raw[1:space])
                if topic in self._counts:
                    self._sink.deliver_frame(topic, index, [(b"*", raw[space + 1 :])])
                    self._last[topic] = index

    async def run_job_polls(self, links: Links) -> None:
        """Once a second, this node's consumers with room look for jobs: the claims of
        a node that died end in Redis without a word to anyone."""
        del links  # (the polls go through the flusher's queue)
        while True:
            await trio.sleep(JOB_POLL_SECONDS)
            if self._sink is not None:
                self._sink.poll_jobs()

    async def run_renewals(self, links: Links) -> None:
        """Renew this node's subscriber counts before their leases end (one call per
        slot's worth of topics: a script touches one slot)."""
        while True:
            by_slot: dict[int, list[tuple[str, int]]] = {}
            for topic, count in self._counts.items():
                by_slot.setdefault(self.layout.slot(topic), []).append((topic, count))
            lease = int(self.lease * 1000)
            commands = []
            for slot, counts in by_slot.items():
                for i in range(0, len(counts), RENEW_CHUNK):
                    chunk = counts[i : i + RENEW_CHUNK]
                    keys = [lua.topic_keys(topic)[2] for topic, _ in chunk]
                    commands.append((slot, RENEW.command(
                        keys, [self.node, lease, *(n for _, n in chunk)])))
            if commands:
                for reply in await links.pipeline(commands):
                    if isinstance(reply, RedisError):  # (the next renewal tries again)
                        log.error("cluster: renewing subscriber counts failed: %s", reply)
            await trio.sleep(self.lease / 3)


async def prepare(links: Links, history: RedisHistory) -> None:
    """Scripts loaded and the epoch known: what a (re)connected node does first."""
    await links.load(SCRIPTS)
    epoch = await start_epoch(links, history._candidate)
    history._adopt(epoch)
    if epoch == history._candidate:
        history._candidate = new_epoch()
