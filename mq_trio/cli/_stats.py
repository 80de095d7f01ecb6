"""``mq-trio stats``: what a running server is doing, read from its HTTP port.

The server answers ``GET /stats``, ``/healthz``, ``/connections`` and ``/topics`` on
``--http-port`` (off by default, loopback by default; docs/operations.md). These commands
are plain blocking clients (``http.client``, no proxies: the port is an operator's, and a
proxy in ``$http_proxy`` has no business seeing it), not trio code: one request at a
time, each bounded by ``--timeout``.

The URL: ``--url``, else ``$MQ_TRIO_HTTP_URL``, else ``http://127.0.0.1:7080``. 7080 is
no default of the server (its HTTP port is off unless asked for) but the port the docs
use for it, next to 7000 (TCP) and 7001 (WebSocket); 8080 was avoided because so many
other things listen there, and a stranger's 404 explains less than "nothing listens".

Exit status: 0 ok (``--health``: the server said it is healthy); 1 cannot connect, no or
a bad answer (``--health``: not healthy); 2 bad arguments; 130 for ``stats`` interrupted
by Ctrl-C (``top`` quits with 0: Ctrl-C is how one leaves it).

The formatting helpers (sizes, durations, rates, tables) are pure functions, shared with
``mq-trio top`` (cli/_top.py).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import ssl
import sys
import textwrap
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode, urlsplit

import attrs

from .. import __version__
from ._args import UsageError, port_number, positive_count, positive_seconds

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
#: Ctrl-C while ``stats`` waits for an answer (128 + SIGINT, as pub and sub).
EXIT_INTERRUPTED = 130

#: Where ``--url`` comes from when not given.
URL_VARIABLE = "MQ_TRIO_HTTP_URL"
#: The HTTP port the docs use (the server's --http-port has no default: it is off).
DEFAULT_HTTP_PORT = 7080
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_HTTP_PORT}"
#: Seconds to wait for each answer.
DEFAULT_TIMEOUT = 5.0
#: Rows listed by ``--connections``/``--topics`` without a count.
DEFAULT_LIMIT = 20

#: ``GET /connections?sort=``: the server's keys (``pending``: bytes queued to the client).
#: The server orders each its own way: counts largest first, since and peer ascending.
CONNECTION_SORTS = ("pending", "messages_in", "bytes_in", "messages_out", "bytes_out",
                    "subscriptions", "since", "peer")
#: ``--topics --sort``: by name (the server's order) or by subscribers.
TOPIC_SORTS = ("name", "subscribers")


# --- the HTTP side ------------------------------------------------------------------------


class FetchError(Exception):
    """The server could not be asked, or answered something unusable: one line for stderr."""


@attrs.frozen
class Endpoint:
    """The server's HTTP port, as given by ``--url`` (a path prefix is kept, for a server
    behind a reverse proxy)."""

    scheme: str
    host: str
    port: int
    netloc: str
    prefix: str = ""

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.prefix}"


def parse_url(text: str) -> Endpoint:
    """``http://HOST:PORT`` (or https, with a path prefix); :class:`UsageError` otherwise,
    naming the URL that was probably meant."""
    if "://" not in text:
        raise UsageError(f"--url {text}: a URL needs a scheme: http://{text}")
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UsageError(
            f"--url {text}: the HTTP port needs an http:// or https:// URL (ws:// and "
            "tcp:// are for pub and sub)"
        )
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"--url {text}: not a port number") from None
    if not parts.hostname:
        raise UsageError(f"--url {text}: no host")
    if parts.query or parts.fragment:
        raise UsageError(f"--url {text}: give the server's base URL, without ?query or #")
    if port is None:
        port = 443 if scheme == "https" else 80
    return Endpoint(scheme, parts.hostname, port, parts.netloc, parts.path.rstrip("/"))


def endpoint_from_args(args: argparse.Namespace,
                       environ: Mapping[str, str] | None = None) -> Endpoint:
    """``--url``, ``--port`` (loopback), ``$MQ_TRIO_HTTP_URL``, or the default."""
    env = os.environ if environ is None else environ
    if args.url is not None and args.port is not None:
        raise UsageError("give either --url or --port, not both")
    if args.port is not None:
        return parse_url(f"http://127.0.0.1:{args.port}")
    return parse_url(args.url or env.get(URL_VARIABLE) or DEFAULT_URL)


@attrs.frozen
class Answer:
    status: int
    reason: str
    body: Any


def fetch(endpoint: Endpoint, path: str, query: Mapping[str, str | int] | None = None,
          *, timeout: float = DEFAULT_TIMEOUT, context: ssl.SSLContext | None = None
          ) -> Answer:
    """``GET`` one JSON document, whatever its status; :class:`FetchError` when there is
    no HTTP answer carrying JSON (with what to check, in the words of the flags)."""
    target = endpoint.prefix + path + (f"?{urlencode(query)}" if query else "")
    where = endpoint.url
    conn: http.client.HTTPConnection
    if endpoint.scheme == "https":
        conn = http.client.HTTPSConnection(endpoint.host, endpoint.port, timeout=timeout,
                                           context=context or ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout)
    try:
        conn.request("GET", target, headers={"Accept": "application/json",
                                             "User-Agent": f"mq-trio/{__version__}"})
        response = conn.getresponse()
        data = response.read()
    except ConnectionRefusedError:
        raise FetchError(
            f"cannot connect to {where}: is the server running with --http-port "
            f"{endpoint.port}?"
        ) from None
    except socket.gaierror as exc:
        raise FetchError(f"cannot resolve host {endpoint.host!r} ({exc.strerror})") from None
    except TimeoutError:
        raise FetchError(f"no answer from {where} within {timeout:g} s") from None
    except ssl.SSLError as exc:
        raise FetchError(f"TLS with {where} failed: {exc.reason or exc}") from None
    except http.client.HTTPException:  # BadStatusLine, RemoteDisconnected, ...
        raise FetchError(
            f"{where}: no HTTP answer (is it the server's TCP port rather than its "
            "--http-port?)"
        ) from None
    except OSError as exc:
        raise FetchError(f"cannot connect to {where}: {exc.strerror or exc}") from None
    finally:
        conn.close()
    try:
        body = json.loads(data)
    except ValueError:
        raise FetchError(
            f"{where}{path}: HTTP {response.status} {response.reason}, not JSON (is it the "
            "server's --http-port? the WebSocket port serves the page, not /stats)"
        ) from None
    return Answer(response.status, response.reason, body)


def get_json(endpoint: Endpoint, path: str, query: Mapping[str, str | int] | None = None,
             *, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """The JSON of a 200 answer; :class:`FetchError` for any other status."""
    answer = fetch(endpoint, path, query, timeout=timeout)
    if answer.status != 200:
        detail = answer.body.get("error") if isinstance(answer.body, dict) else None
        raise FetchError(f"{endpoint.url}{path}: HTTP {answer.status} {answer.reason}"
                         + (f": {detail}" if detail else ""))
    return answer.body


# --- formatting (pure) --------------------------------------------------------------------


def format_bytes(size: float) -> str:
    """``512 B``, ``1.5 KiB``, ``12.3 MiB``, ``2.0 GiB`` (binary units, as the flags)."""
    value = float(size)
    if abs(value) < 1024:
        return f"{value:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def format_count(n: int) -> str:
    """``12,345``: exact, for the summary."""
    return f"{n:,}"


def format_short(value: float) -> str:
    """A number in at most 6 characters for a table cell: ``7``, ``2.5``, ``950``,
    ``12.3k``, ``4.5M``, ``1.2G`` (fractions only below 10, where they matter)."""
    if value < 0:
        return "-" + format_short(-value)
    if value < 10 and value != int(value):
        return f"{value:.1f}"
    if value < 1000:
        return f"{value:.0f}"
    for unit in ("k", "M", "G", "T"):
        value /= 1000
        if value < 999.95 or unit == "T":
            break
    return f"{value:.1f}{unit}"


def format_duration(seconds: float) -> str:
    """Two units at most: ``45s``, ``3m 05s``, ``2h 03m``, ``5d 04h``."""
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {s:02d}s"
    return f"{s}s"


def parse_time(text: str) -> datetime:
    """An ISO time from the server (``Z`` accepted on Python 3.10 too), made aware (UTC
    when it names no zone)."""
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def format_time(text: str) -> str:
    """``2026-12-03 14:05:00 UTC`` from an ISO time (the text itself if unparsable)."""
    try:
        moment = parse_time(text).astimezone(timezone.utc)
    except ValueError:
        return text
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def rate(before: float, after: float, seconds: float) -> float | None:
    """Per-second increase of a counter between two samples; None when it cannot be
    told (no time passed, or the counter went back: the server restarted)."""
    if seconds <= 0 or after < before:
        return None
    return (after - before) / seconds


def format_rate(value: float | None, unit: str = "") -> str:
    """``1.2k``, ``3.4 MiB/s`` with ``unit="B"``; ``-`` when unknown."""
    if value is None:
        return "-"
    if unit == "B":
        return format_bytes(value) + "/s"
    return format_short(value) + unit


def truncate_middle(text: str, width: int) -> str:
    """``203.0.113.77:51234`` -> ``203.0.~51234``: both ends say something (host, port;
    a topic's root and leaf). ``~``, one character, marks the cut."""
    if len(text) <= width:
        return text
    if width <= 2:
        return text[:width]
    tail = (width - 1) // 2
    head = width - 1 - tail
    return text[:head] + "~" + text[len(text) - tail:]


@attrs.frozen
class Column:
    """A table column: numbers align right; ``shrink`` > 0 lets a too-wide table cut
    this column (from the middle) down to that many characters; ``drop`` > 0 lets it
    leave the column out when cutting is not enough (the highest ``drop`` first)."""

    title: str
    right: bool = False
    shrink: int = 0
    drop: int = 0


def layout_table(columns: Sequence[Column], rows: Sequence[Sequence[str]],
                 width: int | None = None) -> list[str]:
    """The header line and one line per row, columns two spaces apart. When the lines
    would be wider than ``width``, the shrinkable columns give up characters, first one
    first, down to their minimum; then droppable columns are left out; what still does
    not fit is left to the caller."""
    keep = list(range(len(columns)))
    natural = [len(c.title) for c in columns]
    for row in rows:
        for i, cell in enumerate(row):
            natural[i] = max(natural[i], len(cell))
    widths = list(natural)
    while width is not None:
        widths = [natural[i] for i in keep]
        excess = sum(widths) + 2 * (len(keep) - 1) - width
        for j, i in enumerate(keep):
            column = columns[i]
            if excess > 0 and column.shrink:
                floor = max(column.shrink, len(column.title))
                give = min(excess, max(0, widths[j] - floor))
                widths[j] -= give
                excess -= give
        droppable = [i for i in keep if columns[i].drop]
        if excess <= 0 or not droppable:
            break
        keep.remove(max(droppable, key=lambda i: columns[i].drop))
    shown = [columns[i] for i in keep]

    def line(cells: Sequence[str]) -> str:
        out = []
        for cell, column, w in zip([cells[i] for i in keep], shown, widths, strict=True):
            cell = truncate_middle(cell, w)
            out.append(cell.rjust(w) if column.right else cell.ljust(w))
        return "  ".join(out).rstrip()

    return [line([c.title for c in columns])] + [line(row) for row in rows]


def _number(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) else 0


def _limit_value(key: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "on" if value else "off"
    if isinstance(value, float) and value == int(value):
        value = int(value)
    if key.endswith("_bytes") and isinstance(value, int):
        return format_bytes(value)
    return str(value)


def format_summary(stats: Mapping[str, Any], url: str, width: int = 100) -> list[str]:
    """``/stats`` as the lines ``mq-trio stats`` prints (labels in a column; the long
    settings line wrapped at ``width``)."""
    get = stats.get
    lines: list[tuple[str, str]] = []
    max_connections = get("max_connections")
    of_max = f" of {format_count(max_connections)} max" if max_connections else ""
    lines.append(("connections", f"{format_count(_number(get('connections')))} now{of_max}; "
                                 f"{format_count(_number(get('connections_total')))} since "
                                 f"start, {format_count(_number(get('refused')))} refused"))
    lines.append(("subscriptions", format_count(_number(get("subscriptions")))))
    lines.append(("topics", f"{format_count(_number(get('topics')))}, cached "
                            f"{format_bytes(_number(get('cached_bytes')))}"))
    lines.append(("in", f"{format_count(_number(get('messages_in')))} messages, "
                        f"{format_bytes(_number(get('bytes_in')))}"))
    lines.append(("out", f"{format_count(_number(get('messages_out')))} messages, "
                         f"{format_bytes(_number(get('bytes_out')))}"))
    lines.append(("deliveries", format_count(_number(get("deliveries")))))
    lines.append(("slow consumers", format_count(_number(get("slow_consumers")))))
    failures = get("failures") or {}
    if failures:
        total = sum(_number(n) for n in failures.values())
        by_reason = ", ".join(f"{reason}: {format_count(_number(n))}" for reason, n in
                              sorted(failures.items(), key=lambda item: -_number(item[1])))
        lines.append(("failures", f"{format_count(total)} ({by_reason})"))
    else:
        lines.append(("failures", "none"))
    lines.append(("store", format_store(get("store"))))
    config = get("config") or {}
    if config:
        # (no-break spaces inside each item: the wrapping parts items, not key and value)
        lines.append(("settings", ", ".join(f"{key}\u00a0{_limit_value(key, value)}"
                                            for key, value in sorted(config.items()))))
    up = format_duration(float(get("uptime_seconds") or 0))
    since = f" (since {format_time(str(get('started')))})" if get("started") else ""
    head = f"mq-trio {get('version', '?')} at {url}, up {up}{since}"
    label = max(len(name) for name, _ in lines)
    out = [head]
    for name, text in lines:
        wrapped = textwrap.wrap(text, max(20, width - label - 4), break_long_words=False,
                                break_on_hyphens=False) or [""]
        wrapped = [part.replace("\u00a0", " ") for part in wrapped]
        out.append(f"  {name.ljust(label)}  {wrapped[0]}")
        out.extend(" " * (label + 4) + more for more in wrapped[1:])
    return out


def format_store(store: Any) -> str:
    """The durable store's state: ``none (in memory)`` without ``--data-dir``."""
    if not isinstance(store, Mapping):
        return "none (in memory, no --data-dir)"
    state = "available" if store.get("available", True) else "UNAVAILABLE"
    commits = _number(store.get("commits"))
    parts = [f"{format_count(commits)} commit{'' if commits == 1 else 's'}",
             f"{format_count(_number(store.get('failed_commits')))} failed"]
    fsync = store.get("fsync")
    if isinstance(fsync, Mapping):
        parts.append("fsync " + ", ".join(f"{k} {v}" for k, v in fsync.items()))
    elif fsync is not None:
        parts.append(f"fsync {fsync}")
    return f"{state}; " + ", ".join(parts)


def format_age(since: Any, now: datetime | None) -> str:
    """How long ago ``since`` (an ISO time) was at ``now``: ``3m 05s``; ``-`` unknown."""
    if now is None or not isinstance(since, str):
        return "-"
    try:
        return format_duration((now - parse_time(since)).total_seconds())
    except ValueError:
        return "-"


def server_now(stats: Mapping[str, Any]) -> datetime | None:
    """The server's clock when it answered (started + uptime): connection ages are
    reckoned on it, so a client whose clock is off does not skew them."""
    try:
        started = parse_time(str(stats["started"]))
        return datetime.fromtimestamp(started.timestamp() + float(stats["uptime_seconds"]),
                                      timezone.utc)
    except (KeyError, TypeError, ValueError):
        return None


def kind(conn: Mapping[str, Any]) -> str:
    """``tcp``, ``ws``, ``tcp+tls``, ``ws+tls``."""
    transport = "ws" if conn.get("transport") == "websocket" else str(conn.get("transport"))
    return transport + ("+tls" if conn.get("tls") else "")


CONNECTION_COLUMNS = (
    Column("PEER", shrink=12), Column("KIND", drop=2), Column("USER", shrink=6),
    Column("AGE", drop=1), Column("SUBS", right=True), Column("PENDING", right=True),
    Column("MSGS IN", right=True), Column("BYTES IN", right=True, drop=3),
    Column("MSGS OUT", right=True), Column("BYTES OUT", right=True),
)


def connection_table(page: Mapping[str, Any], now: datetime | None,
                     width: int | None) -> list[str]:
    """``/connections`` as a table and a line saying how many there are."""
    rows = [
        [str(c.get("peer", "?")), kind(c), str(c.get("user") or "-"),
         format_age(c.get("since"), now),
         format_short(_number(c.get("subscriptions"))),
         format_bytes(_number(c.get("pending_bytes"))),
         format_short(_number(c.get("messages_in"))), format_bytes(_number(c.get("bytes_in"))),
         format_short(_number(c.get("messages_out"))),
         format_bytes(_number(c.get("bytes_out")))]
        for c in page.get("connections", [])
    ]
    note = _shown(len(rows), page, "connection", f"by {page.get('sort', 'pending')}")
    return layout_table(CONNECTION_COLUMNS, rows, width) + [note] if rows else [note]


TOPIC_COLUMNS = (
    Column("TOPIC", shrink=16), Column("SUBSCRIBERS", right=True), Column("CACHED", right=True),
    Column("CACHED BYTES", right=True), Column("NEXT INDEX", right=True),
)


def topic_table(page: Mapping[str, Any], width: int | None) -> list[str]:
    """``/topics`` as a table and a line saying how many there are."""
    rows = [
        [str(t.get("topic", "?")), format_count(_number(t.get("subscribers"))),
         format_count(_number(t.get("cached"))), format_bytes(_number(t.get("cached_bytes"))),
         str(t.get("next_index", "-"))]
        for t in page.get("topics", [])
    ]
    note = _shown(len(rows), page, "topic", "")
    return layout_table(TOPIC_COLUMNS, rows, width) + [note] if rows else [note]


def _shown(count: int, page: Mapping[str, Any], noun: str, order: str) -> str:
    total = _number(page.get("total"))
    offset = _number(page.get("offset"))
    plural = "" if total == 1 else "s"
    if total == 0:
        return f"(no {noun}s)"
    if count >= total:
        return f"({total} {noun}{plural}{', ' + order if order else ''})"
    first = offset + 1 if count else offset
    return (f"({first}-{offset + count} of {total} {noun}{plural}"
            f"{', ' + order if order else ''}; --limit N for more)")


# --- the commands -------------------------------------------------------------------------


def add_endpoint_args(p: argparse.ArgumentParser) -> None:
    """``--url``/``--port``/``--timeout``: shared by stats and top."""
    g = p.add_argument_group(
        "server", f"the server's HTTP port (mq-trio serve --http-port PORT). Default: "
        f"${URL_VARIABLE}, else {DEFAULT_URL}; the server has no HTTP port unless started "
        f"with --http-port (e.g. --http-port {DEFAULT_HTTP_PORT})"
    )
    g.add_argument("--url", default=None, metavar="URL",
                   help="the HTTP port's URL, http://HOST:PORT (https:// if it serves TLS)")
    g.add_argument("--port", type=port_number, default=None, metavar="PORT",
                   help="shorthand for --url http://127.0.0.1:PORT")
    g.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"give up on an answer after this long (default {DEFAULT_TIMEOUT:g})")






def add_stats_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``stats`` and ``top`` (called from :func:`mq_trio.cli.build_parser`)."""
    add_stats_parser(commands)
    from ._top import add_top_parser

    add_top_parser(commands)


def add_stats_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = commands.add_parser(
        "stats",
        help="a running server's counters, connections or topics",
        description="Show what a running server is doing, read from its HTTP port "
        "(mq-trio serve --http-port PORT): uptime; connections now, since start and "
        "refused, of the maximum; subscriptions and topics; messages and bytes in and out; "
        "deliveries; slow consumers; failure replies by reason; the durable store's state "
        "and the settings (limits, TLS, auth). --connections and --topics list those "
        "instead; --json prints the "
        "server's JSON (for scripts and jq); --health checks /healthz (for a container "
        "HEALTHCHECK). Exit status: 0 ok, 1 no or a bad answer (--health: not healthy), "
        "2 bad arguments.",
    )
    view = p.add_mutually_exclusive_group()
    view.add_argument(
        "--connections", nargs="?", type=positive_count, const=0, default=None, metavar="N",
        help=f"list the connections, most pending bytes first (see --sort), N of them "
        f"(default: --limit, {DEFAULT_LIMIT})",
    )
    view.add_argument(
        "--topics", nargs="?", const="", default=None, metavar="PREFIX",
        help="list the topics (those starting with PREFIX), by name or --sort subscribers",
    )
    view.add_argument(
        "--health", action="store_true",
        help="ask /healthz: print the status ('ok', 'stopping', 'storage unavailable'); "
        "exit 0 when healthy, 1 otherwise",
    )
    p.add_argument("--json", action="store_true",
                   help="print the server's JSON answer instead of a summary or table")
    p.add_argument(
        "--sort", default=None, metavar="KEY",
        help=f"order of --connections: {', '.join(CONNECTION_SORTS)} (default pending: "
        "bytes queued to the client; counts go largest first, since oldest first); of "
        f"--topics: {', '.join(TOPIC_SORTS)} (default name)",
    )
    p.add_argument("--limit", type=positive_count, default=DEFAULT_LIMIT, metavar="N",
                   help=f"rows listed by --connections and --topics (default {DEFAULT_LIMIT}; "
                   "the server sends at most 1000)")
    add_endpoint_args(p)
    p.set_defaults(func=run_stats)


def connection_query(sort: str | None, limit: int) -> dict[str, str | int]:
    """``/connections``' parameters; the order is left to the server, whose default for
    each key is the useful one (largest counts first, oldest first, peers A-Z)."""
    return {"offset": 0, "limit": limit, "sort": sort or "pending"}


def error(command: str, text: str) -> None:
    print(f"mq-trio {command}: {text}", file=sys.stderr)


def terminal_width() -> int | None:
    """The terminal's width when stdout is one; None (no cutting) in a pipe."""
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size().columns


def run_stats(args: argparse.Namespace) -> int:
    try:
        endpoint = endpoint_from_args(args)
        if args.sort is not None:
            allowed = TOPIC_SORTS if args.topics is not None else CONNECTION_SORTS
            if args.topics is None and args.connections is None:
                raise UsageError("--sort orders --connections or --topics")
            if args.sort not in allowed:
                raise UsageError(f"--sort {args.sort}: choose from {', '.join(allowed)}")
    except UsageError as exc:
        error("stats", str(exc))
        return EXIT_USAGE
    try:
        if args.health:
            answer = fetch(endpoint, "/healthz", timeout=args.timeout)
            status = answer.body.get("status") if isinstance(answer.body, dict) else None
            print(json.dumps(answer.body) if args.json else status or
                  f"HTTP {answer.status} {answer.reason}")
            return EXIT_OK if answer.status == 200 else EXIT_ERROR
        if args.connections is not None:
            body = get_json(endpoint, "/connections", connection_query(
                args.sort, args.connections or args.limit), timeout=args.timeout)
            if not args.json:
                now = server_now(get_json(endpoint, "/stats", timeout=args.timeout))
                lines = connection_table(body, now, terminal_width())
        elif args.topics is not None:
            query: dict[str, str | int] = {"prefix": args.topics, "offset": 0,
                                           "limit": args.limit}
            if args.sort is not None:
                query["sort"] = args.sort
            body = get_json(endpoint, "/topics", query, timeout=args.timeout)
            lines = topic_table(body, terminal_width())
        else:
            body = get_json(endpoint, "/stats", timeout=args.timeout)
            lines = format_summary(body, endpoint.url, terminal_width() or 100)
    except FetchError as exc:
        error("stats", str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:  # Ctrl-C while waiting for an answer: as pub and sub
        return EXIT_INTERRUPTED
    print(json.dumps(body, indent=2) if args.json else "\n".join(lines))
    return EXIT_OK
