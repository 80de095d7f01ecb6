"""The durable history: a window of each topic in memory, everything in SQLite."""

from __future__ import annotations

import heapq
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Collection
from typing import cast

import attrs
import trio

from ..broker import (
    Answer,
    CachedMessage,
    Held,
    HistoryStats,
    Item,
    SendBatch,
    StoredId,
    StoredJob,
    TopicInfo,
    nothing_lost,
)
from ..protocol import Send, encode_delivery, splice_index
from ._flusher import Store
from ._ops import (
    DEFAULT_MEMORY_WINDOW,
    BatchResult,
    Bump,
    CachedEntry,
    Evict,
    IdPurge,
    IdRecord,
    JobBatch,
    JobCount,
    JobMark,
    Mark,
    Messages,
    NewTopic,
    Op,
    Read,
    Row,
    Take,
    TopicRows,
)
from ._replay import FIRST_READ_ROWS, read_rows
from ._sqlite import Loaded

log = logging.getLogger("mq_trio.store")

#: Every so many ids written, the expired ones are deleted (with the next batch).
ID_PURGE_EVERY = 10_000

#: The largest index SQLite can hold (a 64-bit signed integer).
MAX_INDEX = 2**63 - 1
#: What a cached message in a memory window costs besides its payload's length, counted
#: against ``max_cache_bytes``: its :class:`Entry`, its ticket (a ``Record`` then), their
#: integers, the bytes object's header and the deque slot (measured with tracemalloc: 288
#: bytes on 64-bit CPython 3.11; since sends share one :class:`Messages` ticket per
#: batch, somewhat less: the bound is kept, on the safe side).
ENTRY_OVERHEAD = 288


@attrs.define(slots=True, eq=False)
class Entry:
    """A cached message in the in-memory window."""

    index: int
    one: bool
    #: The delivery; until ``encoded``, the send as received (spliced when its batch is
    #: taken to be written, or replayed: most sends under a small cache size are evicted
    #: before either, and never need it).
    payload: bytes
    #: The batch that writes it (None when loaded from disk: already durable).
    record: Messages | None = None
    encoded: bool = True


@attrs.define(slots=True, eq=False)
class TopicState:
    tid: int
    name: str
    next_index: int = 0
    #: Cached messages, in memory and on disk together (at most the cache size).
    count: int = 0
    window: deque[Entry] = attrs.field(factory=deque)
    #: The newest cached index that lives only on disk (older than the window); -1: none.
    spilled_max: int = -1
    #: The highest index the cache-size rule has dropped (-1: none).
    evicted: int = -1
    #: Replays from disk under way, and the "one" messages they have taken: a snapshot
    #: older than the deletion still holds them, so the others must skip them.
    disk_replays: int = 0
    disk_taken: set[int] = attrs.field(factory=set)
    #: Work queues: the highest index of a job delivered (its first delivery), and
    #: whether a JobMark carrying it is on its way to the store.
    delivered_max: int = -1
    mark_pending: bool = False



@attrs.define(eq=False)
class DurableHistory:
    """Indexes and caches, durable: a window in memory, everything in the database.

    One implementation of the broker's :class:`~mq_trio.broker.TopicHistory`: a send
    consumes its index and updates the window at once, and its :class:`Messages` batch
    (the ticket, shared by the sends the flusher writes together) is decided when the
    flusher has written it. Replays of history older than the window stream from the
    database (:class:`DiskReplay`).
    """

    store: Store
    cache_size: int
    window_size: int = DEFAULT_MEMORY_WINDOW
    epoch: str = ""
    topics: dict[str, TopicState] = attrs.field(factory=dict)
    _by_tid: dict[int, TopicState] = attrs.field(factory=dict)
    _next_tid: int = 1
    #: Bytes of the windows (cached messages in RAM) across all topics; beyond it the
    #: oldest leave RAM (they stay on disk, so this is not an eviction).
    max_cache_bytes: int = attrs.field(default=1 << 30, kw_only=True)
    #: What the windows hold now: payloads plus ``ENTRY_OVERHEAD`` per message.
    window_bytes: int = attrs.field(default=0, init=False)
    #: A heap of (age of the window's oldest entry, tid), to find the oldest across
    #: topics; entries may be stale and are checked when popped (see ``_head_age``).
    _heads: list[tuple[int, int]] = attrs.field(factory=list, init=False)
    #: Topics whose window is over the window size, waiting for writes to be decided.
    _untrimmed: set[TopicState] = attrs.field(factory=set, init=False)
    #: Jobs found at startup, until the broker takes them (``stored_jobs``).
    _loaded_jobs: list[tuple[int, int, bytes, int]] = attrs.field(factory=list, init=False)
    _loaded_ids: list[tuple[int, str, bytes, float]] = attrs.field(factory=list, init=False)
    _ids_written: int = attrs.field(default=0, init=False)
    #: Topics with a JobMark submitted and not yet written.
    _marks_pending: list[TopicState] = attrs.field(factory=list, init=False)

    def load(self, loaded: Loaded) -> None:
        self.epoch = loaded.epoch
        self._loaded_jobs = loaded.jobs
        self._loaded_ids = loaded.ids
        for t in loaded.topics:
            state = TopicState(t.tid, t.name, t.next_index, t.count, deque(
                Entry(i, one, payload) for i, one, payload in t.window
            ), t.spilled_max, t.evicted)
            self.topics[t.name] = state
            self._by_tid[t.tid] = state
            self._next_tid = max(self._next_tid, t.tid + 1)
            self.window_bytes += sum(len(e.payload) + ENTRY_OVERHEAD for e in state.window)
        self._rebuild_heads()
        self._spill_bytes()

    def has(self, topic: str) -> bool:
        return topic in self.topics

    def topic_count(self) -> int:
        return len(self.topics)

    def topic_names(self) -> Collection[str]:
        return self.topics.keys()

    def topic_info(self, topic: str) -> TopicInfo | None:
        state = self.topics.get(topic)
        if state is None:
            return None
        return TopicInfo(state.next_index, state.count,
                         sum(len(e.payload) for e in state.window)
                         + ENTRY_OVERHEAD * len(state.window))

    def record_job(self, topic: str, base: bytes) -> JobBatch:
        state = self.state(topic)
        index = state.next_index
        state.next_index = index + 1
        return self.store.job_write(state.tid, index, base)

    def job_delivered(self, topic: str, index: int, deliveries: int) -> None:
        state = self.topics.get(topic)
        if state is None:
            return
        if deliveries > 1:  # a redelivery: its count (rare)
            self.store.submit(JobCount(state.tid, index, deliveries))
            return
        # A first delivery: the topic's mark moves up (jobs go out in index order but
        # for redeliveries, which are counted above); one row write per topic and batch.
        if index > state.delivered_max:
            state.delivered_max = index
        if not state.mark_pending:
            state.mark_pending = True
            self._marks_pending.append(state)
            self.store.submit(JobMark(state.tid, state))

    def job_done(self, topic: str, index: int) -> JobBatch | None:
        state = self.topics.get(topic)
        if state is None:
            return None
        return self.store.job_done(state.tid, index)

    def stored_jobs(self) -> list[StoredJob]:
        jobs = [StoredJob(self._by_tid[tid].name, index, payload, deliveries)
                for tid, index, payload, deliveries in self._loaded_jobs
                if tid in self._by_tid]
        self._loaded_jobs = []
        return jobs

    def remember_id(self, topic: str, message_id: str, reply: bytes, window: float) -> None:
        state = self.topics.get(topic)
        if state is None:
            return
        now = time.time()
        self.store.submit(IdRecord(state.tid, message_id, reply, now + window))
        self._ids_written += 1
        if self._ids_written % ID_PURGE_EVERY == 0:
            self.store.submit(IdPurge(now))

    def stored_ids(self) -> list[StoredId]:
        now = time.time()
        ids = [StoredId(self._by_tid[tid].name, message_id, reply, expires - now)
               for tid, message_id, reply, expires in self._loaded_ids
               if tid in self._by_tid]
        self._loaded_ids = []
        return ids

    def stats(self) -> HistoryStats:
        store = self.store
        return HistoryStats(store.available, store.commits, store.failed_commits,
                            tuple(store.commit_buckets), store.commit_seconds,
                            self.window_bytes)

    def state(self, topic: str) -> TopicState:
        state = self.topics.get(topic)
        if state is None:
            tid = self._next_tid
            self._next_tid += 1
            state = self.topics[topic] = self._by_tid[tid] = TopicState(tid, topic)
            self.store.submit(NewTopic(tid, topic))
        return state

    def add(self, state: TopicState, entry: Entry, rows: TopicRows) -> None:
        """Cache a message: the cache-size rule first, then spill the window's oldest.
        ``rows``: the topic's part of the open batch (``entry.record``), which counts
        the evictions."""
        window = state.window
        window.append(entry)
        if len(window) == 1:
            heads = self._heads
            heapq.heappush(heads, (self._head_age(state), state.tid))
            if len(heads) > 2 * len(self.topics) + 64:
                self._rebuild_heads()  # stale entries of windows that emptied and refilled
        self.window_bytes += len(entry.payload) + ENTRY_OVERHEAD
        state.count += 1
        while state.count > self.cache_size:
            state.count -= 1
            if state.count >= len(window):
                # the oldest lives only on disk; the store reports its index
                rows.evicts += 1
                continue
            gone = window.popleft()
            self.window_bytes -= len(gone.payload) + ENTRY_OVERHEAD
            if gone.index > state.evicted:
                state.evicted = gone.index
            if gone.record is entry.record:
                # not written yet: never inserted (its index still counts as evicted)
                rows.dropped += 1
                rows.dropped_high = gone.index
            else:
                rows.evicts += 1
                if not gone.encoded:
                    # (a batch before a read, not taken yet: it writes the message)
                    gone.payload = splice_index(gone.payload, gone.index)
                    gone.encoded = True
        if len(window) > self.window_size and not self._trim(state):
            self._untrimmed.add(state)  # trimmed again when its writes are decided
        if self.window_bytes > self.max_cache_bytes:
            self._spill_bytes()

    def _encode(self, entry: CachedEntry) -> bytes:
        """The delivery of an entry in a window (its bytes counted as they grow)."""
        raw = entry.payload
        entry.payload = payload = splice_index(raw, entry.index)
        entry.encoded = True
        self.window_bytes += len(payload) - len(raw)
        return payload

    def take(self, ops: list[Op]) -> None:
        """The flusher took these from the queue: the rows of its batches, but those
        evicted before now (never encoded, never inserted). The rest are in their
        windows (an eviction by another batch encodes, in ``add``)."""
        for op in ops:
            if type(op) is not Messages:
                continue
            for part in op.topics.values():
                entries = part.entries
                if not entries:
                    continue
                start = 0
                if part.dropped:
                    # the oldest (maybe with "one" messages a replay took: deleted anyway)
                    high = part.dropped_high
                    end = len(entries)
                    while start < end and entries[start].index <= high:
                        start += 1
                rows = part.rows
                for entry in entries[start:]:
                    payload = entry.payload if entry.encoded else self._encode(entry)
                    rows += (entry.index, entry.one, payload)

    def _trim(self, state: TopicState) -> bool:
        """Spill the window's oldest beyond the window size; False if some must wait
        (spill only what is on disk already)."""
        window = state.window
        while len(window) > self.window_size:
            oldest = window[0]
            if oldest.record is not None and not oldest.record.done:
                return False
            window.popleft()
            self.window_bytes -= len(oldest.payload) + ENTRY_OVERHEAD
            state.spilled_max = oldest.index
        return True

    def _trim_decided(self) -> None:
        """After a batch: the windows that grew past the window size while their
        entries were not written yet (a burst) shrink now, not at their next send."""
        untrimmed = self._untrimmed
        for state in list(untrimmed):
            if self._trim(state):
                untrimmed.discard(state)

    # -- the byte budget of the windows (max_cache_bytes) ---------------------------

    @staticmethod
    def _head_age(state: TopicState) -> int:
        """How old the window's oldest entry is, comparable across topics: its record's
        sequence number (the order of the sends), or, for entries loaded at startup
        (older than any send since), minus the window's length, so that the longest
        loaded windows are trimmed first."""
        record = state.window[0].record
        return record.seq if record is not None else -len(state.window)

    def _rebuild_heads(self) -> None:
        self._heads = [(self._head_age(s), s.tid) for s in self.topics.values() if s.window]
        heapq.heapify(self._heads)

    def _spill_bytes(self) -> None:
        """Move the oldest window entries across all topics out of RAM until the windows
        fit ``max_cache_bytes``. Only entries already written may go (they stay in the
        cache, on disk, and replay from there): if the oldest is not written yet, the
        windows stay over until its batch is decided (``on_result`` calls this again)."""
        heads = self._heads
        while self.window_bytes > self.max_cache_bytes and heads:
            age, tid = heapq.heappop(heads)
            state = self._by_tid[tid]
            window = state.window
            if not window:
                continue  # pushed again when the window refills
            actual = self._head_age(state)
            if actual != age:
                heapq.heappush(heads, (actual, tid))  # stale: the head has changed
                continue
            oldest = window[0]
            if oldest.record is not None and not oldest.record.done:
                # Decided in sequence order: nothing younger is written either.
                heapq.heappush(heads, (age, tid))
                return
            window.popleft()
            self.window_bytes -= len(oldest.payload) + ENTRY_OVERHEAD
            state.spilled_max = oldest.index
            if window:
                heapq.heappush(heads, (self._head_age(state), tid))

    def replay(self, topic: str, last_seen: int) -> list[Item]:
        """Outbox items for a subscribe: a replay from disk if needed, then the window."""
        state = self.topics.get(topic)
        if state is None or state.count == 0:
            return []
        # Any JSON integer may arrive: below -1 means everything, and no SQL
        # parameter may leave 64 bits (an OverflowError in the worker thread).
        if last_seen < -1:
            last_seen = -1
        elif last_seen > MAX_INDEX:
            last_seen = MAX_INDEX
        items: list[Item] = []
        window = state.window
        if last_seen < state.spilled_max and state.count > len(window):
            read = Read(state.tid, last_seen, state.spilled_max, FIRST_READ_ROWS)
            self.store.submit(read)
            state.disk_replays += 1
            items.append(DiskReplay(self, read))
        taken = 0
        for entry in window:
            if entry.index <= last_seen:
                continue
            record = entry.record
            payload = entry.payload if entry.encoded else self._encode(entry)
            if entry.one:
                # Written once its removal is decided (even if that failed: the removal
                # is retried), never if the message itself failed.
                if record is not None and not record.done:
                    record.topics[state.tid].taken += 1
                take = self.store.take(state.tid, entry.index)
                items.append(Held(payload, take, payload, record))
                taken += 1
            elif record is not None and not record.done:
                items.append(Held(payload, record))
            else:
                items.append(payload)
        if taken:
            kept = deque(e for e in window if not (e.one and e.index > last_seen))
            self.window_bytes -= sum(len(e.payload) + ENTRY_OVERHEAD for e in window
                                     if e.one and e.index > last_seen)
            state.window = kept
            state.count -= taken
        return items

    def recovered(self, topic: str, last_seen: int) -> bool | Answer:
        state = self.topics.get(topic)
        if state is None:
            return last_seen <= -1
        if last_seen >= state.spilled_max or state.count <= len(state.window):
            # Every eviction that can matter is of a message in memory: known exactly.
            return nothing_lost(state.evicted, state.next_index, last_seen)
        # Evictions of messages that live only on disk are reported by the store.
        return Recovered(self.store.mark(), state, last_seen)

    def on_result(self, ops: list[Op], result: BatchResult) -> list[Op]:
        """Apply a batch's outcome to memory; return the state changes to retry."""
        if self._marks_pending:
            # (a mark still queued may be submitted again: a row write, no harm)
            for marked in self._marks_pending:
                marked.mark_pending = False
            self._marks_pending = []
        for tid, high in result.evicted.items():
            state = self._by_tid.get(tid)
            if state is not None and high > state.evicted:
                state.evicted = high
        if not result.failed:
            # entries written by this batch may leave RAM now
            if self._untrimmed:
                self._trim_decided()
            if self.window_bytes > self.max_cache_bytes:
                self._spill_bytes()
            return []
        # A transaction rolled back. Failed messages leave the window; evictions,
        # takes, new topics and index bumps are retried with the next batch. An eviction
        # that memory made only because of a failed message is not retried.
        carry: list[Op] = []
        evicts: dict[int, int] = {}
        bumps: dict[int, int] = {}
        # tid -> cached messages of failed batches still cached in memory, or evicted
        # with an eviction of their own (not dropped unwritten, not taken by a replay)
        failed: dict[int, int] = {}
        batches: set[int] = set()  # ids of the failed batches
        for op in result.failed:
            cls = type(op)
            if cls is Messages:
                assert isinstance(op, Messages)
                batches.add(id(op))
                for part in op.topics.values():
                    tid = part.tid
                    if bumps.get(tid, 0) < part.next_index:
                        bumps[tid] = part.next_index
                    if part.evicts:
                        evicts[tid] = evicts.get(tid, 0) + part.evicts
                    cached = len(part.entries) - part.dropped - part.taken
                    if cached:
                        failed[tid] = failed.get(tid, 0) + cached
            elif cls is JobBatch:
                # Its jobs are gone (their producers were told); their indexes stay
                # consumed. Its removals are retried (their acks were told to retry).
                assert isinstance(op, JobBatch)
                rows = op.rows
                for tid, index in zip(cast("list[int]", rows[0::3]),
                                      cast("list[int]", rows[1::3]), strict=True):
                    if bumps.get(tid, 0) <= index:
                        bumps[tid] = index + 1
                if op.gone:
                    carry.append(JobBatch(op.seq, gone=op.gone))
            elif cls is Evict:
                assert isinstance(op, Evict)
                evicts[op.tid] = evicts.get(op.tid, 0) + op.count
            elif cls is IdRecord:
                pass  # its message failed: the id must not outlive it
            elif cls is not Read and cls is not Mark:
                carry.append(op)
        carry.extend(Bump(tid, n) for tid, n in bumps.items())
        for tid, cached in failed.items():
            state = self._by_tid[tid]
            kept = deque(e for e in state.window if id(e.record) not in batches)
            removed = len(state.window) - len(kept)
            self.window_bytes -= sum(len(e.payload) + ENTRY_OVERHEAD for e in state.window
                                     if id(e.record) in batches)
            state.window = kept
            state.count -= removed
            # the rest were evicted by memory already: that eviction is not redone on disk
            evicts[tid] = evicts.get(tid, 0) - (cached - removed)
        carry.extend(Evict(tid, count) for tid, count in evicts.items() if count > 0)
        if self._untrimmed:
            self._trim_decided()
        if self.window_bytes > self.max_cache_bytes:
            self._spill_bytes()
        return carry

    async def replay_from_disk(self, read: Read, send: SendBatch) -> None:
        """Stream older-than-memory history to one subscriber, chunk by chunk.

        ``send`` (the transport) paces the reads: one chunk (bounded in bytes, see
        ``_replay``) is read, written, and dropped before the next is read, so a
        subscriber that does not read holds one chunk, whatever the history's size.
        "one" messages met on the way are taken: skipped if another replay took them
        first, else removed from the cache. Raises ``sqlite3.Error``/``OSError`` when
        the history cannot be read.
        """
        state = self._by_tid[read.tid]
        rows: list[Row] = []
        out: list[bytes] = []
        try:
            await read.done.wait()
            if read.error is not None:
                raise read.error
            conn = read.conn
            assert conn is not None
            rows, read.rows = read.rows, []  # the Read outlives the replay: keep nothing
            more = bool(rows)  # the first read is FIRST_READ_ROWS rows
            while rows:
                last_take = self._take_ones(state, rows, out)
                if last_take is not None:
                    # "one" messages go out once their removal is decided (see Take)
                    await last_take.wait()
                if out:
                    await send(out)
                    out.clear()
                if not more:
                    return
                after = rows[-1][0]
                rows = []  # not held while the next chunk is read
                rows, more = await trio.to_thread.run_sync(
                    read_rows, conn, read.tid, after, read.upto
                )
        finally:
            # A write that failed leaves these in the traceback's frames (this one's, and
            # the transport's through ``out``): hold no payloads there.
            rows = []
            out.clear()
            self.release(read)

    def release(self, read: Read) -> None:
        """End a replay's snapshot (idempotent); the trio thread owns closing it."""
        if read.released:
            return
        read.released = True
        if read.conn is not None:
            read.conn.close()  # ends the read transaction; no disk I/O
            read.conn = None
        state = self._by_tid[read.tid]
        state.disk_replays -= 1
        if not state.disk_replays:
            # no snapshot is open, and every Take queued so far is committed before
            # the next snapshot opens (the queue is in order)
            state.disk_taken.clear()

    def _take_ones(self, state: TopicState, rows: list[Row], out: list[bytes]) -> Take | None:
        """Append the chunk's payloads to ``out``; return the last "one" removal."""
        take = None
        for index, one, payload in rows:
            if one:
                if index in state.disk_taken:
                    continue  # another replay's snapshot gave it out already
                state.disk_taken.add(index)
                state.count -= 1
                take = self.store.take(state.tid, index)
            out.append(payload)
        return take

    # -- TopicHistory ------------------------------------------------------------

    def record(self, topic: str, send: Send, one: bool, cached: bool) -> Messages:
        state = self.topics.get(topic)
        if state is None:
            state = self.state(topic)
        index = state.next_index
        state.next_index = index + 1
        # Store.write, written out (once per send): the batch it joins is its ticket
        # (uncached, the batch without a row still makes the index durable)
        batch = self.store.messages
        if batch is None:
            batch = self.store.message_batch()
        tid = state.tid
        rows = batch.topics.get(tid)
        if rows is None:
            rows = batch.topics[tid] = TopicRows(tid)
        rows.next_index = index + 1
        batch.index = index
        if cached:
            raw = send.raw
            entry = (Entry(index, one, raw, batch, False) if raw
                     else Entry(index, one, encode_delivery(send, index), batch))
            rows.entries.append(entry)
            self.add(state, entry, rows)
        return batch

    def cached(self, topic: str) -> list[CachedMessage]:
        """The in-memory window, for inspection and tests."""
        state = self.topics.get(topic)
        if state is None:
            return []
        return [CachedMessage(e.index, e.one,
                              e.payload if e.encoded else splice_index(e.payload, e.index))
                for e in state.window]


@attrs.define(slots=True, eq=False)
class DiskReplay:
    """The outbox item standing for a replay of older-than-memory history.

    Its snapshot was queued at the subscribe, so it is the cache as it was then; the
    writer streams it chunk by chunk as the client reads, and whatever ends the
    connection first releases it (``discard``).
    """

    history: DurableHistory
    read: Read

    def __len__(self) -> int:
        return 0

    def ready(self) -> list[bytes] | None:
        return None

    async def write(self, send: SendBatch) -> None:
        try:
            await self.history.replay_from_disk(self.read, send)
        except Exception as exc:
            # Storage errors, and whatever else the worker met opening the snapshot
            # (logged there): this replay ends, the server stays up.
            if not isinstance(exc, sqlite3.Error | OSError) and exc is not self.read.error:
                raise
            log.warning("history unavailable for a replay: %s", exc)
            raise trio.BrokenResourceError("history unavailable") from exc

    def discard(self) -> None:
        self.history.release(self.read)


@attrs.define(slots=True, eq=False)
class Recovered:
    """The epoch extension's ``recovered``, known once the store has caught up."""

    mark: Mark
    state: TopicState
    last_seen: int

    @property
    def done(self) -> bool:
        return self.mark.done

    @property
    def failed(self) -> bool:
        return self.mark.failed

    async def wait(self) -> None:
        await self.mark.wait()

    def value(self) -> bool:
        state = self.state
        return not self.mark.failed and nothing_lost(state.evicted, state.next_index,
                                                      self.last_seen)
