"""``mq-trio top``: a refreshing view of a running server, like ``top`` or ``nats-top``.

Every ``--interval`` it reads ``/stats`` and the top ``-n`` of ``/connections`` from the
server's HTTP port (the URL as for ``mq-trio stats``) and shows the totals with their
rates, then one row per connection with its own. Rates are differences between
successive samples over the server's clock (``uptime_seconds``); the first frame, having
no earlier sample, shows averages since the server started (per connection: since it
connected), as ``vmstat``'s first line does, so ``--once`` still says something.

On a terminal the frame is redrawn in place with plain ANSI codes (the alternate screen,
restored at exit; no curses), and ``q`` or Ctrl-C quits with status 0. Without a terminal
(a pipe, a log) each frame is printed after the last, without escape codes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

import attrs

from ._args import UsageError, positive_count, positive_seconds
from ._stats import (
    CONNECTION_SORTS,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    Column,
    Endpoint,
    FetchError,
    add_endpoint_args,
    connection_query,
    endpoint_from_args,
    error,
    format_age,
    format_bytes,
    format_count,
    format_duration,
    format_rate,
    format_short,
    format_store,
    get_json,
    kind,
    layout_table,
    parse_time,
    rate,
    server_now,
)

DEFAULT_INTERVAL = 2.0
DEFAULT_ROWS = 20
#: The server-wide counters shown with rates.
TOTALS = ("messages_in", "bytes_in", "messages_out", "bytes_out", "deliveries")
#: A connection's counters shown with rates.
COUNTERS = ("messages_in", "bytes_in", "messages_out", "bytes_out")

# ANSI: alternate screen on/off, cursor hidden/shown, home, clear to end of line/screen.
ENTER = "\x1b[?1049h\x1b[?25l"
LEAVE = "\x1b[?25h\x1b[?1049l"
HOME = "\x1b[H"
CLEAR_LINE = "\x1b[K"
CLEAR_BELOW = "\x1b[J"


@attrs.frozen
class Sample:
    """One reading: ``/stats`` and a page of ``/connections``, taken together."""

    stats: Mapping[str, Any]
    connections: Mapping[str, Any]


def take_sample(endpoint: Endpoint, sort: str, rows: int, timeout: float) -> Sample:
    stats = get_json(endpoint, "/stats", timeout=timeout)
    page = get_json(endpoint, "/connections", connection_query(sort, rows), timeout=timeout)
    return Sample(stats, page)


def _value(mapping: Mapping[str, Any], key: str) -> float:
    value = mapping.get(key)
    return float(value) if isinstance(value, (int, float)) else 0.0


def window(before: Sample | None, after: Sample) -> float | None:
    """Seconds between two samples of the same server run on its clock; None when
    there is no earlier sample to compare with (the first, or the server restarted)."""
    if before is None or before.stats.get("started") != after.stats.get("started"):
        return None
    seconds = _value(after.stats, "uptime_seconds") - _value(before.stats, "uptime_seconds")
    return seconds if seconds > 0 else None


def total_rates(before: Sample | None, after: Sample) -> dict[str, float | None]:
    """Per-second rates of :data:`TOTALS`: since ``before``, or since the server started."""
    seconds = window(before, after)
    if seconds is None or before is None:
        base: Mapping[str, Any] = {}
        seconds = _value(after.stats, "uptime_seconds")
    else:
        base = before.stats
    return {key: rate(_value(base, key), _value(after.stats, key), seconds) for key in TOTALS}


def _identity(conn: Mapping[str, Any]) -> tuple[str, str]:
    """A connection across samples: its peer and when it connected (ports are reused)."""
    return str(conn.get("peer")), str(conn.get("since"))


def connection_rates(before: Sample | None, after: Sample, conn: Mapping[str, Any],
                     now: datetime | None) -> dict[str, float | None]:
    """Per-second rates of one connection's :data:`COUNTERS`: since ``before`` when it
    was in that sample too, else since it connected (``now``: the server's clock)."""
    seconds = window(before, after)
    previous: Mapping[str, Any] | None = None
    if seconds is not None and before is not None:
        key = _identity(conn)
        previous = next((c for c in before.connections.get("connections", [])
                         if _identity(c) == key), None)
    if previous is None or seconds is None:
        previous = {}
        try:
            seconds = (now - parse_time(str(conn.get("since")))).total_seconds() if now else 0
        except ValueError:
            seconds = 0
    return {key: rate(_value(previous, key), _value(conn, key), seconds) for key in COUNTERS}


TOP_COLUMNS = (
    Column("PEER", shrink=12), Column("KIND", drop=2), Column("USER", shrink=6),
    Column("SUBS", right=True), Column("PENDING", right=True),
    Column("MSGS IN/s", right=True), Column("MSGS OUT/s", right=True),
    Column("BYTES IN/s", right=True, drop=3), Column("BYTES OUT/s", right=True),
    Column("AGE", right=True, drop=1),
)


def render_frame(before: Sample | None, after: Sample, url: str, width: int | None = None,
                 height: int | None = None) -> list[str]:
    """The lines of one frame: totals and rates, then the connections table (as many
    rows as fit ``height``; lines are not cut here, the table shrinks to ``width``)."""
    stats = after.stats
    page = after.connections
    now = server_now(stats)
    rates = total_rates(before, after)
    seconds = window(before, after)
    n = _value
    clock = f", {now:%H:%M:%S} UTC" if now else ""
    max_connections = stats.get("max_connections")
    of_max = f" of {format_count(int(max_connections))}" if max_connections else ""
    failures = stats.get("failures") or {}
    head = [
        f"mq-trio {stats.get('version', '?')} at {url}: up "
        f"{format_duration(n(stats, 'uptime_seconds'))}{clock}",
        f"connections {format_count(int(n(stats, 'connections')))}{of_max} "
        f"({format_count(int(n(stats, 'connections_total')))} since start, "
        f"{format_count(int(n(stats, 'refused')))} refused); subscriptions "
        f"{format_count(int(n(stats, 'subscriptions')))}",
        f"topics {format_count(int(n(stats, 'topics')))}, cached "
        f"{format_bytes(n(stats, 'cached_bytes'))}; slow consumers "
        f"{format_count(int(n(stats, 'slow_consumers')))}; failures "
        f"{format_count(sum(int(v) for v in failures.values() if isinstance(v, int)))}",
        f"in   {format_rate(rates['messages_in'], ' msg/s'):>12}  "
        f"{format_rate(rates['bytes_in'], 'B'):>13}   total "
        f"{_messages(n(stats, 'messages_in'))}, {format_bytes(n(stats, 'bytes_in'))}",
        f"out  {format_rate(rates['messages_out'], ' msg/s'):>12}  "
        f"{format_rate(rates['bytes_out'], 'B'):>13}   total "
        f"{_messages(n(stats, 'messages_out'))}, {format_bytes(n(stats, 'bytes_out'))}",
        f"deliveries {format_rate(rates['deliveries'], '/s')}; store "
        f"{format_store(stats.get('store'))}",
    ]
    conns = list(page.get("connections", []))
    if height is not None:  # room below this header, its last two lines and the table's
        conns = conns[:max(0, height - len(head) - 3)]
    total = int(n(page, "total"))
    over = (f"over the last {seconds:.1f} s" if seconds is not None
            else "since start (first sample)")
    head.append(f"rates per second {over}; connections by {page.get('sort', 'pending')}, "
                f"{min(len(conns), total)} of {total}")
    head.append("")
    rows = []
    for conn in conns:
        r = connection_rates(before, after, conn, now)
        rows.append([
            str(conn.get("peer", "?")), kind(conn), str(conn.get("user") or "-"),
            format_short(n(conn, "subscriptions")), format_bytes(n(conn, "pending_bytes")),
            format_rate(r["messages_in"]), format_rate(r["messages_out"]),
            format_rate(r["bytes_in"], "B"), format_rate(r["bytes_out"], "B"),
            format_age(conn.get("since"), now),
        ])
    return head + layout_table(TOP_COLUMNS, rows, width)


def _messages(count: float) -> str:
    return f"{format_count(int(count))} msg{'' if count == 1 else 's'}"


def clip(lines: list[str], width: int) -> list[str]:
    """Cut lines at the terminal's width: a wrapped line would scroll the frame."""
    return [line[:width] for line in lines]


# --- the command --------------------------------------------------------------------------






def add_top_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = commands.add_parser(
        "top",
        help="a refreshing view of a running server's rates and busiest connections",
        description="Show a running server's totals with their rates (messages and bytes "
        "in and out per second, deliveries) and its top connections (most pending bytes "
        "first, or --sort) with their own rates, refreshed every --interval seconds from "
        "its HTTP port (mq-trio serve --http-port PORT). Rates cover the time since the "
        "previous frame; the first frame shows averages since the server started (per "
        "connection: since it connected). On a terminal the view is redrawn in place; "
        "press q or Ctrl-C to quit. Without a terminal, one frame is printed per interval. "
        "Exit status: 0 when quit, 1 when the server cannot be read at start, 2 bad "
        "arguments; while running, a lost server is shown and retried.",
    )
    p.add_argument("--interval", "-i", type=positive_seconds, default=DEFAULT_INTERVAL,
                   metavar="SECONDS",
                   help=f"seconds between frames (default {DEFAULT_INTERVAL:g})")
    p.add_argument("--sort", "-s", choices=CONNECTION_SORTS, default="pending", metavar="KEY",
                   help=f"order of the connections: {', '.join(CONNECTION_SORTS)} (default "
                   "pending: bytes queued to the client; counts go largest first, since "
                   "oldest first)")
    p.add_argument("-n", dest="rows", type=positive_count, default=DEFAULT_ROWS, metavar="N",
                   help=f"connections shown (default {DEFAULT_ROWS}; fewer if the terminal "
                   "is shorter)")
    p.add_argument("--once", action="store_true",
                   help="print one frame (rates since start) and exit, without escape codes")
    add_endpoint_args(p)
    p.set_defaults(func=run_top)


@contextlib.contextmanager
def keyboard(enabled: bool) -> Iterator[Callable[[float], bool]]:
    """``wait(seconds)``, True when ``q`` was pressed meanwhile. With ``enabled`` (stdin
    is a terminal) the terminal is put in cbreak mode (keys without Enter, Ctrl-C still a
    signal) and restored on the way out; otherwise ``wait`` just sleeps."""
    try:
        import termios
        import tty
    except ImportError:  # pragma: no cover - Windows
        enabled = False

    def sleep(seconds: float) -> bool:
        time.sleep(seconds)
        return False

    if not enabled:
        yield sleep
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def wait(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([fd], [], [], left)[0]:
                key = os.read(fd, 1)
                if key in (b"q", b"Q"):
                    return True
                if not key:  # end of input: nothing more to read
                    time.sleep(max(0.0, deadline - time.monotonic()))
                    return False
        return False

    try:
        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_top(args: argparse.Namespace) -> int:
    try:
        endpoint = endpoint_from_args(args)
    except UsageError as exc:
        error("top", str(exc))
        return EXIT_USAGE
    try:
        sample = take_sample(endpoint, args.sort, args.rows, args.timeout)
    except FetchError as exc:
        error("top", str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK
    if args.once:
        print("\n".join(render_frame(None, sample, endpoint.url)))
        return EXIT_OK
    live = sys.stdout.isatty()
    if live:  # SIGTERM too leaves through the finally clauses that restore the terminal
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with keyboard(live and sys.stdin.isatty()) as wait:
            if live:
                sys.stdout.write(ENTER)
            try:
                return _loop(args, endpoint, sample, live, wait)
            finally:
                if live:
                    sys.stdout.write(LEAVE)
                    sys.stdout.flush()
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:  # `mq-trio top | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _loop(args: argparse.Namespace, endpoint: Endpoint, sample: Sample, live: bool,
          wait: Callable[[float], bool]) -> int:
    """Frames until ``q`` (Ctrl-C raises out of here)."""
    before: Sample | None = None
    lines: list[str] = []
    while True:
        if live:
            size = shutil.get_terminal_size()
            lines = clip(render_frame(before, sample, endpoint.url, size.columns,
                                      size.lines - 1), size.columns)
            sys.stdout.write(HOME + "".join(line + CLEAR_LINE + "\n" for line in lines)
                             + CLEAR_BELOW)
        else:
            lines = render_frame(before, sample, endpoint.url)
            sys.stdout.write("\n".join(lines) + "\n\n")
        sys.stdout.flush()
        while True:
            if wait(args.interval):
                return EXIT_OK
            try:
                fresh = take_sample(endpoint, args.sort, args.rows, args.timeout)
            except FetchError as exc:
                note = f"{exc}; retrying every {args.interval:g} s"
                if live:
                    sys.stdout.write(HOME + note[:shutil.get_terminal_size().columns]
                                     + CLEAR_LINE)
                    sys.stdout.flush()
                else:
                    error("top", note)
                continue
            before, sample = sample, fresh
            break
