"""Opening a data directory: recover, run the flusher, close cleanly."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from ._flusher import Store
from ._history import DurableHistory
from ._ops import DEFAULT_FSYNC, DEFAULT_MEMORY_WINDOW, FsyncPolicy
from ._sqlite import SqliteBackend

log = logging.getLogger("mq_trio.store")


@attrs.define(eq=False)
class Durable:
    """What ``serve`` needs from an open data directory."""

    store: Store
    history: DurableHistory


@asynccontextmanager
async def open_durable(
    data_dir: str | os.PathLike[str],
    *,
    cache_size: int,
    fsync: FsyncPolicy = DEFAULT_FSYNC,
    memory_window: int = DEFAULT_MEMORY_WINDOW,
    max_cache_bytes: int = 1 << 30,
    accept_data_loss: bool = False,
) -> AsyncIterator[Durable]:
    """Open (or create) the data directory, recover, run the flusher, close cleanly.

    Raises :class:`StoreError` when the directory cannot be used, and its subclass
    :class:`DataLossError` when committed data is gone (a database file missing,
    replaced or corrupt, a write-ahead log damaged in the middle) unless
    ``accept_data_loss``: then it starts with what is left, in a new epoch.
    """
    directory = Path(data_dir)
    backend = SqliteBackend(directory, fsync, cache_size, memory_window, accept_data_loss)
    started = time.perf_counter()
    try:
        loaded = await trio.to_thread.run_sync(backend.open)
    except BaseException:
        backend.abandon()
        raise
    took = time.perf_counter() - started
    store = Store(backend, fsync)
    if loaded.write_error is not None:
        # Started on a full (or failing) disk: sends fail until a batch commits.
        store.available = False
    history = DurableHistory(store, cache_size, memory_window,
                             max_cache_bytes=max_cache_bytes)
    history.load(loaded)
    store.on_result = history.on_result
    store.on_take = history.take
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
                yield Durable(store, history)
            finally:
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + 30
                    await store.aclose()
                nursery.cancel_scope.cancel()
    except BaseException:
        backend.abandon()
        raise
