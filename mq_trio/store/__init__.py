"""Durable topics: a SQLite history behind the broker (``--data-dir``).

:class:`DurableHistory` is one implementation of :class:`~mq_trio.broker.TopicHistory`;
the broker and the connections do not know it is there.
"""

from ..protocol import STORAGE_UNAVAILABLE
from ._history import DiskReplay, DurableHistory
from ._open import Durable, open_durable
from ._ops import (
    DB_NAME,
    DEFAULT_FSYNC,
    DEFAULT_MEMORY_WINDOW,
    FSYNC_POLICIES,
    DataLossError,
    FsyncPolicy,
    StoreError,
    find_store_error,
)

__all__ = [
    "DB_NAME",
    "DEFAULT_FSYNC",
    "DEFAULT_MEMORY_WINDOW",
    "FSYNC_POLICIES",
    "STORAGE_UNAVAILABLE",
    "DiskReplay",
    "DataLossError",
    "Durable",
    "DurableHistory",
    "FsyncPolicy",
    "StoreError",
    "find_store_error",
    "open_durable",
]
