"""Reading old history for a replay from disk, bounded in bytes as well as rows.

A replay from disk holds at most one chunk at a time: the rows just read, and the
transport's one write of them (it joins a batch into one buffer). Chunks are bounded
in bytes, not only in rows, because a cached message may be as large as a line
(``--max-line-bytes``): a chunk stops at the first row that reaches
:data:`REPLAY_CHUNK_BYTES`, so it holds at most that plus one message.
"""

from __future__ import annotations

import sqlite3

from ._ops import Row

#: A replay from disk reads (and writes) at most about this many bytes at a time: a
#: chunk ends with the row that reaches it.
REPLAY_CHUNK_BYTES = 256 << 10
#: Rows per chunk at most (small messages: one worker-thread call per this many).
REPLAY_CHUNK_ROWS = 1000
#: The snapshot's first read (in the flusher, through ``Read``) takes this many rows:
#: one row, so that it is bounded by one message whatever the messages' size.
FIRST_READ_ROWS = 1
#: SQLite's page cache for a replay's snapshot connection, in KiB (SQLite's default
#: is about 2 MiB per connection, which every open replay would keep).
SNAPSHOT_CACHE_KIB = 256


def read_rows(
    conn: sqlite3.Connection,
    tid: int,
    after: int,
    upto: int,
    max_rows: int = REPLAY_CHUNK_ROWS,
    max_bytes: int = REPLAY_CHUNK_BYTES,
) -> tuple[list[Row], bool]:
    """The next chunk of a snapshot, ``after < index <= upto`` in index order, and
    whether more may follow. Runs in a worker thread.

    Stops after ``max_rows`` rows or at the first row that brings the payloads to
    ``max_bytes``; rows are fetched one at a time, so no more than that is read.
    """
    conn.execute(f"PRAGMA cache_size=-{SNAPSHOT_CACHE_KIB}")
    cursor = conn.execute(
        "SELECT idx, one, payload FROM messages WHERE tid = ? AND idx > ? AND idx <= ? "
        "ORDER BY idx LIMIT ?",
        (tid, after, upto, max_rows),
    )
    fetched: list[tuple[int, int, bytes]] = []
    append = fetched.append
    size = 0
    more = False
    try:
        for row in cursor:  # one row at a time: nothing past the budget is read
            append(row)
            size += len(row[2])
            if size >= max_bytes:
                more = True
                break
        else:
            more = len(fetched) == max_rows
    finally:
        cursor.close()
    return [(idx, bool(one), payload) for idx, one, payload in fetched], more
