"""What the trio side hands the worker thread, and the settings both sides share.

Records, takes and marks are also the history's tickets
(:class:`~mq_trio.broker.Ticket`): decided once the flusher has written their batch.
"""

from __future__ import annotations

import sqlite3
from typing import Literal, Protocol

import attrs
import trio

FsyncPolicy = Literal["always", "everysec", "never"]
FSYNC_POLICIES: tuple[FsyncPolicy, ...] = ("always", "everysec", "never")
DEFAULT_FSYNC: FsyncPolicy = "everysec"
#: Cached messages per topic kept in RAM; older ones are read from disk when asked for.
DEFAULT_MEMORY_WINDOW = 1000
DB_NAME = "mq-trio.sqlite3"
LOCK_NAME = "mq-trio.lock"
#: The data directory's identity, written (and fsynced) when its database is created;
#: the same id is in the database's ``meta`` table. A marker without its database (or
#: with another one) means committed data is gone.
ID_NAME = "mq-trio.id"
#: The last start's boot id and --fsync, read before the log is judged: after a reboot, a
#: log written with fsync everysec/never may lack its unsynced end (expected, not damage).
RUN_NAME = "mq-trio.run"
#: The flag that lets a server start after committed data was lost (in a new epoch).
ACCEPT_FLAG = "--accept-data-loss"
#: Rows per read when streaming old history to a subscriber.
#: everysec: the longest a committed write waits for its fsync.
SYNC_INTERVAL = 1.0
#: While the store fails, how often queued state changes are retried with no new sends.
RETRY_INTERVAL = 1.0

class StoreError(Exception):
    """The data directory cannot be used at all (locked by another server, not a dir),
    or committed data is gone and the loss was not accepted (:class:`DataLossError`)."""


class DataLossError(StoreError):
    """Committed (acknowledged) data is gone; the server starts only with
    ``--accept-data-loss`` (``open_durable(..., accept_data_loss=True)``)."""


def find_store_error(exc: BaseException) -> StoreError | None:
    """The StoreError inside (nested, single-member) exception groups from nurseries."""
    while True:
        if isinstance(exc, StoreError):
            return exc
        inner = getattr(exc, "exceptions", None)
        if not inner or len(inner) != 1:
            return None
        exc = inner[0]



class Decider(Protocol):
    """What a ticket waits on (the flusher)."""

    async def wait(self, seq: int) -> None: ...


class _Ticket:
    """Waiting for a decision: the flusher decides operations in ``seq`` order."""

    __slots__ = ()
    seq: int
    done: bool
    decider: Decider | None

    async def wait(self) -> None:
        if not self.done:
            assert self.decider is not None
            await self.decider.wait(self.seq)


# --- what travels to the worker thread --------------------------------------------


@attrs.define(slots=True, eq=False)
class Record(_Ticket):
    """One accepted send on its way to disk, alone (the history records sends in
    :class:`Messages` batches; the backend still writes these, as tests do)."""

    seq: int
    tid: int
    index: int
    one: bool
    #: The delivery to cache, or None when the send is not cached (only its index counts).
    payload: bytes | None
    failed: bool = False
    #: A "one" message replayed (taken from the cache) before its write was decided.
    taken: bool = False
    #: Decided: written, or ``failed``.
    done: bool = False
    decider: Decider | None = None


class CachedEntry(Protocol):
    """A cached message as the history's window holds it (``payload``: the delivery
    once ``encoded``, else the command as received)."""

    index: int
    one: bool
    payload: bytes
    encoded: bool


@attrs.define(slots=True, eq=False)
class TopicRows:
    """One topic's part of a :class:`Messages` batch."""

    tid: int
    #: Cached messages to insert, flat: index, one, payload, index, ... in index order
    #: (the parameters of a multi-row INSERT as they are, after the topic's id).
    rows: list[int | bool | bytes] = attrs.field(factory=list)
    #: Cached messages of the history's window, in index order: made into ``rows`` (but
    #: those evicted meanwhile) when the flusher takes the batch
    #: (``DurableHistory.take``), so that a send evicted before it is written is never
    #: encoded either.
    entries: list[CachedEntry] = attrs.field(factory=list)
    #: The topic's next index after this batch (cached sends or not).
    next_index: int = 0
    #: Oldest cached messages written before this batch to delete (the cache-size rule).
    evicts: int = 0
    #: Rows of this batch evicted from the cache before the batch was written: not
    #: inserted at all (rows with an index up to ``dropped_high``); how many.
    dropped: int = 0
    dropped_high: int = -1
    #: Cached "one" messages of this batch replayed (taken) before it was decided.
    taken: int = 0


@attrs.define(slots=True, eq=False)
class Messages(_Ticket):
    """The messages recorded since the flusher last took its queue: one ticket and one
    queued operation for all of them (a :class:`Record` per message, its queue entry
    and its settle step were most of what durable publishing cost the event loop
    beyond memory mode's: docs/benchmarks.md, issue 16). Rows evicted by the cache-size
    rule before the batch is written are never inserted (a burst under a small cache
    size would insert and delete most of them in one transaction).

    As a :class:`~mq_trio.broker.Recorded`, ``index`` is the index of the message
    recorded last: the broker reads it at once (``TopicHistory.record``). A batch never
    spans a :class:`Read` (the store starts a new one after it), so all of it is in one
    transaction.
    """

    seq: int
    #: tid -> the topic's rows; emptied once settled (entries of the windows keep the
    #: batch as their ticket, not its payloads).
    topics: dict[int, TopicRows] = attrs.field(factory=dict)
    index: int = -1
    failed: bool = False
    done: bool = False
    decider: Decider | None = None


@attrs.frozen(slots=True)
class NewTopic:
    tid: int
    name: str


@attrs.frozen(slots=True)
class Evict:
    """Drop the topic's ``count`` oldest cached messages (the cache-size rule)."""

    tid: int
    count: int


@attrs.define(slots=True, eq=False)
class Take(_Ticket):
    """A "one" message was replayed to a subscriber, so it leaves the cache.

    Like a :class:`Record`, a ticket: the replayed message is written only once the
    removal is decided, so a crash cannot hand it to a second subscriber later.
    """

    seq: int
    tid: int
    index: int
    failed: bool = False
    done: bool = False
    decider: Decider | None = None


@attrs.define(slots=True, eq=False)
class Mark(_Ticket):
    """Writes nothing: decided once everything queued before it is (a barrier)."""

    seq: int
    failed: bool = False
    done: bool = False
    decider: Decider | None = None


@attrs.frozen(slots=True)
class Bump:
    """Make sure the topic's next index is at least ``next_index`` (retries after faults)."""

    tid: int
    next_index: int


@attrs.define(slots=True, eq=False)
class Read:
    """The start of a replay of old history: opens a snapshot, reads its first chunk.

    It travels through the flusher's queue so that the snapshot includes every write
    queued before the subscribe; later chunks come from the same snapshot, read
    directly (:func:`read_chunk`), so evictions meanwhile do not cut the replay short
    and the reads never wait behind writes.
    """

    tid: int
    after: int
    upto: int
    limit: int
    rows: list[Row] = attrs.field(factory=list)
    #: A connection holding the snapshot (a read transaction), opened by the worker
    #: thread, closed on the trio thread by :meth:`DurableHistory.release`.
    conn: sqlite3.Connection | None = None
    error: Exception | None = None
    done: trio.Event = attrs.field(factory=trio.Event)
    released: bool = False


@attrs.define(slots=True, eq=False)
class JobBatch(_Ticket):
    """The jobs written and the jobs acknowledged (or dead-lettered) since the flusher
    last took its queue: one ticket and one queued operation for all of them. A ticket,
    a queue entry and a settle step per job were most of what durable jobs cost the
    event loop beyond memory mode's (docs/benchmarks.md, work queues).

    As a :class:`~mq_trio.broker.Recorded`, ``index`` is the index of the job recorded
    last: the broker reads it at once (``TopicHistory.record_job``). A batch never
    spans a :class:`Read` (the store starts a new one after it), so all of it is in one
    transaction.
    """

    seq: int
    #: Jobs to keep, flat: tid, index, command, tid, index, command, ... in the order
    #: recorded (the parameters of a multi-row INSERT as they are).
    rows: list[int | bytes] = attrs.field(factory=list)
    #: Jobs to forget: (tid, index).
    gone: list[tuple[int, int]] = attrs.field(factory=list)
    index: int = -1
    failed: bool = False
    done: bool = False
    decider: Decider | None = None


@attrs.frozen(slots=True)
class JobCount:
    """A job was delivered for the ``deliveries``-th time (kept across a restart)."""

    tid: int
    index: int
    deliveries: int


class Marked(Protocol):
    """What a :class:`JobMark` reads when its batch is written (a topic's state)."""

    delivered_max: int


@attrs.define(slots=True, eq=False)
class JobMark:
    """Jobs of the topic up to ``source.delivered_max`` have been delivered (at least
    once): one row per topic, instead of a count per first delivery. Read when written,
    so it carries the newest value; a job still stored at a start with an index up to it
    counts one delivery."""

    tid: int
    source: Marked


@attrs.frozen(slots=True)
class IdRecord:
    """A message id and the reply its repeats get, until ``expires`` (wall clock): in
    the same transaction as the message, so a crash keeps both or neither."""

    tid: int
    id: str
    reply: bytes
    expires: float


@attrs.frozen(slots=True)
class IdPurge:
    """Forget the ids that expired before ``before`` (wall clock)."""

    before: float


#: Operations that are tickets (decided by the flusher, in ``seq`` order).
TICKETS = (Record, Messages, Take, Mark, JobBatch)

Op = (Record | Messages | NewTopic | Evict | Take | Bump | Read | Mark | JobBatch | JobCount
      | JobMark | IdRecord | IdPurge)
#: A cached message as read back: (index, one, payload).
Row = tuple[int, bool, bytes]


@attrs.define
class BatchResult:
    #: The last error; ``failed`` holds the ops of every transaction that failed.
    error: Exception | None = None
    failed: list[Op] = attrs.field(factory=list)
    #: tid -> highest index the batch evicted.
    evicted: dict[int, int] = attrs.field(factory=dict)

