"""``mq-trio pub`` / ``mq-trio sub`` end to end: real subprocesses, an in-process server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from functools import partial
from typing import Any

import attrs
import pytest
import trio
from support import start_server

from mq_trio import Message, open_client
from mq_trio.server import Server

COMMAND = [sys.executable, "-m", "mq_trio"]


async def mq(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run ``mq-trio ARGS`` to completion."""
    with trio.fail_after(30):
        return await trio.run_process(
            [*COMMAND, *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


@attrs.define
class Running:
    """A long-running ``mq-trio`` subprocess whose stdout we read line by line."""

    process: trio.Process
    buffer: bytes = b""

    async def readline(self) -> str:
        assert self.process.stdout is not None
        with trio.fail_after(20):
            while b"\n" not in self.buffer:
                data = await self.process.stdout.receive_some(65536)
                if not data:
                    raise EOFError(self.buffer)
                self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    async def finish(self) -> tuple[int, str]:
        """Wait for exit; return the status and stderr."""
        with trio.fail_after(20):
            status = await self.process.wait()
        assert self.process.stderr is not None
        err = b""
        while data := await self.process.stderr.receive_some(65536):
            err += data
        return status, err.decode()


async def start(nursery: trio.Nursery, *args: str, stdin: int | None = None) -> Running:
    """Start ``mq-trio ARGS`` in the test's nursery (killed at test end if still running)."""
    process: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            [*COMMAND, *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            check=False,
        )
    )
    return Running(process)


@attrs.define
class Relay:
    """A TCP relay in front of the server for one client. ``mq-trio sub`` prints nothing
    when it has subscribed; the server's first reply passing through the relay says so."""

    port: int
    replied: trio.Event

    @classmethod
    async def start(cls, nursery: trio.Nursery, server_port: int) -> Relay:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self = cls(listener.socket.getsockname()[1], trio.Event())
        nursery.start_soon(self._serve_one, listener, server_port)
        return self

    async def _serve_one(self, listener: trio.SocketListener, server_port: int) -> None:
        async with listener:
            client = await listener.accept()
        async with client, await trio.open_tcp_stream("127.0.0.1", server_port) as upstream:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, upstream, False)
                nursery.start_soon(self._pump, upstream, client, True)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream,
                    replies: bool) -> None:
        try:
            async for data in source:
                await sink.send_all(data)
                if replies and b"\r\n" in data:
                    self.replied.set()
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def subscribed(sub: Running, server: Server, topic: str) -> None:
    """Until ``sub`` (subscribing to ``topic``, cache on) is subscribed: it prints the
    cached message published here once it is."""
    async with open_client("127.0.0.1", server.port) as client:
        await client.send(topic, "subscribed")
    assert await sub.readline() == "subscribed"


async def test_pub_one_message(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        await client.subscribe("t")
        result = await mq("pub", "t", "hello world", "--port", str(server.port))
        assert result.returncode == 0, result.stderr
        assert result.stdout == result.stderr == b""
        assert await client.receive() == Message("t", "hello world", 0, "all")
        result = await mq("pub", "t", "solo", "--delivery", "one", "--no-cache",
                          "--host", "127.0.0.1", "--port", str(server.port))
        assert result.returncode == 0, result.stderr
        assert await client.receive() == Message("t", "solo", 1, "one")
    async with open_client("127.0.0.1", server.port) as late:
        await late.subscribe("t")  # "all" messages are cached, the --no-cache one is not
        assert (await late.receive()).msg == "hello world"
        with pytest.raises(trio.WouldBlock):
            late.receive_nowait()


async def test_pub_reads_stdin_lines_in_order(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        await client.subscribe("t")
        lines = "first\r\nsecond line\n\n   \nthird ünïcode\nno newline at the end"
        result = await mq("pub", "t", "-", "--port", str(server.port), stdin=lines.encode())
        assert result.returncode == 0, result.stderr
        got = [(await client.receive()).msg for _ in range(4)]
        assert got == ["first", "second line", "third ünïcode", "no newline at the end"]
        assert client.buffered == 0


async def test_pub_from_stdin_stops_on_ctrl_c_while_waiting_for_input(
    server: Server, nursery: trio.Nursery
) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        await client.subscribe("t")
        pub = await start(nursery, "pub", "t", "-", "--port", str(server.port),
                          stdin=subprocess.PIPE)
        assert pub.process.stdin is not None
        await pub.process.stdin.send_all(b"one\ntw")
        assert (await client.receive()).msg == "one"  # sent as soon as its line is complete
        pub.process.send_signal(signal.SIGINT)  # "tw" is an unfinished line: not sent
        status, err = await pub.finish()
        assert (status, err) == (130, "")
        await client.send("t", "marker")
        assert (await client.receive()).msg == "marker"


async def test_sub_replays_with_count_and_json(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        for i in range(3):
            await client.send("t", f"line\n{i}")  # newlines survive in --json
    result = await mq("sub", "t", "--count", "2", "--json", "--last-seen", "0",
                      "--port", str(server.port))
    assert result.returncode == 0, result.stderr
    objects = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert objects == [
        {"topic": "t", "msg": "line\n1", "index": 1, "delivery": "all"},
        {"topic": "t", "msg": "line\n2", "index": 2, "delivery": "all"},
    ]


async def test_sub_several_topics_verbose(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        await client.send("a", "for a")
        await client.send("b", "for b")
    result = await mq("sub", "a", "b", "-v", "--count", "2", "--port", str(server.port))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == ["a for a", "b for b"]


async def test_sub_prints_live_messages_and_exits_130_on_ctrl_c(
    server: Server, nursery: trio.Nursery
) -> None:
    relay = await Relay.start(nursery, server.port)
    async with open_client("127.0.0.1", server.port) as client:
        await client.send("t", "before: not replayed with --no-cache")
        sub = await start(nursery, "sub", "t", "--no-cache", "--port", str(relay.port))
        with trio.fail_after(20):
            await relay.replied.wait()  # subscribed
        await client.send("t", "live 1")
        assert await sub.readline() == "live 1"
        await client.send("t", "live 2")
        assert await sub.readline() == "live 2"
    sub.process.send_signal(signal.SIGINT)
    status, err = await sub.finish()
    assert status == 130
    assert err == ""  # no traceback


async def test_sub_exits_143_on_sigterm(server: Server, nursery: trio.Nursery) -> None:
    sub = await start(nursery, "sub", "t", "--port", str(server.port))
    await subscribed(sub, server, "t")
    sub.process.send_signal(signal.SIGTERM)
    status, err = await sub.finish()
    assert (status, err) == (143, "")


async def test_sub_reports_a_lost_connection(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    sub = await start(nursery, "sub", "t", "--port", str(server.port))
    await subscribed(sub, server, "t")
    server.shutdown()
    status, err = await sub.finish()
    assert status == 1
    assert err == "mq-trio sub: connection closed by the server\n"


async def test_sub_reconnect_resumes_across_a_restart(nursery: trio.Nursery) -> None:
    from test_client import RestartableServer

    rs = await RestartableServer.start_new(nursery)
    async with open_client("127.0.0.1", rs.port) as client:
        await client.send("t", "m0")
    sub = await start(nursery, "sub", "t", "--reconnect", "--count", "3", "--port", str(rs.port))
    assert await sub.readline() == "m0"
    await rs.stop()
    await rs.start()
    async with open_client("127.0.0.1", rs.port) as client:
        await client.send("t", "m1")  # cached (and live, if sub is back already)
        await client.send("t", "m2")
    assert [await sub.readline(), await sub.readline()] == ["m1", "m2"]  # m0 not again
    status, err = await sub.finish()
    assert status == 0
    # The restart is reported on stderr (#13 point 12; tests/test_pubsub_cli_edges.py).
    assert err.startswith("mq-trio sub: connection lost (")
    assert "gap" not in err


@pytest.mark.parametrize("command", [["pub", "t", "x"], ["sub", "t"]])
async def test_unreachable_server_is_one_line_and_status_1(command: list[str]) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    result = await mq(*command, "--port", str(port))
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode() == (
        f"mq-trio {command[0]}: cannot connect to 127.0.0.1:{port}: Connection refused\n"
    )


async def test_pub_refused_by_the_server(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, max_line_bytes=64, max_pending_bytes=1024)
    result = await mq("pub", "t", "x" * 100, "--port", str(server.port))
    assert result.returncode == 1
    assert result.stderr.decode() == "mq-trio pub: Line too long\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--url", "ws://127.0.0.1:1/", "--port", "1"], "not both"),
        (["--url", "http://127.0.0.1:1/"], "unsupported URL scheme"),
    ],
)
async def test_bad_target_arguments(args: list[str], message: str) -> None:
    result = await mq("pub", "t", "x", *args)
    assert result.returncode == 2
    assert message in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


async def test_over_websocket(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, ws_port=0)
    url = f"ws://127.0.0.1:{server.ws_port}/"
    result = await mq("pub", "t", "via ws", "--url", url)
    assert result.returncode == 0, result.stderr
    result = await mq("sub", "t", "--count", "1", "--url", url)
    assert (result.returncode, result.stdout) == (0, b"via ws\n"), result.stderr


def test_help_lists_pub_and_sub(capsys: Any) -> None:
    from mq_trio.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "pub" in out and "sub" in out
