"""Durable topics: a SQLite history behind the broker (``--data-dir``)."""

from ._store import (
    DB_NAME,
    DEFAULT_FSYNC,
    DEFAULT_MEMORY_WINDOW,
    FSYNC_POLICIES,
    STORAGE_UNAVAILABLE,
    FsyncPolicy,
    StoreError,
    find_store_error,
    open_durable,
)

__all__ = [
    "DB_NAME",
    "DEFAULT_FSYNC",
    "DEFAULT_MEMORY_WINDOW",
    "FSYNC_POLICIES",
    "STORAGE_UNAVAILABLE",
    "FsyncPolicy",
    "StoreError",
    "find_store_error",
    "open_durable",
]
