"""What the generator knows about the processes it measures: CPU time and RSS from /proc.

Linux only (the benchmark machine); elsewhere the figures are simply absent.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import attrs

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far, or None if it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; fields after the last ")" are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` (VmRSS), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def listening_pid(port: int) -> int | None:
    """The pid of the local process listening on TCP ``port`` (via /proc), or None.

    Lets ``mq-trio bench`` report the CPU use of a server it did not start, without the
    user having to look the pid up.
    """
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{parts[9]}]")
    if not inodes:
        return None
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            for fd in (entry / "fd").iterdir():
                try:
                    if os.readlink(fd) in inodes:
                        return int(entry.name)
                except OSError:
                    continue
        except OSError:
            continue
    return None


@attrs.define
class CPUMeter:
    """CPU used by one process between ``start()`` and ``stop()``, as a share of wall time."""

    pid: int | None
    _cpu0: float | None = None
    _wall0: float = 0.0
    cpu: float | None = None
    wall: float = 0.0
    #: more processes measured over the same window, by name (a cluster's other node,
    #: its Redis); their CPU seconds end up in ``others_cpu``
    others: dict[str, int] = attrs.field(factory=dict, kw_only=True)
    _others0: dict[str, float] = attrs.field(factory=dict, kw_only=True)
    others_cpu: dict[str, float] = attrs.field(factory=dict, kw_only=True)

    def start(self) -> None:
        self._cpu0 = cpu_seconds(self.pid) if self.pid else None
        self._others0 = {}
        for name, pid in self.others.items():
            cpu = cpu_seconds(pid)
            if cpu is not None:
                self._others0[name] = cpu
        self._wall0 = time.perf_counter()

    def stop(self) -> None:
        self.wall = time.perf_counter() - self._wall0
        if self.pid and self._cpu0 is not None:
            now = cpu_seconds(self.pid)
            self.cpu = None if now is None else now - self._cpu0
        self.others_cpu = {}
        for name, cpu0 in self._others0.items():
            now = cpu_seconds(self.others[name])
            if now is not None:
                self.others_cpu[name] = now - cpu0

    def seconds(self) -> dict[str, float]:
        """CPU seconds of every measured process over the window ("server": the pid)."""
        out = {} if self.cpu is None else {"server": round(self.cpu, 3)}
        out.update((name, round(cpu, 3)) for name, cpu in self.others_cpu.items())
        return out

    @property
    def percent(self) -> float | None:
        if self.cpu is None or self.wall <= 0:
            return None
        return 100.0 * self.cpu / self.wall
