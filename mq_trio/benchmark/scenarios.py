"""The load generator: plain blocking/non-blocking sockets, no event loop, no decoding.

Each scenario returns a :class:`Result`. The generator is written to cost far less per
message than a server does: commands are pre-encoded bytes pipelined in large writes,
replies are counted (``bytes.count``), only e2e timestamps are ever parsed. Work that one
process could not keep up with (many subscribers, several publishers) is spread over
worker processes (``fork``), and each process reports its own CPU time so that a figure
taken while the generator was the bottleneck is marked as such.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from .base import (
    RECV,
    SATURATED,
    BenchError,
    Progress,
    Result,
    Settings,
    Target,
    connect,
    latency_summary,
    mark_workers,
    measuring,
    no_progress,
    read_lines,
    recv,
)
from .dialects import NATS_PING, NATS_PONG, Dialect, StampReader, TokenCounter
from .procstat import CPUMeter, rss_bytes
from .ws import DeliveryCounter, WsReader, client_frame, ws_connect, ws_subscribe

__all__ = [
    "RECV",
    "SATURATED",
    "BenchError",
    "Progress",
    "Result",
    "Settings",
    "Target",
    "connect",
    "latency_summary",
    "raise_fd_limit",
    "run_conns",
    "run_e2e",
    "run_fanout",
    "run_publish",
    "run_rtt",
]


# --- rtt ------------------------------------------------------------------------------


def run_rtt(target: Target, st: Settings, progress: Progress = no_progress) -> Result:
    """One client, one publish at a time: the time from write to complete reply."""
    d = target.dialect
    result = Result(target.name, "rtt", {"size": st.size})
    cmd = d.publish("bench.rtt", "x" * st.size)
    errors = TokenCounter(d.error_token)
    samples: list[int] = []
    with connect(target) as sock:
        for _ in range(200):  # warm-up: connection, caches, branch predictors
            sock.sendall(cmd)
            read_lines(sock, d.ack_lines)
        start = time.perf_counter_ns()
        end = start + int(st.duration * 1e9)
        with measuring(result, target):
            now = start
            while now < end:
                t0 = time.perf_counter_ns()
                sock.sendall(cmd)
                data = recv(sock)
                while not data.endswith(b"\n"):
                    data += recv(sock)
                now = time.perf_counter_ns()
                samples.append(now - t0)
                errors.feed(data)
                if len(samples) % 1024 == 0:
                    progress((now - start) / (end - start))
    result.metrics = latency_summary(samples)
    result.metrics["per_s"] = round(len(samples) / st.duration)
    result.samples_us = [x / 1000 for x in samples]
    if errors.count:
        result.errors.append(f"{errors.count} error replies")
    return result


# --- e2e ------------------------------------------------------------------------------


def run_e2e(target: Target, st: Settings, progress: Progress = no_progress) -> Result:
    """A paced publisher and one subscriber: publish-to-delivery latency.

    With ``target.ws_port`` the subscriber is a WebSocket client (the stamps are read from
    its frames' payloads), the publisher still TCP. With ``target.sub_port`` (or
    ``sub_host``) the subscriber is on that server: a cluster's other node.

    Both sockets live in this process, so one monotonic clock stamps the send (carried in
    ``msg``) and the arrival. ``select.select`` is used for its microsecond timeout; the
    epoll-based selectors round to milliseconds, which would turn the pacing into bursts.
    """
    d = target.dialect
    size = max(st.size, 20)
    # A topic of its own: a second run on the same server must not get the first one's
    # history replayed on subscribing (taken for deliveries, or early frames over WebSocket).
    topic = f"bench.e2e.{os.getpid()}.{time.monotonic_ns()}"
    result = Result(target.name, "e2e", {"rate": st.rate, "size": size})
    total = max(1, int(st.rate * st.duration))
    warm = min(total // 10, st.rate // 2)
    placeholder = "~" * 20  # survives JSON and RESP encoding unchanged
    prefix, suffix = d.publish(topic, placeholder + "x" * (size - 20)).split(b"~" * 20)
    reader = StampReader(d.stamp_re)
    errors = TokenCounter(d.error_token)
    latencies: list[int] = []
    pub_pings = TokenCounter(NATS_PING) if d.name == "nats" else None
    pongs = 0
    ws: WsReader | None = None
    sub_side = target.subscriber_side()
    if target.ws_port is not None:
        sub, first_bytes = ws_connect(sub_side)
        try:
            ws = ws_subscribe(sub, first_bytes, d, topic)
        except BaseException:
            sub.close()
            raise
        ws.keep_payload = True
    else:
        sub = connect(sub_side)
    with sub, connect(target) as pub:
        if ws is None:
            sub.sendall(d.subscribe(topic))
            read_lines(sub, d.sub_confirm_lines)
        sub.setblocking(False)
        pub.setblocking(False)
        interval = 1e9 / st.rate
        sent = ack_lines = received = 0
        start = time.perf_counter_ns()
        last_progress = start
        with measuring(result, target):
            while received < total or ack_lines < total * d.ack_lines:
                now = time.perf_counter_ns()
                if sent < total:
                    due = start + int(sent * interval)
                    if now >= due:
                        line = prefix + b"%020d" % time.perf_counter_ns() + suffix
                        if pub.send(line) != len(line):  # pragma: no cover - tiny writes
                            raise BenchError("publisher socket buffer full")
                        sent += 1
                        continue
                    timeout = (due - now) / 1e9
                else:
                    timeout = 0.1
                readable, _, _ = select.select([sub, pub], [], [], timeout)
                for sock in readable:
                    data = recv(sock)
                    if sock is sub:
                        arrived = time.perf_counter_ns()
                        if ws is not None:
                            ws.feed(data)
                            data = bytes(ws.payload)
                            ws.payload.clear()
                        stamps = reader.feed(data)
                        received += len(stamps)
                        latencies.extend(arrived - s for s in stamps)
                    else:
                        ack_lines += data.count(b"\n")
                        if pub_pings is not None and pub_pings.feed(data):
                            ack_lines -= pub_pings.count - pongs  # not acks
                            pub.send(NATS_PONG * (pub_pings.count - pongs))
                            pongs = pub_pings.count
                        errors.feed(data)
                if now - last_progress > 200_000_000:
                    last_progress = now
                    progress(received / total)
                    if sent >= total and now - start > (st.duration + st.stall_timeout) * 1e9:
                        raise BenchError(f"stalled: {received}/{total} delivered")
        elapsed = (time.perf_counter_ns() - start) / 1e9
    measured = latencies[warm:]
    result.metrics = latency_summary(measured)
    result.metrics.update(sent=sent, delivered=received, achieved_rate=round(sent / elapsed))
    result.samples_us = [x / 1000 for x in measured]
    if received != sent:
        result.errors.append(f"sent {sent}, delivered {received}")
    if errors.count:
        result.errors.append(f"{errors.count} error replies")
    return result


# --- publish --------------------------------------------------------------------------


def _pipelined_publisher(
    sock: socket.socket,
    d: Dialect,
    cmd: bytes,
    window: int,
    duration: float,
    limit: Callable[[int], int] | None = None,
) -> tuple[int, int, float, float]:
    """Keep ``window`` sends in flight for ``duration``; return (acks, errors, t0, t1).

    ``limit(sent)`` optionally caps how many more may be sent now (fanout uses it to stay
    within reach of the slowest subscriber).
    """
    errors = TokenCounter(d.error_token)
    pings = TokenCounter(NATS_PING) if d.name == "nats" else None
    answered = 0
    min_chunk = max(1, window // 8)
    outstanding = sent = lines = 0
    t0 = time.perf_counter()
    end = t0 + duration
    while True:
        if time.perf_counter() < end:
            room = window - outstanding
            if limit is not None:
                room = min(room, limit(sent))
            if room >= min_chunk or (room > 0 and outstanding == 0):
                sock.sendall(cmd * room)
                outstanding += room
                sent += room
        elif outstanding == 0:
            break
        if outstanding == 0:
            time.sleep(0.0002)  # held back by the slowest subscriber
            continue
        data = recv(sock)
        lines += data.count(b"\n")
        if pings is not None and pings.feed(data):
            # nats-server PINGs a connection ~2 s after it connected: a line but no ack
            # (counted as one, the run would wait forever for a last ack never due)
            lines -= pings.count - answered
            sock.sendall(NATS_PONG * (pings.count - answered))
            answered = pings.count
        errors.feed(data)
        outstanding = sent - lines // d.ack_lines
    return sent, errors.count, t0, time.perf_counter()


def _publish_worker(target: Target, cmd: bytes, st: Settings, start: Any, out: Connection
                    ) -> None:
    try:
        with connect(target) as sock:
            start.wait()
            cpu0 = time.process_time()
            acks, errs, t0, t1 = _pipelined_publisher(
                sock, target.dialect, cmd, st.window, st.duration
            )
            out.send(("ok", acks, errs, t0, t1, time.process_time() - cpu0))
    except threading.BrokenBarrierError:
        out.send(("aborted",))  # another publisher failed to start
    except Exception as exc:
        start.abort()  # the others (and the parent) must not wait for this one
        out.send(("error", str(exc) or repr(exc)))


def _drain(pipes: list[Connection], wait: float = 5.0) -> list[Any]:
    """The messages the workers sent (each waited for up to ``wait`` seconds)."""
    return [pipe.recv() for pipe in pipes if pipe.poll(wait)]


def _ctx() -> Any:
    return multiprocessing.get_context("fork")


def _wait_workers(procs: list[Any], pipes: list[Connection], expected_s: float,
                  progress: Progress, st: Settings) -> list[Any]:
    """Collect one message per worker, showing progress against the expected duration."""
    replies: list[Any] = [None] * len(pipes)
    start = time.perf_counter()
    deadline = start + expected_s + st.stall_timeout
    try:
        while any(r is None for r in replies):
            for i, pipe in enumerate(pipes):
                if replies[i] is None and pipe.poll(0.05):
                    replies[i] = pipe.recv()
            progress(min(0.99, (time.perf_counter() - start) / max(expected_s, 1e-3)))
            if time.perf_counter() > deadline:
                raise BenchError("workers did not finish in time")
            if any(r is None and not p.is_alive() for r, p in zip(replies, procs, strict=True)):
                for i, pipe in enumerate(pipes):
                    if replies[i] is None and pipe.poll(0.2):
                        replies[i] = pipe.recv()
                if any(r is None for r in replies):
                    raise BenchError("a worker process died")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return replies


def run_publish(target: Target, st: Settings, publishers: int = 1,
                progress: Progress = no_progress) -> Result:
    """P processes, each pipelining sends (``window`` unacknowledged) to one topic."""
    d = target.dialect
    result = Result(target.name, "publish",
                    {"publishers": publishers, "window": st.window, "size": st.size})
    cmd = d.publish("bench.publish", "x" * st.size)
    ctx = _ctx()
    start = ctx.Barrier(publishers + 1)
    pipes, procs = [], []
    for _ in range(publishers):
        ours, theirs = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_publish_worker, args=(target, cmd, st, start, theirs),
                        daemon=True)
        p.start()
        pipes.append(ours)
        procs.append(p)
    try:
        start.wait(timeout=st.stall_timeout)
    except threading.BrokenBarrierError:
        # A publisher could not connect (or authenticate): say why, not "broken barrier".
        reasons = [r[1] for r in _drain(pipes) if r[0] == "error"]
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        raise BenchError("; ".join(dict.fromkeys(reasons)) or "publishers did not start"
                         ) from None
    server = target.meter()
    server.start()
    cpu0 = time.process_time()
    replies = _wait_workers(procs, pipes, st.duration, progress, st)
    server.stop()
    result.cpu_s = server.seconds()
    own = time.process_time() - cpu0
    failed = [r[1] for r in replies if r[0] != "ok"]
    if failed:
        raise BenchError("; ".join(failed))
    acks = sum(r[1] for r in replies)
    errs = sum(r[2] for r in replies)
    t0 = min(r[3] for r in replies)
    t1 = max(r[4] for r in replies)
    wall = t1 - t0
    result.metrics = {"acked": acks, "per_s": round(acks / wall), "seconds": round(wall, 3)}
    result.server_cpu_pct = server.percent
    mark_workers(result, wall, own, [r[5] for r in replies], [r[4] - r[3] for r in replies])
    if errs:
        result.errors.append(f"{errs} error replies")
    return result


# --- fanout ---------------------------------------------------------------------------


def _subscriber_worker(target: Target, topic: str, first: int, count: int, counts: Any,
                       finished: Any, ready: Any, goal: Any, out: Connection) -> None:
    """A group of subscribers: count deliveries by lines, report when each has ``goal``."""
    d = target.dialect
    target = target.subscriber_side()
    try:
        readers: list[DeliveryCounter] = []
        if target.ws_port is not None:
            socks = []
            for _ in range(count):
                sock, first_bytes = ws_connect(target)
                socks.append(sock)
                readers.append(DeliveryCounter(d, ws_subscribe(sock, first_bytes, d, topic)))
        else:
            socks = [connect(target) for _ in range(count)]
            for sock in socks:
                sock.sendall(d.subscribe(topic))
            for sock in socks:
                extra = read_lines(sock, d.sub_confirm_lines).count(b"\n") - d.sub_confirm_lines
                if extra:
                    raise BenchError("delivery before the publisher started")
        nats = d.name == "nats"
        pings = [TokenCounter(NATS_PING) for _ in range(count)]
        with ready.get_lock():
            ready.value += count
        sel = selectors.DefaultSelector()
        lines = [0] * count
        for i, sock in enumerate(socks):
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, i)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        left = set(range(count))
        problems: list[str] = []
        while left:
            events = sel.select(0.05)
            target_n = goal.value
            for key, _ in events:
                i = key.data
                data = key.fileobj.recv(RECV)  # type: ignore[union-attr]
                if not data:
                    problems.append(f"subscriber {first + i} disconnected by the server")
                    sel.unregister(key.fileobj)
                    left.discard(i)
                    continue
                if readers:
                    before = readers[i].pings.count
                    got = readers[i].feed(data)
                    if readers[i].pings.count != before:
                        key.fileobj.send(client_frame(NATS_PONG))  # type: ignore[union-attr]
                    if readers[i].closed:
                        problems.append(f"subscriber {first + i}: WebSocket closed by the "
                                        "server")
                else:
                    lines[i] += data.count(b"\n")
                    if nats and pings[i].feed(data):
                        key.fileobj.send(NATS_PONG)  # type: ignore[union-attr]
                        lines[i] -= 1
                    got = lines[i] // d.delivery_lines
                counts[first + i] = got
                if 0 <= target_n <= got:
                    finished[first + i] = time.perf_counter()
                    sel.unregister(key.fileobj)
                    left.discard(i)
            if target_n >= 0:
                for i in list(left):
                    if counts[first + i] >= target_n:
                        finished[first + i] = time.perf_counter()
                        sel.unregister(socks[i])
                        left.discard(i)
            if target_n == -2:
                problems.append("aborted")
                break
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - t0
        for sock in socks:
            sock.close()
        out.send(("ok", cpu, wall, problems))
    except Exception as exc:
        out.send(("error", repr(exc)))


def run_fanout(target: Target, st: Settings, subscribers: int,
               progress: Progress = no_progress) -> Result:
    """One publisher, S subscribers of one topic; every delivery is counted per subscriber.

    With ``target.ws_port`` the subscribers are WebSocket clients (frame headers parsed,
    nothing decoded), the publisher still TCP. With ``target.sub_port`` (or ``sub_host``)
    the subscribers are on that server: a cluster's other node.
    """
    d = target.dialect
    topic = f"bench.fanout.{subscribers}.{os.getpid()}.{time.monotonic_ns()}"
    result = Result(target.name, "fanout",
                    {"subscribers": subscribers, "window": st.window, "size": st.size})
    ctx = _ctx()
    counts = ctx.Array("q", subscribers, lock=False)
    finished = ctx.Array("d", subscribers, lock=False)
    ready = ctx.Value("i", 0)
    goal = ctx.Value("q", -1, lock=False)
    groups = max(1, min(st.procs, subscribers))
    pipes, procs = [], []
    first = 0
    for g in range(groups):
        n = subscribers // groups + (1 if g < subscribers % groups else 0)
        ours, theirs = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_subscriber_worker,
                        args=(target, topic, first, n, counts, finished, ready, goal, theirs),
                        daemon=True)
        p.start()
        pipes.append(ours)
        procs.append(p)
        first += n
    try:
        deadline = time.perf_counter() + st.stall_timeout
        while ready.value < subscribers:
            if time.perf_counter() > deadline or not all(p.is_alive() for p in procs):
                raise BenchError("subscribers could not connect")
            time.sleep(0.01)
        cmd = d.publish(topic, "x" * st.size)

        def limit(sent: int) -> int:
            return int(min(counts)) + st.lag - sent

        server = target.meter()
        cpu0 = time.process_time()
        server.start()
        with connect(target) as pub:
            # A server that stops acknowledging fails the run instead of hanging it.
            pub.settimeout(st.stall_timeout)
            sent, errs, t0, _ = _pipelined_publisher(pub, d, cmd, st.window, st.duration, limit)
        own = time.process_time() - cpu0
        goal.value = sent
        replies = _wait_workers(procs, pipes, 0.0, progress, st)
        server.stop()
    except BaseException:
        goal.value = -2
        raise
    failed = [r[1] for r in replies if r[0] != "ok"]
    if failed:
        raise BenchError("; ".join(failed))
    for r in replies:
        result.errors.extend(r[3])
    got = list(counts)
    t_end = max(finished)
    wall = t_end - t0
    delivered = sum(got)
    result.metrics = {
        "published": sent,
        "delivered": delivered,
        "per_s": round(delivered / wall) if wall > 0 else 0,
        "seconds": round(wall, 3),
    }
    short = [i for i, c in enumerate(got) if c != sent]
    if short:
        result.errors.append(
            f"{len(short)} subscriber(s) did not get exactly {sent} messages "
            f"(e.g. #{short[0]}: {got[short[0]]})"
        )
    if errs:
        result.errors.append(f"{errs} error replies")
    result.server_cpu_pct = server.percent
    result.cpu_s = server.seconds()
    mark_workers(result, wall, own, [r[1] for r in replies], [r[2] for r in replies])
    return result


# --- conns ----------------------------------------------------------------------------


def raise_fd_limit(needed: int) -> None:
    try:
        import resource
    except ImportError:  # pragma: no cover
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))
        except (ValueError, OSError):
            pass


#: Connections of the conns scenario opened but not yet confirmed, at most.
CONNS_IN_FLIGHT = 256


def run_conns(target: Target, st: Settings, progress: Progress = no_progress,
              settle: float = 1.0) -> Result:
    """C connections, each subscribed to its own topic, then each sends to the next one's.

    Connections are opened with at most ``CONNS_IN_FLIGHT`` not yet confirmed, so the server's
    accept queue never overflows (an overflow costs a 1 s SYN retry and measures the
    kernel, not the server).
    """
    d = target.dialect
    n = st.conns
    result = Result(target.name, "conns", {"conns": n})
    raise_fd_limit(n + 256)
    in_flight_max = CONNS_IN_FLIGHT
    rss0 = rss_bytes(target.pid) if target.pid else None
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    subs = [TokenCounter(d.sub_token) for _ in range(n)]
    hello = d.hello_for_mixed
    confirmations = 2 if target.auth else 1
    if target.ssl_context is not None:
        raise BenchError("conns does not run over TLS")
    addr = (target.host, target.port)
    confirmed = in_flight = 0
    server = CPUMeter(target.pid)
    server_cpu = own_cpu = wall = 0.0
    try:
        # Two measured phases (setup, delivery); the settling pause is left out.
        server.start()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        last = t_active = t0
        while confirmed < n:
            while len(socks) < n and in_flight < in_flight_max:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.connect_ex(addr)
                sel.register(sock, selectors.EVENT_WRITE, len(socks))
                socks.append(sock)
                in_flight += 1
            events = sel.select(1.0)
            for key, mask in events:
                i = key.data
                sock = socks[i]
                if mask & selectors.EVENT_WRITE:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise BenchError(f"connect #{i}: {os.strerror(err)}")
                    sock.send(target.auth + hello + d.subscribe(f"bench.c{i}"))
                    sel.modify(sock, selectors.EVENT_READ, i)
                    continue
                data = recv(sock)
                if d.error_token in data:
                    text = data.strip()[:200].decode(errors="replace")
                    raise BenchError(f"connect #{i}: {text}")
                # (with auth, its success comes first: the subscribe's is the second)
                if subs[i].feed(data) and subs[i].count == confirmations:
                    confirmed += 1
                    in_flight -= 1
                    sel.unregister(sock)
            now = time.perf_counter()
            if now - last > 0.2:
                last = now
                progress(0.5 * confirmed / n)
            if events:
                t_active = now
            elif now - t_active > st.stall_timeout:
                raise BenchError(f"setup stalled at {confirmed}/{n}")
        setup = time.perf_counter() - t0
        server.stop()
        own_cpu += time.process_time() - cpu0
        server_cpu += server.cpu or 0.0
        wall += server.wall
        time.sleep(settle)  # let the server finish its per-connection allocations
        rss1 = rss_bytes(target.pid) if target.pid else None
        delivered = TokenCounter(d.delivery_token)
        for i, sock in enumerate(socks):
            sel.register(sock, selectors.EVENT_READ, i)
        # Encoded before the clock starts: delivery_s is the server's time, not ours.
        msg = "x" * st.size
        lines = [d.publish(f"bench.c{(i + 1) % n}", msg) for i in range(n)]
        server.start()
        cpu0 = time.process_time()
        t1 = time.perf_counter()
        for sock, line in zip(socks, lines, strict=True):
            if sock.send(line) != len(line):  # pragma: no cover
                raise BenchError("send buffer full on an idle connection")
        got = [0] * n
        t_active = time.perf_counter()
        while delivered.count < n:
            events = sel.select(1.0)
            for key, _ in events:
                i = key.data
                before = delivered.count
                delivered.feed(recv(socks[i]))
                got[i] += delivered.count - before
            now = time.perf_counter()
            if events:
                t_active = now
            elif now - t_active > st.stall_timeout:
                raise BenchError(f"delivery stalled at {delivered.count}/{n}")
            if now - last > 0.2:
                last = now
                progress(0.5 + 0.5 * delivered.count / n)
        delivery = time.perf_counter() - t1
        server.stop()
        own_cpu += time.process_time() - cpu0
        server_cpu += server.cpu or 0.0
        wall += server.wall
    finally:
        sel.close()
        for sock in socks:
            sock.close()
    result.metrics = {"setup_s": round(setup, 3), "delivery_s": round(delivery, 3)}
    if target.pid and server.cpu is not None:
        result.server_cpu_pct = 100 * server_cpu / wall
    mark_workers(result, wall, own_cpu, [], [])
    if rss0 is not None and rss1 is not None:
        result.metrics.update(
            rss_before_mib=round(rss0 / 2**20, 1),
            rss_after_mib=round(rss1 / 2**20, 1),
            rss_per_conn_kib=round((rss1 - rss0) / n / 1024, 2),
        )
    wrong = sum(1 for g in got if g != 1)
    if wrong:
        result.errors.append(f"{wrong} connection(s) did not get exactly one delivery")
    return result
