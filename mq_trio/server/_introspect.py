"""The JSON views of the HTTP port: ``/stats``, ``/connections``, ``/topics``.

Everything runs on the trio thread, on copies of the live structures, in slices with a
checkpoint between them, so that a request over a million topics or twenty thousand
connections never holds the event loop for more than a few milliseconds
(docs/benchmarks.md, "HTTP endpoints: event-loop stall"):

* sorting: one ``sorted`` call over a million names is half a second, so long lists are
  sorted in runs of :data:`SORT_RUN` items and merged lazily (:func:`sort_in_slices`);
* the topic names: copying the history's million keys at once is 10-25 ms, so they are
  read through an iterator a slice at a time (:func:`copy_in_slices`), and the sorted
  list is kept for :data:`TOPICS_TTL` seconds (:class:`TopicNames`): ``/topics`` then
  finds a prefix by bisection. Up to :data:`EXACT_TOPICS` topics the list is read fresh
  on every request.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import json
import math
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

from .. import __version__
from ..broker import QueueInfo
from ._metrics import count_traffic

if TYPE_CHECKING:
    from _typeshed import SupportsRichComparison

    from ._connection import Connection
    from ._server import Server

T = TypeVar("T")
S = TypeVar("S", bound="SupportsRichComparison")

#: Items per ``sorted`` call (a few tenths of a millisecond for strings).
SORT_RUN = 2000
#: Items taken from the merge of the sorted runs per slice (``heapq.merge`` is Python
#: code: under a microsecond per item).
MERGE_SLICE = 1000
#: Topic names copied per slice (a fraction of a millisecond), and names or connections
#: looked at per slice (a subscriber count or a sort key each).
COPY_SLICE = 20_000
SCAN_SLICE = 2000
#: Connections looked at per slice (a connection's first ``peer`` is a system call).
CONNECTION_SLICE = 500
#: References dropped per slice when a big list is emptied (:func:`release`).
RELEASE_SLICE = 50_000
#: Rows rendered, or encoded as JSON, per slice (``topic_info`` sums a topic's cache).
ROWS_PER_SLICE = 100
#: Page sizes: the default, and the most one request may ask for.
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: Up to this many topics, ``/topics`` sorts them fresh per request (a couple of ms).
EXACT_TOPICS = 10_000
#: Beyond it, the sorted name list is reused for this many seconds.
TOPICS_TTL = 2.0
#: A copy through a live iterator restarts when the topics change meanwhile; after this
#: many tries it copies at once (one pause of ~10 ms per million topics).
COPY_TRIES = 3


class QueryError(ValueError):
    """A bad query string value: the client gets 400 with this text."""


def iso_time(timestamp: float) -> str:
    """``2026-12-03T16:08:00.123Z``: UTC, milliseconds."""
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- query strings ---------------------------------------------------------------------


def _int(query: Mapping[str, str], key: str, default: int) -> int:
    text = query.get(key)
    if text is None or text == "":
        return default
    if not text.isdigit() or len(text) > 18:
        raise QueryError(f"{key} must be a non-negative integer, not {text!r}")
    return int(text)


@attrs.frozen
class Page:
    """``offset``, ``limit`` (capped at :data:`MAX_LIMIT`), ``sort`` and ``order``."""

    offset: int
    limit: int
    sort: str
    descending: bool

    @classmethod
    def parse(cls, query: Mapping[str, str], sorts: Mapping[str, bool], default: str) -> Page:
        """``sorts`` maps each sort key to whether it goes descending by default."""
        offset = _int(query, "offset", 0)
        limit = min(_int(query, "limit", DEFAULT_LIMIT), MAX_LIMIT)
        sort = query.get("sort") or default
        if sort not in sorts:
            raise QueryError(f"sort must be one of {', '.join(sorts)}, not {sort!r}")
        order = query.get("order") or ("desc" if sorts[sort] else "asc")
        if order not in ("asc", "desc"):
            raise QueryError(f"order must be asc or desc, not {order!r}")
        return cls(offset, limit, sort, order == "desc")

    def head(self, total: int) -> dict[str, Any]:
        return {"total": total, "offset": self.offset, "limit": self.limit,
                "sort": self.sort, "order": "desc" if self.descending else "asc"}


# --- slicing helpers ---------------------------------------------------------------------


async def sort_in_slices(items: list[S], reverse: bool = False) -> list[S]:
    """``sorted(items, reverse=reverse)`` without one long pause: runs of
    :data:`SORT_RUN` sorted by ``sorted``, then merged a slice at a time. Items should
    be unique (equal ones may come out in any order)."""
    if len(items) <= SORT_RUN:
        return sorted(items, reverse=reverse)
    runs = []
    for start in range(0, len(items), SORT_RUN):
        runs.append(sorted(items[start:start + SORT_RUN], reverse=reverse))
        await trio.lowlevel.checkpoint()
    merged = heapq.merge(*runs, reverse=reverse)
    result: list[S] = []
    while part := list(itertools.islice(merged, MERGE_SLICE)):
        result.extend(part)
        await trio.lowlevel.checkpoint()
    per_slice = max(1, RELEASE_SLICE // SORT_RUN)
    for start in range(0, len(runs), per_slice):
        for run in runs[start:start + per_slice]:
            run.clear()
        await trio.lowlevel.checkpoint()
    return result


async def release(items: list[Any]) -> None:
    """Empty a big list a slice at a time: dropping a million references at once (what
    a list going out of scope does) is milliseconds in one step."""
    while items:
        del items[-RELEASE_SLICE:]
        await trio.lowlevel.checkpoint()


async def copy_in_slices(live: Collection[str]) -> list[str]:
    """A copy of a live collection (the history's topic keys), read :data:`COPY_SLICE`
    at a time. A dict's iterator raises if the dict changes size between two slices;
    the copy then starts over, and after :data:`COPY_TRIES` it is made at once."""
    for _ in range(COPY_TRIES):
        if len(live) <= COPY_SLICE:
            break
        copy: list[str] = []
        source = iter(live)
        try:
            while part := list(itertools.islice(source, COPY_SLICE)):
                copy.extend(part)
                await trio.lowlevel.checkpoint()
        except RuntimeError:  # changed size during iteration
            continue
        return copy
    return list(live)


@attrs.define(eq=False)
class TopicNames:
    """The sorted topic names, shared by the requests of one HTTP port."""

    names: list[str] = attrs.Factory(list)
    built: float = -math.inf
    _lock: trio.Lock = attrs.Factory(trio.Lock)

    async def sorted_names(self, server: Server) -> list[str]:
        broker = server.broker
        if broker.topic_count() <= EXACT_TOPICS:
            return sorted(broker.topic_names())
        async with self._lock:  # one rebuild at a time; the others wait and reuse it
            if trio.current_time() - self.built > TOPICS_TTL:
                names = await copy_in_slices(broker.history.topic_names())
                # Subscribed topics without history: few, and not in the history's keys.
                names.extend(broker.subscribed_only_topics())
                old, self.names = self.names, await sort_in_slices(names)
                self.built = trio.current_time()
                await release(names)
                # The previous list, unless a request still pages through it (then it
                # goes, all at once, with that request).
                if sys.getrefcount(old) <= 2:  # this frame's name and the argument
                    await release(old)
            return self.names


async def encode_page(view: dict[str, Any], rows_key: str) -> bytes:
    """``view`` as compact JSON (and a newline), its rows encoded a slice at a time: a
    thousand rows in one ``json.dumps`` are a few milliseconds."""
    rows = view[rows_key]
    head = json.dumps({k: v for k, v in view.items() if k != rows_key}, separators=_COMPACT)
    parts = []
    for start in range(0, len(rows), ROWS_PER_SLICE):
        if start:
            await trio.lowlevel.checkpoint()
        parts.append(",".join(json.dumps(row, separators=_COMPACT)
                              for row in rows[start:start + ROWS_PER_SLICE]))
    rows_text = ",".join(parts)
    return f'{head[:-1]},"{rows_key}":[{rows_text}]}}\n'.encode()


_COMPACT = (",", ":")


# --- /stats ------------------------------------------------------------------------------


async def stats_view(server: Server) -> dict[str, Any]:
    """Like NATS' ``/varz``: totals, limits and the store (docs/operations.md)."""
    traffic = await count_traffic(server)
    stats = server.stats
    broker = server.broker
    history = broker.history.stats()
    config = server.config
    store = None
    if config.data_dir is not None:
        store = {"available": history.available, "commits": history.commits,
                 "failed_commits": history.failed_commits, "fsync": config.fsync}
    now = datetime.now(timezone.utc).timestamp()
    return {
        "version": __version__,
        "started": iso_time(stats.started),
        "uptime_seconds": round(max(0.0, now - stats.started), 3),
        "connections": traffic.connections,
        "connections_total": stats.connections_total,
        "refused": stats.refused,
        "max_connections": config.max_connections,
        "subscriptions": traffic.subscriptions,
        "topics": broker.topic_count(),
        "messages_in": traffic.messages_in,
        "bytes_in": traffic.bytes_in,
        "messages_out": traffic.messages_out,
        "bytes_out": traffic.bytes_out,
        "deliveries": broker.delivered,
        "slow_consumers": stats.slow_consumers,
        "failures": dict(sorted(stats.failures.items())),
        "store": store,
        "cached_bytes": history.cached_bytes,
        "jobs": jobs_stats(server),
        "config": {
            "cache_size": config.cache_size,
            "max_pending_bytes": config.max_pending_bytes,
            "max_line_bytes": config.max_line_bytes,
            "max_topics": config.max_topics,
            "max_connections": config.max_connections,
            "max_input_bytes": config.max_input_bytes,
            "max_cache_bytes": config.max_cache_bytes,
            "line_timeout": config.line_timeout,
            "shutdown_grace": config.shutdown_grace,
            "memory_window": config.memory_window if config.data_dir is not None else None,
            "ack_timeout": config.ack_timeout,
            "max_deliveries": config.max_deliveries,
            "max_queue_jobs": config.max_queue_jobs,
            "max_job_bytes": config.max_job_bytes,
            "dedupe_window": config.dedupe_window,
            "tls": server.ssl_context is not None,
            "auth": server.authenticator is not None,
        },
    }


# --- /connections ------------------------------------------------------------------------

#: Sort keys of ``/connections``, and whether each goes descending by default.
CONNECTION_SORTS = {"pending": True, "messages_in": True, "bytes_in": True,
                    "messages_out": True, "bytes_out": True, "subscriptions": True,
                    "since": False, "peer": False}


def _connection_key(server: Server, sort: str) -> Callable[[Connection], Any]:
    count = server.broker.subscription_count
    keys: dict[str, Callable[[Connection], Any]] = {
        "pending": lambda c: c.outbox.pending,
        "messages_in": lambda c: c.lines_in,
        "bytes_in": lambda c: c.bytes_in,
        "messages_out": lambda c: c.outbox.sent,
        "bytes_out": lambda c: c.outbox.sent_bytes,
        "subscriptions": lambda c: count(c.outbox),
        "since": lambda c: c.since,
        "peer": lambda c: c.peer,
    }
    return keys[sort]


def connection_row(server: Server, conn: Connection) -> dict[str, Any]:
    outbox = conn.outbox
    grant = conn.grant
    return {
        "peer": conn.peer,
        "transport": "websocket" if type(conn.transport).__name__ == "WebSocketTransport"
        else "tcp",
        "tls": server.ssl_context is not None,
        "user": grant.identity if grant is not None else None,
        "since": iso_time(conn.since),
        "subscriptions": server.broker.subscription_count(outbox),
        "pending_bytes": outbox.pending,
        "messages_in": conn.lines_in,
        "bytes_in": conn.bytes_in,
        "messages_out": outbox.sent,
        "bytes_out": outbox.sent_bytes,
    }


async def connections_view(server: Server, query: Mapping[str, str]) -> dict[str, Any]:
    """Like NATS' ``/connz``: one page of the connections, sorted (default: the most
    output queued first, so a slow consumer shows up before it is cut off)."""
    page = Page.parse(query, CONNECTION_SORTS, "pending")
    conns = list(server.connections)
    key = _connection_key(server, page.sort)
    # (key, position): a unique sort key, so ties cost no comparison of connections
    keyed: list[tuple[Any, int]] = []
    step = CONNECTION_SLICE
    for start in range(0, len(conns), step):
        if start:
            await trio.lowlevel.checkpoint()
        keyed.extend((key(c), start + i) for i, c in enumerate(conns[start:start + step]))
    ordered = await sort_in_slices(keyed, reverse=page.descending)
    chosen = [conns[i] for _, i in ordered[page.offset:page.offset + page.limit]]
    rows = await _rows(chosen, lambda c: connection_row(server, c))
    return {**page.head(len(conns)), "connections": rows}


async def _rows(items: Iterable[T], row: Callable[[T], dict[str, Any] | None]
                ) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if i and i % ROWS_PER_SLICE == 0:
            await trio.lowlevel.checkpoint()
        made = row(item)
        if made is not None:
            rows.append(made)
    return rows


# --- /topics -----------------------------------------------------------------------------

TOPIC_SORTS = {"name": False, "subscribers": True}


def topic_row(server: Server, topic: str) -> dict[str, Any] | None:
    """One topic's row, read live (None: gone since the name list was made)."""
    broker = server.broker
    subscribers = broker.subscriber_count(topic)
    info = broker.history.topic_info(topic)
    if info is None:
        if subscribers == 0 and topic not in broker.jobs.queues:
            return None
        row = {"topic": topic, "subscribers": subscribers, "cached": 0,
               "cached_bytes": 0, "next_index": 0}
    else:
        row = {"topic": topic, "subscribers": subscribers, "cached": info.cached,
               "cached_bytes": info.cached_bytes, "next_index": info.next_index}
    if topic in broker.jobs.queues:  # a work queue: its jobs (docs/protocol.md)
        row["jobs"] = queue_row(broker.queue_info(topic))
    return row


def queue_row(info: QueueInfo) -> dict[str, int]:
    return {"waiting": info.waiting, "in_flight": info.in_flight, "delayed": info.delayed,
            "consumers": info.consumers, "bytes": info.bytes,
            "delivered": info.delivered_total, "redelivered": info.redelivered_total,
            "acked": info.acked_total, "dead_lettered": info.dead_lettered_total}


def jobs_stats(server: Server) -> dict[str, int]:
    """Work queues over all topics (``/stats``)."""
    jobs = server.broker.jobs
    return {"queues": len(jobs.queues), "jobs": jobs.total_jobs, "in_flight": jobs.in_flight,
            "bytes": jobs.total_bytes, "delivered": jobs.delivered_total,
            "redelivered": jobs.redelivered_total, "acked": jobs.acked_total,
            "dead_lettered": jobs.dead_lettered_total,
            "dead_letters_dropped": jobs.dead_letters_dropped,
            "message_ids": len(server.broker.dedupe)}


async def topics_view(
    server: Server, query: Mapping[str, str], names: TopicNames
) -> dict[str, Any]:
    """One page of the topics whose name starts with ``prefix``: by name (default), or
    by subscribers (most first). ``total`` counts the matching topics."""
    page = Page.parse(query, TOPIC_SORTS, "name")
    prefix = query.get("prefix", "")
    everything = await names.sorted_names(server)
    low = bisect.bisect_left(everything, prefix)
    high = _prefix_end(everything, prefix, low) if prefix else len(everything)
    total = high - low
    end = page.offset + page.limit
    if page.sort == "name":
        if page.descending:
            chosen = everything[max(low, high - end):max(low, high - page.offset)][::-1]
        else:
            chosen = everything[low + min(page.offset, total):low + min(end, total)]
    else:
        chosen = await _by_subscribers(server, everything, low, high, page)
    rows = await _rows(chosen, lambda t: topic_row(server, t))
    return {"total": total, "offset": page.offset, "limit": page.limit, "sort": page.sort,
            "order": "desc" if page.descending else "asc", "prefix": prefix, "topics": rows}


def _prefix_end(names: list[str], prefix: str, low: int) -> int:
    """The end of the run of ``names`` (sorted) that start with ``prefix``: cut to the
    prefix's length, the sorted names stay sorted."""
    size = len(prefix)
    return bisect.bisect_right(names, prefix, low, key=lambda name: name[:size])


async def _by_subscribers(
    server: Server, names: list[str], low: int, high: int, page: Page
) -> list[str]:
    """The page of ``names[low:high]`` ordered by subscriber count, ties by name. Most
    topics have no subscriber: only the others are sorted (in slices); the rest keep
    their name order after (or, ascending, before) them."""
    count = server.broker.subscriber_count
    subscribed: list[tuple[int, str]] = []
    unsubscribed: list[str] = []
    for start in range(low, high, SCAN_SLICE):
        if start > low:
            await trio.lowlevel.checkpoint()
        for name in names[start:min(high, start + SCAN_SLICE)]:
            n = count(name)
            if n:
                subscribed.append((-n, name) if page.descending else (n, name))
            else:
                unsubscribed.append(name)
    ordered = await sort_in_slices(subscribed)
    start, end = page.offset, page.offset + page.limit
    if page.descending:  # the subscribed ones first
        size = len(ordered)
        chosen = ([name for _, name in ordered[start:end]]
                  + unsubscribed[max(0, start - size):max(0, end - size)])
    else:
        size = len(unsubscribed)
        chosen = (unsubscribed[start:end]
                  + [name for _, name in ordered[max(0, start - size):max(0, end - size)]])
    await release(unsubscribed)
    await release(ordered)
    return chosen
