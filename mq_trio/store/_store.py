"""Durable topics: indexes and caches in an embedded SQLite database (``--data-dir``).

The broker stays synchronous. A durable ``send`` consumes its index and updates the
in-memory window of the cache at once, and hands a :class:`Record` to the
:class:`Store`; one trio task (the flusher) takes everything queued and writes it in
one transaction in a worker thread, so many pipelined or concurrent sends share one
commit (and, with ``--fsync always``, one fsync: group commit).

Nothing that depends on a record leaves the server before the record is decided:
the sender's ``success`` and every delivery of the message go into the outboxes as
:class:`Pending` items, and a connection's writer waits for the store before writing
one (and everything queued after it, which keeps the reply order). Delivering only
after the write is what makes "no subscriber ever sees two different messages with the
same topic and index" hold across a crash: an index that a subscriber has seen is
always on disk, so a restart never hands it out again. A send whose write fails gets
``Storage unavailable`` and its deliveries are dropped.

Only a recent window of each topic's cache (``memory_window`` messages) stays in
memory; a subscriber that asks for older messages gets a :class:`DiskReplay` marker in
its outbox, and its writer streams those rows from the database in chunks.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import sqlite3
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import attrs
import trio

from ..broker import Broker, CachedMessage, Subscriber, new_epoch, nothing_lost
from ..protocol import SUCCESS, Send, encode_delivery, failure_bytes
from ..server._connection import WRITE_BATCH_BYTES, Outbox, Transport

log = logging.getLogger("mq_trio.store")

STORAGE_UNAVAILABLE = "Storage unavailable"
_STORAGE_UNAVAILABLE = failure_bytes(STORAGE_UNAVAILABLE)

FsyncPolicy = Literal["always", "everysec", "never"]
FSYNC_POLICIES: tuple[FsyncPolicy, ...] = ("always", "everysec", "never")
DEFAULT_FSYNC: FsyncPolicy = "everysec"
#: Cached messages per topic kept in RAM; older ones are read from disk when asked for.
DEFAULT_MEMORY_WINDOW = 1000
DB_NAME = "mq-trio.sqlite3"
LOCK_NAME = "mq-trio.lock"
#: Rows per read when streaming old history to a subscriber.
READ_CHUNK_ROWS = 1000
#: everysec: the longest a committed write waits for its fsync.
SYNC_INTERVAL = 1.0
#: While the store fails, how often queued state changes are retried with no new sends.
RETRY_INTERVAL = 1.0

#: Larger logs are not scanned for a torn tail at startup (SQLite handles them anyway).
MAX_WAL_SCAN_BYTES = 64 << 20

_SYNCHRONOUS = {"always": "FULL", "everysec": "NORMAL", "never": "OFF"}


class StoreError(Exception):
    """The data directory cannot be used at all (locked by another server, not a dir)."""


def find_store_error(exc: BaseException) -> StoreError | None:
    """The StoreError inside (nested, single-member) exception groups from nurseries."""
    while True:
        if isinstance(exc, StoreError):
            return exc
        inner = getattr(exc, "exceptions", None)
        if not inner or len(inner) != 1:
            return None
        exc = inner[0]


# --- what travels to the worker thread --------------------------------------------


@attrs.define(slots=True, eq=False)
class Record:
    """One accepted send on its way to disk; outbox items wait for it to be decided."""

    seq: int
    tid: int
    index: int
    one: bool
    #: The delivery to cache, or None when the send is not cached (only its index counts).
    payload: bytes | None
    failed: bool = False
    #: A "one" message replayed (taken from the cache) before its write was decided.
    taken: bool = False


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
class Take:
    """A "one" message was replayed to a subscriber, so it leaves the cache.

    Like a :class:`Record`, a ticket: the replayed message is written only once the
    removal is decided, so a crash cannot hand it to a second subscriber later.
    """

    seq: int
    tid: int
    index: int
    failed: bool = False


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
    #: The topic's highest evicted index in the snapshot (for the epoch extension).
    evicted: int = -1


Op = Record | NewTopic | Evict | Take | Bump | Read
#: A cached message as read back: (index, one, payload).
Row = tuple[int, bool, bytes]


@attrs.define
class BatchResult:
    #: The last error; ``failed`` holds the ops of every transaction that failed.
    error: Exception | None = None
    failed: list[Op] = attrs.field(factory=list)
    #: tid -> highest index the batch evicted.
    evicted: dict[int, int] = attrs.field(factory=dict)


# --- outbox items -------------------------------------------------------------------


class Pending(bytes):
    """An outbox item that may be written only once its record is decided.

    A ``bytes`` subclass so that outboxes, the broker's ``Subscriber`` protocol and the
    byte budget need no change: the in-memory path never sees one.
    """

    #: What the item waits for.
    record: Record | Take
    #: Written instead when the record failed; None drops the item.
    failure: bytes | None
    #: Another record that must not have failed (a replayed "one" message's own).
    requires: Record | None

    @classmethod
    def make(
        cls,
        payload: bytes,
        record: Record | Take,
        failure: bytes | None,
        requires: Record | None = None,
    ) -> Pending:
        item = cls(payload)
        item.record = record
        item.failure = failure
        item.requires = requires
        return item


class EpochReply(bytes):
    """A subscribe's epoch reply that waits for its replay's snapshot (empty bytes).

    Whether messages after ``last_seen`` were evicted is exact only once the snapshot
    is open: evictions of messages that live only on disk are counted by the store.
    """

    read: Read
    last_seen: int
    epoch: str
    #: False when the answer is "not recovered" whatever the snapshot says.
    possible: bool

    @classmethod
    def make(cls, read: Read, last_seen: int, epoch: str, possible: bool) -> EpochReply:
        item = cls()
        item.read, item.last_seen, item.epoch, item.possible = read, last_seen, epoch, possible
        return item

    def resolve(self) -> bytes:
        read = self.read
        recovered = self.possible and read.error is None and read.evicted <= self.last_seen
        return json.dumps({"success": True, "epoch": self.epoch, "recovered": recovered}).encode()


class DiskReplay(bytes):
    """Marks where a subscriber's replay of older-than-memory history goes (empty bytes).

    ``read`` was queued at the subscribe, so its snapshot is the cache as it was then.
    """

    read: Read

    @classmethod
    def make(cls, read: Read) -> DiskReplay:
        item = cls()
        item.read = read
        return item


# --- the SQLite side (runs in worker threads, one call at a time) -------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS topics (
    tid INTEGER PRIMARY KEY,
    name BLOB NOT NULL,
    next_index INTEGER NOT NULL,
    evicted INTEGER NOT NULL DEFAULT -1
);
CREATE TABLE IF NOT EXISTS messages (
    tid INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    one INTEGER NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (tid, idx)
) WITHOUT ROWID;
"""


@attrs.define
class LoadedTopic:
    tid: int
    name: str
    next_index: int
    evicted: int
    count: int
    #: The newest cached messages, oldest first: (index, one, payload).
    window: list[tuple[int, bool, bytes]]
    #: Newest cached index that is not in the window (-1: none).
    spilled_max: int


@attrs.define
class Loaded:
    epoch: str
    topics: list[LoadedTopic]
    messages: int
    notes: list[str]


def _topic_name(blob: bytes) -> str:
    return blob.decode("utf-8", "surrogatepass")


def _topic_blob(name: str) -> bytes:
    # JSON allows lone surrogates ("\\ud800") in strings; keep them byte-exact.
    return name.encode("utf-8", "surrogatepass")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
    text = str(exc)
    return "malformed" in text or "not a database" in text


@attrs.define
class WalReport:
    """What SQLite will ignore at the end of a write-ahead log after a crash."""

    committed_frames: int = 0
    ignored_bytes: int = 0
    torn: bool = False


def scan_wal(path: Path) -> WalReport:
    """Find a torn or corrupt tail in a WAL file (format: sqlite.org/fileformat.html).

    SQLite itself recovers by ignoring every frame after the last valid commit; this
    scan only tells how much that is, so that startup can say so. Frames left from
    before the log was last reset carry other salts: they are normal, not damage.
    """
    report = WalReport()
    try:
        if path.stat().st_size > MAX_WAL_SCAN_BYTES:
            return report  # not worth the startup time; SQLite still recovers it
        data = path.read_bytes()
    except FileNotFoundError:
        return report
    if len(data) < 32:
        report.ignored_bytes = len(data)
        report.torn = bool(data)
        return report
    magic, _version, page_size, _ckpt, salt1, salt2, c1, c2 = struct.unpack(">8I", data[:32])
    if magic not in (0x377F0682, 0x377F0683) or page_size < 512:
        report.ignored_bytes, report.torn = len(data), True
        return report
    word = ">" if magic & 1 else "<"

    def checksum(chunk: bytes, s0: int, s1: int) -> tuple[int, int]:
        words = struct.unpack(f"{word}{len(chunk) // 4}I", chunk)
        for i in range(0, len(words), 2):
            s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
            s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
        return s0, s1

    s0, s1 = checksum(data[:24], 0, 0)
    if (s0, s1) != (c1, c2):
        report.ignored_bytes, report.torn = len(data), True
        return report
    frame = 24 + page_size
    pos = 32
    end_of_commit = 32
    frames = 0
    while pos + frame <= len(data):
        _page, commit, fsalt1, fsalt2, fc1, fc2 = struct.unpack(">6I", data[pos : pos + 24])
        if (fsalt1, fsalt2) != (salt1, salt2):
            break  # left over from before a reset: the valid log ends here
        s0, s1 = checksum(data[pos : pos + 8], s0, s1)
        s0, s1 = checksum(data[pos + 24 : pos + frame], s0, s1)
        if (s0, s1) != (fc1, fc2):
            report.torn = True  # our salt, wrong checksum: damaged or half written
            break
        pos += frame
        frames += 1
        if commit:
            end_of_commit = pos
            report.committed_frames = frames
    if pos < len(data) and (len(data) - pos) < frame:
        # a partial frame at the very end is a write that was cut off
        report.torn = True
    if end_of_commit < pos:
        report.torn = True  # frames of a transaction that never committed
    if report.torn:
        report.ignored_bytes = len(data) - end_of_commit
    return report


class SqliteBackend:
    """All SQL. Every method runs in a worker thread, never two at once."""

    def __init__(self, directory: Path, fsync: FsyncPolicy, cache_size: int, window: int):
        self.directory = directory
        self.path = directory / DB_NAME
        self.fsync = fsync
        self.cache_size = cache_size
        self.window = window
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._broken = False

    # -- opening ---------------------------------------------------------------

    def open(self) -> Loaded:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock()
            return self._open()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot use data directory {self.directory}: {exc}") from exc

    def _open(self) -> Loaded:
        notes: list[str] = []
        wal = scan_wal(Path(f"{self.path}-wal"))
        if wal.torn:
            log.warning(
                "torn or corrupt tail in the write-ahead log: %d bytes after the last "
                "complete transaction are skipped",
                wal.ignored_bytes,
            )
            notes.append(f"skipped a torn log tail of {wal.ignored_bytes} bytes")
        try:
            return self._load(notes)
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            self.close_quietly()
            aside = self._move_aside()
            log.error(
                "the database in %s is corrupt (%s); moved it to %s and started with an "
                "empty history (new epoch)", self.directory, exc, aside
            )
            notes.append(f"corrupt database moved to {aside.name}")
            return self._load(notes)

    def _lock(self) -> None:
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"data directory {self.directory} is in use by another server"
            ) from None
        self._lock_fd = fd

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{DB_NAME}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                src.rename(Path(f"{aside}{suffix}"))
        return aside

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={_SYNCHRONOUS[self.fsync]}")
        return conn

    def _load(self, notes: list[str]) -> Loaded:
        conn = self._conn = self._connect()
        conn.executescript(_SCHEMA)
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        epoch = meta.get("epoch")
        boot = _boot_id()
        if epoch is None:
            epoch = new_epoch()
            notes.append("new data directory")
        elif meta.get("clean") == "0":
            notes.append("previous run did not shut down cleanly")
            if meta.get("fsync") != "always" and meta.get("boot_id") not in ("", boot):
                # The machine restarted under us: writes after the last fsync may be gone.
                epoch = new_epoch()
                notes.append("machine rebooted since the unclean stop: new epoch")
                log.warning(
                    "unclean stop followed by a reboot with --fsync %s: recent history may "
                    "be lost, starting a new epoch", meta.get("fsync")
                )
        topics: list[LoadedTopic] = []
        total = 0
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute("SELECT tid, name, next_index, evicted FROM topics").fetchall()
        for tid, name, next_index, evicted in rows:
            (count,) = conn.execute(
                "SELECT count(*) FROM messages WHERE tid = ?", (tid,)
            ).fetchone()
            if count > self.cache_size:
                # --cache-size shrank since the last run: apply the cache rule now.
                high = self._evict(tid, count - self.cache_size)
                evicted = max(evicted, high)
                count = self.cache_size
            window = conn.execute(
                "SELECT idx, one, payload FROM messages WHERE tid = ? ORDER BY idx DESC "
                "LIMIT ?",
                (tid, self.window),
            ).fetchall()
            window.reverse()
            spilled_max = -1
            if count > len(window):
                (spilled_max,) = conn.execute(
                    "SELECT max(idx) FROM messages WHERE tid = ? AND idx < ?",
                    (tid, window[0][0]),
                ).fetchone()
            top = window[-1][0] + 1 if window else 0
            topics.append(
                LoadedTopic(
                    tid,
                    _topic_name(name),
                    max(next_index, top),
                    evicted,
                    count,
                    [(i, bool(o), bytes(p)) for i, o, p in window],
                    spilled_max,
                )
            )
            total += count
        conn.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [("epoch", epoch), ("clean", "0"), ("boot_id", boot), ("fsync", self.fsync)],
        )
        conn.execute("COMMIT")
        self._sync_commit()
        return Loaded(epoch, topics, total, notes)

    # -- writing ---------------------------------------------------------------

    def _evict(self, tid: int, count: int) -> int:
        conn = self._conn
        assert conn is not None
        rows = conn.execute(
            "SELECT idx FROM messages WHERE tid = ? ORDER BY idx LIMIT ?", (tid, count)
        ).fetchall()
        if not rows:
            return -1
        high = int(rows[-1][0])
        conn.execute("DELETE FROM messages WHERE tid = ? AND idx <= ?", (tid, high))
        conn.execute("UPDATE topics SET evicted = max(evicted, ?) WHERE tid = ?", (high, tid))
        return high

    def _reconnect(self) -> sqlite3.Connection:
        """After an I/O error the connection may be unusable; start a fresh one."""
        if self._broken or self._conn is None:
            self.close_quietly()
            self._conn = self._connect()
            self._broken = False
        return self._conn

    def apply(self, ops: list[Op], sync: bool) -> BatchResult:
        """Write a batch in order: one transaction, or one per stretch between reads.

        A :class:`Read` opens its snapshot exactly where it stands in the queue, so the
        writes before it are committed first (an extra commit only when a replay from
        disk starts). ``sync`` applies to the last commit, which covers the others.
        """
        result = BatchResult()
        segments: list[list[Op]] = [[]]
        for op in ops:
            if type(op) is Read:
                segments.append([op])
                segments.append([])
            else:
                segments[-1].append(op)
        last_write = max((i for i, seg in enumerate(segments) if seg and type(seg[0]) is not Read),
                         default=-1)
        for i, segment in enumerate(segments):
            if not segment:
                continue
            op = segment[0]
            if type(op) is Read:
                assert isinstance(op, Read)
                self._read(op)
            else:
                self._write(segment, sync and i == last_write, result)
        return result

    def _write(self, ops: list[Op], sync: bool, result: BatchResult) -> None:
        """One transaction for these writes; on failure its records are marked failed."""
        inserts: list[tuple[int, int, int, bytes]] = []
        bumps: dict[int, int] = {}
        evicts: dict[int, int] = {}
        takes: list[tuple[int, int]] = []
        new_topics: list[tuple[int, bytes]] = []
        for op in ops:
            cls = type(op)
            if cls is Record:
                assert isinstance(op, Record)
                if bumps.get(op.tid, -1) <= op.index:
                    bumps[op.tid] = op.index + 1
                if op.payload is not None:
                    inserts.append((op.tid, op.index, op.one, op.payload))
            elif cls is Evict:
                assert isinstance(op, Evict)
                evicts[op.tid] = evicts.get(op.tid, 0) + op.count
            elif cls is Take:
                assert isinstance(op, Take)
                takes.append((op.tid, op.index))
            elif cls is Bump:
                assert isinstance(op, Bump)
                if bumps.get(op.tid, -1) < op.next_index:
                    bumps[op.tid] = op.next_index
            else:
                assert isinstance(op, NewTopic)
                new_topics.append((op.tid, _topic_blob(op.name)))
        evicted: dict[int, int] = {}
        try:
            conn = self._reconnect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Order matters only between kinds: new rows, then "one" rows taken,
                # then the oldest evicted (eviction counts what memory counted).
                if new_topics:
                    conn.executemany(
                        "INSERT OR IGNORE INTO topics (tid, name, next_index) VALUES (?, ?, 0)",
                        new_topics,
                    )
                if inserts:
                    conn.executemany("INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?)", inserts)
                if takes:
                    conn.executemany("DELETE FROM messages WHERE tid = ? AND idx = ?", takes)
                for tid, count in evicts.items():
                    high = self._evict(tid, count)
                    if high >= 0:
                        evicted[tid] = high
                if bumps:
                    conn.executemany(
                        "UPDATE topics SET next_index = max(next_index, ?) WHERE tid = ?",
                        [(n, tid) for tid, n in bumps.items()],
                    )
                self._commit(conn, sync)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            self._broken = True
            result.error = exc
            result.failed.extend(ops)
            for op in ops:
                if isinstance(op, Record | Take):
                    op.failed = True  # the trio side reads it only after the batch
        else:
            for tid, high in evicted.items():
                result.evicted[tid] = max(high, result.evicted.get(tid, -1))

    def _commit(self, conn: sqlite3.Connection, sync: bool) -> None:
        if sync and self.fsync == "everysec":
            conn.execute("COMMIT")  # switching synchronous inside a transaction is a no-op
            self._sync_commit()
        else:
            conn.execute("COMMIT")

    def _sync_commit(self) -> None:
        """A tiny transaction committed with synchronous=FULL: fsyncs the whole log."""
        conn = self._conn
        assert conn is not None
        conn.execute("PRAGMA synchronous=FULL")
        try:
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('synced', ?)",
                (str(time.time()),),
            )
        finally:
            conn.execute(f"PRAGMA synchronous={_SYNCHRONOUS[self.fsync]}")

    def sync(self) -> BatchResult:
        """everysec with nothing new to write: fsync what the last commits left."""
        try:
            self._reconnect()
            self._sync_commit()
        except (sqlite3.Error, OSError) as exc:
            self._broken = True
            return BatchResult(error=exc)
        return BatchResult()

    def _read(self, read: Read) -> None:
        """Open a snapshot (its own connection, a read transaction) and read a chunk."""
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("BEGIN")  # the snapshot is taken by the first SELECT
                row = conn.execute(
                    "SELECT evicted FROM topics WHERE tid = ?", (read.tid,)
                ).fetchone()
                read.evicted = -1 if row is None else int(row[0])
                read.rows = read_chunk(conn, read.tid, read.after, read.upto, read.limit)
            except BaseException:
                conn.close()
                raise
            read.conn = conn
        except (sqlite3.Error, OSError) as exc:
            read.error = exc

    # -- closing ---------------------------------------------------------------

    def close(self) -> None:
        """Clean shutdown: mark it, fsync, let SQLite checkpoint and remove the log."""
        try:
            conn = self._reconnect()
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clean', '1')")
            self._sync_commit()
            conn.close()
            self._conn = None
        except (sqlite3.Error, OSError) as exc:
            log.error("could not close the store cleanly: %s", exc)
        finally:
            self.abandon()

    def close_quietly(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    def abandon(self) -> None:
        """Close without marking a clean stop (startup failed); release the directory."""
        self.close_quietly()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def read_chunk(conn: sqlite3.Connection, tid: int, after: int, upto: int, limit: int) -> list[Row]:
    """The next cached messages of a snapshot, ``after < index <= upto``, in order."""
    rows = conn.execute(
        "SELECT idx, one, payload FROM messages WHERE tid = ? AND idx > ? AND idx <= ? "
        "ORDER BY idx LIMIT ?",
        (tid, after, upto, limit),
    ).fetchall()
    return [(idx, bool(one), bytes(payload)) for idx, one, payload in rows]


# --- the trio side -------------------------------------------------------------------


@attrs.define(slots=True, eq=False)
class Entry:
    """A cached message in the in-memory window."""

    index: int
    one: bool
    payload: bytes
    #: The record that writes it (None when loaded from disk: already durable).
    record: Record | None = None


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
    _queue: list[Op] = attrs.field(factory=list)
    _carry: list[Op] = attrs.field(factory=list)
    _wakeup: trio.Event = attrs.field(factory=trio.Event)
    _decided: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    _closing: bool = False
    _stopped: trio.Event = attrs.field(factory=trio.Event)

    def submit(self, op: Op) -> None:
        self._queue.append(op)
        self._wakeup.set()

    def write(self, tid: int, index: int, one: bool, payload: bytes | None) -> Record:
        self.last_seq = seq = self.last_seq + 1
        record = Record(seq, tid, index, one, payload)
        self._queue.append(record)
        self._wakeup.set()
        return record

    def take(self, tid: int, index: int) -> Take:
        self.last_seq = seq = self.last_seq + 1
        take = Take(seq, tid, index)
        self._queue.append(take)
        self._wakeup.set()
        return take

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
            now = trio.current_time()
            sync = self.fsync == "always" or (
                self.fsync == "everysec" and now - last_sync >= SYNC_INTERVAL
            )
            # Only batches with writes commit (reads of old history do not count).
            writes = any(type(op) is not Read for op in ops)
            if ops:
                result = await trio.to_thread.run_sync(self.backend.apply, ops, sync and writes)
            elif dirty and sync:
                result = await trio.to_thread.run_sync(self.backend.sync)
                writes = True
            else:
                continue
            if result.error is None and writes:
                if sync:
                    last_sync, dirty = now, False
                else:
                    dirty = True
            self._settle(ops, result)

    def _settle(self, ops: list[Op], result: BatchResult) -> None:
        """Back on the trio thread: mark records decided, fix state after a failure."""
        decided = max((op.seq for op in ops if isinstance(op, Record | Take)), default=0)
        if result.error is not None:
            if self.available:
                log.error(
                    "storage unavailable (%s): sends fail with %r until it works again",
                    result.error,
                    STORAGE_UNAVAILABLE,
                )
                self.available = False
        elif not self.available and any(type(op) is not Read for op in ops):
            log.warning("storage works again")
            self.available = True
        if self.on_result is not None:
            self._carry = self.on_result(ops, result)
        if decided > self.decided_seq:  # (retried takes carry older numbers)
            self.decided_seq = decided
            self._decided.unpark_all()
        for op in ops:
            if isinstance(op, Read):
                if op.released and op.conn is not None:
                    op.conn.close()  # its subscriber left before the snapshot opened
                    op.conn = None
                op.done.set()

    async def aclose(self) -> None:
        """Write what is queued, wait for the flusher, then close the database."""
        self._closing = True
        self._wakeup.set()
        await self._stopped.wait()
        await trio.to_thread.run_sync(self.backend.close)


@attrs.define(eq=False)
class DurableHistory:
    """Indexes and caches, durable: a window in memory, everything in the database.

    Implements the broker's ``TopicHistory`` protocol; :class:`DurableBroker` uses the
    richer methods below so that deliveries can wait for the store.
    """

    store: Store
    cache_size: int
    window_size: int = DEFAULT_MEMORY_WINDOW
    epoch: str = ""
    topics: dict[str, TopicState] = attrs.field(factory=dict)
    _by_tid: dict[int, TopicState] = attrs.field(factory=dict)
    _next_tid: int = 1

    def load(self, loaded: Loaded) -> None:
        self.epoch = loaded.epoch
        for t in loaded.topics:
            state = TopicState(t.tid, t.name, t.next_index, t.count, deque(
                Entry(i, one, payload) for i, one, payload in t.window
            ), t.spilled_max, t.evicted)
            self.topics[t.name] = state
            self._by_tid[t.tid] = state
            self._next_tid = max(self._next_tid, t.tid + 1)

    def state(self, topic: str) -> TopicState:
        state = self.topics.get(topic)
        if state is None:
            tid = self._next_tid
            self._next_tid += 1
            state = self.topics[topic] = self._by_tid[tid] = TopicState(tid, topic)
            self.store.submit(NewTopic(tid, topic))
        return state

    def add(self, state: TopicState, entry: Entry) -> None:
        """Cache a message: the cache-size rule first, then spill the window's oldest."""
        window = state.window
        window.append(entry)
        state.count += 1
        while state.count > self.cache_size:
            state.count -= 1
            if state.count >= len(window):
                pass  # the oldest lives only on disk; the store reports its index
            else:
                state.evicted = max(state.evicted, window.popleft().index)
            self.store.submit(Evict(state.tid, 1))
        decided = self.store.decided_seq
        while len(window) > self.window_size:
            oldest = window[0]
            if oldest.record is not None and oldest.record.seq > decided:
                break  # spill only what is on disk already
            window.popleft()
            state.spilled_max = oldest.index

    def replay_items(
        self, topic: str, last_seen: int, owner: DurableOutbox | None = None
    ) -> list[bytes]:
        """Outbox items for a subscribe: a disk-replay marker, then the window.

        The marker's snapshot belongs to ``owner`` (the subscriber's outbox), whose
        writer releases it when it is done with it or ends.
        """
        state = self.topics.get(topic)
        if state is None or state.count == 0:
            return []
        items: list[bytes] = []
        window = state.window
        if last_seen < state.spilled_max and state.count > len(window):
            read = Read(state.tid, last_seen, state.spilled_max, READ_CHUNK_ROWS)
            self.store.submit(read)
            state.disk_replays += 1
            if owner is not None:
                owner.snapshots.add(read)
            items.append(DiskReplay.make(read))
        decided = self.store.decided_seq
        taken = 0
        for entry in window:
            if entry.index <= last_seen:
                continue
            record = entry.record
            if entry.one:
                # Written once its removal is decided (even if that failed: the removal
                # is retried), never if the message itself failed.
                if record is not None:
                    record.taken = True
                take = self.store.take(state.tid, entry.index)
                items.append(Pending.make(entry.payload, take, entry.payload, record))
                taken += 1
            elif record is not None and record.seq > decided:
                items.append(Pending.make(entry.payload, record, None))
            else:
                items.append(entry.payload)
        if taken:
            state.window = deque(e for e in window if not (e.one and e.index > last_seen))
            state.count -= taken
        return items

    def on_result(self, ops: list[Op], result: BatchResult) -> list[Op]:
        """Apply a batch's outcome to memory; return the state changes to retry."""
        for tid, high in result.evicted.items():
            state = self._by_tid.get(tid)
            if state is not None and high > state.evicted:
                state.evicted = high
        if not result.failed:
            return []
        # A transaction rolled back. Failed messages leave the window; evictions,
        # takes, new topics and index bumps are retried with the next batch. An eviction
        # that memory made only because of a failed message is not retried.
        carry: list[Op] = []
        evicts: dict[int, int] = {}
        bumps: dict[int, int] = {}
        failed: dict[int, set[int]] = {}  # tid -> ids of failed records that were cached
        for op in result.failed:
            cls = type(op)
            if cls is Record:
                assert isinstance(op, Record)
                bumps[op.tid] = max(bumps.get(op.tid, 0), op.index + 1)
                if op.payload is not None and not op.taken:
                    failed.setdefault(op.tid, set()).add(id(op))
            elif cls is Evict:
                assert isinstance(op, Evict)
                evicts[op.tid] = evicts.get(op.tid, 0) + op.count
            elif cls is not Read:
                carry.append(op)
        carry.extend(Bump(tid, n) for tid, n in bumps.items())
        for tid, ids in failed.items():
            state = self._by_tid[tid]
            kept = deque(e for e in state.window if id(e.record) not in ids)
            removed = len(state.window) - len(kept)
            state.window = kept
            state.count -= removed
            # the rest were evicted by memory already: that eviction is not redone on disk
            evicts[tid] = evicts.get(tid, 0) - (len(ids) - removed)
        carry.extend(Evict(tid, count) for tid, count in evicts.items() if count > 0)
        return carry

    async def replay_from_disk(
        self, marker: DiskReplay, send: Callable[[list[bytes]], Awaitable[None]]
    ) -> None:
        """Stream older-than-memory history to one subscriber, chunk by chunk.

        ``send`` (the transport) paces the reads. "one" messages met on the way are
        taken: skipped if another replay took them first, else removed from the cache.
        Raises ``sqlite3.Error``/``OSError`` when the history cannot be read.
        """
        read = marker.read
        state = self._by_tid[read.tid]
        try:
            await read.done.wait()
            if read.error is not None:
                raise read.error
            conn = read.conn
            assert conn is not None
            rows = read.rows
            while True:
                payloads, last_take = self._take_ones(state, rows)
                if last_take is not None:
                    # "one" messages go out once their removal is decided (see Take)
                    await self.store.wait(last_take.seq)
                if payloads:
                    await send(payloads)
                if len(rows) < READ_CHUNK_ROWS:
                    return
                rows = await trio.to_thread.run_sync(
                    read_chunk, conn, read.tid, rows[-1][0], read.upto, READ_CHUNK_ROWS
                )
        finally:
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

    def _take_ones(self, state: TopicState, rows: list[Row]) -> tuple[list[bytes], Take | None]:
        payloads = []
        take = None
        for index, one, payload in rows:
            if one:
                if index in state.disk_taken:
                    continue  # another replay's snapshot gave it out already
                state.disk_taken.add(index)
                state.count -= 1
                take = self.store.take(state.tid, index)
            payloads.append(payload)
        return payloads, take

    # -- TopicHistory ------------------------------------------------------------

    def record(self, topic: str, send: Send, one: bool, cached: bool) -> int:
        state = self.state(topic)
        index = state.next_index
        state.next_index = index + 1
        # Uncached, the record (payload None) still makes the index durable.
        payload = encode_delivery(send, index) if cached else None
        written = self.store.write(state.tid, index, one, payload)
        if payload is not None:
            self.add(state, Entry(index, one, payload, written))
        return index

    def replay(self, topic: str, last_seen: int) -> list[bytes]:
        """The in-memory part only; :class:`DurableBroker` streams older ones from disk."""
        state = self.topics.get(topic)
        if state is None:
            return []
        sent = [e.payload for e in state.window if e.index > last_seen]
        self.replay_items(topic, max(last_seen, state.spilled_max))
        return sent

    def recovered(self, topic: str, last_seen: int) -> bool:
        state = self.topics.get(topic)
        if state is None:
            return last_seen <= -1
        return nothing_lost(state.evicted, state.next_index, last_seen)

    def cached(self, topic: str) -> list[CachedMessage]:
        """The in-memory window, for inspection and tests."""
        state = self.topics.get(topic)
        if state is None:
            return []
        return [CachedMessage(e.index, e.one, e.payload) for e in state.window]


@attrs.define(eq=False)
class DurableBroker(Broker):
    """The broker with deliveries and replies held until the store has the message."""

    durable: DurableHistory = attrs.field(kw_only=True)
    #: The snapshot the last ``subscribe`` queued, for its ``subscribe_reply``.
    _subscribe_read: Read | None = attrs.field(default=None, init=False)

    def publish(self, send: Send) -> int:
        topic = send.topic
        durable = self.durable
        state = durable.state(topic)
        index = state.next_index
        state.next_index = index + 1
        payload = encode_delivery(send, index)
        subs = self._subscribers.get(topic)
        if send.delivery == "all":
            one = False
            cached = send.cache
        else:
            one = True
            cached = send.cache and not subs
        record = durable.store.write(state.tid, index, one, payload if cached else None)
        if cached:
            durable.add(state, Entry(index, one, payload, record))
        self.send_reply = Pending.make(SUCCESS, record, _STORAGE_UNAVAILABLE)
        if subs:
            item = Pending.make(payload, record, None)
            if not one:
                for subscriber in subs:
                    subscriber.push(item)
            else:
                self._random.choice(list(subs)).push(item)
        return index

    def subscribe(
        self, subscriber: Subscriber, topic: str, last_seen: int = -1, cache: bool = True
    ) -> list[bytes]:
        super().subscribe(subscriber, topic, last_seen, cache=False)
        self._subscribe_read = None
        if not cache:
            return []
        owner = subscriber if isinstance(subscriber, DurableOutbox) else None
        items = self.durable.replay_items(topic, last_seen, owner)
        if items and type(items[0]) is DiskReplay:
            self._subscribe_read = items[0].read
        return items

    def subscribe_reply(self, topic: str, last_seen: int, epoch: str) -> bytes:
        read = self._subscribe_read
        if read is None:
            # No replay from disk: every eviction that matters is known in memory.
            return super().subscribe_reply(topic, last_seen, epoch)
        possible = epoch == self.epoch and self.history.recovered(topic, last_seen)
        return EpochReply.make(read, last_seen, self.epoch, possible)


class DurableOutbox(Outbox):
    """An outbox whose writer waits for the store at :class:`Pending` items."""

    def __init__(
        self,
        budget: int,
        on_overflow: Callable[[], None] | None = None,
        *,
        history: DurableHistory,
    ) -> None:
        super().__init__(budget, on_overflow)
        self.history = history
        self.store = history.store
        #: Snapshots of replays from disk queued here; the writer releases them.
        self.snapshots: set[Read] = set()

    def send_now(self, transport: Transport) -> None:
        """Never from the reader: queued items may have to wait for the store."""
        self._wake()

    async def drain_into(self, transport: Transport, peer_gone: Callable[[], None]) -> None:
        try:
            await self._drain(transport)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            peer_gone()
        finally:
            # Whatever ends the writer ends the snapshots of replays it did not reach.
            for read in self.snapshots:
                self.history.release(read)
            self.snapshots.clear()

    async def _drain(self, transport: Transport) -> None:
        store = self.store
        while items := await self.take():
            batch: list[bytes] = []
            size = 0
            for item in items:
                size += len(item)
                cls = type(item)
                if cls is bytes:
                    batch.append(item)
                elif cls is Pending:
                    assert isinstance(item, Pending)
                    record = item.record
                    if record.seq > store.decided_seq:
                        if batch:
                            await transport.send_batch(batch)
                            batch = []
                        await store.wait(record.seq)
                    requires = item.requires
                    if requires is not None and requires.failed:
                        pass  # a replayed message whose own write failed
                    elif not record.failed:
                        batch.append(item)
                    elif item.failure is not None:
                        batch.append(item.failure)
                elif cls is DiskReplay:
                    assert isinstance(item, DiskReplay)
                    if batch:
                        await transport.send_batch(batch)
                        batch = []
                    await self._replay(transport, item)
                else:
                    assert isinstance(item, EpochReply)
                    await item.read.done.wait()
                    batch.append(item.resolve())
                if size >= WRITE_BATCH_BYTES:
                    if batch:
                        await transport.send_batch(batch)
                        batch = []
                    self.written(size)
                    size = 0
            if batch:
                await transport.send_batch(batch)
            self.written(size)

    async def _replay(self, transport: Transport, marker: DiskReplay) -> None:
        try:
            await self.history.replay_from_disk(marker, transport.send_batch)
            self.snapshots.discard(marker.read)
        except (sqlite3.Error, OSError) as exc:
            log.warning("history unavailable for a replay: %s", exc)
            raise trio.BrokenResourceError("history unavailable") from exc


@attrs.define(eq=False)
class Durable:
    """What ``serve`` needs from an open data directory."""

    store: Store
    history: DurableHistory
    broker: DurableBroker

    def outbox_factory(self, budget: int, on_overflow: Callable[[], None] | None) -> Outbox:
        return DurableOutbox(budget, on_overflow, history=self.history)


@asynccontextmanager
async def open_durable(
    data_dir: str | os.PathLike[str],
    *,
    cache_size: int,
    fsync: FsyncPolicy = DEFAULT_FSYNC,
    memory_window: int = DEFAULT_MEMORY_WINDOW,
) -> AsyncIterator[Durable]:
    """Open (or create) the data directory, recover, run the flusher, close cleanly."""
    directory = Path(data_dir)
    backend = SqliteBackend(directory, fsync, cache_size, memory_window)
    started = time.perf_counter()
    try:
        loaded = await trio.to_thread.run_sync(backend.open)
    except BaseException:
        backend.abandon()
        raise
    took = time.perf_counter() - started
    store = Store(backend, fsync)
    history = DurableHistory(store, cache_size, memory_window)
    history.load(loaded)
    store.on_result = history.on_result
    broker = DurableBroker(history, durable=history, epoch=history.epoch)
    log.info(
        "data directory %s: recovered %d cached message(s) in %d topic(s) in %.3f s "
        "(fsync %s, epoch %s)%s",
        directory,
        loaded.messages,
        len(loaded.topics),
        took,
        fsync,
        loaded.epoch,
        "".join(f"; {note}" for note in loaded.notes),
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            try:
                yield Durable(store, history, broker)
            finally:
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + 30
                    await store.aclose()
                nursery.cancel_scope.cancel()
    except BaseException:
        backend.abandon()
        raise

