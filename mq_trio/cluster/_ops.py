"""What a node queues for Redis, as tickets the broker and the outboxes wait on.

A :class:`Write` is one script call's messages (or jobs) of one topic, a
:class:`JoinOp` a subscribe's or unsubscribe's count (with its replay and mark), a
:class:`JobOp` a held job's news or a ``take``. Each is decided by its reply from Redis
and, when it published something, by the node's intake passing it (``_settle``).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio


def message_flags(one: bool, cached: bool, rest: bool = False, count: int = 0) -> int:
    return (1 if one else 0) | (2 if cached else 0) | (4 if rest else 0) | count << 4


@attrs.define(eq=False, slots=True)
class _Decided:
    """The decided/failed/wait part of a ticket."""

    done: bool = False
    failed: bool = False
    _event: trio.Event | None = None

    def _decide(self, failed: bool = False) -> None:
        if self.done:
            return
        self.failed = failed
        self.done = True
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        if self.done:
            return
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()


@attrs.define(eq=False, slots=True)
class Write(_Decided):
    """One script call's messages of one topic (a :class:`SharedWrite`)."""

    topic: str = ""
    #: ARGV triples per message: flags, id, command.
    args: list[bytes | str | int] = attrs.field(factory=list)
    size: int = 0
    seq: int = -1
    first: int = -1
    results: list[bytes] | None = None
    replied: bool = False
    passed: bool = False
    #: The intake will pass it (it was flushed while the intake was subscribed).
    awaits_intake: bool = False
    #: Jobs (``JOB_ADD``): decided by the reply alone (nothing is delivered).
    jobs: bool = False

    @property
    def count(self) -> int:
        return len(self.args) // 3

    def result(self, offset: int) -> tuple[int, int, bool]:
        """(index, count, repeated) of the message at ``offset``: a repeated id gives
        the original's index and batch size."""
        if self.first < 0:  # jobs refused: the queue is full
            return -1, 0, False
        results = self.results
        if results is None:
            return self.first + offset, 1, False
        text = results[offset]
        if text[:1] == b"d":
            index, _, count = text[1:].partition(b":")
            return int(index), int(count or 1), True
        return int(text), 1, False

    def _settle(self) -> None:
        if self.replied and (self.passed or not self.awaits_intake):
            self._decide()


@attrs.define(eq=False, slots=True)
class JoinOp(_Decided):
    """A subscribe's (or a leave's) remote step (a :class:`JoinResult`)."""

    topic: str = ""
    count: int = 0
    last_seen: int = -1
    replay: bool = False
    next_index: int = 0
    evicted: int = -1
    epoch: str = ""
    entries: list[tuple[int, bytes]] = attrs.field(factory=list)
    on_fail: Callable[[], None] | None = None
    #: Every join and leave marks its place in the channel (an empty frame) and is
    #: decided once the intake passed the mark, i.e. delivered every message before
    #: it: a subscribe's replay then joins the live deliveries exactly; an
    #: unsubscribe ends deliveries exactly there.
    #: Called at the mark (or failed): an unsubscribe ends the subscription then.
    on_done: Callable[[], None] | None = None
    seq: int = -1
    replied: bool = False
    passed: bool = False
    awaits_intake: bool = False

    def result(self, offset: int) -> tuple[int, int, bool]:
        return self.next_index, 0, False

    def _settle(self) -> None:
        if self.passed:
            self._ended()  # at the mark: nothing after it may still be delivered
        if self.replied and (self.passed or not self.awaits_intake):
            self._decide()
            self._ended()

    def _ended(self) -> None:
        then, self.on_done = self.on_done, None
        if then is not None:
            then()


@attrs.define(eq=False, slots=True)
class JobOp(_Decided):
    """A job's news for Redis (``touch``, ``done``, ``back``) or a ``take``; failed if
    Redis says this node no longer holds the job."""

    topic: str = ""
    what: str = "take"
    index: int = -1
    #: take: how many; touch: the deliveries so far (-1: unchanged).
    count: int = -1
    #: take: called with (index, deliveries before, command) of each job taken.
    on_taken: Callable[[list[tuple[int, int, bytes]]], None] | None = None
    seq: int = -1
    awaits_intake: bool = False
    passed: bool = False

    def _settle(self) -> None:
        pass  # (decided by its reply alone)


def failed_write() -> Write:
    """A write refused before it was queued (Redis down, or the queue full)."""
    write = Write()
    write._decide(failed=True)
    return write
