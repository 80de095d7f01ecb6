"""Finding a torn or corrupt tail in SQLite's write-ahead log at startup."""

from __future__ import annotations

import struct
from pathlib import Path

import attrs

#: Larger logs are not scanned for a torn tail at startup (SQLite handles them anyway).
MAX_WAL_SCAN_BYTES = 64 << 20


@attrs.define
class WalReport:
    """What SQLite will ignore at the end of a write-ahead log after a crash."""

    committed_frames: int = 0
    ignored_bytes: int = 0
    torn: bool = False
    #: Committed transactions of this log found *after* the point where SQLite stops
    #: reading (a damaged frame in the middle): acknowledged data SQLite will drop. At
    #: least this many: a transaction whose commit frame is itself damaged is not seen.
    lost_commits: int = 0
    #: When commits are lost: ``tid -> (name, next_index)`` read from the lost frames
    #: that are intact (checksum verified against the frame before them). A lower bound
    #: of the indexes handed out; empty when nothing could be read.
    lost_topics: dict[int, tuple[bytes, int]] = attrs.field(factory=dict)


def _checksum(word: str, chunk: bytes, s0: int, s1: int) -> tuple[int, int]:
    words = struct.unpack(f"{word}{len(chunk) // 4}I", chunk)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


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
        report.lost_commits = _commits_behind_bad_header(data)
        return report
    word = ">" if magic & 1 else "<"

    def checksum(chunk: bytes, s0: int, s1: int) -> tuple[int, int]:
        return _checksum(word, chunk, s0, s1)

    s0, s1 = checksum(data[:24], 0, 0)
    if (s0, s1) != (c1, c2):
        report.ignored_bytes, report.torn = len(data), True
        report.lost_commits = _commits_behind_bad_header(data)
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
    report.lost_commits = _commits_after(data, pos, frame, data[16:24])
    if report.lost_commits:
        report.lost_topics = _salvage_topics(data, pos, page_size, word, data[16:24])
    return report


def _commits_behind_bad_header(data: bytes) -> int:
    """A damaged log header makes SQLite ignore the whole log: count the commits in it.

    The frames still tell their salts and, by where the next frame's salts are, the
    page size (the header's may be the damaged part).
    """
    salts = data[40:48]
    for shift in range(9, 17):
        frame = 24 + (1 << shift)
        if data[32 + frame + 8 : 32 + frame + 16] == salts:
            return _commits_after(data, 32, frame, salts)
    return 0


def _commits_after(data: bytes, pos: int, frame: int, salts: bytes) -> int:
    """Commit frames of this log (its salts) after ``pos``, where SQLite stops reading,
    less one.

    SQLite writes frames in order, so a process crash leaves at most a cut-off tail:
    nothing of this log's generation after it is a commit. A power loss under
    ``--fsync always`` can leave holes only in the one transaction that was being
    committed (unacknowledged), so its commit frame may be there, after the hole: the
    first commit frame is not counted. Frames from before the log was last reset carry
    other salts (salt-1 is incremented at every reset), garbage matches the 64-bit salts
    by chance only. Found by searching for the salts, so garbage inserted (not just
    overwritten) in the middle shifts nothing.
    """
    commits = 0
    start = pos + 8
    while True:
        hit = data.find(salts, start)
        if hit < 0:
            break
        candidate = hit - 8
        if candidate + frame > len(data):
            break
        _page, commit = struct.unpack(">2I", data[candidate : candidate + 8])
        if commit:
            commits += 1
        start = candidate + frame + 8
    return max(0, commits - 1)



def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        byte = data[pos + i]
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, pos + i + 1
    return (value << 8) | data[pos + 8], pos + 9


_INT_SIZES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}


def _salvage_topics(
    data: bytes, pos: int, page_size: int, word: str, salts: bytes
) -> dict[int, tuple[bytes, int]]:
    """Rows of the ``topics`` table in intact frames after ``pos`` (the lost part).

    A frame counts as intact when its checksum verifies starting from the checksum
    stored in the frame just before it (also of this log), so damaged pages are never
    read. Rows are recognised by shape: table-leaf pages (``messages`` is WITHOUT
    ROWID, ``meta`` and ``sqlite_master`` rows have text columns), records of exactly
    (rowid alias, blob, integer, integer).
    """
    frame = 24 + page_size
    found: dict[int, tuple[bytes, int]] = {}
    start = pos + 8
    while True:
        hit = data.find(salts, start)
        if hit < 0:
            break
        at = hit - 8
        start = at + frame + 8
        if at + frame > len(data) or at - frame < 32:
            continue
        before = data[at - frame : at]
        if before[8:16] != salts:
            continue  # nothing to verify it against
        s0, s1 = struct.unpack(">2I", before[16:24])
        s0, s1 = _checksum(word, data[at : at + 8], s0, s1)
        s0, s1 = _checksum(word, data[at + 24 : at + frame], s0, s1)
        if (s0, s1) != struct.unpack(">2I", data[at + 16 : at + 24]):
            continue
        page_no = struct.unpack(">I", data[at : at + 4])[0]
        if page_no == 1:
            continue
        try:
            _topic_rows(data[at + 24 : at + frame], found)
        except (IndexError, struct.error):
            continue  # not what it looked like
    return found


def _topic_rows(page: bytes, found: dict[int, tuple[bytes, int]]) -> None:
    if page[0] != 0x0D:
        return
    (cells,) = struct.unpack(">H", page[3:5])
    for i in range(cells):
        (cell,) = struct.unpack(">H", page[8 + 2 * i : 10 + 2 * i])
        size, p = _varint(page, cell)
        rowid, p = _varint(page, p)
        if size > len(page) - 35:
            continue  # overflows to other pages: not a topics row of ours
        record = page[p : p + size]
        header_size, q = _varint(record, 0)
        types = []
        while q < header_size:
            serial, q = _varint(record, q)
            types.append(serial)
        if (len(types) != 4 or types[0] != 0 or types[1] < 12 or types[1] % 2
                or types[2] not in (*_INT_SIZES, 8, 9)):
            continue
        q = header_size
        name_len = (types[1] - 12) // 2
        name = record[q : q + name_len]
        q += name_len
        if types[2] in (8, 9):
            next_index = types[2] - 8
        else:
            n = _INT_SIZES[types[2]]
            next_index = int.from_bytes(record[q : q + n], "big", signed=True)
        if next_index >= 0 and len(name) == name_len:
            old = found.get(rowid)
            if old is None or old[1] < next_index:
                found[rowid] = (name, next_index)
