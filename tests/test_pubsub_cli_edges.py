"""``mq-trio pub``/``sub`` rough edges (#13, points 6, 7 and 12), as subprocesses."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import partial

import attrs
import pytest
import trio
from support import make_config

from mq_trio import open_client
from mq_trio.broker import Broker, MemoryHistory
from mq_trio.client import Target, parse_target
from mq_trio.server import Config, Server, serve

COMMAND = [sys.executable, "-m", "mq_trio"]


async def mq(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run ``mq-trio ARGS`` to completion."""
    with trio.fail_after(30):
        return await trio.run_process(
            [*COMMAND, *args], stdin=stdin, capture_stdout=True, capture_stderr=True,
            check=False,
        )


# --- point 7: names and URLs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "command, target",
    [
        (["pub", "t", "x"], ["--host", "nosuch.invalid"]),
        (["sub", "t"], ["--host", "nosuch.invalid", "--port", "7000"]),
        (["pub", "t", "x"], ["--url", "ws://nosuch.invalid:7001/"]),
    ],
)
async def test_unresolvable_host_is_one_clear_line(command: list[str], target: list[str]
                                                   ) -> None:
    result = await mq(*command, *target)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.startswith(f"mq-trio {command[0]}: cannot resolve host 'nosuch.invalid'")
    assert err.count("\n") == 1
    assert "Unknown error" not in err


@pytest.mark.parametrize("command", [["pub", "t", "x"], ["sub", "t"]])
async def test_url_without_a_scheme_is_refused_with_a_hint(command: list[str]) -> None:
    result = await mq(*command, "--url", "127.0.0.1:7000")
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.startswith(f"mq-trio {command[0]}: --url 127.0.0.1:7000: a URL needs a scheme")
    assert "tcp://127.0.0.1:7000" in err and "ws://127.0.0.1:7000/" in err
    assert err.count("\n") == 1


def test_client_takes_host_colon_port_as_an_address_not_a_host() -> None:
    # (It used to be refused; since several addresses can be given, host:port is one.)
    assert parse_target("127.0.0.1:7000") == Target("127.0.0.1", 7000)
    with pytest.raises(ValueError, match="not both"):
        parse_target("127.0.0.1:7000", 7001)
    assert parse_target("::1", 7000).host == "::1"  # IPv6 addresses still work
    assert parse_target("[::1]:7002") == Target("::1", 7002)
    assert parse_target("localhost", 7001).port == 7001


# --- point 6: timeouts ----------------------------------------------------------------------


async def silent_listener(nursery: trio.Nursery) -> int:
    """A port that accepts connections and never sends a byte."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def never_answer(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, never_answer, listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def timed(*args: str) -> tuple[subprocess.CompletedProcess[bytes], float]:
    started = trio.current_time()
    result = await mq(*args)
    return result, trio.current_time() - started


async def test_pub_gives_up_waiting_for_a_reply(nursery: trio.Nursery) -> None:
    port = await silent_listener(nursery)
    result, took = await timed("pub", "t", "x", "--timeout", "0.5", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr.decode() == (
        f"mq-trio pub: no reply from 127.0.0.1:{port} within 0.5 s (--timeout); the "
        "message may or may not have been published\n"
    )
    assert took < 15


async def test_pub_has_a_reply_timeout_by_default() -> None:
    from mq_trio.cli import build_parser

    assert build_parser().parse_args(["pub", "t", "x"]).timeout == 10.0


async def test_sub_gives_up_waiting_for_its_subscribe_reply(nursery: trio.Nursery) -> None:
    port = await silent_listener(nursery)
    result, _ = await timed("sub", "t", "--connect-timeout", "0.5", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr.decode() == (
        f"mq-trio sub: no reply to subscribe from 127.0.0.1:{port} within 0.5 s "
        "(--connect-timeout)\n"
    )


async def test_sub_timeout_against_a_silent_server_exits_27(nursery: trio.Nursery) -> None:
    port = await silent_listener(nursery)
    result, took = await timed("sub", "t", "--timeout", "0.5", "--port", str(port))
    assert (result.returncode, result.stdout, result.stderr) == (27, b"", b"")
    assert took < 15


async def test_sub_timeout_prints_what_came_then_exits_27(server: Server) -> None:
    async with open_client("127.0.0.1", server.port) as client:
        await client.send("t", "one")
        await client.send("t", "two")
    result = await mq("sub", "t", "-W", "0.5", "--port", str(server.port))
    assert (result.returncode, result.stdout, result.stderr) == (27, b"one\ntwo\n", b"")
    # --count reached first: status 0.
    result = await mq("sub", "t", "-W", "20", "--count", "2", "--port", str(server.port))
    assert (result.returncode, result.stdout, result.stderr) == (0, b"one\ntwo\n", b"")


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
async def test_timeouts_must_be_positive(value: str) -> None:
    for command in (["pub", "t", "x"], ["sub", "t"]):
        result = await mq(*command, "--timeout", value)
        assert result.returncode == 2
        assert "not a number of seconds > 0" in result.stderr.decode()


@pytest.mark.parametrize("command", [["pub", "t", "x"], ["sub", "t"]])
async def test_ws_url_at_the_tcp_port_is_bounded_by_connect_timeout(
    server: Server, command: list[str]
) -> None:
    url = f"ws://127.0.0.1:{server.port}/"  # the TCP port: it answers no HTTP
    result, took = await timed(*command, "--url", url, "--connect-timeout", "0.5")
    assert result.returncode == 1
    assert result.stderr.decode() == (
        f"mq-trio {command[0]}: cannot connect to {url}: no WebSocket handshake within "
        "0.5 s (is it the server's TCP port rather than its --ws-port?)\n"
    )
    assert took < 15


async def test_ws_url_at_a_silent_port(nursery: trio.Nursery) -> None:
    port = await silent_listener(nursery)
    url = f"ws://127.0.0.1:{port}/"
    result, _ = await timed("pub", "t", "x", "--url", url, "--connect-timeout", "0.5")
    assert result.returncode == 1
    assert "no WebSocket handshake within 0.5 s" in result.stderr.decode()


# --- point 12: sub --reconnect reports on stderr ---------------------------------------------


@attrs.define
class Restartable:
    """A server stopped and started again on the same port, keeping its history (as a
    durable server does) or starting with a new one (as an in-memory server does)."""

    nursery: trio.Nursery
    config: Config
    broker: Broker
    server: Server | None = None
    scope: trio.CancelScope | None = None

    @classmethod
    async def start_new(cls, nursery: trio.Nursery) -> Restartable:
        config = make_config()
        self = cls(nursery, config, Broker(MemoryHistory(config.cache_size)))
        await self.start()
        assert self.server is not None
        self.config = attrs.evolve(config, port=self.server.port)
        return self

    async def start(self, *, new_history: bool = False) -> None:
        if new_history:
            self.broker = Broker(MemoryHistory(self.config.cache_size))
        self.server = await self.nursery.start(self._run)

    async def _run(self, *, task_status: trio.TaskStatus[Server]) -> None:
        with trio.CancelScope() as self.scope:
            await serve(self.config, broker=self.broker, task_status=task_status)

    async def stop(self) -> None:
        assert self.scope is not None and self.server is not None
        self.scope.cancel()
        await self.server.stopped.wait()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port


async def run_sub(nursery: trio.Nursery, *args: str) -> trio.Process:
    process: trio.Process = await nursery.start(partial(
        trio.run_process, [*COMMAND, "sub", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, check=False,
    ))
    return process


async def read_lines(stream: trio.abc.ReceiveStream | None, count: int) -> list[str]:
    assert stream is not None
    data = b""
    with trio.fail_after(20):
        while data.count(b"\n") < count:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    return data.decode().splitlines()


async def finish(process: trio.Process) -> tuple[int, list[str]]:
    with trio.fail_after(20):
        status = await process.wait()
    return status, await read_lines(process.stderr, 1_000_000)


RECONNECTED = re.compile(r"mq-trio sub: reconnected( after \d+ attempts)?; resuming")


async def test_sub_reconnect_reports_a_restart_that_lost_history(
    nursery: trio.Nursery,
) -> None:
    rs = await Restartable.start_new(nursery)
    async with open_client("127.0.0.1", rs.port) as client:
        await client.send("t", "m0")
    sub = await run_sub(nursery, "t", "--reconnect", "--count", "2", "--port", str(rs.port))
    assert await read_lines(sub.stdout, 1) == ["m0"]
    await rs.stop()
    assert await read_lines(sub.stderr, 1) == [
        "mq-trio sub: connection lost (connection closed by the server); reconnecting"
    ]
    await rs.start(new_history=True)  # an in-memory server's restart: indexes from 0 again
    async with open_client("127.0.0.1", rs.port) as client:
        await client.send("t", "m1")  # index 0 of the new history: not skipped
    assert await read_lines(sub.stdout, 1) == ["m1"]
    status, err = await finish(sub)
    assert status == 0
    assert len(err) == 2, err
    assert RECONNECTED.fullmatch(err[0]), err
    assert err[1] == (
        "mq-trio sub: gap in 't': messages after index 0 may be lost: the server's history "
        "was lost (a restart without --data-dir?); resumed from the start of its new history"
    )


async def test_sub_reconnect_reports_a_restart_that_kept_history(
    nursery: trio.Nursery,
) -> None:
    rs = await Restartable.start_new(nursery)
    async with open_client("127.0.0.1", rs.port) as client:
        await client.send("t", "m0")
    sub = await run_sub(nursery, "t", "--reconnect", "--count", "2", "--port", str(rs.port))
    assert await read_lines(sub.stdout, 1) == ["m0"]
    await rs.stop()
    await rs.start()  # the same history, as a durable server keeps it
    async with open_client("127.0.0.1", rs.port) as client:
        await client.send("t", "m1")
    assert await read_lines(sub.stdout, 1) == ["m1"]  # m0 not again
    status, err = await finish(sub)
    assert status == 0
    assert err[0] == (
        "mq-trio sub: connection lost (connection closed by the server); reconnecting"
    )
    assert len(err) == 2 and RECONNECTED.fullmatch(err[1]), err  # and no gap


async def test_sub_without_reconnect_sends_no_epoch(server: Server) -> None:
    # A version-1 server of the family rejects the epoch key: plain sub never sends it.
    result = await mq("sub", "t", "-W", "0.3", "--port", str(server.port))
    assert (result.returncode, result.stderr) == (27, b"")
