"""Spreading a burst of work over scheduler passes.

trio runs every task that became ready in one pass before it looks at the sockets again.
One client's action can make thousands of tasks ready at once: a publish that overflows
thousands of subscribers, whose cancellations, clean-ups and closes in one pass were
hundreds of milliseconds every other client waited for. A :class:`Pacer` takes such work
as callables and runs at most ``per_pass`` of them per pass; the server has one for
cut-off connections (``Connection._slow_consumer``).

A big fan-out is such a burst too: one publish to thousands of subscribers wakes thousands
of writers, and their socket writes in one pass were half a second every other client
waited for. :class:`WriteTurns` lets at most ``per_pass`` writes happen per pass once
there is a queue, the rest wait in line (a parking lot: no cost while waiting), and the
reader whose commands caused the crowd waits for room before it reads more, so the queue
(and the memory it holds) stays bounded. Replies a reader writes for its own client never
wait here: a client's round trip does not queue behind someone else's fan-out.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ._outbox import Outbox

#: Cut-off connections cancelled per pass.
CUTOFFS_PER_PASS = 64
#: Bytes of fan-out writes per pass once writers queue for turns (a 64 KiB write to a
#: socket is tens of microseconds: 2 MiB of them is a few milliseconds).
WRITE_BYTES_PER_PASS = 4 << 20


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

    async def turn(self) -> None:
        """Wait for a turn of this pacer (at once if it is not running): a task that is
        one of a crowd (thousands of clients that left in the same instant) does its
        work after it, ``per_pass`` of them per pass."""
        if not self._running:
            return
        done = trio.Event()
        self.defer(done.set)
        await done.wait()

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


_UNLIMITED = 1 << 62


class WriteTurns:
    """At most ``per_pass`` bytes of fan-out writes per scheduler pass once they queue.

    Two kinds of work wait here: outboxes on the server's ready list that no reader
    flushed (``send_ready`` stops when the budget is spent), and writers whose socket was
    full and became writable again (``wait_turn``). While nothing waits, ``take`` is a
    subtraction; once something does, ``run`` gives out ``per_pass`` bytes per pass,
    writers first, then outboxes, in arrival order.
    """

    def __init__(self, per_pass: int = WRITE_BYTES_PER_PASS) -> None:
        self.per_pass = per_pass
        #: Bytes that may still be written this pass; unlimited until ``run`` runs (a
        #: server that is not running, e.g. a broker driven directly, has no passes
        #: to spread work over).
        self._left = _UNLIMITED
        #: The outboxes waiting to be written (the server's ready list, ``Ready``).
        self.ready: list[Outbox] = []
        #: Waiting writers, in arrival order, with the bytes each will write.
        self._line: OrderedDict[trio.lowlevel.Task, int] = OrderedDict()
        self._room = trio.lowlevel.ParkingLot()
        self._idle: trio.Event | None = None
        #: ``run`` is running: pushes may rely on it to flush the ready list.
        self.running = False

    def take(self, size: int) -> bool:
        """A turn to write ``size`` bytes now (True), or False: wait for one."""
        if self._left > 0:
            self._left -= size
            return True
        return False

    def poke(self) -> None:
        """Something waits: ``run`` looks at it in the next pass."""
        if self._idle is not None:
            self._idle.set()

    async def wait_turn(self, size: int) -> None:
        """Wait in line; returns with a turn."""
        task = trio.lowlevel.current_task()
        self._line[task] = size
        self.poke()

        def abort(_: object) -> trio.lowlevel.Abort:
            del self._line[task]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    @property
    def busy(self) -> bool:
        """Writes are waiting for turns."""
        return bool(self._line) or bool(self.ready)

    async def wait_room(self) -> None:
        """Wait until no write waits for a turn (a reader whose commands fanned out
        widely, before it handles more: what it produced is written first)."""
        while self.busy:
            await self._room.park()

    async def run(self) -> None:
        """Give ``per_pass`` bytes of turns per pass while writes wait; for the server's
        lifetime."""
        from ._outbox import send_ready

        line = self._line
        ready = self.ready
        self.running = True
        self._left = self.per_pass
        try:
            await self._run(line, ready)
        finally:
            self.running = False
            self._left = _UNLIMITED  # stopping: nothing waits for turns any more
            while line:
                trio.lowlevel.reschedule(line.popitem(last=False)[0])
            self._room.unpark_all()
            send_ready(ready)

    async def _run(
        self, line: OrderedDict[trio.lowlevel.Task, int], ready: list[Outbox]
    ) -> None:
        from ._outbox import send_ready

        while True:
            if not line and not ready:
                self._left = self.per_pass
                if self._room:
                    self._room.unpark_all()
                self._idle = trio.Event()
                await self._idle.wait()
                self._idle = None
                continue
            self._left = self.per_pass
            while line and self._left > 0:
                task, size = line.popitem(last=False)
                self._left -= size
                trio.lowlevel.reschedule(task)
            if ready and self._left > 0:
                send_ready(ready)  # stops where the budget ends
            # A fresh budget for the readers until this task's next turn: per pass at
            # most twice ``per_pass`` is written, and the queue gets its share each pass.
            self._left = self.per_pass
            if self._room and not self.busy:
                self._room.unpark_all()
            await trio.lowlevel.checkpoint()
