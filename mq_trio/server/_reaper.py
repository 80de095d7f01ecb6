"""Cutting off slow consumers a few per scheduler pass.

One publish can overflow thousands of subscribers at once (a big message to a topic whose
subscribers stopped reading). Cancelling each connection where its outbox overflows puts
all their cancellations, clean-ups and closes into the next pass of the scheduler, which
every other client then waits for (6,000 at once: about half a second). The broker evicts
an overflowed subscriber at once and its outbox takes nothing more, so nothing is lost by
cancelling its connection a few passes later: the reaper cancels at most ``per_pass`` of
them, then yields.
"""

from __future__ import annotations

from collections import deque

import trio

#: Connections cancelled per scheduler pass.
DEFAULT_PER_PASS = 64


class Reaper:
    def __init__(self, per_pass: int = DEFAULT_PER_PASS) -> None:
        self.per_pass = per_pass
        self._queue: deque[trio.CancelScope] = deque()
        self._wake: trio.Event | None = None
        #: Whether ``run`` is running: otherwise ``cut`` cancels at once.
        self._running = False

    def cut(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` (a connection's) soon, at most ``per_pass`` per pass."""
        if not self._running:
            scope.cancel()
            return
        self._queue.append(scope)
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Cancel what ``cut`` queued, ``per_pass`` at a time; for the server's lifetime."""
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
                    queue.popleft().cancel()
                await trio.lowlevel.checkpoint()
        finally:
            self._running = False
            while queue:  # stopping: what is left goes at once
                queue.popleft().cancel()
