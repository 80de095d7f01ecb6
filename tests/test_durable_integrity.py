"""Durable store integrity (issue #11 points 7, 9, 10): committed data that is gone is
noticed and refused unless accepted (then a new epoch), the directory lock cannot be
bypassed by deleting the lock file, and a full disk. Real files throughout."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from support import LineClient, replay

from mq_trio.store import DB_NAME, DataLossError, StoreError, _ops, open_durable
from mq_trio.store._ops import ID_NAME, LOCK_NAME, RUN_NAME, Record
from mq_trio.store._sqlite import SqliteBackend
from mq_trio.store._wal import scan_wal

ACCEPT = "--accept-data-loss"
TEST_GUARD_SECONDS = 120


def payload(i: int) -> bytes:
    return json.dumps({"command": "send", "topic": "t", "msg": str(i), "delivery": "all",
                       "index": i}).encode()


def write_acknowledged(directory: Path, count: int, fsync: str = "always") -> SqliteBackend:
    """``count`` messages on topic "t", one committed transaction each (what
    ``--fsync always`` does for a sender waiting for each reply); left open."""
    backend = SqliteBackend(directory, fsync, 10_000, 1000)  # type: ignore[arg-type]
    backend.open()
    assert backend.apply([_ops.NewTopic(1, "t")], sync=True).error is None
    for i in range(count):
        assert backend.apply([Record(i + 1, 1, i, False, payload(i))], sync=True).error is None
    return backend


def crash_copy(live: Path, target: Path) -> None:
    """What a crash leaves: database, write-ahead log and the identity file."""
    target.mkdir()
    for name in (DB_NAME, f"{DB_NAME}-wal", ID_NAME):
        shutil.copyfile(live / name, target / name)


def open_backend(directory: Path, accept: bool = False) -> SqliteBackend:
    return SqliteBackend(directory, "always", 10_000, 1000, accept_data_loss=accept)


def indexes(directory: Path) -> list[int]:
    backend = open_backend(directory)
    loaded = backend.open()
    backend.close()
    return [i for topic in loaded.topics for i, _, _ in topic.window]


# --- the lock (point 10) ----------------------------------------------------------------


def test_deleting_the_lock_file_does_not_unlock_the_directory(tmp_path: Path) -> None:
    first = open_backend(tmp_path)
    first.open()
    (tmp_path / LOCK_NAME).unlink()
    second = open_backend(tmp_path)
    with pytest.raises(StoreError, match="is in use by another server"):
        second.open()
    first.close()
    second.open()  # released at close: the next server gets it
    second.close()


# --- lost committed data (point 7) ------------------------------------------------------


def damage_middle(wal: Path, insert: bool) -> None:
    """Garbage in the middle of the log, overwriting or inserted (shifting the rest)."""
    data = wal.read_bytes()
    middle = len(data) // 2
    garbage = os.urandom(10_000)
    if insert:
        data = data[:middle] + garbage + data[middle:]
    else:
        data = data[:middle] + garbage + data[middle + len(garbage):]
    wal.write_bytes(data)


@pytest.mark.parametrize("insert", [False, True])
def test_damaged_log_middle_is_refused_then_accepted_in_a_new_epoch(
    tmp_path: Path, insert: bool
) -> None:
    live = write_acknowledged(tmp_path / "live", 300)
    epoch = _epoch(tmp_path / "live")
    crash_copy(tmp_path / "live", tmp_path / "crash")
    live.abandon()
    wal = tmp_path / "crash" / f"{DB_NAME}-wal"
    assert scan_wal(wal).lost_commits == 0  # an intact log of a crash: nothing lost
    damage_middle(wal, insert)
    assert scan_wal(wal).lost_commits > 100

    refused = open_backend(tmp_path / "crash")
    with pytest.raises(DataLossError) as info:
        refused.open()
    refused.abandon()
    message = str(info.value)
    assert "\n" not in message
    assert "damaged before its end" in message and "committed transaction(s)" in message
    assert ACCEPT in message
    # nothing was touched: refusing again gives the same answer
    assert scan_wal(wal).lost_commits > 100

    accepted = open_backend(tmp_path / "crash", accept=True)
    loaded = accepted.open()
    accepted.close()
    assert loaded.epoch != epoch
    assert "committed data lost (accepted): new epoch" in loaded.notes
    survivors = [i for i, _, _ in loaded.topics[0].window]
    assert survivors == list(range(len(survivors))) and 0 < len(survivors) < 300
    # the lost transactions' intact pages still tell which indexes were handed out:
    # new sends continue above all of them (here every one, 0..299)
    assert loaded.topics[0].next_index == 300
    assert any(p.name.startswith(f"{DB_NAME}-wal.damaged-")
               for p in (tmp_path / "crash").iterdir())
    # accepted once: the next start is normal and keeps the new epoch
    again = open_backend(tmp_path / "crash")
    assert again.open().epoch == loaded.epoch
    again.close()


@pytest.mark.parametrize(("fsync", "refused"), [("everysec", False), ("always", True)])
def test_damaged_log_after_a_reboot_is_expected_without_fsync_always(
    tmp_path: Path, fsync: str, refused: bool
) -> None:
    # After a power loss with --fsync everysec/never the log's unsynced end may be lost:
    # the documented price of the policy, answered with a new epoch (no flag needed).
    # With always, every acknowledged send was synced: damage is lost data, refused.
    live = write_acknowledged(tmp_path / "live", 300, fsync)
    epoch = _epoch(tmp_path / "live")
    crash_copy(tmp_path / "live", tmp_path / "crash")
    live.abandon()
    run = (tmp_path / "live" / RUN_NAME).read_text()
    assert f"fsync={fsync}" in run
    # the machine rebooted: another boot id than this one
    (tmp_path / "crash" / RUN_NAME).write_text(
        "\n".join("boot_id=another-boot" if line.startswith("boot_id=") else line
                  for line in run.splitlines()) + "\n"
    )
    wal = tmp_path / "crash" / f"{DB_NAME}-wal"
    # in the middle of the frames in use (past them, the file may hold stale frames)
    frames = scan_wal(wal).committed_frames
    data = bytearray(wal.read_bytes())
    middle = 32 + (frames // 2) * (24 + 4096)
    data[middle:middle + 10_000] = os.urandom(10_000)
    wal.write_bytes(bytes(data))
    assert scan_wal(wal).lost_commits > 0
    backend = open_backend(tmp_path / "crash")
    if refused:
        with pytest.raises(DataLossError):
            backend.open()
        backend.abandon()
        return
    loaded = backend.open()
    backend.close()
    assert loaded.epoch != epoch
    assert loaded.topics[0].next_index == 300  # no index handed out again


def _epoch(directory: Path) -> str:
    conn = sqlite3.connect(directory / DB_NAME)
    try:
        (epoch,) = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
    finally:
        conn.close()
    return str(epoch)


def test_damaged_log_header_is_data_loss(tmp_path: Path) -> None:
    """A damaged header makes SQLite ignore the whole log (every commit in it)."""
    live = write_acknowledged(tmp_path / "live", 50)
    crash_copy(tmp_path / "live", tmp_path / "crash")
    live.abandon()
    wal = tmp_path / "crash" / f"{DB_NAME}-wal"
    data = bytearray(wal.read_bytes())
    data[8:16] = b"\xff" * 8  # page size and checkpoint sequence
    wal.write_bytes(bytes(data))
    assert scan_wal(wal).lost_commits >= 50
    with pytest.raises(DataLossError, match="damaged"):
        open_backend(tmp_path / "crash").open()


def test_torn_tail_is_not_data_loss(tmp_path: Path) -> None:
    """A crash cuts off at most the transaction being written: still only a warning."""
    live = write_acknowledged(tmp_path / "live", 30)
    crash_copy(tmp_path / "live", tmp_path / "crash")
    live.abandon()
    wal = tmp_path / "crash" / f"{DB_NAME}-wal"
    data = wal.read_bytes()
    wal.write_bytes(data[:-2000])  # the last frame half written
    report = scan_wal(wal)
    assert report.torn and report.lost_commits == 0
    assert indexes(tmp_path / "crash") == list(range(29))


def test_deleted_database_is_refused_then_accepted_in_a_new_epoch(tmp_path: Path) -> None:
    write_acknowledged(tmp_path, 20).close()
    epoch = _epoch(tmp_path)
    (tmp_path / DB_NAME).unlink()
    refused = open_backend(tmp_path)
    with pytest.raises(DataLossError, match=f"database file {DB_NAME} is missing.*{ACCEPT}"):
        refused.open()
    refused.abandon()
    assert not (tmp_path / DB_NAME).exists()  # refusing created nothing

    accepted = open_backend(tmp_path, accept=True)
    loaded = accepted.open()
    accepted.close()
    assert loaded.epoch != epoch and loaded.topics == []
    assert indexes(tmp_path) == []  # and the next start is normal


def test_replaced_database_is_refused(tmp_path: Path) -> None:
    write_acknowledged(tmp_path / "a", 5).close()
    write_acknowledged(tmp_path / "b", 2).close()
    shutil.copyfile(tmp_path / "b" / DB_NAME, tmp_path / "a" / DB_NAME)
    refused = open_backend(tmp_path / "a")
    with pytest.raises(DataLossError, match="was replaced"):
        refused.open()
    refused.abandon()


def test_corrupt_database_of_an_initialised_directory_is_refused(tmp_path: Path) -> None:
    write_acknowledged(tmp_path, 5).close()
    (tmp_path / DB_NAME).write_bytes(b"this is not a database" * 500)
    refused = open_backend(tmp_path)
    with pytest.raises(DataLossError, match="is corrupt"):
        refused.open()
    refused.abandon()
    accepted = open_backend(tmp_path, accept=True)
    assert accepted.open().topics == []
    accepted.close()


def test_directory_without_identity_file_gets_one(tmp_path: Path) -> None:
    """A directory from before the identity file (or one lost in a crash right after
    creating the database) is not data loss: the file is written."""
    write_acknowledged(tmp_path, 3).close()
    (tmp_path / ID_NAME).unlink()
    assert indexes(tmp_path) == [0, 1, 2]
    assert (tmp_path / ID_NAME).read_text().strip()
    (tmp_path / DB_NAME).unlink()
    with pytest.raises(DataLossError):
        open_backend(tmp_path).open()


async def test_open_durable_passes_accept_data_loss(tmp_path: Path) -> None:
    write_acknowledged(tmp_path, 3).close()
    (tmp_path / DB_NAME).unlink()
    with pytest.raises(DataLossError):
        async with open_durable(tmp_path, cache_size=10):
            pass  # pragma: no cover
    async with open_durable(tmp_path, cache_size=10, accept_data_loss=True) as durable:
        assert durable.history is not None


async def test_server_refuses_with_one_line_and_accepts_with_the_flag(tmp_path: Path) -> None:
    """The real command line: exit 1 with one line naming the loss and the flag."""
    write_acknowledged(tmp_path, 3).close()
    (tmp_path / DB_NAME).unlink()
    result = await trio.run_process(
        [sys.executable, "-m", "mq_trio", "serve", "--port", "0", "--data-dir",
         str(tmp_path)],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert lines[-1].startswith("mq-trio: data directory")
    assert "is missing" in lines[-1] and ACCEPT in lines[-1]


# --- a full disk (point 9) --------------------------------------------------------------
#
# A full volume cannot be made without privileges (tmpfs, loop devices), so the server
# runs under RLIMIT_FSIZE, with SIGXFSZ ignored: no file of the process can grow past
# the limit, the write fails (EFBIG; SQLite reports an I/O error or "database or disk is
# full" for a short write), exactly where a full disk would stop it. The limit is set at
# the size of the write-ahead log a crash left, so SQLite can read everything and write
# nothing new; prlimit() on the child lifts it, as freeing space would.


def limit_file_size(limit: int) -> None:  # pragma: no cover - runs in the child
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited by exec
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


async def start_server(
    data_dir: Path, limit: int | None = None, *args: str
) -> tuple[trio.Process, int, list[str]]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mq_trio", "serve", "--port", "0", "--data-dir",
         str(data_dir), "--fsync", "always", "--cache-size", "10000", *args],
        stderr=subprocess.PIPE,
        preexec_fn=None if limit is None else lambda: limit_file_size(limit),
    )
    assert process.stderr is not None
    lines: list[str] = []
    buffer = b""
    with trio.fail_after(TEST_GUARD_SECONDS):  # a guard against a hang, not a timing
        while True:
            data = await process.stderr.receive_some()
            if not data:
                raise AssertionError("server exited: " + "".join(lines))
            buffer += data
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                lines.append(line.decode())
                m = re.search(r"listening on 127\.0\.0\.1:(\d+) \(tcp\)", lines[-1])
                if m:
                    return process, int(m.group(1)), lines


async def test_starts_on_a_full_disk_and_recovers_when_space_comes_back(
    tmp_path: Path,
) -> None:
    import resource

    write_acknowledged(tmp_path / "live", 500).close()  # all in the database file
    live = open_backend(tmp_path / "live")
    live.open()
    for i in range(500, 600):  # in the log only, and in new pages of the database
        assert live.apply([Record(i + 1, 1, i, False, payload(i))], sync=True).error is None
    crash_copy(tmp_path / "live", tmp_path / "full")
    live.abandon()
    # Nothing may grow: not the log (no new transaction), not the database (no
    # checkpoint of the log's new pages); the shared-memory index (32 KiB) fits.
    limit = (tmp_path / "full" / DB_NAME).stat().st_size
    assert (tmp_path / "full" / f"{DB_NAME}-wal").stat().st_size > limit > 1 << 15

    process, port, lines = await start_server(tmp_path / "full", limit)
    try:
        assert any("cannot write to the store at startup" in line for line in lines)
        assert any("recovered 600 cached message(s)" in line for line in lines)
        client = await LineClient.connect(port)
        # what is there is served; a send fails like any storage failure
        assert [m["index"] for m in await replay(client, "t")] == list(range(600))
        pub = await LineClient.connect(port)
        message = {"command": "send", "topic": "t", "msg": "after", "delivery": "all"}
        assert await pub.request(message) == {"success": False,
                                               "reason": "Storage unavailable"}
        # space comes back: the next send succeeds, no restart needed
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert await pub.request(message) == {"success": True}
        assert (await client.receive())["index"] == 601  # 600 was the failed send's
    finally:
        process.terminate()
        with trio.fail_after(TEST_GUARD_SECONDS):
            await process.wait()
    assert process.returncode == 0
    assert indexes(tmp_path / "full")[-3:] == [598, 599, 601]


async def test_server_killed_log_damaged_refused_then_new_epoch_and_higher_indexes(
    tmp_path: Path,
) -> None:
    """The issue's case end to end: acknowledged sends (--fsync always), SIGKILL,
    garbage in the middle of the log; refused; accepted: a new epoch, and new sends
    get indexes above every acknowledged one."""
    process, port, _ = await start_server(tmp_path)
    pub = await LineClient.connect(port)
    sub = await LineClient.connect(port)
    reply = await sub.request({"command": "subscribe", "topic": "t", "epoch": ""})
    epoch = reply["epoch"]
    message = {"command": "send", "topic": "t", "msg": "m", "delivery": "all"}
    for _ in range(300):
        assert await pub.request(message) == {"success": True}
    process.kill()
    with trio.fail_after(TEST_GUARD_SECONDS):
        await process.wait()
    damage_middle(tmp_path / f"{DB_NAME}-wal", insert=False)

    result = await trio.run_process(
        [sys.executable, "-m", "mq_trio", "serve", "--port", "0", "--data-dir",
         str(tmp_path)], capture_stderr=True, check=False,
    )
    assert result.returncode == 1
    last = result.stderr.decode().splitlines()[-1]
    assert "lost committed data" in last and "damaged before its end" in last
    assert ACCEPT in last

    process, port, lines = await start_server(tmp_path, None, ACCEPT)
    try:
        sub = await LineClient.connect(port)
        reply = await sub.request(
            {"command": "subscribe", "topic": "t", "last_seen": 299, "epoch": epoch}
        )
        assert reply["epoch"] != epoch and reply["recovered"] is False
        pub = await LineClient.connect(port)
        assert await pub.request(message) == {"success": True}
        assert (await sub.receive())["index"] == 300
    finally:
        process.terminate()
        with trio.fail_after(TEST_GUARD_SECONDS):
            await process.wait()
