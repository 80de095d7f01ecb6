"""Abuse scenarios for issue #11: no single client can crash, freeze or exhaust the server.

    python bench/abuse.py                       # every scenario at the issue's sizes
    python bench/abuse.py bigint nested --small # some scenarios, scaled down
    python bench/abuse.py slowloris --conns 200 --hold 35 --json out.json
    python bench/abuse.py --python /other/venv/bin/python topics   # measure another build

For every scenario a fresh ``python -m mq_trio serve`` is started in a subprocess (its
interpreter is ``--python``; the current directory of the server is a temporary one, so the
``mq_trio`` that interpreter imports is the one installed in its environment, or ``--src``).
Then:

* a **probe** in a separate process (so the attacker's own client work does not count)
  subscribes to its own topic and does back-to-back round trips (``send`` with delivery
  ``all`` and ``cache: false``, timed until the ``success`` reply, which follows its own
  delivery). The stall other clients see is the longest gap between two completed round
  trips (an unfinished one at the end counts up to then) and the p99 round trip, in ms,
  over the scenario's key window (the whole attack unless the scenario names one; e.g. the
  disconnect for ``many-subs``). The same figures for one idle second before the attack are
  the baseline.
* the server's **RSS** (VmRSS from /proc/PID/status) before the attack, its peak during it
  (VmHWM, reset through /proc/PID/clear_refs at the start, and a 20 ms sampler) and after
  the attacker left (after ``--settle`` seconds).
* the **outcome**: what the attacker got back (reply texts / closed), and whether the
  server is still alive and serves a fresh client.

Only the standard library is used, so any interpreter can run this script.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20
HOST = "127.0.0.1"
LINE_LIMIT = MiB  # the server's default --max-line-bytes
TCP_ESTABLISHED = 1

now = time.monotonic  # CLOCK_MONOTONIC: comparable between this process and the probe's


# --------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def proc_status(pid: int, key: str) -> int | None:
    """A ``VmXxx`` line of /proc/PID/status, in bytes (None once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Server:
    def __init__(self, python: str, flags: list[str], src: str | None, log_level: str) -> None:
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="mq-abuse-")
        env = dict(os.environ)
        if src:
            old = env.get("PYTHONPATH")
            env["PYTHONPATH"] = src + (os.pathsep + old if old else "")
        self.cmd = [python, "-m", "mq_trio", "serve", "--host", HOST, "--port", str(self.port),
                    "--log-level", log_level, *flags]
        self.log = open(os.path.join(self.workdir, "server.log"), "w+b")
        self.proc = subprocess.Popen(self.cmd, cwd=self.workdir, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        deadline = now() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                break
            except OSError:
                if now() > deadline:
                    raise RuntimeError("server did not start listening") from None
                time.sleep(0.05)
        self._peak = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            rss = proc_status(self.pid, "VmRSS")
            if rss is None:
                return
            self._peak = max(self._peak, rss)

    def rss(self) -> int | None:
        return proc_status(self.pid, "VmRSS")

    def reset_peak(self) -> None:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        self._peak = self.rss() or 0

    def peak(self) -> int:
        return max(self._peak, proc_status(self.pid, "VmHWM") or 0, self.rss() or 0)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-n:]

    def stop(self) -> int | None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.proc.returncode


def build_info(python: str, src: str | None) -> dict[str, str]:
    """Which mq_trio the server interpreter imports and, if in a git tree, its commit."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    try:
        path = subprocess.run([python, "-c", "import mq_trio; print(mq_trio.__file__)"],
                              cwd=tempfile.gettempdir(), env=env, capture_output=True,
                              text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        path = ""
    info = {"python": python, "mq_trio": path}
    if path:
        try:
            where = os.path.dirname(path)
            info["commit"] = subprocess.run(
                ["git", "-C", where, "log", "--oneline", "-1"],
                capture_output=True, text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--", "."],
                                   capture_output=True, text=True, timeout=10).stdout.split("\n")
            dirty = [d[3:] for d in dirty if d.strip()]
            if info["commit"] and dirty:
                info["commit"] += f" + uncommitted changes to {', '.join(dirty)}"
        except (OSError, subprocess.SubprocessError):
            pass
    return info


# --------------------------------------------------------------------------- probe

def _probe_main(port: int, topic: str, stop: Any, soft: Any, ready: Any, out: Any) -> None:
    sub = json.dumps({"command": "subscribe", "topic": topic, "cache": False}).encode() + b"\n"
    send = json.dumps({"command": "send", "topic": topic, "msg": "probe", "delivery": "all",
                       "cache": False}).encode() + b"\n"
    times = array("d")  # start, end pairs
    errors: list[str] = []
    sock: socket.socket | None = None
    buf = b""

    def connect() -> socket.socket:
        nonlocal buf
        s = socket.create_connection((HOST, port), timeout=2)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(0.2)
        s.sendall(sub)
        buf = b""
        wait_success(s)
        return s

    def wait_success(s: socket.socket) -> bool:
        """Read until a line that is a reply; False if asked to stop first."""
        nonlocal buf
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.startswith(b'{"success"'):
                    if b'"success": true' not in line and b'"success":true' not in line:
                        raise RuntimeError(f"probe got {line[:200]!r}")
                    return True
            if stop.is_set():
                return False
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise ConnectionError("closed by server")
            buf += data

    pending: float | None = None  # start of the round trip not yet answered
    try:
        while not stop.is_set() and not soft.is_set():
            if pending is None:
                pending = now()
            try:
                if sock is None:
                    sock = connect()
                    if not ready.is_set():
                        ready.set()
                        pending = now()
                sock.sendall(send)
                if not wait_success(sock):
                    break
                times.append(pending)
                times.append(now())
                pending = None
            except (OSError, RuntimeError) as exc:
                errors.append(f"{now():.3f} {exc!r}")
                if sock is not None:
                    sock.close()
                sock = None
                if not ready.is_set():
                    ready.set()
                time.sleep(0.05)
    finally:
        out.send((times.tobytes(), pending, now(), errors[:20], len(errors)))
        out.close()


class Probe:
    def __init__(self, port: int, topic: str = "abuse.probe") -> None:
        ctx = mp.get_context("fork")
        self._stop = ctx.Event()
        self._soft = ctx.Event()
        ready = ctx.Event()
        self._recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_probe_main, daemon=True,
                                args=(port, topic, self._stop, self._soft, ready, send))
        self.proc.start()
        send.close()
        if not ready.wait(10):
            raise RuntimeError("probe did not connect")

    def finish(self, grace: float = 0) -> ProbeRecord:
        """Stop after the round trip in flight completes (waiting up to ``grace`` s)."""
        self._soft.set()
        if not self._recv.poll(grace):
            self._stop.set()
        if not self._recv.poll(15):
            self.proc.kill()
            raise RuntimeError("probe did not report")
        raw, pending, stopped, errors, n_errors = self._recv.recv()
        self.proc.join(5)
        t = array("d")
        t.frombytes(raw)
        trips = list(zip(t[0::2], t[1::2], strict=True))
        return ProbeRecord(trips, pending, stopped, errors, n_errors)


@dataclass
class ProbeRecord:
    trips: list[tuple[float, float]]  # (start, end) of every answered round trip, in order
    pending: float | None  # start of an unanswered one at the end
    stopped: float
    errors: list[str]
    n_errors: int

    def stall(self, a: float, b: float) -> dict[str, Any]:
        """Stall seen over [a, b]: round trips overlapping it, gaps between completions."""
        rtts: list[float] = []
        max_gap = 0.0
        prev_end: float | None = None
        for start, end in self.trips:
            if end >= a and start <= b:
                rtts.append(end - start)
                if prev_end is not None:
                    max_gap = max(max_gap, end - prev_end)
                else:
                    max_gap = max(max_gap, end - start)
            prev_end = end
        unfinished = False
        if self.pending is not None and self.pending <= b:
            last = self.trips[-1][1] if self.trips else self.pending
            if self.stopped - last > max_gap:
                max_gap = self.stopped - last
                unfinished = max_gap > 0.5  # still waiting when the probe was stopped
        rtts.sort()
        p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] if rtts else None
        return {"max_gap_ms": round(max_gap * 1000, 1),
                "p99_ms": round(p99 * 1000, 2) if p99 is not None else None,
                "round_trips": len(rtts), "unfinished_at_end": unfinished,
                "window_s": round(b - a, 2)}


# --------------------------------------------------------------------------- client helpers

def connect(port: int, rcvbuf: int | None = None, timeout: float | None = 10) -> socket.socket:
    s = socket.socket()
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect((HOST, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def tcp_state(s: socket.socket) -> int:
    try:
        return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return 0


def server_side_open(port: int, client_ports: set[int]) -> int:
    """How many of these clients the server still holds ESTABLISHED (from /proc/net/tcp).

    The client side cannot tell: a FIN queued behind data the client never reads does
    not arrive, so a cut-off subscriber that never reads still looks connected.
    """
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for row in f:
            parts = row.split(None, 4)
            local, remote, st = parts[1], parts[2], parts[3]
            if st == "01" and int(local.rsplit(":", 1)[1], 16) == port \
                    and int(remote.rsplit(":", 1)[1], 16) in client_ports:
                n += 1
    return n


def short(data: bytes, n: int = 120) -> str:
    text = data.decode(errors="replace").strip()
    return text if len(text) <= n else text[:n] + "…"


def line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


_OK = re.compile(rb'"success": ?true')
_FAIL = re.compile(rb'^.*"success": ?false.*$', re.M)


@dataclass
class Replies:
    ok: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    closed: bool = False
    write_error: str | None = None
    timed_out: bool = False
    elapsed: float = 0.0

    @property
    def total(self) -> int:
        return self.ok + sum(self.failures.values())

    def summary(self) -> str:
        parts = [f"{self.ok} ok"]
        parts += [f"{n}× {r}" for r, n in self.failures.most_common(4)]
        if self.closed:
            parts.append("closed by server")
        if self.write_error:
            parts.append(f"write: {self.write_error}")
        if self.timed_out:
            parts.append("no reply (timeout)")
        return ", ".join(parts)


def pipelined(sock: socket.socket, chunks: Iterable[bytes], expect: int,
              idle_timeout: float = 60) -> Replies:
    """Write ``chunks`` from a thread while reading replies until ``expect`` arrive.

    Deliveries are ignored; a reply is a line with ``"success"``. No window: the attacker
    writes as fast as the server takes it.
    """
    r = Replies()
    t0 = now()

    def write() -> None:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError as exc:
            r.write_error = type(exc).__name__

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    sock.settimeout(idle_timeout)
    buf = b""
    while r.total < expect:
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            r.timed_out = True
            break
        except OSError:
            data = b""
        if not data:
            r.closed = True
            break
        buf += data
        cut = buf.rfind(b"\n") + 1
        if not cut:
            continue
        done, buf = buf[:cut], buf[cut:]
        if b'"command"' in done:  # deliveries: count replies line by line
            for ln in done.split(b"\n"):
                if ln.startswith(b'{"success"'):
                    if _OK.search(ln):
                        r.ok += 1
                    else:
                        r.failures[_reason(ln)] += 1
        else:
            fails = _FAIL.findall(done)
            r.ok += len(_OK.findall(done))
            for f in fails:
                r.failures[_reason(f)] += 1
    r.elapsed = now() - t0
    writer.join(1)
    return r


def _reason(ln: bytes) -> str:
    try:
        return str(json.loads(ln).get("reason"))
    except ValueError:
        return short(ln, 60)


def batched(make: Callable[[int], bytes], n: int, per: int = 2000) -> Iterator[bytes]:
    for i in range(0, n, per):
        yield b"".join(make(j) for j in range(i, min(n, i + per)))


def read_reply(sock: socket.socket, timeout: float) -> str:
    """The first reply line (or 'closed'/'timeout'/'reset')."""
    sock.settimeout(timeout)
    buf = b""
    try:
        while b"\n" not in buf:
            data = sock.recv(65536)
            if not data:
                return f"closed{': ' + short(buf) if buf else ''}"
            buf += data
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return type(exc).__name__
    return short(buf.split(b"\n", 1)[0])


def fresh_client(port: int, timeout: float = 5) -> str:
    """Can a new client connect and be served? 'ok N ms' or what went wrong."""
    t0 = now()
    try:
        with connect(port, timeout=timeout) as s:
            s.sendall(line({"command": "send", "topic": "abuse.fresh", "msg": "hi",
                            "delivery": "all", "cache": False}))
            reply = read_reply(s, timeout)
    except OSError as exc:
        return f"connect failed: {type(exc).__name__}"
    if _OK.search(reply.encode()):
        return f"ok {(now() - t0) * 1000:.0f} ms"
    return reply


def partial_payload(size: int) -> bytes:
    head = b'{"command": "send", "topic": "abuse.partial", "delivery": "all", "msg": "'
    return head + b"a" * max(0, size - len(head))


def hold_partial(port: int, n: int, size: int, fill_timeout: float
                 ) -> tuple[list[socket.socket], dict[str, Any]]:
    """Open ``n`` connections and write an unfinished ``size``-byte line on each.

    Non-blocking: a connection the server stops reading just stays partly written until
    ``fill_timeout``. Returns the sockets and how far the writes got.
    """
    payload = memoryview(partial_payload(size))
    socks: list[socket.socket] = []
    connect_errors: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        try:
            s = connect(port, timeout=5)
        except OSError as exc:
            connect_errors[type(exc).__name__] += 1
            continue
        s.setblocking(False)
        socks.append(s)
    sel = selectors.DefaultSelector()
    offsets = [0] * len(socks)
    write_errors: collections.Counter[str] = collections.Counter()
    for i, s in enumerate(socks):
        sel.register(s, selectors.EVENT_WRITE, i)
    deadline = now() + fill_timeout
    while sel.get_map() and now() < deadline:
        for key, _ in sel.select(0.2):
            i = key.data
            try:
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                offsets[i] += sock.send(payload[offsets[i]:offsets[i] + (1 << 18)])
            except BlockingIOError:
                continue
            except OSError as exc:
                write_errors[type(exc).__name__] += 1
                sel.unregister(key.fileobj)
                continue
            if offsets[i] >= len(payload):
                sel.unregister(key.fileobj)
    stuck = len(sel.get_map())
    sel.close()
    complete = sum(1 for o in offsets if o >= len(payload))
    return socks, {"connections": len(socks), "fully_written": complete, "stuck": stuck,
                   "bytes_written": sum(offsets),
                   "connect_errors": dict(connect_errors), "write_errors": dict(write_errors)}


def states(socks: list[socket.socket]) -> collections.Counter[str]:
    """What each connection looks like without consuming its data ('open' or the reply)."""
    c: collections.Counter[str] = collections.Counter()
    for s in socks:
        try:
            data = s.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            c["open"] += 1
            continue
        except OSError as exc:
            c[type(exc).__name__] += 1
            continue
        if not data:
            c["closed"] += 1
        else:
            first = short(data.split(b"\n", 1)[0], 80)
            c[first + ("" if tcp_state(s) == TCP_ESTABLISHED else " +closed")] += 1
    return c


def fmt_counter(c: collections.Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{n}× {k}" for k, n in collections.Counter(c).most_common(4))


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --------------------------------------------------------------------------- scenarios

class Ctx:
    """What a scenario sees: the server, the options, and marks for its phases."""

    def __init__(self, server: Server, args: argparse.Namespace) -> None:
        self.server = server
        self.port = server.port
        self.args = args
        self.phases: list[dict[str, Any]] = []
        self.window: tuple[float, float] | None = None  # the key window, if not the whole attack
        self.window_name = "attack+settle"
        self._last = now()
        self._phase_peaks: list[int] = []

    def phase(self, name: str) -> None:
        """End a phase: record its duration and the server's peak RSS in it."""
        t = now()
        peak = self.server.peak()
        self._phase_peaks.append(peak)
        self.phases.append({"phase": name, "seconds": round(t - self._last, 2),
                            "rss_peak_mib": mib(peak),
                            "rss_end_mib": mib(self.server.rss()), "t": t})
        self._last = t
        self.server.reset_peak()


def mib(n: int | None) -> float | None:
    return None if n is None else round(n / MiB, 1)


def _send_repeatedly(ctx: Ctx, data: bytes) -> tuple[str, float]:
    """Send ``data`` ``--repeat`` times on one connection, each after the last reply;
    the replies (counted) and the seconds it all took."""
    replies = []
    with connect(ctx.port) as s:
        t0 = now()
        for _ in range(ctx.args.repeat):
            s.sendall(data)
            replies.append(read_reply(s, 120))
            if replies[-1] == "timeout" or replies[-1].startswith("closed"):
                break
        took = now() - t0
    return fmt_counter(collections.Counter(replies)), round(took, 3)


def sc_bigint(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    head, tail = b'{"command": "send", "topic": "abuse.big", "delivery": "all", "msg": ', b"}\n"
    digits = a.digits if a.digits else LINE_LIMIT - len(head) - len(tail)
    data = head + b"1" * digits + tail
    reply, took = _send_repeatedly(ctx, data)
    return {"size": f"{digits} digits ×{a.repeat}", "reply": reply, "reply_s": took}


def sc_nested(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    head, tail = b'{"command": "send", "topic": "abuse.nest", "delivery": "all", "msg": ', b"}\n"
    depth = a.depth if a.depth else (LINE_LIMIT - len(head) - len(tail)) // 2
    data = head + b"[" * depth + b"]" * depth + tail
    reply, took = _send_repeatedly(ctx, data)
    return {"size": f"depth {depth} ({len(data)} B) ×{a.repeat}", "reply": reply,
            "reply_s": took}


def sc_slowloris(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    socks, fill = hold_partial(ctx.port, a.conns, a.line_bytes, a.fill_timeout)
    ctx.phase("fill")
    new_during = [fresh_client(ctx.port)]
    after_fill = states(socks)
    end = now() + a.hold
    while now() < end:
        time.sleep(min(1.0, max(0.0, end - now())))
    new_during.append(fresh_client(ctx.port))
    after_hold = states(socks)
    ctx.phase("hold")
    for s in socks:
        s.close()
    return {"size": f"{a.conns} conns × {a.line_bytes} B unfinished, hold {a.hold:g} s",
            "fill": fill, "states_after_fill": dict(after_fill),
            "states_after_hold": dict(after_hold), "new_client": new_during,
            "reply": f"after fill: {fmt_counter(after_fill)}; "
                     f"after hold: {fmt_counter(after_hold)}; "
                     f"written {fill['fully_written']}/{fill['connections']}; "
                     f"new client: {' / '.join(new_during)}"}


def sc_closed_partial(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    socks, fill = hold_partial(ctx.port, a.closed_conns, a.line_bytes, a.fill_timeout)
    time.sleep(min(1.0, a.hold))  # let the server take the bytes in
    st = states(socks)
    ctx.phase("fill")
    t = now()
    for s in socks:
        s.close()
    time.sleep(a.settle)
    ctx.window = (t, now())
    ctx.window_name = "close"
    ctx.phase("close")
    return {"size": f"{a.closed_conns} conns × {a.line_bytes} B unfinished, then closed",
            "fill": fill, "states_before_close": dict(st),
            "reply": f"written {fill['fully_written']}/{fill['connections']}; {fmt_counter(st)}"}


def sc_topics(ctx: Ctx) -> dict[str, Any]:
    n = ctx.args.topics
    with connect(ctx.port) as s:
        r = pipelined(s, batched(lambda i: b'{"command": "send", "topic": "t%d", "msg": "x", '
                                           b'"delivery": "all"}\n' % i, n), n)
    return {"size": f"{n} topics", "reply": r.summary(), "attack_s": round(r.elapsed, 2),
            "per_s": round(r.total / r.elapsed) if r.elapsed else None}


def sc_caches(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    head = b'{"command": "send", "topic": "abuse.cache%d", "delivery": "all", "msg": "'
    size = a.cache_msg_bytes if a.cache_msg_bytes else LINE_LIMIT - len(head) - 8
    body = b"m" * size
    n = a.cache_topics * a.cache_msgs
    with connect(ctx.port) as s:
        r = pipelined(s, (head % (i % a.cache_topics) + body + b'"}\n' for i in range(n)), n)
    return {"size": f"{a.cache_topics} topics × {a.cache_msgs} × {size} B",
            "reply": r.summary(), "attack_s": round(r.elapsed, 2)}


def sc_many_subs(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    n = a.subs_topics
    s = connect(ctx.port)
    r = pipelined(s, batched(lambda i: b'{"command": "subscribe", "topic": "s%d"}\n' % i, n), n)
    ctx.phase("subscribe")
    t = now()
    s.close()
    time.sleep(a.settle)
    ctx.window = (t, t + a.settle)
    ctx.window_name = "disconnect"
    ctx.phase("disconnect")
    return {"size": f"{n} subscriptions, then disconnect", "reply": r.summary(),
            "subscribe_s": round(r.elapsed, 2)}


_CROWD_TOPIC = "abuse.crowd"


def _crowd(ctx: Ctx, rcvbuf: int | None) -> tuple[list[socket.socket], collections.Counter[str]]:
    """``--cutoff-subs`` subscribers of one topic (500 connections at a time)."""
    a = ctx.args
    subs: list[socket.socket] = []
    sub_line = line({"command": "subscribe", "topic": _CROWD_TOPIC})
    replies: collections.Counter[str] = collections.Counter()
    for i in range(0, a.cutoff_subs, 500):
        batch = []
        for _ in range(min(500, a.cutoff_subs - i)):
            s = connect(ctx.port, rcvbuf=rcvbuf)
            s.sendall(sub_line)
            batch.append(s)
        for s in batch:
            replies[read_reply(s, 30)] += 1
        subs += batch
    ctx.phase("subscribe")
    return subs, replies


def _burst(ctx: Ctx, pub: socket.socket) -> Replies:
    """``--cutoff-burst`` pipelined sends of ``--cutoff-msg-bytes`` to the crowd's topic."""
    a = ctx.args
    body = "b" * a.cutoff_msg_bytes
    return pipelined(pub, (line({"command": "send", "topic": _CROWD_TOPIC, "msg": body,
                                 "delivery": "all"}) for _ in range(a.cutoff_burst)),
                     a.cutoff_burst)


def sc_cutoff(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    subs, replies = _crowd(ctx, rcvbuf=4096)
    t0 = now()
    with connect(ctx.port) as pub:
        r = _burst(ctx, pub)
        t_pub = now()
        deadline = now() + a.cutoff_timeout
        ports = {s.getsockname()[1] for s in subs}
        while True:
            open_ = server_side_open(ctx.port, ports)
            if open_ == 0 or now() > deadline:
                break
            time.sleep(0.2)
    t1 = now()
    ctx.window = (t0, t1)
    ctx.window_name = "burst+cutoff"
    ctx.phase("burst")
    for s in subs:
        s.close()
    return {"size": f"{a.cutoff_subs} subs, {a.cutoff_burst} × {a.cutoff_msg_bytes} B, "
                    f"pending {a.cutoff_pending}",
            "subscribe_replies": dict(replies),
            "reply": f"publisher: {r.summary()} in {t_pub - t0:.2f} s; "
                     f"{len(subs) - open_}/{len(subs)} subs cut off after {t1 - t0:.2f} s",
            "cut_off": len(subs) - open_, "burst_s": round(t_pub - t0, 2),
            "cutoff_s": round(t1 - t0, 2)}


def sc_fanout_readers(ctx: Ctx) -> dict[str, Any]:
    """The cutoff scenario's burst to subscribers that do read: what the fan-out itself
    costs the others, without any cut-off (compare with ``cutoff``)."""
    a = ctx.args
    subs, _ = _crowd(ctx, rcvbuf=None)
    delivered = [0]
    stop = threading.Event()

    def drain() -> None:
        # Counts delivery line ends across every subscriber, as fast as it can read.
        sel = selectors.DefaultSelector()
        for s in subs:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        while not stop.is_set():
            for key, _ in sel.select(0.1):
                try:
                    data = key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                delivered[0] += data.count(b"\n")
        sel.close()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    expected = a.cutoff_subs * a.cutoff_burst
    t0 = now()
    with connect(ctx.port) as pub:
        r = _burst(ctx, pub)
        t_pub = now()
        deadline = now() + a.cutoff_timeout
        while delivered[0] < expected and now() < deadline:
            time.sleep(0.05)
    t1 = now()
    stop.set()
    reader.join()
    ctx.window = (t0, t1)
    ctx.window_name = "burst+delivery"
    ctx.phase("burst")
    for s in subs:
        s.close()
    return {"size": f"{a.cutoff_subs} reading subs, {a.cutoff_burst} × {a.cutoff_msg_bytes} B",
            "reply": f"publisher: {r.summary()} in {t_pub - t0:.2f} s; "
                     f"{delivered[0]}/{expected} delivered after {t1 - t0:.2f} s",
            "delivered": delivered[0], "burst_s": round(t_pub - t0, 2)}


def sc_durable_replay(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    topic = "abuse.replay"
    body = "r" * a.replay_msg_bytes
    with connect(ctx.port) as pub:
        r = pipelined(pub, (line({"command": "send", "topic": topic, "msg": body,
                                  "delivery": "all"}) for _ in range(a.replay_msgs)),
                      a.replay_msgs)
    ctx.phase("publish")
    published_rss = mib(ctx.server.rss())
    t0 = now()
    subs = []
    for _ in range(a.replay_subs):
        s = connect(ctx.port, rcvbuf=4096)
        s.sendall(line({"command": "subscribe", "topic": topic, "last_seen": -1}))
        subs.append(s)
    time.sleep(a.hold)
    still = server_side_open(ctx.port, {s.getsockname()[1] for s in subs})
    st = collections.Counter({"connected": still, "cut off": len(subs) - still})
    ctx.window = (t0, now())
    ctx.window_name = "replay"
    ctx.phase("replay")
    for s in subs:
        s.close()
    return {"size": f"{a.replay_msgs} × {a.replay_msg_bytes} B, {a.replay_subs} non-reading subs, "
                    f"hold {a.hold:g} s",
            "reply": f"publish: {r.summary()} in {r.elapsed:.2f} s, RSS then {published_rss} MiB; "
                     f"subscribers after hold: {fmt_counter(st)}"}


@dataclass
class Scenario:
    run: Callable[[Ctx], dict[str, Any]]
    flags: Callable[[argparse.Namespace], list[str]] = lambda a: []
    doc: str = ""


SCENARIOS: dict[str, Scenario] = {
    "bigint": Scenario(sc_bigint, doc="one 1 MiB line whose msg is a number of that many digits"),
    "nested": Scenario(sc_nested, doc="one line of deeply nested arrays within the line limit"),
    "slowloris": Scenario(sc_slowloris, doc="N connections each holding an unfinished 1 MiB line"),
    "closed-partial": Scenario(sc_closed_partial,
                               doc="connections closed with an unfinished 1 MiB line"),
    "topics": Scenario(sc_topics, doc="one client sending to 1M distinct topics"),
    "caches": Scenario(sc_caches, lambda a: ["--cache-size", str(a.cache_msgs)],
                       doc="8 topics × 100 cached 1 MiB messages"),
    "many-subs": Scenario(sc_many_subs, doc="one client subscribing to 1M topics, then leaving"),
    "cutoff": Scenario(sc_cutoff, lambda a: ["--max-pending-bytes", str(a.cutoff_pending),
                                           "--max-line-bytes", str(a.cutoff_pending // 2)],
                       doc="non-reading subscribers overflowed by a burst and cut off"),
    "fanout-readers": Scenario(sc_fanout_readers,
                               doc="the cutoff burst to subscribers that read (no cut-off)"),
    "durable-replay": Scenario(
        sc_durable_replay,
        lambda a: ["--data-dir", "{datadir}", "--cache-size", str(a.replay_msgs),
                   "--memory-window", "10"],
        doc="durable replay of a big cache to subscribers that never read"),
}

SMALL = dict(digits=20_000, depth=20_000, conns=50, line_bytes=256 * 1024, closed_conns=20,
             topics=20_000, cache_topics=2, cache_msgs=10, cache_msg_bytes=100_000,
             subs_topics=20_000, cutoff_subs=200, cutoff_burst=40, cutoff_msg_bytes=16_384,
             cutoff_pending=65_536, replay_subs=2, cutoff_timeout=10.0,
             replay_msgs=200, replay_msg_bytes=20_000, hold=1.0, settle=1.0, baseline=0.5,
             fill_timeout=10.0)
FULL = dict(digits=0, depth=0, conns=1000, line_bytes=LINE_LIMIT - 2, closed_conns=200,
            topics=1_000_000, cache_topics=8, cache_msgs=100, cache_msg_bytes=0,
            subs_topics=1_000_000, cutoff_subs=6000, cutoff_burst=64, cutoff_msg_bytes=65_536,
            cutoff_pending=262_144, replay_subs=2, cutoff_timeout=30.0,
            replay_msgs=2000, replay_msg_bytes=100 * 1024, hold=5.0, settle=3.0, baseline=1.0,
            fill_timeout=30.0)


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    sc = SCENARIOS[name]
    datadir = tempfile.mkdtemp(prefix="mq-abuse-data-")
    flags = [f.replace("{datadir}", datadir) for f in sc.flags(args)] + args.server_flag
    server = Server(args.python, flags, args.src, args.log_level)
    result: dict[str, Any] = {"scenario": name, "flags": flags}
    probe: Probe | None = None
    try:
        probe = Probe(server.port)
        time.sleep(args.baseline)
        base = (now() - args.baseline, now())
        server.reset_peak()
        before = server.rss()
        ctx = Ctx(server, args)
        t0 = now()
        try:
            out = sc.run(ctx)
        except Exception as exc:  # the attacker failing is an outcome too
            out = {"size": "?", "reply": f"attacker error: {exc!r}"}
        t1 = now()
        ctx.phase("attack end")
        peak = max(ctx._phase_peaks)
        time.sleep(args.settle)
        t2 = now()
        after = server.rss()
        rec = probe.finish(args.probe_grace)
        probe = None
        alive = server.alive()
        fresh = fresh_client(server.port) if alive else "server exited"
        window = ctx.window or (t0, t2)
        result.update(out)
        result.update({
            "attack_s": out.get("attack_s", round(t1 - t0, 2)),
            "stall_window": ctx.window_name,
            "stall": rec.stall(*window),
            "stall_whole_attack": rec.stall(t0, t2),
            "baseline": rec.stall(*base),
            "probe_errors": rec.errors, "probe_error_count": rec.n_errors,
            "rss_mib": {"before": mib(before), "peak": mib(peak), "after": mib(after)},
            "phases": _phase_gaps(ctx.phases, rec, t0, t2),
            "alive": alive, "fresh_client_after": fresh,
        })
        if not alive:
            result["server_log"] = server.log_tail()
    finally:
        if probe is not None:
            try:
                probe.finish()
            except Exception:
                probe.proc.kill()
        rc = server.stop()
        result["exit_code"] = rc
        shutil.rmtree(datadir, ignore_errors=True)
    return result


def _phase_gaps(phases: list[dict[str, Any]], rec: ProbeRecord, t0: float,
                t2: float) -> list[dict[str, Any]]:
    """The phases without their timestamps, each with the probe's longest gap in it (and
    a last one, "after": the attacker gone, until the settle time ends)."""
    out = []
    start = t0
    for p in phases:
        out.append({**{k: v for k, v in p.items() if k != "t"},
                    "max_gap_ms": rec.stall(start, p["t"])["max_gap_ms"]})
        start = p["t"]
    out.append({"phase": "after", "max_gap_ms": rec.stall(start, t2)["max_gap_ms"]})
    return out


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| scenario | size | attack s | stall window | probe max gap ms | probe p99 ms "
            "| whole attack max gap ms | idle max/p99 ms | RSS before → peak → after MiB "
            "| outcome |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "stall" not in r:
            rows.append(f"| {r['scenario']} | | | | | | | | | failed: {r.get('error', '?')} |")
            continue
        st, b, m, w = r["stall"], r["baseline"], r["rss_mib"], r["stall_whole_attack"]
        gap = (f"≥{st['max_gap_ms']:g} (unfinished)" if st["unfinished_at_end"]
               else f"{st['max_gap_ms']:g}")
        alive = "alive" if r["alive"] else f"DEAD (exit {r.get('exit_code')})"
        outcome = f"{r['reply']}; server {alive}, fresh client after: {r['fresh_client_after']}"
        if r["probe_error_count"]:
            outcome += f"; probe errors: {r['probe_error_count']}"
        rows.append(f"| {r['scenario']} | {r['size']} | {r['attack_s']} | {r['stall_window']} "
                    f"({st['window_s']} s) | {gap} | {st['p99_ms']} | {w['max_gap_ms']:g} | "
                    f"{b['max_gap_ms']:g}/{b['p99_ms']} | "
                    f"{m['before']} → {m['peak']} → {m['after']} | {outcome.replace('|', '/')} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="scenarios: " + "; ".join(f"{k}: {v.doc}" for k, v in SCENARIOS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                   help=f"any of {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter that runs the server (default: this one)")
    p.add_argument("--src", help="directory put on the server's PYTHONPATH (a checkout to measure)")
    p.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                   help="extra flag for every server (repeat; e.g. --server-flag=--line-timeout=5)")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--probe-grace", type=float, default=60,
                   help="at the end, wait up to this long for the probe's round trip in flight "
                        "(a stall still going on then is reported as unfinished; default 60)")
    p.add_argument("--small", action="store_true", help="scaled-down sizes for a quick check")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': stdout)")
    g = p.add_argument_group("sizes (defaults: the issue's; --small: scaled down)")
    for k, v in FULL.items():
        g.add_argument("--" + k.replace("_", "-"), type=type(v), default=None,
                       help=f"default {v} (small: {SMALL[k]})" + (
                           " (0: fill the line limit)" if v == 0 else ""))
    g.add_argument("--repeat", type=int, default=1, help="bigint/nested: lines sent (default 1)")
    a = p.parse_args(argv)
    preset = SMALL if a.small else FULL
    for k, v in preset.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    for s in a.scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    a.scenarios = a.scenarios or list(SCENARIOS)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    info = build_info(args.python, args.src)
    print(f"# server: {info.get('mq_trio')} {info.get('commit', '')} ({args.python})",
          file=sys.stderr)
    results = []
    for name in args.scenarios:
        print(f"# {name} …", file=sys.stderr, flush=True)
        try:
            results.append(run_one(name, args))
        except Exception as exc:
            results.append({"scenario": name, "error": repr(exc)})
        r = results[-1]
        if "stall" in r:
            gaps = ", ".join(f"{p['phase']} {p['max_gap_ms']:g}" for p in r.get("phases", []))
            print(f"#   {r['attack_s']} s, stall {r['stall']}, rss {r['rss_mib']}, {r['reply']}"
                  f"; max gap ms by phase: {gaps}",
                  file=sys.stderr, flush=True)
    print(f"server build: `{info.get('commit') or info.get('mq_trio')}`\n")
    print(table(results))
    if args.json:
        doc = json.dumps({"build": info, "results": results}, indent=2)
        if args.json == "-":
            print(doc)
        else:
            with open(args.json, "w") as f:
                f.write(doc + "\n")
    return 0 if all("stall" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
