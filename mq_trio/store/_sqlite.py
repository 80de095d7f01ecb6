"""All SQL: the database side of the store, run in worker threads one call at a time."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import cast

import attrs

from ..broker import DEFAULT_MAX_IDS, new_epoch
from ._ops import (
    ACCEPT_FLAG,
    DB_NAME,
    ID_NAME,
    LOCK_NAME,
    RUN_NAME,
    TICKETS,
    BatchResult,
    Bump,
    DataLossError,
    Evict,
    FsyncPolicy,
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
    Record,
    Row,
    StoreError,
    Take,
    TopicRows,
)
from ._wal import scan_wal

log = logging.getLogger("mq_trio.store")

#: Message ids restored at start, at most (the broker's bound: broker/_dedupe.py).
ID_LOAD_LIMIT = DEFAULT_MAX_IDS

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
CREATE TABLE IF NOT EXISTS ids (
    tid INTEGER NOT NULL,
    id TEXT NOT NULL,
    reply BLOB NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (tid, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ids_expires ON ids (expires);
CREATE TABLE IF NOT EXISTS job_marks (
    tid INTEGER PRIMARY KEY,
    delivered INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    tid INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    payload BLOB NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0,
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
    #: The startup write failed (disk full, I/O error): the store starts unavailable
    #: and its first successful batch writes what startup could not.
    write_error: Exception | None = None
    #: Jobs not acknowledged: (tid, index, payload, deliveries), in index order per topic.
    jobs: list[tuple[int, int, bytes, int]] = attrs.field(factory=list)
    #: Message ids not expired: (tid, id, reply, expires), oldest first.
    ids: list[tuple[int, str, bytes, float]] = attrs.field(factory=list)


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

    def __init__(
        self,
        directory: Path,
        fsync: FsyncPolicy,
        cache_size: int,
        window: int,
        accept_data_loss: bool = False,
    ):
        self.directory = directory
        self.path = directory / DB_NAME
        self.fsync = fsync
        self.cache_size = cache_size
        self.window = window
        self.accept_data_loss = accept_data_loss
        self._conn: sqlite3.Connection | None = None
        self._lock_fds: list[int] = []
        self._broken = False
        #: Committed data found missing (and accepted): start a new epoch.
        self._lost: list[str] = []
        #: The identity the directory's marker file holds (None: no marker).
        self._marker: str | None = None
        #: meta rows startup could not write (full disk): go with the first batch.
        self._pending_meta: list[tuple[str, str]] = []
        #: tid -> (name, next index) read from intact frames of a damaged log's lost part.
        self._salvaged: dict[int, tuple[bytes, int]] = {}

    # -- opening ---------------------------------------------------------------

    def open(self) -> Loaded:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock()
            loaded = self._open()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot use data directory {self.directory}: {exc}") from exc
        try:
            self._write_run()
        except OSError as exc:  # a full disk: only a later power-loss verdict needs it
            log.warning("could not write %s: %s", RUN_NAME, exc)
        return loaded

    def _open(self) -> Loaded:
        notes: list[str] = []
        self._marker = self._read_marker()
        wal_path = Path(f"{self.path}-wal")
        wal = scan_wal(wal_path)
        if self._marker is not None and not self.path.exists():
            self._data_lost(f"its database file {DB_NAME} is missing")
            self._move_aside("missing")  # a stale log must not be replayed into a new file
        if wal.lost_commits:
            what = (
                f"the write-ahead log {wal_path.name} is damaged before its end: at least "
                f"{wal.lost_commits} committed transaction(s) after the damage cannot be "
                "recovered"
            )
            previous = self._read_run()
            if previous.get("fsync", "always") != "always" and previous.get(
                "boot_id", ""
            ) not in ("", _boot_id()):
                # A power loss under everysec/never: the unsynced end of the log may be
                # gone or torn; that loss is the documented price of the policy, and the
                # new epoch tells resuming clients (docs/durability.md).
                log.warning("%s, after a reboot with --fsync %s (expected); starting a new "
                            "epoch", what, previous["fsync"])
                self._lost.append(what)
            else:
                self._data_lost(what)
            self._keep_damaged_log(wal_path)
            self._salvaged = wal.lost_topics
        elif wal.torn:
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
            if self._marker is not None:
                # This directory held our data: a corrupt database is lost data.
                self._data_lost(f"its database file {DB_NAME} is corrupt ({exc})")
            aside = self._move_aside("corrupt")
            log.error(
                "the database in %s is corrupt (%s); moved it to %s and started with an "
                "empty history (new epoch)", self.directory, exc, aside
            )
            notes.append(f"corrupt database moved to {aside.name}")
            return self._load(notes)

    def _data_lost(self, what: str) -> None:
        """Committed data is gone: refuse to start, unless the loss is accepted."""
        if not self.accept_data_loss:
            raise DataLossError(
                f"data directory {self.directory} has lost committed data: {what}; "
                f"refusing to start (start with {ACCEPT_FLAG} to continue without it, "
                "in a new epoch)"
            )
        log.error("data directory %s has lost committed data: %s; continuing in a new "
                  "epoch (%s)", self.directory, what, ACCEPT_FLAG)
        self._lost.append(what)

    def _keep_damaged_log(self, wal: Path) -> None:
        """A copy of a damaged log for whoever wants to salvage it (best effort: the
        disk may be full)."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        copy = wal.with_name(f"{wal.name}.damaged-{stamp}")
        try:
            shutil.copyfile(wal, copy)
        except OSError as exc:
            log.error("could not keep a copy of the damaged log: %s", exc)
            copy.unlink(missing_ok=True)
        else:
            log.warning("kept a copy of the damaged log as %s", copy)

    def _read_run(self) -> dict[str, str]:
        try:
            lines = (self.directory / RUN_NAME).read_text().splitlines()
        except (FileNotFoundError, UnicodeDecodeError):
            return {}
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def _write_run(self) -> None:
        """Record this start's boot id and fsync policy."""
        self._write_file(RUN_NAME, f"boot_id={_boot_id()}\nfsync={self.fsync}\n",
                         sync_dir=False)

    def _write_file(self, name: str, text: str, sync_dir: bool) -> None:
        """Write a small file of the directory atomically, the file fsynced (and the
        directory, so that the rename is durable too, when ``sync_dir``)."""
        tmp = self.directory / f"{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / name)
        if sync_dir:
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _read_marker(self) -> str | None:
        try:
            text = (self.directory / ID_NAME).read_text().strip()
        except FileNotFoundError:
            return None
        return text or None

    def _write_marker(self, identity: str) -> None:
        """Write the identity file atomically and durably."""
        self._write_file(ID_NAME, f"{identity}\n", sync_dir=True)
        self._marker = identity

    def _lock(self) -> None:
        """Lock the directory itself (its own inode: deleting a file cannot undo that),
        and ``mq-trio.lock`` as well, which older versions lock."""
        for path, flags in ((self.directory, os.O_RDONLY | os.O_DIRECTORY),
                            (self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT)):
            fd = os.open(path, flags, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._unlock()
                raise StoreError(
                    f"data directory {self.directory} is in use by another server"
                ) from None
            self._lock_fds.append(fd)

    def _unlock(self) -> None:
        while self._lock_fds:
            os.close(self._lock_fds.pop())

    def _move_aside(self, why: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{DB_NAME}.{why}-{stamp}")
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
        meta: dict[str, str] = {}
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        identity = meta.get("identity")
        if self._marker is not None and identity != self._marker and not self._lost:
            # Checked before anything is written to a database that is not ours.
            self._data_lost(
                f"its database file {DB_NAME} was replaced (it is not the database "
                f"{ID_NAME} names)"
            )
        conn.executescript(_SCHEMA)
        epoch = meta.get("epoch")
        boot = _boot_id()
        if self._lost:
            epoch = new_epoch()
            identity = None
            notes.append("committed data lost (accepted): new epoch")
        elif epoch is None:
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
        evicted_at_start = False
        conn.execute("BEGIN IMMEDIATE")
        if self._lost and self._salvaged:
            # Indexes the lost transactions handed out, as far as intact pages tell:
            # new sends continue above them (topics created there come back, empty).
            salvaged = [(tid, name, n) for tid, (name, n) in self._salvaged.items()]
            conn.executemany(
                "INSERT OR IGNORE INTO topics (tid, name, next_index) VALUES (?, ?, ?)",
                salvaged,
            )
            conn.executemany(
                "UPDATE topics SET next_index = max(next_index, ?) WHERE tid = ? AND name = ?",
                [(n, tid, name) for tid, name, n in salvaged],
            )
            notes.append(
                f"next indexes of {len(salvaged)} topic(s) read from the damaged log"
            )
        rows = conn.execute("SELECT tid, name, next_index, evicted FROM topics").fetchall()
        for tid, name, next_index, evicted in rows:
            (count,) = conn.execute(
                "SELECT count(*) FROM messages WHERE tid = ?", (tid,)
            ).fetchone()
            if count > self.cache_size:
                # --cache-size shrank since the last run: apply the cache rule now.
                high = self._evict(tid, count - self.cache_size)
                evicted_at_start = True
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
        fresh = identity is None
        if identity is None:
            identity = new_epoch()
        rows = [("epoch", epoch), ("clean", "0"), ("boot_id", boot), ("fsync", self.fsync),
                ("identity", identity)]
        write_error: Exception | None = None
        try:
            conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", rows)
            conn.execute("COMMIT")
            self._sync_commit()
        except (sqlite3.Error, OSError) as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if fresh or evicted_at_start or epoch != meta.get("epoch"):
                raise  # a new identity or epoch, or evictions memory relies on: needed
            # A full disk (or a failing one): serve what is there, sends fail until the
            # store can write again; the first batch that commits writes these rows.
            # Nothing of this run is on disk before then, so the clean flag left by
            # the previous run is still true.
            write_error = exc
            self._broken = True
            self._pending_meta = rows
            log.error("cannot write to the store at startup (%s): starting anyway, "
                      "sends fail until it can", exc)
            notes.append(f"store not writable at startup ({exc})")
        if self._lost:
            # Copy the log into the database and empty it: frames left behind the
            # damage must not be mistaken for another loss at the next start.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if self._marker != identity:
            # After the database's identity is durable: a crash in between leaves a
            # database without marker, which is only treated as an older directory.
            self._write_marker(identity)
        marks = dict(conn.execute("SELECT tid, delivered FROM job_marks").fetchall())
        # A job at or below its topic's mark was delivered at least once (JobMark).
        jobs = [(int(t), int(i), bytes(p), max(int(d), int(i <= marks.get(t, -1))))
                for t, i, p, d in conn.execute(
                    "SELECT tid, idx, payload, deliveries FROM jobs ORDER BY tid, idx")]
        # The newest ids only, as many as the broker keeps (a flood of ids within the
        # window leaves more rows than that until they expire), oldest first.
        ids = [(int(t), str(k), bytes(r), float(e)) for t, k, r, e in conn.execute(
            "SELECT tid, id, reply, expires FROM ids WHERE expires > ? "
            "ORDER BY expires DESC LIMIT ?", (time.time(), ID_LOAD_LIMIT))]
        ids.reverse()
        return Loaded(epoch, topics, total, notes, write_error, jobs, ids)

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
        jobs: list[int | bytes] = []  # flat: tid, index, command, ...
        counts: list[tuple[int, int, int]] = []
        done: list[tuple[int, int]] = []
        ids: list[tuple[int, str, bytes, float]] = []
        marks: dict[int, int] = {}
        batches: list[Messages] = []
        dropped: dict[int, int] = {}  # tid -> highest index evicted before written
        purge = 0.0
        for op in ops:
            cls = type(op)
            if cls is Messages:
                assert isinstance(op, Messages)
                batches.append(op)
                for part in op.topics.values():
                    tid = part.tid
                    if bumps.get(tid, -1) < part.next_index:
                        bumps[tid] = part.next_index
                    if part.evicts:
                        evicts[tid] = evicts.get(tid, 0) + part.evicts
                    if part.dropped_high > dropped.get(tid, -1):
                        dropped[tid] = part.dropped_high
                continue
            if cls is IdRecord:
                assert isinstance(op, IdRecord)
                ids.append((op.tid, op.id, op.reply, op.expires))
                continue
            if cls is IdPurge:
                assert isinstance(op, IdPurge)
                purge = max(purge, op.before)
                continue
            if cls is JobMark:
                assert isinstance(op, JobMark)
                marks[op.tid] = max(marks.get(op.tid, -1), op.source.delivered_max)
                continue
            if cls is JobBatch:
                assert isinstance(op, JobBatch)
                rows = op.rows
                if rows:
                    jobs.extend(rows)
                    # (in index order per topic: the last index of each is the highest)
                    last = dict(zip(cast("list[int]", rows[0::3]),
                                    cast("list[int]", rows[1::3]), strict=True))
                    for tid, index in last.items():
                        if bumps.get(tid, -1) <= index:
                            bumps[tid] = index + 1
                done.extend(op.gone)
            elif cls is JobCount:
                assert isinstance(op, JobCount)
                counts.append((op.deliveries, op.tid, op.index))
            elif cls is Record:
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
                for batch in batches:
                    for part in batch.topics.values():
                        _insert_messages(conn, part)
                if takes:
                    conn.executemany("DELETE FROM messages WHERE tid = ? AND idx = ?", takes)
                if done and counts:
                    # A job acknowledged in the batch that counted its delivery needs no
                    # count. (A job is delivered, so acknowledged, only once the batch
                    # writing it is decided: never in the same one. Were it, its row
                    # would be deleted below, after its insert.)
                    gone = set(done)
                    counts = [c for c in counts if (c[1], c[2]) not in gone]
                if jobs:
                    _insert_rows(conn, "INSERT OR REPLACE INTO jobs (tid, idx, payload) VALUES ",
                                 "(?, ?, ?)", 3, jobs)
                if counts:
                    conn.executemany("UPDATE jobs SET deliveries = ? WHERE tid = ? AND idx = ?",
                                     counts)
                if done:
                    # Acks come mostly in index order: one range per run of indexes.
                    conn.executemany(
                        "DELETE FROM jobs WHERE tid = ? AND idx >= ? AND idx <= ?",
                        _runs(done))
                if marks:
                    conn.executemany(
                        "INSERT INTO job_marks VALUES (?, ?) ON CONFLICT(tid) DO UPDATE "
                        "SET delivered = max(delivered, excluded.delivered)",
                        list(marks.items()))
                if ids:
                    conn.executemany("INSERT OR REPLACE INTO ids VALUES (?, ?, ?, ?)", ids)
                if purge:
                    conn.execute("DELETE FROM ids WHERE expires < ?", (purge,))
                for tid, count in evicts.items():
                    high = self._evict(tid, count)
                    if high >= 0:
                        evicted[tid] = high
                if dropped:
                    # rows never inserted: their indexes were evicted all the same
                    conn.executemany(
                        "UPDATE topics SET evicted = max(evicted, ?) WHERE tid = ?",
                        [(high, tid) for tid, high in dropped.items()])
                if bumps:
                    conn.executemany(
                        "UPDATE topics SET next_index = max(next_index, ?) WHERE tid = ?",
                        [(n, tid) for tid, n in bumps.items()],
                    )
                if self._pending_meta:
                    conn.executemany(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                        self._pending_meta,
                    )
                self._commit(conn, sync)
                self._pending_meta = []
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
                if isinstance(op, TICKETS):
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
        self._unlock()


#: Rows per multi-row INSERT statement, largest first: a few fixed sizes, so that the
#: connection's statement cache holds every statement (``_insert_rows``).
_INSERT_SIZES = (256, 64, 16, 4, 1)


def _insert_rows(conn: sqlite3.Connection, head: str, values: str, width: int,
                 params: list[int | bytes]) -> None:
    """Insert rows of ``width`` values each, given flat in ``params``, with multi-row
    ``VALUES`` statements of the sizes above: one statement step per up to 256 rows
    instead of one per row (``executemany`` binds, steps and resets row by row and lets
    go of the GIL at each step: about 0.8 µs a row more, on the CPU the event loop
    shares)."""
    start = 0
    left = len(params) // width
    for size in _INSERT_SIZES:
        if left < size:
            continue
        sql = head + ", ".join([values] * size)
        step = size * width
        while left >= size:
            conn.execute(sql, params[start:start + step])
            start += step
            left -= size


_MESSAGE_SQL = {size: "INSERT OR REPLACE INTO messages (tid, idx, one, payload) VALUES "
                     + ", ".join(["(?1, ?, ?, ?)"] * size) for size in _INSERT_SIZES}


def _insert_messages(conn: sqlite3.Connection, rows: TopicRows) -> None:
    """A topic's rows of a :class:`Messages` batch with multi-row statements as
    ``_insert_rows`` (the topic's id is the first parameter, ``?1`` in each row: the
    following ``?`` count on from the highest)."""
    flat = rows.rows
    start = 0
    left = len(flat) // 3
    tid = rows.tid
    for size in _INSERT_SIZES:
        if left < size:
            continue
        sql = _MESSAGE_SQL[size]
        step = size * 3
        while left >= size:
            params: list[int | bool | bytes] = [tid]
            params += flat[start:start + step]
            conn.execute(sql, params)
            start += step
            left -= size


def _runs(keys: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(tid, first, last) for each run of consecutive indexes among ``keys``."""
    runs: list[tuple[int, int, int]] = []
    tid = first = last = -1
    for t, i in sorted(keys):
        if t == tid and i == last + 1:
            last = i
            continue
        if tid >= 0:
            runs.append((tid, first, last))
        tid, first, last = t, i, i
    if tid >= 0:
        runs.append((tid, first, last))
    return runs


def read_chunk(conn: sqlite3.Connection, tid: int, after: int, upto: int, limit: int) -> list[Row]:
    """The next cached messages of a snapshot, ``after < index <= upto``, in order."""
    rows = conn.execute(
        "SELECT idx, one, payload FROM messages WHERE tid = ? AND idx > ? AND idx <= ? "
        "ORDER BY idx LIMIT ?",
        (tid, after, upto, limit),
    ).fetchall()
    return [(idx, bool(one), bytes(payload)) for idx, one, payload in rows]

