"""Acknowledged jobs: each topic's queue, its consumers, deadlines and redelivery.

Plain synchronous Python, owned by the :class:`~mq_trio.broker.Broker` (docs/protocol.md,
"Acknowledged jobs"). Time comes from ``clock`` and timers are kept in one heap; the
server runs :meth:`JobQueues.expire` when the earliest is due, and :meth:`settle` when a
history decides a job's write. Nothing here awaits.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import attrs

from ..protocol import job_delivery

if TYPE_CHECKING:
    from ._broker import Subscriber
    from ._history import Ticket, TopicHistory

#: The dead-letter topic of topic T is DEAD_PREFIX + T (docs/protocol.md).
DEAD_PREFIX = "$dead."
#: What a job costs besides its bytes, counted against ``max_job_bytes``.
JOB_OVERHEAD = 200

# A job's states.
PENDING = 0  # its write is not decided yet: not deliverable
WAITING = 1
HELD = 2  # delivered, not acknowledged
DELAYED = 3  # nacked with a delay


#: What ``_of`` gives for a subscriber that consumes nothing (never mutated).
_NO_CONSUMERS: dict[str, Consumer] = {}


class QueueFull(Exception):
    """A job or batch of jobs beyond the queue limits: ``Queue full``, nothing accepted."""


@attrs.define(slots=True, eq=False)
class Job:
    topic: str
    index: int
    #: The job's send command as a JSON object without its closing brace: its delivery
    #: is this, then index and deliveries (``job_delivery``), built once per delivery.
    head: bytes
    deliveries: int = 0
    state: int = PENDING
    #: What it counts against ``max_job_bytes``.
    size: int = 0
    holder: Consumer | None = None
    #: HELD: when it goes back unless acknowledged or extended.
    deadline: float = 0.0
    #: Bumped at every state change: a heap entry with an older value is stale.
    gen: int = 0
    #: PENDING: the history's write of it.
    ticket: Ticket | None = None


@attrs.define(slots=True, eq=False)
class Consumer:
    subscriber: Subscriber
    queue: TopicQueue
    prefetch: int
    held: dict[int, Job] = attrs.field(factory=dict)
    #: In its queue's ``ready`` ring.
    listed: bool = False
    #: Still a consumer (the ring drops one that left when it comes to its turn).
    active: bool = True


@attrs.frozen
class QueueInfo:
    """A topic's queue for introspection (tests, ``GET /topics``, metrics)."""

    waiting: int = 0
    in_flight: int = 0
    delayed: int = 0
    consumers: int = 0
    bytes: int = 0
    delivered_total: int = 0
    redelivered_total: int = 0
    acked_total: int = 0
    dead_lettered_total: int = 0


@attrs.define(eq=False)
class TopicQueue:
    topic: str
    #: Every job of the topic not yet acknowledged, by index.
    jobs: dict[int, Job] = attrs.field(factory=dict)
    waiting: deque[Job] = attrs.field(factory=deque)
    consumers: dict[Subscriber, Consumer] = attrs.field(factory=dict)
    #: Consumers with room under their prefetch, in turn (round robin).
    ready: deque[Consumer] = attrs.field(factory=deque)
    bytes: int = 0
    delayed: int = 0
    in_flight: int = 0
    delivered: int = 0
    redelivered: int = 0
    acked: int = 0
    dead_lettered: int = 0

    @property
    def idle(self) -> bool:
        return not self.jobs and not self.consumers


@attrs.define(eq=False)
class JobQueues:
    history: TopicHistory
    ack_timeout: float = 30.0
    max_deliveries: int = 5
    max_queue_jobs: int = 100_000
    max_job_bytes: int = 512 << 20
    #: The server sets trio's clock (tests: the autojump clock).
    clock: Callable[[], float] = time.monotonic
    #: Called when a timer is set earlier than ``wake_at`` (the server's timer task).
    on_timer: Callable[[], None] | None = None
    #: Called with a job to move to its dead-letter topic (the broker publishes it).
    dead_letter: Callable[[Job], None] | None = None
    #: Called with a topic whose queue went idle (no jobs, no consumers).
    on_idle: Callable[[str], None] | None = None
    #: Called with a queue whose last consumer left (a shared history takes its jobs
    #: back for the other nodes).
    on_unconsumed: Callable[[TopicQueue], None] | None = None
    queues: dict[str, TopicQueue] = attrs.field(factory=dict)
    _of: dict[Subscriber, dict[str, Consumer]] = attrs.field(factory=dict)
    #: The totals of queues that went idle (delivered, redelivered, acked, dead-lettered).
    _totals: dict[str, tuple[int, int, int, int]] = attrs.field(factory=dict)
    #: Held jobs in the order of their deadlines: every deadline is "now + ack_timeout",
    #: so delivery order is deadline order (``progress`` moves a job to the end). An
    #: acknowledged job leaves at once: no stale entries, nothing to compact.
    _deadlines: OrderedDict[Job, None] = attrs.field(factory=OrderedDict)
    #: (when, seq, job, gen): the ends of nack delays (a heap: delays differ).
    _timers: list[tuple[float, int, Job, int]] = attrs.field(factory=list)
    _seq: int = 0
    #: When the server's timer task wakes next (it sets this).
    wake_at: float = float("inf")
    #: Jobs whose write is not decided yet, oldest first (``settle``).
    undecided: deque[Job] = attrs.field(factory=deque)
    on_undecided: Callable[[], None] | None = None
    #: Whether the history keeps delivery counts (``job_delivered``): a memory history
    #: does not, and the call is skipped.
    keep_counts: bool = True
    total_bytes: int = 0
    total_jobs: int = 0
    dead_letters_dropped: int = 0
    #: Totals over all topics (metrics): deliveries, redeliveries, acks, dead letters.
    delivered_total: int = 0
    redelivered_total: int = 0
    acked_total: int = 0
    dead_lettered_total: int = 0
    #: Queues to dispatch once the dispatch under way is done (a push can evict).
    _dispatching: bool = False
    _again: set[TopicQueue] = attrs.field(factory=set)

    # --- producing ---

    def check_room(self, topic: str, count: int, size: int) -> None:
        """Raise :class:`QueueFull` unless ``count`` more jobs of ``size`` bytes fit."""
        if self.total_bytes + size + count * JOB_OVERHEAD > self.max_job_bytes:
            raise QueueFull
        queue = self.queues.get(topic)
        if queue is not None and len(queue.jobs) + count > self.max_queue_jobs:
            raise QueueFull

    def _queue(self, topic: str) -> TopicQueue:
        queue = self.queues.get(topic)
        if queue is None:
            queue = self.queues[topic] = TopicQueue(topic)
            totals = self._totals.pop(topic, None)
            if totals is not None:
                (queue.delivered, queue.redelivered, queue.acked,
                 queue.dead_lettered) = totals
        return queue

    def add(self, topic: str, index: int, base: bytes, ticket: Ticket | None = None,
            deliveries: int = 0) -> Job:
        """A new job (room checked by the caller); deliverable once ``ticket`` (its write)
        is decided, at once without one."""
        queue = self._queue(topic)
        job = Job(topic, index, base[:-1], deliveries, PENDING, len(base) + JOB_OVERHEAD)
        queue.jobs[index] = job
        queue.bytes += job.size
        self.total_bytes += job.size
        self.total_jobs += 1
        if ticket is not None and not ticket.done:
            job.ticket = ticket
            self.undecided.append(job)
            if len(self.undecided) == 1 and self.on_undecided is not None:
                self.on_undecided()
            return job
        job.state = WAITING
        queue.waiting.append(job)
        if queue.ready:  # (a consumer may have room: else nothing to do)
            self._dispatch(queue)
        return job

    def settle(self) -> None:
        """Jobs whose writes were decided: deliverable, or gone if the write failed."""
        undecided = self.undecided
        touched: set[TopicQueue] = set()
        while undecided:
            job = undecided[0]
            ticket = job.ticket
            if ticket is not None and not ticket.done:
                break
            undecided.popleft()
            job.ticket = None
            queue = self.queues.get(job.topic)
            if queue is None or job.state != PENDING:
                continue
            if ticket is not None and ticket.failed:
                self._forget(queue, job)
                continue
            job.state = WAITING
            queue.waiting.append(job)
            touched.add(queue)
        for queue in touched:
            self._dispatch(queue)

    # --- consuming ---

    def consume(self, subscriber: Subscriber, topic: str, prefetch: int
                ) -> Callable[[], None]:
        """Add (or update) a consumer; returns what dispatches to it (after its reply)."""
        queue = self._queue(topic)
        consumer = queue.consumers.get(subscriber)
        if consumer is None:
            consumer = queue.consumers[subscriber] = Consumer(subscriber, queue, prefetch)
            self._of.setdefault(subscriber, {})[topic] = consumer
        consumer.prefetch = prefetch
        self._list(consumer)
        return lambda: self._dispatch(queue)

    def unconsume(self, subscriber: Subscriber, topic: str) -> None:
        mine = self._of.get(subscriber)
        if mine is None:
            return
        consumer = mine.pop(topic, None)
        if not mine:
            del self._of[subscriber]
        if consumer is not None:
            self._leave(consumer)

    def disconnect(self, subscriber: Subscriber) -> None:
        """A departing connection: its held jobs go back to their queues."""
        mine = self._of.pop(subscriber, None)
        if mine:
            for consumer in mine.values():
                self._leave(consumer)

    def disconnect_steps(self, subscriber: Subscriber, step: int) -> Iterator[None]:
        """``disconnect`` in steps of ``step`` consumers (the caller yields to other
        tasks at each ``next``): a client consuming many topics must not stall the rest
        when it leaves."""
        mine = self._of.pop(subscriber, None)
        if not mine:
            return
        for n, consumer in enumerate(list(mine.values()), 1):
            self._leave(consumer)
            if n % step == 0:
                yield

    def consumer_count(self, subscriber: Subscriber) -> int:
        return len(self._of.get(subscriber, _NO_CONSUMERS))

    def _leave(self, consumer: Consumer) -> None:
        queue = consumer.queue
        del queue.consumers[consumer.subscriber]
        consumer.active = consumer.listed = False  # (the ring skips it)
        held = list(consumer.held.values())
        consumer.held.clear()
        deadlines = self._deadlines
        for job in held:
            job.holder = None
            del deadlines[job]
            queue.in_flight -= 1
        self._return_all(queue, held)
        self._dispatch(queue)
        if not queue.consumers and self.on_unconsumed is not None:
            self.on_unconsumed(queue)
        self._drop_if_idle(queue)

    def room(self, topic: str) -> int:
        """Jobs the topic's consumers could take now beyond those waiting here."""
        queue = self.queues.get(topic)
        if queue is None:
            return 0
        free = sum(c.prefetch - len(c.held) for c in queue.consumers.values())
        return free - len(queue.waiting)

    def surrender(self, queue: TopicQueue) -> list[Job]:
        """Every job of the queue not held by a consumer (waiting, delayed), forgotten
        here: a shared history gives them to the other nodes."""
        jobs = [job for job in queue.jobs.values() if job.holder is None
                and job.state in (WAITING, DELAYED)]
        for job in jobs:
            self._forget(queue, job)
        queue.waiting.clear()
        return jobs

    def _list(self, consumer: Consumer) -> None:
        if not consumer.listed and len(consumer.held) < consumer.prefetch:
            consumer.listed = True
            consumer.queue.ready.append(consumer)

    # --- acknowledging ---

    def _held(self, subscriber: Subscriber, topic: str, index: int) -> Job | None:
        consumer = self._of.get(subscriber, _NO_CONSUMERS).get(topic)
        if consumer is None:
            return None
        return consumer.held.get(index)

    def ack(self, subscriber: Subscriber, topic: str, index: int, dispatch: bool = True
            ) -> tuple[bool, Ticket | None]:
        """(held, the history's removal ticket, None when already decided). Without
        ``dispatch`` the room made is filled by a later ``dispatch_topic`` (after the
        reply, so that the reply comes before the next job)."""
        # The other half of a work queue's hot path (once per job): _held, _release and
        # _forget written out.
        consumer = self._of.get(subscriber, _NO_CONSUMERS).get(topic)
        if consumer is None:
            return False, None
        job = consumer.held.pop(index, None)
        if job is None:
            return False, None
        del self._deadlines[job]
        job.holder = None
        job.state = PENDING
        queue = consumer.queue
        queue.in_flight -= 1
        queue.acked += 1
        self.acked_total += 1
        if consumer.active and not consumer.listed:
            consumer.listed = True
            queue.ready.append(consumer)
        del queue.jobs[index]
        size = job.size
        queue.bytes -= size
        self.total_bytes -= size
        self.total_jobs -= 1
        ticket = self.history.job_done(topic, index) if self.keep_counts else None
        if dispatch:
            self._dispatch(queue)
            self._drop_if_idle(queue)
        return True, ticket

    def nack(self, subscriber: Subscriber, topic: str, index: int, delay: float,
             dispatch: bool = True) -> bool:
        job = self._held(subscriber, topic, index)
        if job is None:
            return False
        queue = self._release(job)
        self._back(queue, job, delay, front=True)
        if dispatch:
            self._dispatch(queue)
        return True

    def dispatch_topic(self, topic: str) -> None:
        """Deliver what waits on ``topic`` to consumers with room."""
        queue = self.queues.get(topic)
        if queue is not None:
            if queue.waiting and queue.ready:
                self._dispatch(queue)
            elif not queue.jobs and not queue.consumers:
                self._drop_if_idle(queue)

    def progress(self, subscriber: Subscriber, topic: str, index: int) -> bool:
        job = self._held(subscriber, topic, index)
        if job is None:
            return False
        job.deadline = self.clock() + self.ack_timeout
        self._deadlines.move_to_end(job)
        return True

    def _release(self, job: Job) -> TopicQueue:
        """Take a held job from its consumer (who then has room)."""
        consumer = job.holder
        assert consumer is not None
        del consumer.held[job.index]
        del self._deadlines[job]
        job.holder = None
        queue = consumer.queue
        queue.in_flight -= 1
        if consumer.active:
            self._list(consumer)
        return queue

    def _return_all(self, queue: TopicQueue, jobs: list[Job]) -> None:
        """Jobs taken back together: dead letters in index order, the others to the
        front of the queue, oldest first."""
        jobs.sort(key=lambda j: j.index)
        rest = [job for job in jobs if not self._out_of_deliveries(job)]
        for job in jobs:
            if self._out_of_deliveries(job):
                self._back(queue, job, 0.0, front=True)
        for job in reversed(rest):
            self._back(queue, job, 0.0, front=True)

    def _out_of_deliveries(self, job: Job) -> bool:
        return job.deliveries >= self.max_deliveries and not job.topic.startswith(DEAD_PREFIX)

    def _back(self, queue: TopicQueue, job: Job, delay: float, front: bool) -> None:
        """A job not finished: delivered again (after ``delay``), or dead-lettered."""
        job.gen += 1
        if self._out_of_deliveries(job):
            queue.dead_lettered += 1
            self.dead_lettered_total += 1
            self._forget(queue, job)
            self.history.job_done(job.topic, job.index)
            if self.dead_letter is not None:
                self.dead_letter(job)
            return
        queue.redelivered += 1
        self.redelivered_total += 1
        if delay > 0:
            job.state = DELAYED
            queue.delayed += 1
            self._timer(self.clock() + delay, job)
        else:
            job.state = WAITING
            if front:
                queue.waiting.appendleft(job)
            else:
                queue.waiting.append(job)

    def _forget(self, queue: TopicQueue, job: Job) -> None:
        if queue.jobs.pop(job.index, None) is None:
            return
        if job.state == DELAYED:
            queue.delayed -= 1
        job.state = PENDING
        job.gen += 1
        queue.bytes -= job.size
        self.total_bytes -= job.size
        self.total_jobs -= 1

    def _drop_if_idle(self, queue: TopicQueue) -> None:
        """An idle queue (no jobs, no consumers) leaves ``queues``; its totals stay, in
        a tuple (a few hundred bytes less per topic than the queue)."""
        if queue.idle and self.queues.get(queue.topic) is queue:
            del self.queues[queue.topic]
            if queue.delivered:
                self._totals[queue.topic] = (queue.delivered, queue.redelivered, queue.acked,
                                             queue.dead_lettered)
            if self.on_idle is not None:
                self.on_idle(queue.topic)

    # --- delivering ---

    def _dispatch(self, queue: TopicQueue) -> None:
        """Give waiting jobs to consumers with room, in turn."""
        if self._dispatching:
            self._again.add(queue)
            return
        self._dispatching = True
        try:
            self._deliver_all(queue)
            while self._again:
                self._deliver_all(self._again.pop())
        finally:
            self._dispatching = False

    def _deliver_all(self, queue: TopicQueue) -> None:
        """The hot path of a work queue (once per job): what it reads is in locals, and
        the waiting deque holds only WAITING jobs (nothing leaves it otherwise)."""
        waiting = queue.waiting
        ready = queue.ready
        if not waiting or not ready:
            return
        deadline = self.clock() + self.ack_timeout
        deadlines = self._deadlines
        if not deadlines and self.on_timer is not None:
            self.on_timer()  # the first deadline: the timer task may sleep for good
        count = self.keep_counts
        delivered = 0
        while waiting and ready:
            consumer = ready.popleft()
            if not consumer.active:
                continue  # left (the ring is cleaned lazily)
            held = consumer.held
            room = consumer.prefetch - len(held)
            if room <= 0:
                consumer.listed = False
                continue
            job = waiting.popleft()
            job.state = HELD
            job.holder = consumer
            job.deliveries = n = job.deliveries + 1
            job.deadline = deadline
            index = job.index
            held[index] = job
            deadlines[job] = None
            delivered += 1
            if room > 1:
                ready.append(consumer)
            else:
                consumer.listed = False
            if count:
                self.history.job_delivered(job.topic, index, n)
            # Last: the push may cut the consumer off, which gives the job back.
            consumer.subscriber.push(job_delivery(job.head, index, n))
        queue.in_flight += delivered
        queue.delivered += delivered
        self.delivered_total += delivered

    # --- time ---

    def _timer(self, when: float, job: Job) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, job, job.gen))
        if when < self.wake_at and self.on_timer is not None:
            self.on_timer()

    def next_timer(self) -> float:
        due = self._timers[0][0] if self._timers else float("inf")
        if self._deadlines:
            due = min(due, next(iter(self._deadlines)).deadline)
        return due

    def expire(self, now: float | None = None, limit: int = 10_000) -> float:
        """Handle the timers due by ``now`` (at most ``limit``: the caller yields and
        comes back); return when the next one is due."""
        if now is None:
            now = self.clock()
        timers = self._timers
        touched: set[TopicQueue] = set()
        expired: list[Job] = []
        deadlines = self._deadlines
        while deadlines and limit > 0:
            job = next(iter(deadlines))
            if job.deadline > now:
                break
            limit -= 1
            touched.add(self._release(job))
            expired.append(job)  # back in index order, below
        while timers and timers[0][0] <= now and limit > 0:
            limit -= 1
            _, _, job, gen = heapq.heappop(timers)
            if gen != job.gen:
                continue  # stale: returned or forgotten since
            queue = self.queues.get(job.topic)
            if queue is None or queue.jobs.get(job.index) is not job:
                continue
            if job.state == DELAYED:
                queue.delayed -= 1
                job.state = WAITING
                job.gen += 1
                queue.waiting.appendleft(job)
            touched.add(queue)
        by_queue: dict[TopicQueue, list[Job]] = {}
        for job in expired:  # timed out together: back in index order
            by_queue.setdefault(self.queues[job.topic], []).append(job)
        for queue, jobs in by_queue.items():
            self._return_all(queue, jobs)
        for queue in touched:
            self._dispatch(queue)
        return self.next_timer()

    # --- inspection ---

    def info(self, topic: str) -> QueueInfo:
        queue = self.queues.get(topic)
        if queue is None:
            totals = self._totals.get(topic)
            if totals is None:
                return QueueInfo()
            return QueueInfo(delivered_total=totals[0], redelivered_total=totals[1],
                             acked_total=totals[2], dead_lettered_total=totals[3])
        return QueueInfo(len(queue.waiting), queue.in_flight, queue.delayed,
                         len(queue.consumers), queue.bytes, queue.delivered,
                         queue.redelivered, queue.acked, queue.dead_lettered)

    @property
    def in_flight(self) -> int:
        """Jobs delivered and not yet acknowledged, over all topics."""
        return len(self._deadlines)

    def is_consumer(self, subscriber: Subscriber, topic: str) -> bool:
        return topic in self._of.get(subscriber, {})
