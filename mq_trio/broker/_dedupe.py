"""Idempotent publishing: message ids remembered per topic for a window.

A repeat of an id gets the original reply (with ``"duplicate": true``) and is neither
stored nor delivered again (docs/protocol.md, "Idempotent publishing"). An id is kept
from its acceptance; one whose write then fails is forgotten when next looked up, so a
retry of a failed send is a new attempt.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ._history import Ticket

log = logging.getLogger("mq_trio.broker")

DEFAULT_MAX_IDS = 1_000_000


@attrs.define(slots=True, eq=False)
class Seen:
    #: The reply a repeat gets (the original's, marked duplicate).
    reply: bytes
    expires: float
    #: The original's write, while it may still fail.
    ticket: Ticket | None = None


@attrs.define(eq=False)
class Dedupe:
    window: float = 120.0
    max_ids: int = DEFAULT_MAX_IDS
    clock: Callable[[], float] = time.monotonic
    _seen: dict[tuple[str, str], Seen] = attrs.field(factory=dict)
    #: Keys in the order they expire (the window is one constant).
    _order: deque[tuple[float, tuple[str, str]]] = attrs.field(factory=deque)
    forgotten_early: int = 0

    @property
    def enabled(self) -> bool:
        return self.window > 0

    def __len__(self) -> int:
        return len(self._seen)

    def lookup(self, topic: str, message_id: str) -> Seen | None:
        """The original of a repeat, or None (a new id, or one whose write failed)."""
        self._expire()
        key = (topic, message_id)
        seen = self._seen.get(key)
        if seen is None:
            return None
        ticket = seen.ticket
        if ticket is not None and ticket.done:
            if ticket.failed:
                del self._seen[key]
                return None
            seen.ticket = None
        return seen

    def remember(self, topic: str, message_id: str, reply: bytes,
                 ticket: Ticket | None) -> None:
        key = (topic, message_id)
        expires = self.clock() + self.window
        if ticket is not None and ticket.done:
            if ticket.failed:
                return  # a failed send is not remembered: its retry is a new attempt
            ticket = None
        self._seen[key] = Seen(reply, expires, ticket)
        self._order.append((expires, key))
        if len(self._seen) > self.max_ids:
            self._forget_oldest()

    def restore(self, topic: str, message_id: str, reply: bytes, remaining: float) -> None:
        """An id kept from before a restart, for the rest of its window (oldest first)."""
        if remaining <= 0:
            return
        key = (topic, message_id)
        expires = self.clock() + min(remaining, self.window)
        self._seen[key] = Seen(reply, expires)
        self._order.append((expires, key))
        if len(self._seen) > self.max_ids:
            self._forget_oldest()

    def _expire(self) -> None:
        order = self._order
        if not order:
            return
        now = self.clock()
        seen = self._seen
        while order and order[0][0] <= now:
            expires, key = order.popleft()
            entry = seen.get(key)
            if entry is not None and entry.expires <= now:
                del seen[key]

    def _forget_oldest(self) -> None:
        order = self._order
        seen = self._seen
        while len(seen) > self.max_ids and order:
            expires, key = order.popleft()
            entry = seen.get(key)
            if entry is not None and entry.expires == expires:
                del seen[key]
                if not self.forgotten_early:
                    log.warning("more than %d message ids within the dedupe window: the "
                                "oldest are forgotten early", self.max_ids)
                self.forgotten_early += 1
