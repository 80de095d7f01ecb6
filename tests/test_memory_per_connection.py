"""What an idle subscribed TCP connection keeps (docs/architecture.md, "Memory per idle
connection"): the shape that 10,000 idle connections pay for, checked by structure.

The byte figures come from ``bench/memory_per_connection.py`` (docs/benchmarks.md); here
the causes of past growth are pinned instead, deterministically: how deep each task of
an idle connection waits (each await level is a coroutine frame it keeps), and which
per-connection objects exist at all (an empty queue list, bound methods, socket objects).
"""

from __future__ import annotations

import types
from typing import Any

import trio
from support import LineClient, start_server

from mq_trio.server import Server
from mq_trio.server._connection import Connection
from mq_trio.server._outbox import Outbox
from mq_trio.transports._tcp import TCPTransport

N = 5


def await_chain(coro: Any) -> list[types.CodeType]:
    """The code objects a suspended coroutine waits under, outermost first."""
    chain: list[types.CodeType] = []
    while coro is not None:
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        if code is None:
            break
        chain.append(code)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return chain


def tasks_under(task: trio.lowlevel.Task) -> list[trio.lowlevel.Task]:
    found = [task]
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            found += tasks_under(child)
    return found


async def idle_subscribers(server: Server, n: int) -> list[LineClient]:
    clients = []
    for i in range(n):
        client = await LineClient.connect(server.port)
        assert (await client.request({"command": "subscribe", "topic": f"t{i}"}))["success"]
        clients.append(client)
    for _ in range(10):  # let every reader and writer settle into its idle wait
        await trio.testing.wait_all_tasks_blocked()
    return clients


async def test_idle_connection_waits_one_frame_deep_per_task(nursery: trio.Nursery) -> None:
    """The reader waits for input in ``Connection.run`` itself (not under the
    transport's ``receive_lines``), the writer in ``Outbox.drain_into`` itself: below
    each, only trio's own wait."""
    server = await start_server(nursery)
    clients = await idle_subscribers(server, N)
    by_code: dict[str, list[list[types.CodeType]]] = {}
    for task in tasks_under(trio.lowlevel.current_root_task()):  # type: ignore[arg-type]
        chain = await_chain(task.coro)
        if chain and chain[0] in (Connection.run.__code__, Outbox.drain_into.__code__):
            by_code.setdefault(chain[0].co_name, []).append(chain)
    assert len(by_code["run"]) == N
    assert len(by_code["drain_into"]) == N
    for chains in by_code.values():
        for chain in chains:
            below = chain[1:]
            assert below, chain
            assert all("/trio/" in code.co_filename for code in below), [
                f"{c.co_name} ({c.co_filename})" for c in chain]
    for chain in by_code["run"]:
        assert chain[1].co_name == "wait_readable"
    for chain in by_code["drain_into"]:
        assert chain[1].co_name == "wait_task_rescheduled"
    for client in clients:
        await client.aclose()


async def test_idle_connection_keeps_no_spare_objects(nursery: trio.Nursery) -> None:
    """No empty queue list, no bound methods held for callbacks (the outbox reports to
    its connection and is its writer's abort function), no socket objects over the
    descriptor, no separate line buffer."""
    server = await start_server(nursery)
    clients = await idle_subscribers(server, N)
    conns: list[Connection] = list(server.connections)
    assert len(conns) == N
    for conn in conns:
        outbox = conn.outbox
        assert outbox._queue is None
        assert outbox._owner is conn
        assert outbox.high_water is conns[0].outbox.high_water  # one int per server
        transport = conn.transport
        assert isinstance(transport, TCPTransport)
        assert transport.stream is None and transport._fd >= 0  # the bare descriptor
        for name in TCPTransport.__slots__:
            value = getattr(transport, name, None)
            assert not isinstance(value, (trio.socket.SocketType, types.MethodType)), name
        for name in type(outbox).__slots__:
            value = getattr(outbox, name, None)
            assert not isinstance(value, types.MethodType), name
            if name != "_ready":  # (the server's list of outboxes to write, shared)
                assert not isinstance(value, list), name
    for client in clients:
        await client.aclose()
