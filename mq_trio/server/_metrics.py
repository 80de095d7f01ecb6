"""``GET /metrics``: the server's counters in the Prometheus text format (0.0.4).

Plain string building (no ``prometheus_client``): the counters are plain integers kept
by the server (server/_stats.py), and a scrape only reads them. The one part that costs
more than O(1) is the traffic of the live connections, summed by :func:`count_traffic`
in slices with checkpoints between them; nothing here is O(topics).
"""

from __future__ import annotations

import platform
import time
from typing import TYPE_CHECKING

import attrs
import trio

from .. import __version__
from ..broker import COMMIT_BUCKETS

if TYPE_CHECKING:
    from ._server import Server

#: The exposition format this module writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Live connections read per slice (about a microsecond each), then other tasks run.
CONNECTIONS_PER_SLICE = 500
PREFIX = "mq_trio_"


@attrs.frozen
class Traffic:
    """Traffic totals since start: the closed connections' plus the live ones'."""

    connections: int
    subscriptions: int
    messages_in: int
    bytes_in: int
    messages_out: int
    bytes_out: int


async def count_traffic(server: Server) -> Traffic:
    """Sum the traffic over the live connections, a slice at a time.

    The closed connections' totals are read at the same instant as the snapshot of the
    live ones, so a connection that closes meanwhile is counted once (by its object, which
    keeps its counters), and a counter never goes down between two scrapes.
    """
    stats = server.stats
    conns = list(server.connections)
    lines_in = stats.closed_lines_in
    bytes_in = stats.closed_bytes_in
    messages_out = stats.closed_messages_out
    bytes_out = stats.closed_bytes_out
    subscriptions = 0
    subscription_count = server.broker.subscription_count
    for start in range(0, len(conns), CONNECTIONS_PER_SLICE):
        if start:
            await trio.lowlevel.checkpoint()
        for conn in conns[start:start + CONNECTIONS_PER_SLICE]:
            outbox = conn.outbox
            lines_in += conn.lines_in
            bytes_in += conn.bytes_in
            messages_out += outbox.sent
            bytes_out += outbox.sent_bytes
            subscriptions += subscription_count(outbox)
    return Traffic(len(conns), subscriptions, lines_in, bytes_in, messages_out, bytes_out)


def escape_label(value: str) -> str:
    """A label value as the text format wants it: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class _Writer:
    """The lines of one exposition: a HELP and a TYPE line before each metric's samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str,
               value: float | None = None) -> str:
        full = PREFIX + name
        self.lines.append(f"# HELP {full} {help_text}")
        self.lines.append(f"# TYPE {full} {kind}")
        if value is not None:
            self.lines.append(f"{full} {_number(value)}")
        return full

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        text = ",".join(f'{key}="{escape_label(val)}"' for key, val in labels.items())
        self.lines.append(f"{name}{{{text}}} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(server: Server, traffic: Traffic) -> str:
    """The exposition: every metric, with HELP and TYPE (docs/operations.md, "Metrics")."""
    stats = server.stats
    broker = server.broker
    history = broker.history.stats()
    out = _Writer()
    out.metric("connections", "gauge", "Clients connected now (TCP and WebSocket).",
               traffic.connections)
    out.metric("connections_total", "counter", "Clients served since start.",
               stats.connections_total)
    out.metric("connections_refused_total", "counter",
               "Clients refused with 'Too many connections'.", stats.refused)
    out.metric("max_connections", "gauge", "The --max-connections limit.",
               server.config.max_connections)
    out.metric("subscriptions", "gauge", "Subscriptions of the connected clients.",
               traffic.subscriptions)
    out.metric("topics", "gauge", "Topics with state (history or subscribers).",
               broker.topic_count())
    out.metric("messages_in_total", "counter", "Command lines received.", traffic.messages_in)
    out.metric("bytes_in_total", "counter", "Bytes received from clients.", traffic.bytes_in)
    out.metric("messages_out_total", "counter", "Replies and deliveries written to clients.",
               traffic.messages_out)
    out.metric("bytes_out_total", "counter", "Bytes written to clients.", traffic.bytes_out)
    out.metric("deliveries_total", "counter",
               "Messages handed to subscribers (replays not included).", broker.delivered)
    out.metric("slow_consumers_total", "counter",
               "Subscribers disconnected for exceeding --max-pending-bytes.",
               stats.slow_consumers)
    name = out.metric("failures_total", "counter", "Failure replies sent, by reason.")
    for reason in sorted(stats.failures):
        out.sample(name, {"reason": reason}, stats.failures[reason])
    out.metric("tls_handshake_failures_total", "counter",
               "TLS handshakes that failed or timed out.", server.tls_failures)
    out.metric("store_available", "gauge",
               "1 while the history can write (always 1 in memory mode).",
               int(history.available))
    out.metric("store_commits_total", "counter", "Store batches committed (0 in memory mode).",
               history.commits)
    out.metric("store_commit_failures_total", "counter", "Store batches that failed.",
               history.failed_commits)
    name = out.metric("store_commit_seconds", "histogram",
                      "Time to commit a store batch (no samples in memory mode).")
    buckets = history.commit_buckets or (0,) * len(COMMIT_BUCKETS)
    for bound, count in zip(COMMIT_BUCKETS, buckets, strict=False):
        out.sample(f"{name}_bucket", {"le": repr(bound)}, count)
    out.sample(f"{name}_bucket", {"le": "+Inf"}, history.commits)
    out.lines.append(f"{name}_sum {_number(float(history.commit_seconds))}")
    out.lines.append(f"{name}_count {history.commits}")
    out.metric("cached_bytes", "gauge", "Bytes of cached messages held in memory.",
               history.cached_bytes)
    jobs = broker.jobs
    out.metric("jobs", "gauge", "Jobs held: waiting, delayed or in flight (all topics).",
               jobs.total_jobs)
    out.metric("jobs_in_flight", "gauge", "Jobs delivered and not yet acknowledged.",
               jobs.in_flight)
    out.metric("job_bytes", "gauge", "Bytes of the jobs held (--max-job-bytes).",
               jobs.total_bytes)
    out.metric("jobs_delivered_total", "counter", "Job deliveries (redeliveries included).",
               jobs.delivered_total)
    out.metric("jobs_redelivered_total", "counter",
               "Jobs taken back (nack, ack timeout, consumer gone) to be delivered again.",
               jobs.redelivered_total)
    out.metric("jobs_acked_total", "counter", "Jobs acknowledged.", jobs.acked_total)
    out.metric("dead_letters_total", "counter",
               "Jobs moved to a dead-letter topic (--max-deliveries).",
               jobs.dead_lettered_total)
    out.metric("dead_letters_dropped_total", "counter",
               "Jobs dropped because their dead-letter topic was full.",
               jobs.dead_letters_dropped)
    out.metric("message_ids", "gauge", "Message ids remembered (--dedupe-window).",
               len(broker.dedupe))
    out.metric("uptime_seconds", "gauge", "Seconds since the server started.",
               round(max(0.0, time.time() - stats.started), 3))
    name = out.metric("build_info", "gauge", "The running version (value always 1).")
    out.sample(name, {"version": __version__, "python": platform.python_version()}, 1)
    return out.text()
