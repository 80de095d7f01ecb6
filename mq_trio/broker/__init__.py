"""The topic supervisor and the history seam behind it.

:class:`Broker` is the one place the semantics of docs/protocol.md section 4 are written
(index, cache, ``one``, replay, epoch); a history (memory, SQLite, ...) is one
implementation of :class:`TopicHistory`.
"""

from ._broker import (
    DEFAULT_CACHE_SIZE,
    Broker,
    CachedMessage,
    MemoryHistory,
    Subscriber,
    TopicHistory,
    new_epoch,
    nothing_lost,
)

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "Broker",
    "CachedMessage",
    "MemoryHistory",
    "Subscriber",
    "TopicHistory",
    "new_epoch",
    "nothing_lost",
]
