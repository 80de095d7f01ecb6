"""pytest plugin: an in-process mq-trio server and clients for your own tests.

Registered through the ``pytest11`` entry point, so installing mq-trio is enough; the
fixtures need pytest-trio (``trio_mode = true``, or ``@pytest.mark.trio`` on tests)::

    async def test_my_app(mq_server, mq_client):
        await mq_client.subscribe("orders")
        await run_my_app("127.0.0.1", mq_server.port)
        assert (await mq_client.receive()).msg == "order 1 accepted"

Fixtures (see docs/testing.md):

* ``mq_server``: a server on an ephemeral 127.0.0.1 port, running in the test's nursery
  (so it stops when the test ends). Settings come from ``@pytest.mark.mq_server(...)``,
  which takes any :class:`~mq_trio.server.Config` field (``cache_size=5``, ...).
* ``mq_server_factory``: ``await mq_server_factory(cache_size=5)`` for more servers.
* ``mq_client``: a client connected to ``mq_server``.
* ``mq_client_factory``: ``await mq_client_factory(reconnect=True)`` for more clients
  (to ``mq_server`` unless given another server, a host and port, or a ``ws://`` URL).

Servers and clients live in tasks of the test's nursery rather than in the fixtures'
own tasks: a nursery (and the client owns one) must be closed by the task that opened
it, and the factories are called from the test's task.
"""

from __future__ import annotations

from collections.abc import Awaitable
from functools import partial
from typing import Any, Protocol

import attrs
import pytest
import trio

from .client import Client, open_client
from .server import Config, Server, serve

__all__ = [
    "ClientFactory",
    "ServerFactory",
    "mq_client",
    "mq_client_factory",
    "mq_server",
    "mq_server_factory",
    "restart_server",
    "server_config",
    "start_client",
    "start_server",
]

MARKER = "mq_server"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**settings): settings for the mq_server fixture, any mq_trio.Config "
        "field (cache_size=5, max_pending_bytes=65536, ...)",
    )


def server_config(**settings: Any) -> Config:
    """A :class:`Config` for tests: 127.0.0.1, an ephemeral port, then ``settings``."""
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0}
    values.update(settings)
    unknown = set(values) - set(attrs.fields_dict(Config))
    if unknown:
        raise TypeError(f"unknown mq_server settings: {', '.join(sorted(unknown))}")
    return Config(**values)


async def start_server(nursery: trio.Nursery, **settings: Any) -> Server:
    """Start a server in ``nursery``; it runs until the nursery is cancelled."""
    server: Server = await nursery.start(serve, server_config(**settings))
    return server


async def restart_server(nursery: trio.Nursery, server: Server) -> Server:
    """Stop ``server`` gracefully and start a new one on the same port and broker.

    The broker carries the topics' caches and indexes (a durable server reopens its data
    directory instead): clients with ``reconnect=True`` resume where they were. The old
    server must have been started with a fixed port or port 0 (its bound port is reused;
    trio sets SO_REUSEADDR).
    """
    config = attrs.evolve(server.config, port=server.port)  # before the sockets close
    if server.ws_port is not None:
        config = attrs.evolve(config, ws_port=server.ws_port)
    server.shutdown()
    await server.stopped.wait()
    broker = server.broker if config.data_dir is None else None
    new: Server = await nursery.start(partial(serve, config, broker=broker))
    return new


async def start_client(
    nursery: trio.Nursery, *args: Any, **kwargs: Any
) -> Client:
    """Open a client (``open_client(*args, **kwargs)``) held open by a task in ``nursery``."""

    async def hold(*, task_status: trio.TaskStatus[Client]) -> None:
        async with open_client(*args, **kwargs) as client:
            task_status.started(client)
            await trio.sleep_forever()

    client: Client = await nursery.start(hold)
    return client


class ServerFactory(Protocol):
    def __call__(self, **settings: Any) -> Awaitable[Server]: ...


class ClientFactory(Protocol):
    def __call__(
        self,
        target: Server | str | None = None,
        port: int | None = None,
        **options: Any,
    ) -> Awaitable[Client]: ...


@pytest.fixture
def mq_server_factory(nursery: trio.Nursery) -> ServerFactory:
    """``await mq_server_factory(**settings)``: another server, stopped at test end."""

    async def factory(**settings: Any) -> Server:
        return await start_server(nursery, **settings)

    return factory


@pytest.fixture
async def mq_server(request: pytest.FixtureRequest, mq_server_factory: ServerFactory) -> Server:
    """An mq-trio server on 127.0.0.1 (``mq_server.port``); configure it with
    ``@pytest.mark.mq_server(cache_size=..., max_pending_bytes=..., ...)``."""
    settings: dict[str, Any] = {}
    # The closest marker wins per setting (a test's over its class's over its module's).
    for marker in reversed(list(request.node.iter_markers(MARKER))):
        if marker.args:
            raise TypeError("@pytest.mark.mq_server takes keyword settings only")
        settings.update(marker.kwargs)
    return await mq_server_factory(**settings)


@pytest.fixture
def mq_client_factory(mq_server: Server, nursery: trio.Nursery) -> ClientFactory:
    """``await mq_client_factory(**options)``: another client, closed at test end.

    Connects to ``mq_server`` by default; pass a ``Server``, a host and port, or a
    ``ws://`` URL to go elsewhere. ``options`` are those of
    :func:`mq_trio.open_client` (``reconnect=True``, ``max_buffered=...``).
    """

    async def factory(
        target: Server | str | None = None, port: int | None = None, **options: Any
    ) -> Client:
        if target is None:
            target = mq_server
        if isinstance(target, Server):
            host, server_port = target.address
            return await start_client(nursery, host, server_port, **options)
        return await start_client(nursery, target, port, **options)

    return factory


@pytest.fixture
async def mq_client(mq_server: Server, mq_client_factory: ClientFactory) -> Client:
    """A client connected to ``mq_server``."""
    return await mq_client_factory(mq_server)

