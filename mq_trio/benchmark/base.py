"""What every scenario shares: its inputs (Target, Settings), its output (Result), and the
socket and CPU-measuring helpers.

Apart from the scenarios themselves so that ``scenarios`` stays a readable size; the
names the rest of the package and the tests use are re-exported from ``scenarios``.
"""

from __future__ import annotations

import math
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs

from .dialects import NATS_CONNECT_VERBOSE, Dialect
from .procstat import CPUMeter

#: A generator process above this share of one CPU is considered saturated.
SATURATED = 0.90
RECV = 256 << 10

Progress = Callable[[float], None]


def no_progress(fraction: float) -> None:
    """The default progress callback: scenarios run without a progress bar."""
    pass


@attrs.define
class Target:
    """One server under test."""

    name: str
    host: str
    port: int
    dialect: Dialect
    #: for CPU and RSS figures; None when unknown (then they are left out)
    pid: int | None = None
    #: a framed ``auth`` command sent first on every connection (b"": none); not in the
    #: repr, it holds a token or a password
    auth: bytes = attrs.field(default=b"", repr=False)
    #: TLS (rtt and publish only: the other scenarios multiplex non-blocking sockets)
    ssl_context: ssl.SSLContext | None = attrs.field(default=None, repr=False)
    #: subscribers of fanout and e2e connect here over WebSocket (None: over TCP, to
    #: ``port``); publishers always use TCP
    ws_port: int | None = None
    #: subscribers of fanout and e2e connect to this server instead (another node of a
    #: cluster: publisher on one node, subscribers on the other); None: ``host``/``port``
    sub_host: str | None = None
    sub_port: int | None = None
    #: more processes whose CPU is measured with the server's, by name (the subscribers'
    #: node, a cluster's Redis): ``Result.cpu_s``
    cpu_pids: dict[str, int] = attrs.field(factory=dict)

    def subscriber_side(self) -> Target:
        """Where subscribers connect: this target, or its ``sub_host``/``sub_port``."""
        if self.sub_host is None and self.sub_port is None:
            return self
        return attrs.evolve(self, host=self.sub_host or self.host,
                            port=self.sub_port or self.port, sub_host=None, sub_port=None)

    def meter(self) -> CPUMeter:
        """A CPU meter of the server and of ``cpu_pids``."""
        return CPUMeter(self.pid, others=dict(self.cpu_pids))


@attrs.frozen
class Settings:
    duration: float = 5.0
    #: characters of ``msg`` (at least 20 for e2e: the timestamp)
    size: int = 64
    #: unacknowledged sends a publisher may have in flight
    window: int = 1000
    #: e2e publish rate, messages per second
    rate: int = 5000
    publishers: tuple[int, ...] = (1,)
    subscribers: tuple[int, ...] = (1, 10, 100)
    conns: int = 10_000
    #: worker processes for subscriber groups in fanout
    procs: int = 2
    #: how far (messages) the fanout publisher may run ahead of the slowest subscriber
    lag: int = 2000
    #: give up on a scenario that makes no progress for this long
    stall_timeout: float = 30.0
    #: queue: producer and consumer processes, unacknowledged jobs per consumer
    producers: int = 2
    consumers: int = 2
    prefetch: int = 100
    #: queue: jobs producers may be ahead of the acks (0: twice all windows and prefetches)
    backlog: int = 0


@attrs.define
class Result:
    target: str
    scenario: str
    params: dict[str, Any]
    metrics: dict[str, Any] = attrs.field(factory=dict)
    gen_cpu_pct: float | None = None
    server_cpu_pct: float | None = None
    saturated: bool = False
    errors: list[str] = attrs.field(factory=list)
    #: latency samples in microseconds (for plots; not written to JSON)
    samples_us: list[float] = attrs.field(factory=list, repr=False)
    #: CPU seconds of the measured processes over the measured window: "server" and the
    #: target's ``cpu_pids`` (empty when unknown)
    cpu_s: dict[str, float] = attrs.field(factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "scenario": self.scenario,
            "params": self.params,
            "metrics": self.metrics,
            "gen_cpu_pct": _round(self.gen_cpu_pct),
            "server_cpu_pct": _round(self.server_cpu_pct),
            "saturated": self.saturated,
            "cpu_s": self.cpu_s,
            "ok": self.ok,
            "errors": self.errors,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


class BenchError(Exception):
    """The scenario could not complete (disconnect, stall, error replies)."""


def latency_summary(samples_ns: list[int]) -> dict[str, float]:
    """Nearest-rank percentiles in microseconds."""
    if not samples_ns:
        return {"n": 0}
    s = sorted(samples_ns)
    n = len(s)

    def pct(q: float) -> float:
        return round(s[max(0, math.ceil(q * n) - 1)] / 1000, 1)

    return {
        "n": n,
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
        "max_us": round(s[-1] / 1000, 1),
        "mean_us": round(sum(s) / n / 1000, 1),
    }


#: Scenarios that can run over TLS (blocking sockets only).
TLS_SCENARIOS = ("rtt", "publish")


def connect(target: Target, blocking: bool = True) -> socket.socket:
    """A TCP connection with Nagle off: pipelined small commands must not wait for ACKs.

    With ``target.ssl_context`` it is TLS (handshake done); with ``target.auth`` the
    ``auth`` command has been answered with success before this returns.
    """
    sock = socket.create_connection((target.host, target.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if target.ssl_context is not None:
            if not blocking:
                raise BenchError("TLS needs blocking sockets: only "
                                 f"{', '.join(TLS_SCENARIOS)} run over TLS")
            sock = target.ssl_context.wrap_socket(sock, server_hostname=target.host)
        if target.auth:
            authenticate(sock, target.auth)
        if target.dialect.name == "nats":
            read_lines(sock, 1)  # INFO, sent before anything is asked
            sock.sendall(NATS_CONNECT_VERBOSE)
            reply = read_lines(sock, 1)
            if not reply.startswith(b"+OK"):
                raise BenchError(f"NATS refused CONNECT: {reply[:200].decode(errors='replace')}")
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    sock.setblocking(blocking)
    return sock


def authenticate(sock: socket.socket, auth: bytes) -> None:
    """Send the framed ``auth`` command and check the one reply line it gets."""
    sock.sendall(auth)
    reply = read_lines(sock, 1)
    if reply.count(b"\n") != 1 or b'"success": true' not in reply:
        raise BenchError(f"authentication refused: {reply.strip().decode(errors='replace')}")


def recv(sock: socket.socket) -> bytes:
    """Some bytes; a closed connection is a failed scenario, not an empty read."""
    data = sock.recv(RECV)
    if not data:
        raise BenchError("server closed the connection")
    return data


def read_lines(sock: socket.socket, lines: int) -> bytes:
    """Blocking read until at least ``lines`` lines arrived (setup replies only)."""
    buf = b""
    while buf.count(b"\n") < lines:
        buf += recv(sock)
    return buf


@contextmanager
def measuring(result: Result, target: Target, gen_pids_cpu: list[float] | None = None
              ) -> Iterator[CPUMeter]:
    """Server CPU via /proc, this process's CPU via process_time, around a block."""
    server = target.meter()
    cpu0 = time.process_time()
    server.start()
    yield server
    server.stop()
    result.server_cpu_pct = server.percent
    result.cpu_s = server.seconds()
    own = time.process_time() - cpu0
    result.gen_cpu_pct = 100 * own / server.wall if server.wall > 0 else None
    if result.gen_cpu_pct is not None and result.gen_cpu_pct >= 100 * SATURATED:
        result.saturated = True


def generator_cpus() -> int:
    """CPUs this process may run on: what "all CPUs saturated" is measured against."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def mark_workers(result: Result, wall: float, own_cpu: float, worker_cpu: list[float],
                  worker_wall: list[float]) -> None:
    """Generator CPU over all its processes; saturated if one process or all CPUs were."""
    total = own_cpu + sum(worker_cpu)
    result.gen_cpu_pct = 100 * total / wall if wall > 0 else None
    per_process = [c / w for c, w in zip(worker_cpu, worker_wall, strict=True) if w > 0]
    if wall > 0:
        per_process.append(own_cpu / wall)
    if any(p >= SATURATED for p in per_process) or (
        wall > 0 and total / wall >= SATURATED * generator_cpus()
    ):
        result.saturated = True

