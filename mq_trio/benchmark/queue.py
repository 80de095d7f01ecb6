"""The ``queue`` scenario: acknowledged jobs, P producers and C consumers.

Against mq-trio (and any server of the jobs extension, docs/protocol.md "Acknowledged
jobs") a producer sends ``"delivery": "one", "ack": true`` and a consumer subscribes with
``"ack": true, "prefetch": N`` and acks every job. Against Redis the same work is done
with a stream and a consumer group: ``XADD``, ``XREADGROUP ... COUNT N BLOCK 0`` and one
``XACK`` per entry. No ``MAXLEN`` is used: acknowledged entries stay in the stream (Redis
does not delete them), which costs Redis memory but no time during a short run.

As in the other scenarios the generator parses only what it must: the index (or entry
id) of each delivery, to ack it, and the send timestamp carried in the message, for the
latency. Producers and consumers are separate processes (``fork``) sharing only a few
counters: how many jobs each producer sent and had accepted, how many each consumer had
acknowledged. Producers keep at most ``window`` sends unanswered each and stay at most
``backlog`` jobs ahead of the consumers, so that a server slower than the producers builds
a bounded queue (latency then is mostly ``backlog / rate``: queueing, as in any saturated
work queue) instead of an ever-growing one that would end in ``Queue full``.

Timeline: all workers start together; after a warm-up the measurement window of
``duration`` seconds opens; producers stop sending when it closes; consumers go on until
every accepted job is acknowledged. A job counts toward the rate if the success reply to
its ack arrived inside the window; its latency (send → consumer receipt) is sampled if it
arrived inside the window.
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import attrs

from ..protocol import encode_consume, encode_job_command, encode_publish
from .base import (
    BenchError,
    Progress,
    Result,
    Settings,
    Target,
    connect,
    latency_summary,
    mark_workers,
    no_progress,
    read_lines,
    recv,
)
from .dialects import TokenCounter, resp_command
from .procstat import CPUMeter
from .scenarios import _ctx, _drain, _wait_workers

#: The Redis consumer group of the scenario.
GROUP = "bench"
#: How many digits of an index the ack template holds (split out once, filled per job).
_INDEX_MARK = b"987654321987654321"
#: Placeholder of the send timestamp in a job (survives JSON and RESP unchanged).
_STAMP_MARK = "~" * 20
#: A remainder longer than this plus the message size is not a reply we know.
_MAX_UNPARSED = 1 << 20


def warmup_seconds(duration: float) -> float:
    """Warm-up before the window: connections, caches, the server's first queue."""
    return min(1.0, 0.2 * duration)


def auto_backlog(st: Settings) -> int:
    """Jobs producers may be ahead of acknowledgements: room for every producer's window
    and every consumer's prefetch, twice, so neither side waits for the other."""
    if st.backlog > 0:
        return st.backlog
    return 2 * (st.producers * st.window + st.consumers * st.prefetch)


# --- the two wire dialects -------------------------------------------------------------


@attrs.frozen
class JobTemplate:
    """A job as bytes around its timestamp: ``prefix + b"%020d" % ns + suffix``."""

    prefix: bytes
    suffix: bytes

    def chunk(self, n: int, stamp_ns: int) -> bytes:
        """``n`` pipelined jobs, all stamped with the moment the chunk is written."""
        return (self.prefix + b"%020d" % stamp_ns + self.suffix) * n


def job_template(dialect: str, topic: str, size: int) -> JobTemplate:
    msg = _STAMP_MARK + "x" * (max(size, 20) - 20)
    if dialect == "redis":
        cmd = resp_command("XADD", topic, "*", "m", msg)
    else:
        cmd = encode_publish(topic, msg, delivery="one", ack=True) + b"\n"
    prefix, suffix = cmd.split(_STAMP_MARK.encode())
    return JobTemplate(prefix, suffix)


class ProducerReplies:
    """Counts the replies to a producer's sends: ``replies`` and ``errors`` so far.

    mq: one line each, failures contain ``"success": false``. Redis: a bulk string (the
    entry id: two lines, one ``$``) each; an error (``-ERR ...``) is fatal, since it would
    break the line arithmetic.
    """

    def __init__(self, dialect: str) -> None:
        self.redis = dialect == "redis"
        self.replies = 0
        # Redis: a line that starts with "-" (an id holds "-" only after digits)
        self._errors = TokenCounter(b"\n-" if self.redis else b'"success": false')
        if self.redis:
            self._errors.feed(b"\n")  # the first reply starts a line too

    @property
    def errors(self) -> int:
        return self._errors.count

    def feed(self, data: bytes) -> None:
        if self.redis:
            self.replies += data.count(b"$")
            if self._errors.feed(data):
                text = data[data.find(b"-"):][:200].decode(errors="replace")
                raise BenchError(f"redis refused a job: {text.strip()}")
            return
        self.replies += data.count(b"\n")
        self._errors.feed(data)


class MQConsumer:
    """A jobs consumer of protocol v1 + extensions: acks every job in whole lines."""

    _STAMP = re.compile(rb'"msg": "(\d{20})')
    _INDEX = re.compile(rb'"index": (\d+)')

    def __init__(self, topic: str, prefetch: int) -> None:
        self.subscribe = encode_consume(topic, prefetch) + b"\n"
        ack = encode_job_command("ack", topic, int(_INDEX_MARK)) + b"\n"
        self._ack_prefix, self._ack_suffix = ack.split(_INDEX_MARK)
        self._buffer = b""
        #: acks answered with success; failed acks (``Unknown job``); deliveries with
        #: ``deliveries`` above 1; sum of the acked indexes (each index is used once)
        self.acked = 0
        self.failed = 0
        self.redelivered = 0
        self.index_sum = 0

    def start(self, sock: socket.socket) -> None:
        sock.sendall(self.subscribe)
        reply = read_lines(sock, 1)
        if reply.count(b"\n") != 1 or b'"success": true' not in reply:
            raise BenchError(f"consumer refused: {reply.strip()[:200].decode(errors='replace')}")

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """The stamps of the deliveries now complete, and the acks to write for them."""
        buf = self._buffer + data if self._buffer else data
        cut = buf.rfind(b"\n") + 1
        if cut == 0:
            self._buffer = buf
            return [], b""
        whole, self._buffer = buf[:cut], buf[cut:]
        self.acked += whole.count(b'"success": true')
        self.failed += whole.count(b'"success": false')
        indexes = self._INDEX.findall(whole)
        if not indexes:
            return [], b""
        stamps = self._STAMP.findall(whole)
        if len(stamps) != len(indexes):
            raise BenchError("a delivery without a timestamp (not a benchmark job?)")
        self.redelivered += len(indexes) - whole.count(b'"deliveries": 1}')
        self.index_sum += sum(map(int, indexes))
        sep = self._ack_suffix + self._ack_prefix
        return stamps, self._ack_prefix + sep.join(indexes) + self._ack_suffix


class RedisConsumer:
    """A member of a Redis consumer group: XREADGROUP a batch, XACK each entry as it
    arrives, and ask for the next batch once the whole current one is in."""

    def __init__(self, stream: str, name: str, count: int, size: int = 64) -> None:
        self._size = size
        self.read = resp_command("XREADGROUP", "GROUP", GROUP, name, "COUNT", str(count),
                                 "BLOCK", "0", "STREAMS", stream, ">")
        # XACK stream group <one id>: the id's bulk string is added per entry
        self._ack_head = resp_command("XACK", stream, GROUP, "ID")[:-len(b"$2\r\nID\r\n")]
        s = re.escape(stream.encode())
        self._reply = re.compile(
            rb"(\*1\r\n\*2\r\n\$\d+\r\n" + s + rb"\r\n\*(\d+)\r\n)"  # a batch's header
            rb"|\*2\r\n\$\d+\r\n(\d+-\d+)\r\n\*2\r\n\$1\r\nm\r\n\$\d+\r\n(\d{20})[^\r]*\r\n"
            rb"|((?::1\r\n)+)"  # acks of entries that were pending
            rb"|(-[^\r]*\r\n|:0\r\n)"  # an error, or an ack of an entry not pending
        )
        self._buffer = b""
        self._remaining = 0  # entries of the current batch not yet received
        self.acked = 0
        self.failed = 0
        self.redelivered = 0  # '>' only ever reads new entries
        self.index_sum = 0  # entry ids are not a sequence: not checked

    def start(self, sock: socket.socket) -> None:
        sock.sendall(self.read)

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """The stamps of the entries now complete, and the XACKs (and XREADGROUP) to write."""
        buf = self._buffer + data if self._buffer else data
        stamps: list[bytes] = []
        out: list[bytes] = []
        head = self._ack_head
        end = 0
        match = self._reply.match
        # Replies back to back from the start; the first that does not match is
        # incomplete (its rest comes with the next chunk) or not one we know.
        while (m := match(buf, end)) is not None:
            end = m.end()
            entry_id = m.group(3)
            if entry_id is not None:
                stamps.append(m.group(4))
                out.append(b"%b$%d\r\n%b\r\n" % (head, len(entry_id), entry_id))
                self._remaining -= 1
                if self._remaining == 0:
                    out.append(self.read)  # the whole batch is in: ask for the next
            elif m.group(5) is not None:
                self.acked += len(m.group(5)) // 4
            elif m.group(2) is not None:
                self._remaining += int(m.group(2))
            elif m.group(6) == b":0\r\n":
                self.failed += 1
            else:
                raise BenchError(f"redis: {m.group(6).strip().decode(errors='replace')}")
        rest = buf[end:]
        # What is left is the start of one reply (at most one entry: size + ids and
        # lengths); anything else is a reply this consumer never asks for.
        if rest and (rest[:1] not in b"*:-" or len(rest) > _MAX_UNPARSED + self._size):
            raise BenchError(f"unexpected reply from redis: {rest[:200]!r}")
        self._buffer = rest
        return stamps, b"".join(out)


def redis_setup(target: Target, stream: str) -> None:
    """The stream and its consumer group, created empty before any producer starts."""
    with connect(target) as sock:
        sock.sendall(resp_command("XGROUP", "CREATE", stream, GROUP, "$", "MKSTREAM"))
        reply = read_lines(sock, 1)
        if not reply.startswith(b"+OK"):
            raise BenchError(f"XGROUP CREATE: {reply.strip().decode(errors='replace')}")


def redis_cleanup(target: Target, stream: str) -> None:
    """Drop the stream (every entry stays in it otherwise); best effort."""
    try:
        with connect(target) as sock:
            sock.sendall(resp_command("DEL", stream))
            read_lines(sock, 1)
    except (OSError, BenchError):
        pass


# --- the worker processes ----------------------------------------------------------------


@attrs.frozen
class Shared:
    """What the processes share: start time, per-process counters, producers done."""

    start: Any  # Value('d'): when the run starts (perf_counter seconds, every process)
    sent: Any  # Array('q'): per producer, jobs written
    accepted: Any  # Array('q'): per producer, success replies
    acked: Any  # Array('q'): per consumer, acks answered with success
    done: Any  # Value('i'): producers finished


@attrs.frozen
class Clock:
    """The run's timeline in perf_counter_ns."""

    begin: int
    window_start: int
    window_end: int

    @classmethod
    def of(cls, start: float, warmup: float, duration: float) -> Clock:
        begin = int(start * 1e9)
        return cls(begin, begin + int(warmup * 1e9), begin + int((warmup + duration) * 1e9))


def _clock(shared: Shared, st: Settings) -> Clock:
    """The timeline, once the parent has set the start (right after the barrier)."""
    while shared.start.value == 0.0:
        time.sleep(0.0005)
    return Clock.of(shared.start.value, warmup_seconds(st.duration), st.duration)


def _sleep_until(deadline: float, progress: Progress, start: float, total: float) -> None:
    while (left := deadline - time.perf_counter()) > 0:
        time.sleep(min(left, 0.1))
        progress(min(0.99, (time.perf_counter() - start) / total))


def _producer(target: Target, i: int, topic: str, st: Settings, backlog: int,
              shared: Shared, barrier: Any, out: Connection) -> None:
    """Pipeline jobs (``window`` unanswered at most, ``backlog`` ahead of the acks)."""
    try:
        d = target.dialect.name
        template = job_template(d, topic, st.size)
        replies = ProducerReplies(d)
        with connect(target) as sock:
            barrier.wait()
            clock = _clock(shared, st)
            min_chunk = max(1, st.window // 8)
            sent = 0
            cpu_window: list[float] = []
            while time.perf_counter_ns() < clock.begin:
                time.sleep(0.001)
            while True:
                now = time.perf_counter_ns()
                if len(cpu_window) == 0 and now >= clock.window_start:
                    cpu_window.append(time.process_time())
                outstanding = sent - replies.replies
                if now < clock.window_end:
                    room = min(st.window - outstanding,
                               backlog - (sum(shared.sent[:]) - sum(shared.acked[:])))
                    if room >= min_chunk or (room > 0 and outstanding == 0):
                        sock.sendall(template.chunk(room, time.perf_counter_ns()))
                        sent += room
                        shared.sent[i] = sent
                        outstanding += room
                else:
                    if len(cpu_window) == 1:
                        cpu_window.append(time.process_time())
                    if outstanding == 0:
                        break
                if outstanding == 0:
                    time.sleep(0.0002)  # held back by the consumers
                    continue
                replies.feed(recv(sock))
                shared.accepted[i] = replies.replies - replies.errors
        shared.accepted[i] = replies.replies - replies.errors
        cpu = cpu_window[1] - cpu_window[0] if len(cpu_window) == 2 else 0.0
        out.send(("ok", sent, replies.replies - replies.errors, replies.errors, cpu))
    except threading.BrokenBarrierError:
        out.send(("aborted",))
    except Exception as exc:
        barrier.abort()
        out.send(("error", str(exc) or repr(exc)))
    finally:
        with shared.done.get_lock():
            shared.done.value += 1


def _consumer(target: Target, i: int, topic: str, st: Settings, shared: Shared,
              barrier: Any, out: Connection) -> None:
    """Receive jobs, ack each at once; stop when every accepted job is acknowledged."""
    try:
        consumer: MQConsumer | RedisConsumer
        if target.dialect.name == "redis":
            consumer = RedisConsumer(topic, f"c{i}", st.prefetch, st.size)
        else:
            consumer = MQConsumer(topic, st.prefetch)
        with connect(target) as sock:
            consumer.start(sock)
            barrier.wait()
            clock = _clock(shared, st)
            latencies: list[int] = []
            acked_in_window = 0
            cpu_window: list[float] = []
            last_progress = time.perf_counter_ns()
            stall_ns = int(st.stall_timeout * 1e9)
            while True:
                readable, _, _ = select.select([sock], [], [], 0.05)
                now = time.perf_counter_ns()
                if readable:
                    before = consumer.acked
                    stamps, acks = consumer.feed(recv(sock))
                    if acks:
                        sock.sendall(acks)
                    shared.acked[i] = consumer.acked
                    if clock.window_start <= now < clock.window_end:
                        acked_in_window += consumer.acked - before
                        latencies.extend([now - int(s) for s in stamps])
                    last_progress = now
                if len(cpu_window) == 0 and now >= clock.window_start:
                    cpu_window.append(time.process_time())
                elif len(cpu_window) == 1 and now >= clock.window_end:
                    cpu_window.append(time.process_time())
                if (now >= clock.window_end and shared.done.value == st.producers
                        and sum(shared.acked[:]) >= sum(shared.accepted[:])):
                    break
                if now - last_progress > stall_ns and now > clock.window_end:
                    raise BenchError(
                        f"stalled: {sum(shared.acked[:])} of {sum(shared.accepted[:])} "
                        "accepted jobs acknowledged"
                    )
        cpu = cpu_window[1] - cpu_window[0] if len(cpu_window) == 2 else 0.0
        out.send(("ok", consumer.acked, acked_in_window, consumer.failed,
                  consumer.redelivered, consumer.index_sum, cpu, latencies))
    except threading.BrokenBarrierError:
        out.send(("aborted",))
    except Exception as exc:
        barrier.abort()
        out.send(("error", str(exc) or repr(exc)))


# --- the scenario ----------------------------------------------------------------------


def queue_params(st: Settings, target: Target) -> dict[str, Any]:
    return {"producers": st.producers, "consumers": st.consumers, "prefetch": st.prefetch,
            "window": st.window, "backlog": auto_backlog(st), "size": max(st.size, 20),
            "server": target.dialect.name}


def run_queue(target: Target, st: Settings, progress: Progress = no_progress,
              topic: str | None = None) -> Result:
    """P producer and C consumer processes; acknowledged jobs per second and latency.

    ``topic`` (the Redis stream): a new one by default, dropped at the end on Redis. One
    named by the caller must be new (mq-trio: the index check counts from 0) and is left
    as it is, for the caller to inspect.
    """
    if target.ssl_context is not None:
        raise BenchError("queue does not run over TLS")
    result = Result(target.name, "queue", queue_params(st, target))
    redis = target.dialect.name == "redis"
    drop = redis and topic is None
    topic = topic or f"bench.queue.{time.monotonic_ns()}"
    if redis:
        redis_setup(target, topic)
    ctx = _ctx()
    nproc = st.producers + st.consumers
    shared = Shared(ctx.Value("d", 0.0), ctx.Array("q", st.producers, lock=False),
                    ctx.Array("q", st.producers, lock=False),
                    ctx.Array("q", st.consumers, lock=False), ctx.Value("i", 0))
    barrier = ctx.Barrier(nproc + 1)
    warmup = warmup_seconds(st.duration)
    backlog = auto_backlog(st)
    pipes, procs = [], []
    try:
        for i in range(st.consumers):
            ours, theirs = ctx.Pipe(duplex=False)
            procs.append(ctx.Process(target=_consumer, daemon=True,
                                     args=(target, i, topic, st, shared, barrier, theirs)))
            pipes.append(ours)
        for i in range(st.producers):
            ours, theirs = ctx.Pipe(duplex=False)
            procs.append(ctx.Process(target=_producer, daemon=True,
                                     args=(target, i, topic, st, backlog, shared, barrier,
                                           theirs)))
            pipes.append(ours)
        for p in procs:
            p.start()
        try:
            barrier.wait(timeout=st.stall_timeout)
        except threading.BrokenBarrierError:
            reasons = [r[1] for r in _drain(pipes) if r[0] == "error"]
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
            raise BenchError("; ".join(dict.fromkeys(reasons)) or "workers did not start"
                             ) from None
        # Every worker is connected (and subscribed): start them all together.
        start = time.perf_counter() + 0.02
        shared.start.value = start
        server = CPUMeter(target.pid)
        _sleep_until(start + warmup, progress, start, warmup + st.duration)
        server.start()
        _sleep_until(start + warmup + st.duration, progress, start, warmup + st.duration)
        server.stop()
        cpu0 = time.process_time()
        replies = _wait_workers(procs, pipes, 0.0, progress, st)
        own = time.process_time() - cpu0
    finally:
        if drop:
            redis_cleanup(target, topic)
    failed = [r[1] for r in replies if r[0] == "error"]
    if failed or any(r[0] != "ok" for r in replies):
        raise BenchError("; ".join(dict.fromkeys(failed)) or "a worker aborted")
    cons, prods = replies[:st.consumers], replies[st.consumers:]
    sent = sum(r[1] for r in prods)
    accepted = sum(r[2] for r in prods)
    refused = sum(r[3] for r in prods)
    acked = sum(r[1] for r in cons)
    in_window = sum(r[2] for r in cons)
    latencies = [x for r in cons for x in r[7]]
    result.metrics = latency_summary(latencies)
    result.metrics.update(
        per_s=round(in_window / st.duration), acked_in_window=in_window, sent=sent,
        accepted=accepted, acked=acked, seconds=st.duration,
    )
    result.samples_us = [x / 1000 for x in latencies]
    result.server_cpu_pct = server.percent
    mark_workers(result, server.wall or st.duration, own,
                 [r[4] for r in prods] + [r[6] for r in cons],
                 [st.duration] * nproc)
    if refused:
        result.errors.append(f"{refused} jobs refused")
    ack_failures = sum(r[3] for r in cons)
    if ack_failures:
        result.errors.append(f"{ack_failures} acks refused")
    redelivered = sum(r[4] for r in cons)
    if redelivered:
        result.errors.append(f"{redelivered} jobs delivered more than once")
    if acked != accepted:
        result.errors.append(f"{accepted} jobs accepted, {acked} acknowledged")
    if not redis and sum(r[5] for r in cons) != accepted * (accepted - 1) // 2:
        # A fresh topic numbers its jobs 0..accepted-1: each acked once sums to this.
        result.errors.append("the acknowledged indexes are not each job once")
    return result
