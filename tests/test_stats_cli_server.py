"""``mq-trio stats`` / ``mq-trio top`` against a REAL in-process server with
``http_port=0``: the commands as users run them (subprocesses) and in a thread."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from typing import Any

import pytest
import trio
from support import LineClient, start_server

from mq_trio import __version__
from mq_trio.cli import main
from mq_trio.cli._stats import format_bytes
from mq_trio.server import Server

COMMAND = [sys.executable, "-m", "mq_trio"]
OK = {"success": True}


async def mq(*args: str) -> subprocess.CompletedProcess[str]:
    """``mq-trio ARGS`` in a subprocess, to completion (the server keeps running here)."""
    with trio.fail_after(30):
        result = await trio.run_process([*COMMAND, *args], capture_stdout=True,
                                        capture_stderr=True, check=False)
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode(), result.stderr.decode())


async def in_thread(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``mq-trio ARGS`` through ``main`` in a worker thread (faster than a subprocess):
    status, stdout, stderr."""
    status = await trio.to_thread.run_sync(main, list(args))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    """A server with its HTTP port on an ephemeral loopback port."""
    return await start_server(nursery, http_port=0)


def http(server: Server) -> str:
    assert server.http_port is not None
    return str(server.http_port)


LINES = [
    {"command": "subscribe", "topic": "news"},
    *({"command": "send", "topic": "news", "msg": f"m{i}", "delivery": "all"} for i in range(3)),
]


async def traffic(server: Server) -> tuple[LineClient, LineClient]:
    """A subscriber to ``news`` and a publisher that sent it three messages, all of
    them delivered (the subscriber has read them): the counters are settled."""
    subscriber = await LineClient.connect(server.port)
    assert await subscriber.request(LINES[0]) == OK
    publisher = await LineClient.connect(server.port)
    for line in LINES[1:]:
        assert (await publisher.request(line))["success"] is True
    assert [d["msg"] for d in await subscriber.receive_many(3)] == ["m0", "m1", "m2"]
    return subscriber, publisher


def size(obj: Any) -> int:
    return len(json.dumps(obj).encode()) + 1


async def test_stats_json_counts_what_happened(server: Server,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _clients = await traffic(server)  # (kept: they stay connected)
    status, out, err = await in_thread(capsys, "stats", "--port", http(server), "--json")
    assert (status, err) == (0, "")
    stats = json.loads(out)
    assert {key: stats[key] for key in ("connections", "connections_total", "refused",
                                        "subscriptions", "topics", "messages_in",
                                        "deliveries", "slow_consumers", "failures", "store")
            } == {"connections": 2, "connections_total": 2, "refused": 0, "subscriptions": 1,
                  "topics": 1, "messages_in": 4, "deliveries": 3, "slow_consumers": 0,
                  "failures": {}, "store": None}
    assert stats["bytes_in"] == sum(size(line) for line in LINES)
    assert stats["messages_out"] >= 3 + 4  # the deliveries, and a reply to each line
    assert stats["config"]["max_connections"] == server.config.max_connections


async def test_stats_summary_as_a_user_runs_it(server: Server) -> None:
    _clients = await traffic(server)  # (kept: they stay connected)
    result = await mq("stats", "--url", f"http://127.0.0.1:{http(server)}/")
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"mq-trio {__version__} at http://127.0.0.1:{http(server)}, "
                               "up ")
    body = [" ".join(line.split()) for line in lines[1:]]
    bytes_in = format_bytes(sum(size(x) for x in LINES))
    for expected in ["connections 2 now of 20,000 max; 2 since start, 0 refused",
                     "subscriptions 1", f"in 4 messages, {bytes_in}",
                     "deliveries 3", "slow consumers 0", "failures none",
                     "store none (in memory, no --data-dir)"]:
        assert expected in body, (expected, body)


async def test_failures_by_reason(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    client = await LineClient.connect(server.port)
    for _ in range(2):
        assert (await client.request({"command": "nope"}))["success"] is False
    status, out, _ = await in_thread(capsys, "stats", "--port", http(server), "--json")
    (reason,) = json.loads(out)["failures"]
    assert json.loads(out)["failures"][reason] == 2
    status, out, _ = await in_thread(capsys, "stats", "--port", http(server))
    assert status == 0
    assert f"failures        2 ({reason}: 2)" in out


async def test_connections_table(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    _clients = await traffic(server)  # (kept: they stay connected)
    status, out, err = await in_thread(capsys, "stats", "--port", http(server),
                                       "--connections", "--sort", "subscriptions")
    assert (status, err) == (0, "")
    header, first, second, note = out.splitlines()
    assert header.split()[:5] == ["PEER", "KIND", "USER", "AGE", "SUBS"]
    subs = slice(header.index("SUBS"), header.index("SUBS") + 4)  # (right-aligned)
    assert first.split()[1:3] == ["tcp", "-"] and first[subs] == "   1"
    assert second[subs] == "   0"
    assert first.startswith("127.0.0.1:") and second.startswith("127.0.0.1:")
    assert note == "(2 connections, by subscriptions)"
    status, out, _ = await in_thread(capsys, "stats", "--port", http(server), "--connections",
                                     "1", "--json")
    page = json.loads(out)
    assert (page["total"], page["limit"], len(page["connections"])) == (2, 1, 1)
    assert set(page["connections"][0]) >= {"peer", "transport", "tls", "user", "since",
                                           "subscriptions", "pending_bytes", "messages_in",
                                           "bytes_in", "messages_out", "bytes_out"}


async def test_topics_table(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    _clients = await traffic(server)  # (kept: they stay connected)
    client = await LineClient.connect(server.port)
    assert (await client.request({"command": "send", "topic": "other", "msg": "x",
                                   "delivery": "all"}))["success"]
    status, out, _ = await in_thread(capsys, "stats", "--port", http(server), "--topics")
    assert status == 0
    lines = out.splitlines()
    assert [line.split()[:3] for line in lines[1:3]] == [["news", "1", "3"],
                                                         ["other", "0", "1"]]
    assert lines[3] == "(2 topics)"
    status, out, _ = await in_thread(capsys, "stats", "--port", http(server), "--topics", "ot")
    assert [line.split()[0] for line in out.splitlines()] == ["TOPIC", "other", "(1"]
    status, out, _ = await in_thread(capsys, "stats", "--port", http(server), "--topics",
                                     "--sort", "subscribers", "--limit", "1")
    assert out.splitlines()[1].split()[:2] == ["news", "1"]
    assert out.splitlines()[2] == "(1-1 of 2 topics; --limit N for more)"


async def test_health(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert await in_thread(capsys, "stats", "--port", http(server), "--health") == (
        0, "ok\n", "")


async def test_top_once_as_a_user_runs_it(server: Server) -> None:
    _clients = await traffic(server)  # (kept: they stay connected)
    result = await mq("top", "--once", "--port", http(server), "-n", "1")
    assert (result.returncode, result.stderr) == (0, "")
    assert "\x1b" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"mq-trio {__version__} at http://127.0.0.1:{http(server)}: up ")
    assert lines[1] == "connections 2 of 20,000 (2 since start, 0 refused); subscriptions 1"
    assert lines[2].startswith("topics 1, cached ")
    assert "total 4 msgs" in lines[3]
    assert lines[6] == "rates per second since start (first sample); connections by pending, " \
                       "1 of 2"
    table = lines[lines.index("") + 1:]
    assert table[0].split()[0] == "PEER" and len(table) == 2
    assert table[1].startswith("127.0.0.1:")


def refusing_port() -> socket.socket:
    """A loopback port bound without listening: connections to it are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


async def test_nothing_listening_as_a_user_sees_it() -> None:
    with refusing_port() as sock:
        port = sock.getsockname()[1]
        result = await mq("stats", "--url", f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (f"mq-trio stats: cannot connect to http://127.0.0.1:{port}: is "
                             f"the server running with --http-port {port}?\n")


async def test_a_server_without_http_port_and_its_other_ports(
        nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]) -> None:
    """The TCP port speaks no HTTP; the WebSocket port has no /stats: each says so."""
    plain = await start_server(nursery, ws_port=0)
    assert plain.http_port is None
    status, out, err = await in_thread(capsys, "stats", "--port", str(plain.port))
    assert (status, out) == (1, "")
    assert err == (f"mq-trio stats: http://127.0.0.1:{plain.port}: no HTTP answer (is it the "
                   "server's TCP port rather than its --http-port?)\n")
    assert plain.ws_port is not None
    status, out, err = await in_thread(capsys, "top", "--port", str(plain.ws_port))
    assert (status, out) == (1, "")
    assert "HTTP 404 Not Found" in err and "the WebSocket port serves the page" in err
