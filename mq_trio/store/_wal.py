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

