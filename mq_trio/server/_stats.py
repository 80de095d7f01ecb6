"""Server-wide counters for metrics and introspection (docs/operations.md, "Metrics").

Plain integers, bumped on the paths where things happen (a ``prometheus_client``
``Counter.inc`` costs about 7x a ``+= 1``); the HTTP side (``server/_admin.py``) reads
them on the trio thread and renders them. Per-connection traffic is counted by the
connection's own objects (its wire and its outbox) and added here when it closes, so the
hot paths never touch a shared object per message.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ._connection import Connection


@attrs.define(eq=False)
class Stats:
    #: Wall-clock time the server started (``uptime``).
    started: float = attrs.field(factory=time.time)
    #: Clients served since start (TCP and WebSocket, after any TLS handshake).
    connections_total: int = 0
    #: Clients refused: ``Too many connections``.
    refused: int = 0
    #: Subscribers disconnected as slow consumers.
    slow_consumers: int = 0
    #: Failure replies sent, by reason (the protocol's failure texts).
    failures: defaultdict[str, int] = attrs.field(factory=lambda: defaultdict(int))
    #: Traffic of connections that have closed (the live ones count their own).
    closed_lines_in: int = 0
    closed_bytes_in: int = 0
    closed_messages_out: int = 0
    closed_bytes_out: int = 0

    def fail(self, reason: str) -> None:
        self.failures[reason] += 1

    def retire(self, conn: Connection) -> None:
        """A connection has ended: its traffic joins the totals."""
        self.closed_lines_in += conn.lines_in
        self.closed_bytes_in += conn.bytes_in
        self.closed_messages_out += conn.outbox.sent
        self.closed_bytes_out += conn.outbox.sent_bytes
