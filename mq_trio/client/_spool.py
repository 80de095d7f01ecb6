"""The producer's spool: publishes not yet acknowledged by the server, kept in a file.

``open_client(spool=PATH)``: every publish that carries an id (``publish``, ``send_job``,
``send_batch``, ``send(id=...)``) is appended here before it is sent and marked done when
its success reply arrives, so a producer killed (or a server down) in between loses
nothing: the next ``open_client`` with the same spool sends what is left first, with the
same ids, and the server's dedupe window turns what it had already accepted into
duplicates instead of second copies.

The file is an append-only log of JSON lines, ``{"n": N, "cmd": COMMAND}`` when a publish
is taken and ``{"done": N}`` when it is settled, rewritten with only the live entries
(compacted) when it is opened and whenever the settled ones outweigh the live ones.
Each record is one ``write`` to a file opened with ``O_APPEND``: once written, it is in
the operating system's cache and survives the process being killed (``kill -9``); it
survives a power cut or kernel crash only once fsynced, which happens on compaction and
on close, and for every publish with ``fsync=True``. A last line cut short by a crash is
ignored.

A lock (``PATH.lock``, ``flock``) keeps a second process from using the same spool.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from ._values import SpoolFull

log = logging.getLogger("mq_trio.client")

#: ``open_client(spool_max_bytes=...)``'s default: the spool file's largest size.
DEFAULT_SPOOL_MAX_BYTES = 64 << 20
#: Settled records are compacted away once they are this many bytes and outweigh the live.
COMPACT_AT_BYTES = 1 << 20


class SpoolError(Exception):
    """The spool cannot be used (locked by another process, or unreadable)."""


class Spool:
    """Publishes with ids, from the moment they are taken until the server accepted them."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
                 fsync: bool = False) -> None:
        if max_bytes < 1:
            raise ValueError("spool_max_bytes must be >= 1")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.fsync = fsync
        #: Live entries, oldest first: number -> (command line, bytes of its record).
        self._live: dict[int, tuple[bytes, int]] = {}
        self._live_bytes = 0
        self._file_bytes = 0
        self._next = 0
        self._fd = -1
        self._lock_fd = -1

    # --- opening and closing ---

    def open(self) -> None:
        """Lock, read what a previous run left, and compact it into a fresh file."""
        self._lock()
        try:
            self._read()
            self._rewrite()
        except BaseException:
            self._unlock()
            raise

    def close(self) -> None:
        """Fsync and close (entries still live stay in the file for the next run)."""
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1
        self._unlock()

    def _lock(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        if sys.platform != "win32":
            import fcntl

            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise SpoolError(
                    f"spool {self.path} is in use by another process (locked: {lock_path})"
                ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # (closing releases the flock)
            self._lock_fd = -1

    def _read(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise SpoolError(f"cannot read spool {self.path}: {exc.strerror or exc}") from exc
        lines = data.split(b"\n")
        last = len(lines) - 1  # (after a final newline the last item is b"")
        taken: dict[int, bytes] = {}
        for number, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                if "done" in record:
                    taken.pop(int(record["done"]), None)
                    continue
                n, cmd = int(record["n"]), record["cmd"]
                if type(cmd) is not dict or type(cmd.get("id")) is not str:
                    raise ValueError("not a command with an id")
            except (ValueError, TypeError, KeyError):
                if number == last:  # cut short by a crash mid-write: never sent for sure
                    log.warning("spool %s: ignoring its unfinished last line", self.path)
                else:
                    log.warning("spool %s: skipping unreadable line %d", self.path, number + 1)
                continue
            taken[n] = json.dumps(cmd).encode("ascii")
            self._next = max(self._next, n + 1)
        for n, line in taken.items():
            self._live[n] = (line, len(self._record(n, line)))
        self._live_bytes = sum(size for _, size in self._live.values())

    def _rewrite(self) -> None:
        """Write the live entries to a new file and put it in place (atomically)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            for n, (line, _) in self._live.items():
                f.write(self._record(n, line))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        if sys.platform != "win32":
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._file_bytes = self._live_bytes

    # --- entries ---

    @staticmethod
    def _record(n: int, line: bytes) -> bytes:
        return b'{"n": %d, "cmd": %b}\n' % (n, line)

    def pending(self) -> list[tuple[int, bytes]]:
        """The live entries, oldest first: (number, command line)."""
        return [(n, line) for n, (line, _) in self._live.items()]

    def __len__(self) -> int:
        return len(self._live)

    @property
    def size(self) -> int:
        """Bytes of the file now (live entries and settled records not yet compacted)."""
        return self._file_bytes

    def add(self, line: bytes) -> int:
        """Keep a command (in the file) until ``done``; its number. Raises
        :class:`SpoolFull` when the file would pass ``max_bytes`` even compacted."""
        n = self._next
        record = self._record(n, line)
        if self._file_bytes + len(record) > self.max_bytes:
            if self._file_bytes > self._live_bytes:
                self._rewrite()
            if self._file_bytes + len(record) > self.max_bytes:
                raise SpoolFull(
                    f"the spool {self.path} is full ({len(self._live)} unacknowledged "
                    f"publishes, {self._live_bytes} bytes of spool_max_bytes="
                    f"{self.max_bytes}): not published"
                )
        self._write(record)
        self._next = n + 1
        self._live[n] = (line, len(record))
        self._live_bytes += len(record)
        return n

    def done(self, n: int) -> None:
        """The server settled entry ``n``: it is not sent again."""
        entry = self._live.pop(n, None)
        if entry is None or self._fd < 0:
            return
        self._live_bytes -= entry[1]
        self._write(b'{"done": %d}\n' % n)
        dead = self._file_bytes - self._live_bytes
        if dead >= COMPACT_AT_BYTES and dead > self._live_bytes:
            self._rewrite()

    def _write(self, record: bytes) -> None:
        written = os.write(self._fd, record)
        if written != len(record):  # pragma: no cover - a full disk mid-record
            raise OSError(f"short write to spool {self.path}")
        self._file_bytes += len(record)

    def sync_fd(self) -> int:
        """A duplicate of the file's descriptor, for an fsync in a thread (the caller
        closes it; a compaction meanwhile cannot close it under the thread)."""
        return os.dup(self._fd)


def fsync_and_close(fd: int) -> None:
    """Fsync a duplicate from ``sync_fd`` and close it (run in a thread)."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
