"""``mq-trio stats`` / ``mq-trio top``: the pure formatting and rate helpers, and the
commands against a FAKE HTTP server answering fixture JSON in the server's documented
shapes (the real server's port is exercised in test_stats_cli_server.py)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from mq_trio.cli import main
from mq_trio.cli._args import UsageError
from mq_trio.cli._stats import (
    DEFAULT_URL,
    Column,
    endpoint_from_args,
    format_bytes,
    format_duration,
    format_short,
    format_summary,
    layout_table,
    parse_time,
    parse_url,
    rate,
    server_now,
    truncate_middle,
)
from mq_trio.cli._top import (
    Sample,
    _loop,
    connection_rates,
    render_frame,
    total_rates,
    window,
)

STATS: dict[str, Any] = {
    "version": "0.1.0",
    "started": "2026-12-03T14:00:00+00:00",
    "uptime_seconds": 7380.0,
    "connections": 2,
    "connections_total": 340,
    "refused": 2,
    "max_connections": 20000,
    "subscriptions": 40,
    "topics": 31,
    "messages_in": 12345,
    "bytes_in": 1536,
    "messages_out": 45678,
    "bytes_out": 3 << 20,
    "deliveries": 45678,
    "slow_consumers": 1,
    "failures": {"Line too long": 2, "Too many topics": 5},
    "store": {"available": True, "commits": 1234, "failed_commits": 0, "fsync": "everysec"},
    "cached_bytes": 2048,
    "config": {"max_connections": 20000, "max_pending_bytes": 8 << 20, "cache_size": 100},
}

CONNECTIONS: dict[str, Any] = {
    "total": 2, "offset": 0, "limit": 100, "sort": "pending",
    "connections": [
        {"peer": "203.0.113.77:51234", "transport": "websocket", "tls": True, "user": "alice",
         "since": "2026-12-03T16:00:00+00:00", "subscriptions": 3, "pending_bytes": 4096,
         "messages_in": 10, "bytes_in": 900, "messages_out": 7200, "bytes_out": 720000},
        {"peer": "127.0.0.1:40000", "transport": "tcp", "tls": False, "user": None,
         "since": "2026-12-03T14:00:05Z", "subscriptions": 0, "pending_bytes": 0,
         "messages_in": 3, "bytes_in": 120, "messages_out": 0, "bytes_out": 0},
    ],
}

TOPICS: dict[str, Any] = {
    "total": 3, "offset": 0, "limit": 2,
    "topics": [
        {"topic": "news", "subscribers": 4, "cached": 100, "cached_bytes": 5000,
         "next_index": 123},
        {"topic": "news/sport", "subscribers": 0, "cached": 1, "cached_bytes": 50,
         "next_index": 1},
    ],
}


# --- pure helpers ---------------------------------------------------------------------


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1024) == "1.0 KiB"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(8 << 20) == "8.0 MiB"
    assert format_bytes(3 << 30) == "3.0 GiB"
    assert format_bytes(5 << 50) == "5120.0 TiB"  # the largest unit stays


def test_format_short_fits_a_cell() -> None:
    assert [format_short(v) for v in (0, 7, 2.5, 9.96, 950, 999.4)] == [
        "0", "7", "2.5", "10.0", "950", "999"]
    assert format_short(12_345) == "12.3k"
    assert format_short(999_940) == "999.9k"
    assert format_short(999_999) == "1.0M"  # not "1000.0k"
    assert format_short(4_500_000) == "4.5M"
    assert format_short(-1500) == "-1.5k"
    assert all(len(format_short(10 ** e + 0.5)) <= 6 for e in range(13))


def test_format_duration() -> None:
    assert format_duration(-3) == "0s"
    assert format_duration(0) == "0s"
    assert format_duration(59.9) == "59s"
    assert format_duration(65) == "1m 05s"
    assert format_duration(7380) == "2h 03m"
    assert format_duration(5 * 86400 + 4 * 3600 + 59) == "5d 04h"


def test_rate_from_two_samples() -> None:
    assert rate(10, 30, 2.0) == 10.0
    assert rate(10, 10, 2.0) == 0.0
    assert rate(10, 30, 0.0) is None  # no time between the samples
    assert rate(30, 10, 2.0) is None  # the counter went back: a restarted server


def test_truncate_middle_keeps_both_ends() -> None:
    assert truncate_middle("203.0.113.77:51234", 30) == "203.0.113.77:51234"
    assert truncate_middle("203.0.113.77:51234", 12) == "203.0.~51234"
    assert truncate_middle("203.0.113.77:51234", 13) == "203.0.~:51234"
    assert len(truncate_middle("x" * 50, 7)) == 7
    assert truncate_middle("abcdef", 2) == "ab"


def test_parse_time_takes_z_and_naive_times_as_utc() -> None:
    assert parse_time("2026-12-03T14:00:05Z") == parse_time("2026-12-03T14:00:05+00:00")
    assert parse_time("2026-12-03T14:00:05") == parse_time("2026-12-03T14:00:05+00:00")
    now = server_now(STATS)
    assert now is not None and now.isoformat() == "2026-12-03T16:03:00+00:00"
    assert server_now({"started": "yesterday", "uptime_seconds": 1}) is None


COLUMNS = (Column("PEER", shrink=8), Column("USER", shrink=6), Column("N", right=True))
ROWS = [["203.0.113.77:51234", "a-rather-long-user-name", "7"],
        ["[2001:db8::1]:40000", "-", "12345"]]


def test_table_at_its_natural_width() -> None:
    lines = layout_table(COLUMNS, ROWS)
    assert lines == [
        "PEER                 USER                         N",
        "203.0.113.77:51234   a-rather-long-user-name      7",
        "[2001:db8::1]:40000  -                        12345",
    ]


def test_table_fits_the_width_by_cutting_peers_first() -> None:
    natural = len(layout_table(COLUMNS, ROWS)[0])
    lines = layout_table(COLUMNS, ROWS, width=natural - 5)
    assert all(len(line) <= natural - 5 for line in lines)
    assert lines[1].startswith("203.0.1~:51234  a-rather-long-user-name")
    for width in range(10, natural + 5):  # at any width: as narrow as the minimums allow
        lines = layout_table(COLUMNS, ROWS, width=width)
        assert max(len(line) for line in lines) <= max(width, 8 + 2 + 6 + 2 + 5)
        assert [line.split()[-1] for line in lines] == ["N", "7", "12345"]


def test_table_leaves_out_droppable_columns_when_cutting_is_not_enough() -> None:
    columns = (Column("PEER", shrink=8), Column("KIND", drop=1), Column("AGE", drop=2),
               Column("N", right=True))
    rows = [["203.0.113.77:51234", "ws+tls", "3m 05s", "7"]]
    assert layout_table(columns, rows, width=40)[1] == "203.0.113.77:51234  ws+tls  3m 05s  7"
    assert layout_table(columns, rows, width=30) == ["PEER         KIND    AGE     N",
                                                     "203.0~51234  ws+tls  3m 05s  7"]
    assert layout_table(columns, rows, width=22) == ["PEER         KIND    N",
                                                     "203.0~51234  ws+tls  7"]
    assert layout_table(columns, rows, width=12) == ["PEER       N", "203.~1234  7"]
    assert layout_table(columns, rows, width=5) == ["PEER      N", "203.~234  7"]  # (floor)


def test_parse_url() -> None:
    e = parse_url("http://127.0.0.1:7080")
    assert (e.scheme, e.host, e.port, e.url) == ("http", "127.0.0.1", 7080, "http://127.0.0.1:7080")
    e = parse_url("https://mq.example.org/admin/")
    assert (e.port, e.prefix, e.url) == (443, "/admin", "https://mq.example.org/admin")
    e = parse_url("http://[::1]:7080/")
    assert (e.host, e.url) == ("::1", "http://[::1]:7080")
    for bad, says in [("127.0.0.1:7080", "needs a scheme: http://127.0.0.1:7080"),
                      ("ws://127.0.0.1:7001/", "http:// or https://"),
                      ("http://127.0.0.1:99999", "not a port number"),
                      ("http://:7080", "no host"),
                      ("http://127.0.0.1:7080/stats?x=1", "without ?query")]:
        with pytest.raises(UsageError, match=says.replace("?", r"\?")):
            parse_url(bad)


def test_url_from_flag_port_environment_or_default() -> None:
    def args(url: str | None = None, port: int | None = None) -> argparse.Namespace:
        return argparse.Namespace(url=url, port=port)

    env = {"MQ_TRIO_HTTP_URL": "http://10.0.0.5:9000"}
    assert endpoint_from_args(args(), {}).url == DEFAULT_URL == "http://127.0.0.1:7080"
    assert endpoint_from_args(args(), env).url == "http://10.0.0.5:9000"
    assert endpoint_from_args(args(port=8222), env).url == "http://127.0.0.1:8222"
    assert endpoint_from_args(args(url="http://h:1"), env).url == "http://h:1"
    with pytest.raises(UsageError, match="either --url or --port"):
        endpoint_from_args(args(url="http://h:1", port=2), {})


def test_summary_says_it_all() -> None:
    text = "\n".join(format_summary(STATS, "http://127.0.0.1:7080"))
    assert text.splitlines()[0] == ("mq-trio 0.1.0 at http://127.0.0.1:7080, up 2h 03m "
                                    "(since 2026-12-03 14:00:00 UTC)")
    for expected in [
        "connections     2 now of 20,000 max; 340 since start, 2 refused",
        "subscriptions   40",
        "topics          31, cached 2.0 KiB",
        "in              12,345 messages, 1.5 KiB",
        "out             45,678 messages, 3.0 MiB",
        "deliveries      45,678",
        "slow consumers  1",
        "failures        7 (Too many topics: 5, Line too long: 2)",
        "store           available; 1,234 commits, 0 failed, fsync everysec",
        "settings        cache_size 100, max_connections 20000, max_pending_bytes 8.0 MiB",
    ]:
        assert f"  {expected}\n" in text + "\n", expected
    config = {f"max_{name}_bytes": 1 << 20 for name in "abcdefghij"}
    narrow = format_summary(dict(STATS, config=config), "u", width=60)
    settings = narrow[narrow.index(next(x for x in narrow if "settings" in x)):]
    assert len(settings) > 2 and all(len(line) <= 60 for line in settings)
    assert " ".join(" ".join(settings).split()) == "settings " + ", ".join(
        f"max_{name}_bytes 1.0 MiB" for name in "abcdefghij")
    assert all(line.rstrip(",").endswith("MiB") for line in settings)  # items stay whole
    one = dict(STATS, store={"available": False, "commits": 1, "failed_commits": 3,
                             "fsync": "always"})
    assert "  store           UNAVAILABLE; 1 commit, 3 failed, fsync always" in format_summary(
        one, "u")
    memory = dict(STATS, store=None, failures={})
    text = "\n".join(format_summary(memory, "u"))
    assert "store           none (in memory, no --data-dir)" in text
    assert "failures        none" in text


def later(stats: dict[str, Any], seconds: float, **more: int) -> dict[str, Any]:
    """``stats`` ``seconds`` later, with counters grown by ``more``."""
    after = dict(stats, uptime_seconds=stats["uptime_seconds"] + seconds)
    for key, grow in more.items():
        after[key] = stats[key] + grow
    return after


def test_first_frame_rates_are_averages_since_start() -> None:
    first = Sample(STATS, CONNECTIONS)
    assert window(None, first) is None
    rates = total_rates(None, first)
    assert rates["messages_in"] == pytest.approx(12345 / 7380)
    conn = CONNECTIONS["connections"][0]  # connected 180 s before the sample
    assert connection_rates(None, first, conn, server_now(STATS))["messages_out"] == 40.0


def test_later_frames_rates_cover_the_window() -> None:
    first = Sample(STATS, CONNECTIONS)
    conns = copy.deepcopy(CONNECTIONS)
    conns["connections"][0]["messages_out"] += 500
    second = Sample(later(STATS, 2.0, messages_in=20, bytes_out=4096), conns)
    assert window(first, second) == 2.0
    rates = total_rates(first, second)
    assert (rates["messages_in"], rates["bytes_out"], rates["deliveries"]) == (10, 2048, 0)
    now = server_now(second.stats)
    assert connection_rates(first, second, conns["connections"][0], now)["messages_out"] == 250
    # A connection not in the earlier sample: since it connected.
    new = dict(conns["connections"][0], peer="198.51.100.1:1", since="2026-12-03T16:02:52Z",
               messages_out=100)
    assert connection_rates(first, second, new, now)["messages_out"] == 10.0


def test_a_restarted_server_is_compared_with_nothing() -> None:
    first = Sample(STATS, CONNECTIONS)
    restarted = dict(STATS, started="2026-12-03T16:00:00+00:00", uptime_seconds=10.0,
                     messages_in=50)
    second = Sample(restarted, CONNECTIONS)
    assert window(first, second) is None
    assert total_rates(first, second)["messages_in"] == 5.0


def test_frame() -> None:
    first = Sample(STATS, CONNECTIONS)
    lines = render_frame(None, first, "http://127.0.0.1:7080")
    text = "\n".join(lines)
    assert lines[0] == "mq-trio 0.1.0 at http://127.0.0.1:7080: up 2h 03m, 16:03:00 UTC"
    assert lines[1:6] == [
        "connections 2 of 20,000 (340 since start, 2 refused); subscriptions 40",
        "topics 31, cached 2.0 KiB; slow consumers 1; failures 7",
        "in      1.7 msg/s          0 B/s   total 12,345 msgs, 1.5 KiB",
        "out     6.2 msg/s        426 B/s   total 45,678 msgs, 3.0 MiB",
        "deliveries 6.2/s; store available; 1,234 commits, 0 failed, fsync everysec",
    ]
    assert "rates per second since start (first sample); connections by pending, 2 of 2" in text
    table = lines[lines.index("") + 1:]
    assert table[0].split() == ["PEER", "KIND", "USER", "SUBS", "PENDING", "MSGS", "IN/s",
                                "MSGS", "OUT/s", "BYTES", "IN/s", "BYTES", "OUT/s", "AGE"]
    assert table[1].split() == ["203.0.113.77:51234", "ws+tls", "alice", "3", "4.0", "KiB",
                                "0.1", "40", "5", "B/s", "3.9", "KiB/s", "3m", "00s"]
    assert table[2].split()[:3] == ["127.0.0.1:40000", "tcp", "-"]
    assert max(len(line) for line in table) > 98
    short = render_frame(None, first, "u", width=98, height=len(lines) - 1)
    assert len(short) == len(lines) - 1  # one connection row fewer
    table = short[short.index("") + 1:]
    assert max(len(line) for line in table) == 98
    assert table[1].startswith("203.0.~51234  ws+tls")


# --- the commands against a fake HTTP server --------------------------------------------

Route = Callable[[dict[str, str]], tuple[int, Any]]


class FakeAdmin:
    """A stand-in for the server's HTTP port: fixed answers per path, requests recorded."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {
            "/stats": lambda q: (200, STATS),
            "/connections": lambda q: (200, CONNECTIONS),
            "/topics": lambda q: (200, TOPICS),
            "/healthz": lambda q: (200, {"status": "ok"}),
        }
        self.requests: list[tuple[str, dict[str, str]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = dict(parse_qsl(parts.query, keep_blank_values=True))
                fake.requests.append((parts.path, query))
                route = fake.routes.get(parts.path)
                status, body = route(query) if route else (404, {"error": "not found"})
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture
def fake() -> Iterator[FakeAdmin]:
    admin = FakeAdmin()
    thread = threading.Thread(target=admin.httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield admin
    finally:
        admin.httpd.shutdown()
        admin.httpd.server_close()
        thread.join()


def mq(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``mq-trio ARGS`` in this process: status, stdout, stderr."""
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_fake_stats_summary(fake: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = mq(capsys, "stats", "--url", fake.url)
    assert (status, err) == (0, "")
    assert out.splitlines() == format_summary(STATS, fake.url)
    assert fake.requests == [("/stats", {})]


def test_fake_stats_json(fake: FakeAdmin, capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQ_TRIO_HTTP_URL", fake.url + "/")  # the environment's URL
    status, out, _ = mq(capsys, "stats", "--json")
    assert status == 0 and json.loads(out) == STATS
    status, out, _ = mq(capsys, "stats", "--json", "--topics")
    assert status == 0 and json.loads(out) == TOPICS


def test_fake_connections_table(fake: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = mq(capsys, "stats", "--url", fake.url, "--connections", "5")
    assert (status, err) == (0, "")
    assert fake.requests[0] == ("/connections", {"offset": "0", "limit": "5",
                                                 "sort": "pending"})
    lines = out.splitlines()
    assert lines[0].split() == ["PEER", "KIND", "USER", "AGE", "SUBS", "PENDING", "MSGS", "IN",
                                "BYTES", "IN", "MSGS", "OUT", "BYTES", "OUT"]
    assert lines[1].split() == ["203.0.113.77:51234", "ws+tls", "alice", "3m", "00s", "3",
                                "4.0", "KiB", "10", "900", "B", "7.2k", "703.1", "KiB"]
    assert lines[2].split()[:4] == ["127.0.0.1:40000", "tcp", "-", "2h"]
    assert lines[3] == "(2 connections, by pending)"
    fake.requests.clear()
    mq(capsys, "stats", "--url", fake.url, "--connections", "--sort", "peer", "--limit", "7")
    assert fake.requests[0] == ("/connections", {"offset": "0", "limit": "7", "sort": "peer"})


def test_fake_topics_table(fake: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = mq(capsys, "stats", "--port", fake.url.rsplit(":", 1)[1],
                        "--topics", "news", "--sort", "subscribers", "--limit", "2")
    assert status == 0
    assert fake.requests == [("/topics", {"prefix": "news", "offset": "0", "limit": "2",
                                          "sort": "subscribers"})]
    assert out.splitlines() == [
        "TOPIC       SUBSCRIBERS  CACHED  CACHED BYTES  NEXT INDEX",
        "news                  4     100       4.9 KiB         123",
        "news/sport            0       1          50 B           1",
        "(1-2 of 3 topics; --limit N for more)",
    ]


def test_fake_health(fake: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    assert mq(capsys, "stats", "--url", fake.url, "--health") == (0, "ok\n", "")
    fake.routes["/healthz"] = lambda q: (503, {"status": "storage unavailable"})
    assert mq(capsys, "stats", "--url", fake.url, "--health") == (
        1, "storage unavailable\n", "")
    status, out, _ = mq(capsys, "stats", "--url", fake.url, "--health", "--json")
    assert status == 1 and json.loads(out) == {"status": "storage unavailable"}


def test_fake_http_errors(fake: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    fake.routes["/stats"] = lambda q: (500, {"error": "Internal exception"})
    assert mq(capsys, "stats", "--url", fake.url) == (
        1, "", f"mq-trio stats: {fake.url}/stats: HTTP 500 Internal Server Error: "
        "Internal exception\n")
    fake.routes["/stats"] = lambda q: (200, b"<html>a page</html>")
    status, _, err = mq(capsys, "stats", "--url", fake.url)
    assert status == 1
    assert err == (f"mq-trio stats: {fake.url}/stats: HTTP 200 OK, not JSON (is it the "
                   "server's --http-port? the WebSocket port serves the page, not /stats)\n")
    status, _, err = mq(capsys, "stats", "--url", fake.url + "/nowhere")
    assert status == 1 and f"{fake.url}/nowhere/stats: HTTP 404 Not Found" in err


@contextlib.contextmanager
def bound_port(listen: bool) -> Iterator[int]:
    """A loopback port that refuses connections (bound, not listening) or accepts them
    (into the backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        if listen:
            sock.listen(8)
        yield int(sock.getsockname()[1])


def test_nothing_listening(capsys: pytest.CaptureFixture[str]) -> None:
    with bound_port(listen=False) as port:
        for command in ("stats", "top"):
            assert mq(capsys, command, "--port", str(port)) == (
                1, "", f"mq-trio {command}: cannot connect to http://127.0.0.1:{port}: is the "
                f"server running with --http-port {port}?\n")


def test_no_answer_within_the_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    with bound_port(listen=True) as port:
        assert mq(capsys, "stats", "--port", str(port), "--timeout", "0.2") == (
            1, "", f"mq-trio stats: no answer from http://127.0.0.1:{port} within 0.2 s\n")


def test_stats_interrupted_while_waiting() -> None:
    """Ctrl-C while the answer is awaited: 130 and no traceback, as pub and sub."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        proc = subprocess.Popen([sys.executable, "-m", "mq_trio", "stats", "--port",
                                 str(sock.getsockname()[1])],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            sock.settimeout(20)
            conn, _ = sock.accept()  # connected: now it waits for the answer
            with conn:
                conn.settimeout(20)
                assert conn.recv(65536).startswith(b"GET /stats HTTP/1.1\r\n")
                proc.send_signal(signal.SIGINT)
                assert proc.communicate(timeout=20) == ("", "")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130


def test_not_an_http_port(capsys: pytest.CaptureFixture[str]) -> None:
    """A line-protocol port answers the request line with a JSON line, not HTTP."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)

        def answer() -> None:
            conn, _ = sock.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b'{"success": false, "reason": "Invalid JSON"}\r\n')

        thread = threading.Thread(target=answer)
        thread.start()
        status, _, err = mq(capsys, "stats", "--port", str(sock.getsockname()[1]))
        thread.join()
    assert status == 1
    assert err.endswith("no HTTP answer (is it the server's TCP port rather than its "
                        "--http-port?)\n")


@pytest.mark.parametrize(("args", "says"), [
    (["stats", "--sort", "peer"], "--sort orders --connections or --topics"),
    (["stats", "--connections", "--sort", "name"], "--sort name: choose from pending,"),
    (["stats", "--topics", "--sort", "pending"], "--sort pending: choose from name, "),
    (["stats", "--url", "ws://127.0.0.1:7001/"], "http:// or https://"),
    (["top", "--url", "127.0.0.1:7080"], "a URL needs a scheme: http://127.0.0.1:7080"),
    (["stats", "--url", "http://h:1", "--port", "2"], "either --url or --port"),
])
def test_usage_errors(capsys: pytest.CaptureFixture[str], args: list[str], says: str) -> None:
    status, out, err = mq(capsys, *args)
    assert (status, out) == (2, "")
    assert says in err


@pytest.mark.parametrize("args", [
    ["stats", "--connections", "0"], ["stats", "--health", "--topics"],
    ["top", "--interval", "0"], ["top", "-n", "x"], ["top", "--sort", "nope"],
])
def test_argparse_refusals(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2


def test_fake_top_once(fake: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = mq(capsys, "top", "--url", fake.url, "--once", "-n", "3",
                          "--sort", "messages_out")
    assert (status, err) == (0, "")
    assert "\x1b" not in out
    assert out.splitlines() == render_frame(None, Sample(STATS, CONNECTIONS), fake.url)
    assert fake.requests == [("/stats", {}), ("/connections", {
        "offset": "0", "limit": "3", "sort": "messages_out"})]


def test_fake_top_frames_without_a_terminal(fake: FakeAdmin,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Frame after frame, plain; the second one's rates cover the time between samples;
    a lost server is reported and retried."""
    samples = [later(STATS, 2.0 * i, messages_in=30 * i) for i in range(3)]
    fake.routes["/stats"] = lambda q: (200, samples.pop(0))
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        if len(waits) == 2:  # the server is gone for one round
            fake.routes["/stats"] = lambda q: (503, {"status": "stopping"})
        elif len(waits) == 3:
            fake.routes["/stats"] = lambda q: (200, samples.pop(0))
        return len(waits) == 4  # then 'q'

    args = argparse.Namespace(interval=0.5, sort="pending", rows=20, timeout=5.0)
    endpoint = parse_url(fake.url)
    from mq_trio.cli._top import take_sample

    first = take_sample(endpoint, "pending", 20, 5.0)
    assert _loop(args, endpoint, first, False, wait) == 0
    out, err = capsys.readouterr()
    frames = out.split("\n\nmq-trio ")  # (a blank line also parts header and table)
    assert len(frames) == 3 and out.endswith("\n\n")
    assert "since start (first sample)" in frames[0]
    assert "in      1.7 msg/s" in frames[0]
    assert "over the last 2.0 s" in frames[1]
    assert "in       15 msg/s" in frames[1]  # 30 messages in 2 s
    assert "over the last 2.0 s" in frames[2]  # (the failed round left no sample)
    assert waits == [0.5] * 4
    assert err == (f"mq-trio top: {fake.url}/stats: HTTP 503 Service Unavailable; retrying "
                   "every 0.5 s\n")


def test_fake_top_subprocess_quits_on_ctrl_c(fake: FakeAdmin) -> None:
    """The real command, without a terminal: a frame per interval; Ctrl-C ends it with 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mq_trio", "top", "--url", fake.url, "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith(f"mq-trio 0.1.0 at {fake.url}: up 2h 03m")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert err == "" and "\x1b" not in out


# --- the live view on a terminal (a pseudo-terminal) ------------------------------------


class Terminal:
    """``mq-trio ARGS`` on a pseudo-terminal (stdin and stdout), 100x30."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        self.slave = slave
        self.saved = termios.tcgetattr(slave)
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        self.proc = subprocess.Popen([sys.executable, "-m", "mq_trio", *args], stdin=slave,
                                     stdout=slave, stderr=subprocess.PIPE, env=env)
        self.output = b""

    def read_until(self, marker: bytes, timeout: float = 20.0) -> bytes:
        """Everything shown so far, once ``marker`` is in it."""

        deadline = time.monotonic() + timeout
        while marker not in self.output:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.master], [], [], left)[0]:
                raise TimeoutError(f"{marker!r} not shown; got ...{self.output[-3000:]!r}")
            self.output += os.read(self.master, 65536)
        return self.output

    def type(self, keys: bytes) -> None:

        os.write(self.master, keys)

    def finish(self) -> tuple[int, str]:
        """Wait for the exit, reading the screen meanwhile (a full pty blocks the writer)."""

        deadline = time.monotonic() + 20
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "still running"
            if select.select([self.master], [], [], 0.1)[0]:
                self.output += os.read(self.master, 65536)
        while select.select([self.master], [], [], 0)[0]:
            self.output += os.read(self.master, 65536)
        status = self.proc.wait()
        assert self.proc.stderr is not None
        return status, self.proc.stderr.read().decode()

    def close(self) -> None:

        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def open_terminal(*args: str) -> Terminal:
        opened.append(Terminal(*args))
        return opened[-1]

    yield open_terminal
    for term in opened:
        term.close()


@pytest.mark.parametrize(("key", "status"), [(b"q", 0), (signal.SIGINT, 0),
                                             (signal.SIGTERM, 128 + signal.SIGTERM)],
                         ids=["q", "ctrl-c", "sigterm"])
def test_fake_top_on_a_terminal(fake: FakeAdmin, terminal: Callable[..., Terminal],
                                key: bytes | signal.Signals, status: int) -> None:
    """Redrawn in place on the alternate screen, cut to the terminal's width; ``q`` or
    Ctrl-C quits with 0, SIGTERM with 143, each leaving the terminal as it was. (Ctrl-C
    is sent as the SIGINT a terminal makes of it: the pty is not the child's controlling
    terminal.)"""

    from mq_trio.cli._top import ENTER, HOME, LEAVE

    uptimes = iter(range(10**6))
    fake.routes["/stats"] = lambda q: (200, later(STATS, next(uptimes)))
    term = terminal("top", "--url", fake.url, "--interval", "0.05")
    shown = term.read_until(b"2h 02m\x1b[K")  # the last row of the first frame
    assert shown.startswith(ENTER.encode() + HOME.encode())
    assert b"mq-trio 0.1.0 at " + fake.url.encode() + b": up 2h 03m" in shown
    frame = shown.split(HOME.encode())[1]
    assert all(len(line.split(b"\x1b[K")[0]) <= 100 for line in frame.split(b"\r\n"))
    term.read_until(b"rates per second over the last")  # the next frames: rates (0/s)
    if isinstance(key, bytes):
        term.type(key)
    else:
        term.proc.send_signal(key)
    assert term.finish() == (status, "")
    assert term.read_until(LEAVE.encode()).endswith(LEAVE.encode())
    assert termios.tcgetattr(term.slave) == term.saved  # cbreak undone
