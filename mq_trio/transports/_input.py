"""Unfinished input across all connections: the line timeout and the input budget.

A line transport holds the start of a line until its newline arrives. Without a bound in
time and in total, a client can hold a partial line forever (slowloris), and many clients
can hold gigabytes. :class:`InputGuard` is one object per server. A transport reports to it
only when its unfinished line changes (starts, grows, ends), that is when a chunk leaves a
partial tail or finishes one; a client that sends whole lines never reaches it, and an
idle connection without a partial line is not in it at all.

* ``max_input_bytes``: the total of unfinished lines; the transport whose line would pass
  it is refused (``Too much unfinished input``).
* ``line_timeout``: the connections holding a partial line, in an ordered dict by the time
  their line started. The timeout is one constant, so that order is also the order of the
  deadlines: one sweeper task sleeps until the first one, and a line that starts or ends
  costs an O(1) insert, move or delete.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import trio

from ..protocol import INPUT_LIMIT, LINE_TIMEOUT

#: A line finished from a partial line this long (or such a tail at EOF) waits for its
#: turn (:meth:`InputGuard.turn`); shorter ones fit in one read and parse in well under
#: a millisecond.
BIG_LINE = 64 << 10


class Holder(Protocol):
    """What the guard needs from a transport that holds unfinished input."""

    #: Bytes of unfinished input counted for it (the guard keeps it up to date).
    held: int

    def abort_input(self, reason: str) -> None:
        """Drop the unfinished input, reply ``reason`` and end the reading."""


class InputGuard:
    def __init__(self, max_input_bytes: int, line_timeout: float) -> None:
        self.max_input_bytes = max_input_bytes
        self.line_timeout = line_timeout
        #: Bytes of unfinished lines held by all connections.
        self.total = 0
        #: The connections holding a partial line -> when it times out (in that order).
        self.deadlines: OrderedDict[Holder, float] = OrderedDict()
        self._wake: trio.Event | None = None
        self._turns = trio.Lock()

    async def turn(self) -> None:
        """Wait for this connection's turn to handle a big line (one finished from a
        partial line of at least ``BIG_LINE`` bytes, or such a tail at EOF).

        trio runs every task that became ready in one pass before it looks at the
        sockets again, so 200 clients finishing (or closing on) 1 MiB lines at once made
        one pass of 200 parses (1.5 s) that every other client waited for. Here the big
        lines take turns, one per pass: the holder of the turn yields once, then gives
        the turn on and handles its line in the next pass, while the next one yields.
        """
        async with self._turns:
            await trio.lowlevel.checkpoint()

    def update(self, holder: Holder, size: int, new_line: bool) -> bool:
        """``holder`` now holds ``size`` unfinished bytes (``new_line``: a line started
        in this chunk). False when that passes the budget: the caller aborts its input
        with ``Too much unfinished input`` (its count is released here)."""
        old = holder.held
        total = self.total + size - old
        if size > old and total > self.max_input_bytes:
            self.release(holder)
            return False
        self.total = total
        holder.held = size
        if self.line_timeout > 0:
            deadlines = self.deadlines
            if size == 0:
                deadlines.pop(holder, None)
            elif old == 0 or new_line:
                deadlines[holder] = trio.current_time() + self.line_timeout
                deadlines.move_to_end(holder)
                if self._wake is not None:
                    self._wake.set()
        return True

    def release(self, holder: Holder) -> None:
        """``holder`` holds nothing any more (closed, or refused)."""
        self.total -= holder.held
        holder.held = 0
        self.deadlines.pop(holder, None)

    async def sweep(self) -> None:
        """Abort the input of every connection whose line is past its deadline; runs for
        the server's lifetime (when ``line_timeout`` > 0)."""
        deadlines = self.deadlines
        while True:
            if not deadlines:
                self._wake = trio.Event()
                await self._wake.wait()
                self._wake = None
                continue
            holder, deadline = next(iter(deadlines.items()))
            if trio.current_time() < deadline:
                await trio.sleep_until(deadline)
                continue  # the first one may have finished its line meanwhile
            self.release(holder)
            holder.abort_input(LINE_TIMEOUT)


__all__ = ["BIG_LINE", "INPUT_LIMIT", "LINE_TIMEOUT", "Holder", "InputGuard"]
