"""All SQL: the database side of the store, run in worker threads one call at a time."""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from pathlib import Path

import attrs

from ..broker import new_epoch
from ._ops import (
    DB_NAME,
    LOCK_NAME,
    BatchResult,
    Bump,
    Evict,
    FsyncPolicy,
    Mark,
    NewTopic,
    Op,
    Read,
    Record,
    Row,
    StoreError,
    Take,
)
from ._wal import scan_wal

log = logging.getLogger("mq_trio.store")

_SYNCHRONOUS = {"always": "FULL", "everysec": "NORMAL", "never": "OFF"}

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
            elif cls is Mark:
                pass  # decided with the batch, nothing to write
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
        except Exception as exc:
            if not isinstance(exc, sqlite3.Error | OSError):
                # A bug or an unforeseen value: the batch fails like a storage error
                # (rolled back above) instead of taking the server down.
                log.exception("unexpected error writing a batch; its sends fail")
            self._broken = True
            result.error = exc
            result.failed.extend(ops)
            for op in ops:
                if isinstance(op, Record | Take | Mark):
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
                read.rows = read_chunk(conn, read.tid, read.after, read.upto, read.limit)
            except BaseException:
                conn.close()
                raise
            read.conn = conn
        except Exception as exc:
            if not isinstance(exc, sqlite3.Error | OSError):
                log.exception("unexpected error opening a replay from disk")
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

