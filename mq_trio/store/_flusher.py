"""The flusher: the queue to the worker thread, and group commit."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import attrs
import trio

from ..broker import COMMIT_BUCKETS
from ..protocol import STORAGE_UNAVAILABLE
from ._ops import (
    DEFAULT_FSYNC,
    RETRY_INTERVAL,
    SYNC_INTERVAL,
    TICKETS,
    BatchResult,
    FsyncPolicy,
    JobBatch,
    Mark,
    Messages,
    Op,
    Read,
    Take,
    TopicRows,
)
from ._sqlite import SqliteBackend

log = logging.getLogger("mq_trio.store")

_TICKET_TYPES = frozenset(TICKETS)
#: Operations that write nothing: a batch of only these commits nothing.
_NOT_WRITES = (Read, Mark)


@attrs.define(eq=False)
class Store:
    """The queue to the worker thread and the flusher task that drains it."""

    backend: SqliteBackend
    fsync: FsyncPolicy = DEFAULT_FSYNC
    #: Every record with ``seq <=`` this is decided (written, or failed).
    decided_seq: int = 0
    last_seq: int = 0
    available: bool = True
    on_result: Callable[[list[Op], BatchResult], list[Op]] | None = None
    #: Called with what the flusher takes from the queue, before it goes to the worker.
    on_take: Callable[[list[Op]], None] | None = None
    _queue: list[Op] = attrs.field(factory=list)
    #: The batch in ``_queue`` that job writes and removals join (None: start one).
    _jobs: JobBatch | None = None
    #: The batch in ``_queue`` that sends join (None: start one); the history reads it.
    messages: Messages | None = None
    _carry: list[Op] = attrs.field(factory=list)
    _wakeup: trio.Event = attrs.field(factory=trio.Event)
    _decided: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    _closing: bool = False
    _stopped: trio.Event = attrs.field(factory=trio.Event)
    #: Metrics (``HistoryStats``): batches with writes committed, and failed; their
    #: latency histogram (cumulative counts per ``COMMIT_BUCKETS`` bound) and total.
    commits: int = 0
    failed_commits: int = 0
    commit_buckets: list[int] = attrs.field(factory=lambda: [0] * len(COMMIT_BUCKETS))
    commit_seconds: float = 0.0

    def submit(self, op: Op) -> None:
        if type(op) is Read:
            # writes after it go in the next transaction
            self._jobs = None
            self.messages = None
        self._queue.append(op)
        self._wakeup.set()

    def write(self, tid: int, index: int, one: bool, payload: bytes | None) -> Messages:
        """Record a send (``payload``: the delivery to cache, or None); the batch it
        joins is its ticket (``index`` is this send's until the next call)."""
        batch = self.messages
        if batch is None:
            batch = self.message_batch()
        rows = batch.topics.get(tid)
        if rows is None:
            rows = batch.topics[tid] = TopicRows(tid)
        rows.next_index = index + 1
        if payload is not None:
            rows.rows += (index, one, payload)
        batch.index = index
        return batch

    def message_batch(self) -> Messages:
        """Start the batch that sends join (there is none in the queue)."""
        self.last_seq = seq = self.last_seq + 1
        batch = self.messages = Messages(seq, decider=self)
        self._queue.append(batch)
        self._wakeup.set()
        return batch

    def take(self, tid: int, index: int) -> Take:
        self.last_seq = seq = self.last_seq + 1
        take = Take(seq, tid, index, decider=self)
        self._queue.append(take)
        self._wakeup.set()
        return take

    def _job_batch(self) -> JobBatch:
        """The open batch of job writes and removals (a new one after the flusher took
        the queue, or after a read split it)."""
        batch = self._jobs
        if batch is None:
            self.last_seq = seq = self.last_seq + 1
            batch = self._jobs = JobBatch(seq, decider=self)
            self._queue.append(batch)
            self._wakeup.set()
        return batch

    def job_write(self, tid: int, index: int, payload: bytes) -> JobBatch:
        """Keep a job; the batch it joins is its ticket (``index`` is this job's until
        the next call)."""
        batch = self._jobs
        if batch is None:
            batch = self._job_batch()
        batch.rows += (tid, index, payload)
        batch.index = index
        return batch

    def job_done(self, tid: int, index: int) -> JobBatch:
        """Forget a job; the batch is the removal's ticket."""
        batch = self._jobs
        if batch is None:
            batch = self._job_batch()
        batch.gone.append((tid, index))
        return batch

    def mark(self) -> Mark:
        """A ticket decided once everything queued before it is (and failed with it)."""
        self.last_seq = seq = self.last_seq + 1
        mark = Mark(seq, decider=self)
        self._queue.append(mark)
        self._wakeup.set()
        return mark

    async def wait(self, seq: int) -> None:
        while self.decided_seq < seq:
            await self._decided.park()

    async def read(self, tid: int, after: int, upto: int, limit: int) -> Read:
        read = Read(tid, after, upto, limit)
        self.submit(read)
        await read.done.wait()
        return read

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The flusher: one worker-thread call per batch of whatever is queued."""
        task_status.started()
        try:
            await self._run()
        finally:
            self._stopped.set()

    async def _run(self) -> None:
        last_sync = trio.current_time()
        dirty = False
        while True:
            if not self._queue:
                if self._closing:
                    if self._carry:
                        log.warning("closing with %d state change(s) unwritten", len(self._carry))
                    return  # the backend's close fsyncs what was committed
                timeout = math.inf
                if self._carry:
                    timeout = RETRY_INTERVAL
                elif dirty and self.fsync == "everysec":
                    timeout = max(0.0, last_sync + SYNC_INTERVAL - trio.current_time())
                with trio.move_on_after(timeout):
                    await self._wakeup.wait()
            self._wakeup = trio.Event()
            ops = self._carry + self._queue if self._carry else self._queue
            self._carry = []
            self._queue = []
            self._jobs = None
            self.messages = None
            if self.on_take is not None:
                self.on_take(ops)
            now = trio.current_time()
            sync = self.fsync == "always" or (
                self.fsync == "everysec" and now - last_sync >= SYNC_INTERVAL
            )
            # Only batches with writes commit (reads of old history do not count).
            writes = any(type(op) not in _NOT_WRITES for op in ops)
            try:
                if ops:
                    result = await trio.to_thread.run_sync(
                        self.backend.apply, ops, sync and writes
                    )
                elif dirty and sync:
                    result = await trio.to_thread.run_sync(self.backend.sync)
                    writes = True
                else:
                    continue
            except Exception as exc:
                # Never let the worker take the server down: the batch fails like a
                # storage error (its sends get STORAGE_UNAVAILABLE, state changes retry).
                log.exception("unexpected error in the store's worker; the batch fails")
                result = _failed_batch(ops, exc)
            if writes:
                self._count_commit(trio.current_time() - now, result.error is None)
            if result.error is None and writes:
                if sync:
                    last_sync, dirty = now, False
                else:
                    dirty = True
            self._settle(ops, result)

    def _count_commit(self, seconds: float, ok: bool) -> None:
        if not ok:
            self.failed_commits += 1
            return
        self.commits += 1
        self.commit_seconds += seconds
        buckets = self.commit_buckets
        for i, bound in enumerate(COMMIT_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1

    def _settle(self, ops: list[Op], result: BatchResult) -> None:
        """Back on the trio thread: mark records decided, fix state after a failure."""
        decided = 0
        reads: list[Read] = []
        batches: list[Messages] = []
        tickets = _TICKET_TYPES
        for op in ops:  # (three ops a job on a work queue: one pass, no isinstance)
            cls = type(op)
            if cls in tickets:
                op.done = True  # type: ignore[union-attr]
                if op.seq > decided:  # type: ignore[union-attr]
                    decided = op.seq  # type: ignore[union-attr]
                if cls is Messages:
                    batches.append(op)  # type: ignore[arg-type]
            elif cls is Read:
                reads.append(op)  # type: ignore[arg-type]
        if result.error is not None:
            if self.available:
                log.error(
                    "storage unavailable (%s): sends fail with %r until it works again",
                    result.error,
                    STORAGE_UNAVAILABLE,
                )
                self.available = False
        elif not self.available and any(type(op) not in _NOT_WRITES for op in ops):
            log.warning("storage works again")
            self.available = True
        if self.on_result is not None:
            self._carry = self.on_result(ops, result)
        for batch in batches:
            batch.topics = {}  # the payloads go; windows keep the batch as the ticket
        if decided > self.decided_seq:  # (retried takes carry older numbers)
            self.decided_seq = decided
            self._decided.unpark_all()
        for read in reads:
            if read.released and read.conn is not None:
                read.conn.close()  # its subscriber left before the snapshot opened
                read.conn = None
            read.done.set()

    async def aclose(self) -> None:
        """Write what is queued, wait for the flusher, then close the database."""
        self._closing = True
        self._wakeup.set()
        await self._stopped.wait()
        await trio.to_thread.run_sync(self.backend.close)


def _failed_batch(ops: list[Op], exc: Exception) -> BatchResult:
    """The result of a batch the worker did not finish: every op in it failed."""
    for op in ops:
        if isinstance(op, TICKETS):
            op.failed = True
        elif isinstance(op, Read) and op.conn is None and op.error is None:
            op.error = exc
    return BatchResult(error=exc, failed=list(ops))
