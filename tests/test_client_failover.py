"""Several server addresses (issue 15, the client side): ``open_client([...])`` and the CLI's
``--host a,b``/``--url a,b``.

Two or three independent single-node servers on 127.0.0.1 are enough for the client's
mechanics: which address is used, in which order they are tried, that the subscriptions
are resubscribed on the next one, that a refused ``auth`` is never retried elsewhere.
Independent servers have their own indexes and epochs (a cluster's nodes share them):
what a resume on another one gets is their business, except that ``epoch=True`` must
report the change (``client.gaps``).
"""

from __future__ import annotations

import json
import math
import random
import ssl
import subprocess
import sys
from collections.abc import Sequence
from functools import partial
from typing import Literal

import attrs
import pytest
import trio
from support import make_config

from mq_trio.client import (
    AuthError,
    Backoff,
    ConnectError,
    ConnectionEvent,
    ConnectionLost,
    Gap,
    Message,
    MQError,
    Target,
    open_client,
    parse_targets,
)
from mq_trio.server import Server, serve
from mq_trio.testing import AuthFile, Certificates, ServerFactory

FAST = Backoff(initial=0.01, maximum=0.05)
COMMAND = [sys.executable, "-m", "mq_trio"]


# --- helpers ---------------------------------------------------------------------------------


@attrs.define
class Node:
    """A real in-process server that a test can kill (its task cancelled: every
    connection ends at once, as when the process dies)."""

    server: Server
    scope: trio.CancelScope
    #: (Kept: a killed server's listening socket is gone.)
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def target(self) -> Target:
        return Target("127.0.0.1", self.port)

    async def kill(self) -> None:
        self.scope.cancel()
        await self.server.stopped.wait()


async def start_node(nursery: trio.Nursery, **overrides: object) -> Node:
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[Server]) -> None:
        with scope:
            await serve(make_config(**overrides), task_status=task_status)

    server: Server = await nursery.start(run)
    return Node(server, scope, server.port)


async def closed_port() -> int:
    """A port nothing listens on (connecting is refused)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port: int = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    return port


class Events:
    """``on_event`` for a test: every ConnectionEvent, in order, to wait for."""

    def __init__(self) -> None:
        self.seen: list[ConnectionEvent] = []
        self._send, self._receive = trio.open_memory_channel[ConnectionEvent](math.inf)

    def __call__(self, event: ConnectionEvent) -> None:
        self.seen.append(event)
        self._send.send_nowait(event)

    async def next(self) -> ConnectionEvent:
        with trio.fail_after(10):
            return await self._receive.receive()


async def publish(port: int, topic: str, msg: str) -> None:
    async with open_client("127.0.0.1", port) as client:
        await client.send(topic, msg)


@attrs.define
class Peer:
    """A scripted server that counts its connections. What a new connection gets depends
    on ``mode`` at that moment: ``ok``: success to every command (a subscribe to
    ``"drop"`` closes it without a reply, and turns the mode to ``then``); ``close``:
    closed at once; ``refuse``: its first command (the ``auth``) is refused."""

    mode: Literal["ok", "close", "refuse"]
    then: Literal["ok", "close", "refuse"] = "ok"
    port: int = 0
    connections: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        mode = self.mode
        buffer = b""
        async with stream:
            try:
                while mode != "close":
                    while b"\n" not in buffer:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        buffer += data
                    line, buffer = buffer.split(b"\n", 1)
                    command = json.loads(line)
                    if mode == "refuse":
                        await stream.send_all(
                            b'{"success": false, "reason": "Authentication failed"}\r\n')
                        return
                    if command.get("topic") == "drop":
                        self.mode = self.then
                        return
                    await stream.send_all(b'{"success": true}\r\n')
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


async def start_peer(nursery: trio.Nursery, mode: Literal["ok", "close", "refuse"],
                     then: Literal["ok", "close", "refuse"] = "ok") -> Peer:
    peer = Peer(mode, then)
    listeners = await nursery.start(partial(trio.serve_tcp, peer.handle, 0, host="127.0.0.1"))
    peer.port = listeners[0].socket.getsockname()[1]
    return peer


# --- the forms --------------------------------------------------------------------------------


def test_the_list_forms() -> None:
    a, b = Target("127.0.0.1", 7000), Target("127.0.0.1", 7002)
    assert parse_targets("127.0.0.1:7000,127.0.0.1:7002") == (a, b)
    assert parse_targets(" 127.0.0.1:7000 , 127.0.0.1:7002 ") == (a, b)
    assert parse_targets(["127.0.0.1:7000", "127.0.0.1:7002"]) == (a, b)
    assert parse_targets(("127.0.0.1:7000",)) == (a,)
    assert parse_targets(["127.0.0.1:7000,127.0.0.1:7002", "h"]) == (a, b, Target("h", 7000))
    # In a list, the port is that of the hosts that give none.
    assert parse_targets(["n1", "n2:7005"], 7001) == (Target("n1", 7001), Target("n2", 7005))
    assert parse_targets("n1,n2") == (Target("n1", 7000), Target("n2", 7000))
    mixed = parse_targets("tcp://n1:7003,ws://n2:7001/,wss://n3/mq,[::1]:7004,::1")
    assert mixed == (
        Target("n1", 7003),
        Target("n2", 7001, "ws://n2:7001/"),
        Target("n3", 443, "wss://n3/mq"),
        Target("::1", 7004),
        Target("::1", 7000),
    )
    assert [str(t) for t in mixed] == [
        "n1:7003", "ws://n2:7001/", "wss://n3/mq", "[::1]:7004", "[::1]:7000"]
    # One address: what it always was.
    assert parse_targets("127.0.0.1", 7005) == (Target("127.0.0.1", 7005),)
    assert parse_targets("") == (Target("127.0.0.1", 7000),)


@pytest.mark.parametrize(
    ("addresses", "port", "error"),
    [
        ([], None, "no server address given"),
        ("127.0.0.1:7000,,127.0.0.1:7002", None, "an empty address in"),
        ("127.0.0.1:7000,", None, "an empty address in"),
        (["127.0.0.1:7000", ""], None, "an empty address in"),
        ("n1:7000,n2:x", None, "bad port in 'n2:x'"),
        ("n1:7000,n2:70000", None, "bad port in 'n2:70000'"),
        ("n1:7000,n2:0", None, "bad port in 'n2:0'"),
        ("n1,http://n2/", None, "unsupported URL scheme 'http' in 'http://n2/'"),
        ("n1,ws://n2:x/", None, "bad port in 'ws://n2:x/'"),
        ("n1,[::1", None, "an IPv6 address in brackets"),
        ("n1,[::1]7000", None, "an IPv6 address in brackets"),
        ("ws://n1:7001/", 7001, "not both"),
        ("n1:7000", 7001, "not both"),
    ],
)
async def test_bad_forms_give_a_clear_error(
    addresses: str | list[str], port: int | None, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        parse_targets(addresses, port)
    with pytest.raises(ValueError, match=error):  # before any connection
        async with open_client(addresses, port):
            pytest.fail("connected")


async def test_not_strings_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="a string or a list of strings"):
        parse_targets([("127.0.0.1", 7000)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="a string or a list of strings"):
        async with open_client(7000):  # type: ignore[arg-type]
            pytest.fail("connected")


# --- connecting -------------------------------------------------------------------------------


async def test_connect_goes_to_the_first_reachable_in_order(nursery: trio.Nursery) -> None:
    a, b = await start_node(nursery), await start_node(nursery)
    dead = await closed_port()
    addresses = [f"127.0.0.1:{dead}", a.address, b.address]
    async with open_client(addresses) as client:
        assert client.targets == (Target("127.0.0.1", dead), a.target, b.target)
        assert client.target == a.target
        await client.subscribe("t")
        assert len(a.server.broker.subscribers("t")) == 1
        assert b.server.broker.subscribers("t") == []
    # The same as one comma-separated string; b first when it comes first.
    async with open_client(f"{b.address},{a.address}") as client:
        assert client.target == b.target
        await client.subscribe("u")
        assert len(b.server.broker.subscribers("u")) == 1


async def test_the_first_connection_fails_only_when_every_address_does() -> None:
    first, second = await closed_port(), await closed_port()
    with pytest.raises(ConnectError) as caught:
        async with open_client([f"127.0.0.1:{first}", f"127.0.0.1:{second}"], reconnect=True):
            pytest.fail("connected to a closed port")
    reason = caught.value.reason
    assert reason.startswith("no server of 2 could be reached: ")
    assert f"cannot connect to 127.0.0.1:{first}: Connection refused" in reason
    assert f"cannot connect to 127.0.0.1:{second}: Connection refused" in reason
    # One address: its own error, as always.
    with pytest.raises(ConnectError, match=f"^cannot connect to 127.0.0.1:{first}: Conn"):
        async with open_client([f"127.0.0.1:{first}"]):
            pytest.fail("connected to a closed port")


async def test_shuffle_starts_in_a_random_order(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await start_node(nursery), await start_node(nursery)
    shuffled: list[list[Target]] = []

    def reverse(items: list[Target]) -> None:  # a "random" order the test knows
        shuffled.append(list(items))
        items.reverse()

    monkeypatch.setattr(random, "shuffle", reverse)
    async with open_client([a.address, b.address]) as client:
        assert client.target == a.target and shuffled == []  # not shuffled by default
    async with open_client([a.address, b.address], shuffle=True) as client:
        assert shuffled == [[a.target, b.target]]
        assert client.targets == (b.target, a.target)
        assert client.target == b.target


# --- failing over -----------------------------------------------------------------------------


async def test_a_killed_node_sends_the_client_to_the_next_which_resubscribes(
    nursery: trio.Nursery,
) -> None:
    a, b = await start_node(nursery), await start_node(nursery)
    events = Events()
    async with open_client([a.address, b.address], reconnect=FAST, on_event=events) as client:
        await client.subscribe("t")
        await publish(a.port, "t", "on a")
        assert await client.receive() == Message("t", "on a", 0)
        await a.kill()
        lost = await events.next()
        assert (lost.kind, lost.target) == ("lost", a.target)
        back = await events.next()
        assert (back.kind, back.target, back.attempts) == ("reconnected", b.target, 1)
        await client.subscribe("marker")  # after the resumes
        assert client.target == b.target and client.reconnects == 1
        assert len(b.server.broker.subscribers("t")) == 1  # resubscribed there
        await publish(b.port, "t", "on b")
        assert (await client.receive("t")).msg == "on b"
        assert sorted(client.subscriptions) == ["marker", "t"]
        assert client.gaps == []  # (without epoch=True nothing can tell)


async def test_with_epoch_the_next_nodes_other_history_is_a_gap(nursery: trio.Nursery) -> None:
    """Two independent servers: different epochs, so the resume reports the change and
    takes the next one's history from its start (a cluster's nodes share one epoch)."""
    a, b = await start_node(nursery), await start_node(nursery)
    events = Events()
    async with open_client([a.address, b.address], reconnect=FAST, epoch=True,
                           on_event=events) as client:
        await client.subscribe("t")
        await publish(a.port, "t", "a0")
        await publish(a.port, "t", "a1")
        assert [(await client.receive()).msg for _ in range(2)] == ["a0", "a1"]
        first_epoch = client.epoch
        assert first_epoch == a.server.broker.epoch
        await publish(b.port, "t", "b0")  # cached by b before the client comes
        await a.kill()
        kinds = [(await events.next()).kind for _ in range(3)]
        assert kinds == ["lost", "reconnected", "gap"]
        assert events.seen[2].target == b.target
        assert events.seen[2].gap == Gap("t", 1, "history lost")
        assert await client.receive() == Message("t", "b0", 0)  # replayed, not skipped
        assert client.gaps == [Gap("t", 1, "history lost")]
        assert client.epoch == b.server.broker.epoch != first_epoch


async def test_the_next_address_is_tried_first_and_the_lost_one_goes_last(
    nursery: trio.Nursery,
) -> None:
    """Every node stays up: a drop (here ``Line too long``, after which a server closes)
    moves the client on to the next address, not back to the first that works."""
    nodes = [await start_node(nursery, max_line_bytes=256) for _ in range(3)]
    events = Events()
    async with open_client([n.address for n in nodes], reconnect=FAST,
                           on_event=events) as client:
        visited = [client.target]
        for _ in range(4):
            with pytest.raises(MQError, match="Line too long"):
                await client.send("t", "x" * 1000)
            lost, back = await events.next(), await events.next()
            assert (lost.kind, lost.target) == ("lost", visited[-1])
            assert (back.kind, back.attempts) == ("reconnected", 1)
            visited.append(client.target)
            assert back.target == client.target
        assert visited == [n.target for n in nodes + nodes[:2]]
        assert client.reconnects == 4


async def test_a_dead_address_is_skipped_within_the_round(nursery: trio.Nursery) -> None:
    a, b, c = [await start_node(nursery) for _ in range(3)]
    events = Events()
    async with open_client(f"{a.address},{b.address},{c.address}", reconnect=FAST,
                           on_event=events) as client:
        await client.subscribe("t")
        await b.kill()
        await a.kill()
        lost, back = await events.next(), await events.next()
        assert (lost.kind, lost.target) == ("lost", a.target)
        # b (next) is refused, then c: two attempts, without a backoff between them.
        assert (back.kind, back.target, back.attempts) == ("reconnected", c.target, 2)
        await client.subscribe("marker")
        await publish(c.port, "t", "on c")
        assert (await client.receive("t")).msg == "on c"


async def test_max_attempts_counts_rounds_of_the_whole_list(nursery: trio.Nursery) -> None:
    """After the drop every address fails (each closes during ``auth``): the client
    gives up after ``max_attempts`` rounds, each address tried once per round."""
    first = await start_peer(nursery, "ok", then="close")
    others = [await start_peer(nursery, "close") for _ in range(2)]
    backoff = Backoff(initial=0.01, maximum=0.02, max_attempts=2)
    addresses = [first.address] + [p.address for p in others]
    async with open_client(addresses, reconnect=backoff, token="mqt_test") as client:
        await client.subscribe("t")
        with trio.fail_after(10), pytest.raises(ConnectionLost,
                                                match="during authentication"):
            await client.subscribe("drop")  # in flight at the drop: it waited for the rest
        assert client.closed
    assert [p.connections for p in others] == [2, 2]
    assert first.connections == 1 + 2


# --- authentication ---------------------------------------------------------------------------


async def test_a_refused_auth_is_not_tried_at_the_other_addresses(
    nursery: trio.Nursery, mq_server_factory: ServerFactory
) -> None:
    auth = await mq_server_factory(auth=True)
    other = await start_peer(nursery, "ok")
    with trio.fail_after(10), pytest.raises(AuthError, match="Authentication failed"):
        async with open_client([f"127.0.0.1:{auth.port}", other.address], reconnect=FAST,
                               token="mqt_not-this-servers"):
            pytest.fail("connected with refused credentials")
    assert other.connections == 0


async def test_a_refused_auth_on_reconnecting_gives_up(
    nursery: trio.Nursery, mq_server_factory: ServerFactory, mq_auth: AuthFile
) -> None:
    auth = await mq_server_factory(auth=True)
    refusing = await start_peer(nursery, "refuse")
    last = await start_peer(nursery, "ok")
    addresses = [f"127.0.0.1:{auth.port}", refusing.address, last.address]
    async with open_client(addresses, reconnect=FAST, token=mq_auth.token) as client:
        await client.subscribe("t")
        auth.shutdown()
        with trio.fail_after(10), pytest.raises(ConnectionLost,
                                                match=r"Authentication failed \(on reconn"):
            await client.receive()
        assert client.closed
    assert refusing.connections == 1
    assert last.connections == 0


# --- TLS --------------------------------------------------------------------------------------


async def test_the_tls_context_applies_to_every_address(
    mq_server_factory: ServerFactory, mq_tls: Certificates
) -> None:
    a, b = await mq_server_factory(tls=True), await mq_server_factory(tls=True)
    dead = await closed_port()
    events = Events()
    addresses = [f"127.0.0.1:{dead}", f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
    async with open_client(addresses, reconnect=FAST, ssl_context=mq_tls.client_context(),
                           on_event=events) as client:
        assert client.target == Target("127.0.0.1", a.port)
        await client.subscribe("t")
        a.shutdown()
        assert (await events.next()).kind == "lost"
        back = await events.next()
        # (the dead port went last when it refused the first connection)
        assert (back.target, back.attempts) == (Target("127.0.0.1", b.port), 1)
        await client.subscribe("marker")
        assert len(b.broker.subscribers("t")) == 1


async def test_a_ws_url_among_tls_addresses_is_refused() -> None:
    with pytest.raises(ValueError, match="use wss://"):
        async with open_client(["127.0.0.1:7000", "ws://127.0.0.1:7001/"],
                               ssl_context=ssl.create_default_context()):
            pytest.fail("connected")


# --- the command line -------------------------------------------------------------------------


async def mq(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``mq-trio ARGS`` to completion."""
    with trio.fail_after(30):
        return await trio.run_process([*COMMAND, *args], capture_stdout=True,
                                      capture_stderr=True, check=False)


@attrs.define
class Lines:
    """A subprocess's output, line by line."""

    stream: trio.abc.ReceiveStream | None
    buffer: bytes = b""

    async def read(self, n: int) -> list[str]:
        """The next ``n`` lines (fewer if the stream ends first)."""
        assert self.stream is not None
        with trio.fail_after(20):
            while self.buffer.count(b"\n") < n:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    break
                self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n", min(n, self.buffer.count(b"\n")))
        return [line.decode() for line in lines]


@pytest.mark.parametrize("form", ["comma", "repeated", "url"])
async def test_cli_pub_and_sub_take_several_servers(
    nursery: trio.Nursery, form: str
) -> None:
    node = await start_node(nursery)
    dead = await closed_port()
    if form == "comma":
        flags = ["--host", f"127.0.0.1:{dead},127.0.0.1:{node.port}"]
    elif form == "repeated":  # (with --port for the host that gives none)
        flags = ["--host", f"127.0.0.1:{dead}", "--host", "127.0.0.1", "--port", str(node.port)]
    else:
        flags = ["--url", f"tcp://127.0.0.1:{dead}", "--url", f"tcp://127.0.0.1:{node.port}"]
    result = await mq("pub", "t", "via the list", "--job", *flags)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"0\n", b"")
    async with open_client("127.0.0.1", node.port) as client:
        await client.send("u", "cached")
    result = await mq("sub", "u", "--count", "1", *flags)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"cached\n", b"")


async def test_cli_work_takes_several_servers(nursery: trio.Nursery) -> None:
    node = await start_node(nursery)
    dead = await closed_port()
    async with open_client("127.0.0.1", node.port) as client:
        await client.send_job("jobs", "one")
    result = await mq("work", "jobs", "--max-jobs", "1", "--host",
                      f"127.0.0.1:{dead},127.0.0.1:{node.port}", "--", "cat")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"one", b"")


async def test_cli_sub_reconnect_moves_to_the_next_server(nursery: trio.Nursery) -> None:
    a, b = await start_node(nursery), await start_node(nursery)
    process: trio.Process = await nursery.start(partial(
        trio.run_process,
        [*COMMAND, "sub", "t", "--reconnect", "--count", "2", "--host",
         f"{a.address},{b.address}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False,
    ))
    out, err = Lines(process.stdout), Lines(process.stderr)
    await publish(a.port, "t", "on a")  # cached: printed once subscribed
    assert await out.read(1) == ["on a"]
    await publish(b.port, "t", "on b")  # b's history, taken from its start (epoch)
    await a.kill()
    assert await out.read(1) == ["on b"]
    with trio.fail_after(20):
        status = await process.wait()
    assert status == 0
    assert await err.read(4) == [
        f"mq-trio sub: connection to {a.address} lost (connection closed by the server); "
        "reconnecting",
        f"mq-trio sub: reconnected to {b.address}; resuming",
        "mq-trio sub: gap in 't': messages after index 0 may be lost: the server's history "
        "was lost (a restart without --data-dir?); resumed from the start of its new history",
    ]


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--host", "127.0.0.1:1,"], "an empty address in '127.0.0.1:1,'"),
        (["--host", "127.0.0.1:1,127.0.0.1:x"], "bad port in '127.0.0.1:x'"),
        (["--url", "tcp://127.0.0.1:1,127.0.0.1:2"], "--url 127.0.0.1:2: a URL needs a scheme"),
        (["--url", "tcp://127.0.0.1:1", "--host", "h"],
         "give either --url or --host/--port, not both"),
        (["--tls", "--url", "wss://h:1/,ws://h:2/"], "--tls/--cafile need a wss:// URL"),
    ],
)
async def test_cli_bad_lists_are_usage_errors(flags: Sequence[str], error: str) -> None:
    result = await mq("pub", "t", "x", *flags)
    assert result.returncode == 2
    assert result.stderr.decode().startswith(f"mq-trio pub: {error}")
    assert result.stderr.count(b"\n") == 1


@pytest.mark.parametrize("command", ["pub", "sub", "work"])
async def test_cli_help_says_several_servers(command: str) -> None:
    result = await mq(command, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.decode().split())
    assert "Several servers (the nodes of a cluster): a comma-separated list" in text
    assert "--host HOST[:PORT][,...]" in text and "--url URL[,...]" in text
    assert "--shuffle" in text
