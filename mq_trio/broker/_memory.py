"""The in-memory history: a bounded deque and a counter per topic."""

from __future__ import annotations

from collections import deque
from typing import Any, cast

import attrs

from ..protocol import Send, encode_delivery, splice_index
from ._history import CachedMessage, Item, new_epoch, nothing_lost

DEFAULT_CACHE_SIZE = 100
DEFAULT_MAX_CACHE_BYTES = 1 << 30
#: What a cached message costs besides its data, counted against ``max_cache_bytes``:
#: its entry tuple (72), the index (28), the data's bytes header (33), its deque slot (8)
#: and its two slots in the global order (16); tracemalloc, 64-bit CPython 3.11.
ENTRY_OVERHEAD = 160


#: A cached message in memory: (index, one, data, encoded). ``data`` is the delivery when
#: ``encoded``, else the command as received (``Send.raw``), not yet spliced: a message
#: is encoded only when first replayed, so one that is evicted unread (the common case
#: under load) never is. Splicing measured 0.17 of 0.46 us per cached publish. A tuple:
#: an attrs instance per cached message cost another 0.13 us.
Entry = tuple[int, bool, bytes, bool]


#: The cache of a topic that never had a message cached: an empty tuple, as a deque
#: (``record`` makes the deque when its ``append`` fails; everything else only reads).
NO_CACHE: deque[Entry] = cast("deque[Entry]", ())


@attrs.define(slots=True, eq=False)
class TopicLog:
    """One topic's history in memory: all of it in one object, so one dict lookup."""

    #: ``NO_CACHE`` until the topic's first cached message: an empty deque is about
    #: 600 bytes, most of what a topic would cost (``--max-topics``).
    cache: deque[Entry]
    next_index: int = 0
    #: The highest index evicted (cache size or ``max_cache_bytes``; for the epoch
    #: extension's ``recovered``); -1: none.
    evicted: int = -1


@attrs.define
class MemoryHistory:
    """In-memory history: a bounded deque and a counter per topic, and a bound on the
    bytes cached across all topics (``max_cache_bytes``): beyond it the oldest cached
    messages, whichever their topics, are evicted (and count as evicted for the epoch
    extension's ``recovered``, like the cache-size rule's).

    The bytes counted are each entry's data (``len``) plus ``ENTRY_OVERHEAD``; the data
    is the command as received until first replayed, the delivery after (``replay`` adds
    the difference, and evicts too if that goes beyond the bound: the oldest may be what
    it just sent). The global
    order is a deque, (topic log, index) per cached message in the order recorded; an
    element whose message already left (cache-size rule, a replayed "one") is skipped
    when met, and the deque is compacted when twice as long as after the last compaction
    (an element dropped by the cache-size rule is usually the first: dropped at once).
    Topics are never forgotten (an index is never reused within an epoch): only cached
    messages are evicted, never a topic's ``next_index``.
    """

    cache_size: int = DEFAULT_CACHE_SIZE
    _topics: dict[str, TopicLog] = attrs.field(factory=dict)
    #: A new one per process: memory does not outlive it.
    epoch: str = attrs.field(factory=new_epoch, kw_only=True)
    #: Bytes of cached messages across all topics; beyond it the oldest are evicted.
    max_cache_bytes: int = attrs.field(default=DEFAULT_MAX_CACHE_BYTES, kw_only=True)
    #: Bytes of the cached messages now (all topics), ``ENTRY_OVERHEAD`` included.
    cached_bytes: int = attrs.field(default=0, init=False)
    #: The order the cached messages were recorded in: each one's log, then its index
    #: (one deque, two appends: cheaper than a tuple, or two deques).
    _order: deque[Any] = attrs.field(factory=deque, init=False)
    #: Compact the order when it is longer (doubles with what compaction keeps).
    _compact_at: int = attrs.field(default=2048, init=False)

    def record(self, topic: str, send: Send, one: bool, cached: bool) -> int:
        try:
            log = self._topics[topic]  # a subscript measured cheaper than .get
        except KeyError:
            log = self._topics[topic] = TopicLog(NO_CACHE)
        index = log.next_index
        log.next_index = index + 1
        if cached:
            cache = log.cache
            size = self.cached_bytes
            order = self._order
            if len(cache) == self.cache_size:
                if not cache:  # cache size 0: nothing is kept
                    log.evicted = index
                    return index
                oldest = cache[0]  # the deque drops it on append
                dropped = log.evicted = oldest[0]
                size -= len(oldest[2])  # (its ENTRY_OVERHEAD is the new one's)
                # Its element in the order is now stale; usually the first (one busy
                # topic): dropped at once, else by compaction.
                if order[0] is log and order[1] == dropped:
                    order.popleft()
                    order.popleft()
                elif len(order) > self._compact_at:
                    self._compact()
                    order = self._order
            else:
                size += ENTRY_OVERHEAD
            raw = send.raw
            if raw:
                entry = (index, one, raw, False)
            else:  # built in code, not received: encode now (no raw to splice later)
                raw = encode_delivery(send, index)
                entry = (index, one, raw, True)
            try:
                cache.append(entry)
            except AttributeError:  # NO_CACHE: the topic's first cached message
                log.cache = deque((entry,), maxlen=self.cache_size)
            order.append(log)
            order.append(index)
            size += len(raw)
            self.cached_bytes = size
            if size > self.max_cache_bytes:
                self._evict_oldest()
        return index

    @property
    def cached_count(self) -> int:
        """Cached messages now (all topics)."""
        return sum(len(log.cache) for log in self._topics.values())

    def _evict_oldest(self) -> None:
        """Evict the oldest cached messages (all topics) until within ``max_cache_bytes``."""
        order = self._order
        limit = self.max_cache_bytes
        while self.cached_bytes > limit:
            log: TopicLog = order.popleft()
            index: int = order.popleft()
            cache = log.cache
            # Every message of the log older than ``index`` has left already (its own
            # element came first), so this one is at the head, or gone.
            if cache and cache[0][0] == index:
                entry = cache.popleft()
                log.evicted = index
                self.cached_bytes -= len(entry[2]) + ENTRY_OVERHEAD

    def _compact(self) -> None:
        """Drop the order's elements whose messages have left (O(elements), amortized)."""
        live: dict[int, set[int]] = {}
        order: deque[Any] = deque()
        old = iter(self._order)
        for log in old:
            index = next(old)
            kept = live.get(id(log))
            if kept is None:
                kept = live[id(log)] = {entry[0] for entry in log.cache}
            if index in kept:
                order.append(log)
                order.append(index)
        self._order = order
        self._compact_at = max(2048, 2 * len(order))

    def replay(self, topic: str, last_seen: int) -> list[Item]:
        log = self._topics.get(topic)
        if log is None or not log.cache:
            return []
        sent: list[Item] = []
        # Rebuilt in one pass (as cheap as the copy that replay makes anyway): what is
        # sent stays encoded, so later replays share the bytes; "one" messages leave.
        kept: deque[Entry] = deque(maxlen=self.cache_size)
        grown = 0  # bytes added by encoding, less those of the "one" messages that left
        removed = False
        for entry in log.cache:
            index, one, data, encoded = entry
            if index > last_seen:
                if not encoded:
                    spliced = splice_index(data, index)
                    grown += len(spliced) - len(data)
                    data = spliced
                    entry = (index, one, data, True)
                sent.append(data)
                if one:
                    grown -= len(data) + ENTRY_OVERHEAD
                    removed = True
                    continue
            kept.append(entry)
        log.cache = kept
        self.cached_bytes += grown
        if removed and len(self._order) > self._compact_at:
            self._compact()
        if self.cached_bytes > self.max_cache_bytes:  # encoding grew them: evict as usual
            self._evict_oldest()
        return sent

    def recovered(self, topic: str, last_seen: int) -> bool:
        log = self._topics.get(topic)
        if log is None:
            return last_seen <= -1
        return nothing_lost(log.evicted, log.next_index, last_seen)

    def cached(self, topic: str) -> list[CachedMessage]:
        """The topic's cache, for inspection and tests."""
        log = self._topics.get(topic)
        if log is None:
            return []
        return [
            CachedMessage(index, one, data if encoded else splice_index(data, index))
            for index, one, data, encoded in log.cache
        ]

    def has(self, topic: str) -> bool:
        return topic in self._topics

    def topic_count(self) -> int:
        return len(self._topics)
