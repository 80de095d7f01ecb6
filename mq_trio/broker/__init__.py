"""The topic supervisor and the history seam behind it.

:class:`Broker` is the one place the semantics of docs/protocol.md are written (index,
cache, ``one``, replay, epoch); a history (memory, SQLite, ...) is one implementation of
:class:`TopicHistory` and nothing more.
"""

from ._broker import Broker, Subscriber, send_reply
from ._dedupe import DEFAULT_MAX_IDS
from ._history import (
    COMMIT_BUCKETS,
    Answer,
    CachedMessage,
    Deferred,
    EpochReply,
    Held,
    HistoryStats,
    Item,
    Recorded,
    SendBatch,
    StoredId,
    StoredJob,
    Ticket,
    TooManyTopics,
    TopicHistory,
    TopicInfo,
    epoch_reply,
    new_epoch,
    nothing_lost,
)
from ._jobs import DEAD_PREFIX, QueueFull, QueueInfo
from ._memory import DEFAULT_CACHE_SIZE, MemoryHistory
from ._shared import (
    PENDING_COST,
    AfterJoin,
    FrameSink,
    Gate,
    Join,
    JoinResult,
    SharedHistory,
    SharedTopics,
    SharedWrite,
)

__all__ = [
    "PENDING_COST",
    "AfterJoin",
    "FrameSink",
    "Gate",
    "Join",
    "JoinResult",
    "SharedHistory",
    "SharedTopics",
    "SharedWrite",
    "DEFAULT_MAX_IDS",
    "COMMIT_BUCKETS",
    "DEAD_PREFIX",
    "DEFAULT_CACHE_SIZE",
    "Answer",
    "Broker",
    "CachedMessage",
    "Deferred",
    "EpochReply",
    "Held",
    "HistoryStats",
    "Item",
    "MemoryHistory",
    "QueueFull",
    "QueueInfo",
    "Recorded",
    "SendBatch",
    "StoredId",
    "StoredJob",
    "Ticket",
    "TooManyTopics",
    "TopicHistory",
    "TopicInfo",
    "Subscriber",
    "epoch_reply",
    "new_epoch",
    "nothing_lost",
    "send_reply",
]
