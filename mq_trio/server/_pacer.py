"""Spreading a burst of work over scheduler passes.

trio runs every task that became ready in one pass before it looks at the sockets again.
One client's action can make thousands of tasks ready at once: a publish that overflows
thousands of subscribers, whose cancellations, clean-ups and closes in one pass were
hundreds of milliseconds every other client waited for. A :class:`Pacer` takes such work
as callables and runs at most ``per_pass`` of them per pass; the server has one for
cut-off connections (``Connection._slow_consumer``).

(Pacing the wake-ups of a big fan-out's writers the same way was tried and made it
worse: writers woken later leave more queued, so more memory and more work per pass.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio

#: Cut-off connections cancelled per pass.
CUTOFFS_PER_PASS = 64


class Pacer:
    def __init__(self, per_pass: int) -> None:
        self.per_pass = per_pass
        self._queue: deque[Callable[[], object]] = deque()
        self._wake: trio.Event | None = None
        #: Whether ``run`` is running: otherwise ``defer`` runs the work at once.
        self._running = False

    def defer(self, work: Callable[[], object]) -> None:
        """Run ``work`` soon, at most ``per_pass`` of them per pass."""
        if not self._running:
            work()
            return
        self._queue.append(work)
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Run what ``defer`` queued, ``per_pass`` at a time; for the server's lifetime."""
        queue = self._queue
        self._running = True
        try:
            while True:
                if not queue:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    self._wake = None
                    continue
                for _ in range(min(self.per_pass, len(queue))):
                    queue.popleft()()
                await trio.lowlevel.checkpoint()
        finally:
            self._running = False
            while queue:  # stopping: what is left runs at once
                queue.popleft()()
