"""The server: listeners, the shared broker, and the nursery that owns every connection."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import attrs
import trio

from ..broker import DEFAULT_CACHE_SIZE, Broker, MemoryHistory
from ..protocol import DEFAULT_MAX_LINE_BYTES, TOO_MANY_CONNECTIONS, failure_bytes
from ..transports import _tcp as tcp
from ..transports import _tls as tls
from ..transports._base import Transport
from ..transports._http import OriginPolicy
from ..transports._input import InputGuard
from ..transports._tcp import TCPTransport
from ..transports._websocket import DEFAULT_PING_INTERVAL
from ._admin import serve_admin
from ._connection import (
    DEFAULT_FLUSH_TIMEOUT,
    DEFAULT_MAX_PENDING_BYTES,
    Connection,
    Limits,
    LogThrottle,
    Registry,
)
from ._outbox import Ready, send_ready
from ._pacer import CUTOFFS_PER_PASS, Pacer, WriteTurns
from ._stats import Stats
from ._ws_listener import handle_stream

if TYPE_CHECKING:
    from ..auth import Authenticator

log = logging.getLogger("mq_trio.server")


#: accept() errors that only mean this client is gone already.
_ACCEPT_RETRY_ERRNOS = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EPERM))
#: accept() errors from running out of descriptors or memory: wait and try again (as
#: trio.serve_listeners does), rather than crash the server.
_ACCEPT_CAPACITY_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS))
_ACCEPT_CAPACITY_SLEEP = 0.1
#: While accept() keeps failing so, at most one log line per this many seconds.
_ACCEPT_LOG_INTERVAL = 10.0
#: A constant task name, so trio does not build one per connection.
_CONNECTION_TASK = "mq_trio.connection"
_REFUSED_TASK = "mq_trio.refused"
_TLS_TASK = "mq_trio.tls"
_WS_TASK = "mq_trio.websocket"
_TOO_MANY_CONNECTIONS = failure_bytes(TOO_MANY_CONNECTIONS)
#: Time a refused TCP client is given to read its reply before the socket closes.
_REFUSE_TIMEOUT = 1.0
#: Connections looked at per scheduler pass after an auth reload.
_RECHECKS_PER_PASS = 256

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7000
#: Limits and abuse (docs/operations.md): see the Config fields below.
DEFAULT_LINE_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 20_000
DEFAULT_MAX_INPUT_BYTES = 256 << 20
DEFAULT_MAX_TOPICS = 1_000_000
DEFAULT_MAX_CACHE_BYTES = 1 << 30
#: Security (docs/security.md).
DEFAULT_AUTH_TIMEOUT = 5.0
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0
#: Work queues (docs/protocol.md, "Acknowledged jobs").
DEFAULT_ACK_TIMEOUT = 30.0
DEFAULT_MAX_DELIVERIES = 5
DEFAULT_DEDUPE_WINDOW = 120.0
DEFAULT_MAX_QUEUE_JOBS = 100_000
DEFAULT_MAX_JOB_BYTES = 512 << 20


@attrs.frozen
class Config:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    cache_size: int = DEFAULT_CACHE_SIZE
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    #: On shutdown (and per closing connection): time allowed to flush queued output.
    shutdown_grace: float = DEFAULT_FLUSH_TIMEOUT
    #: WebSocket listener (and browser page): off when ``ws_port`` is None; 0 picks a port.
    ws_port: int | None = None
    #: Defaults to ``host``.
    ws_host: str | None = None
    #: Origins allowed besides the page's own; None: localhost origins; ("*",): any.
    ws_allowed_origins: tuple[str, ...] | None = None
    #: Seconds between keepalive pings; a ping unanswered as long drops the peer. 0: off.
    ws_ping_interval: float = DEFAULT_PING_INTERVAL
    #: Durable topics (docs/durability.md): None keeps everything in memory.
    data_dir: str | None = None
    #: Cluster mode (docs/cluster.md): the Redis URL the nodes share; None: one node.
    cluster: str | None = None
    #: With cluster: seconds a node's subscriber counts outlive it (a node killed
    #: without a goodbye is picked for "one" messages at most this long).
    cluster_lease: float = 15.0
    #: With data_dir: "always", "everysec" or "never" (when the store fsyncs).
    fsync: str = "everysec"
    #: With data_dir: cached messages per topic kept in RAM (older ones stay on disk).
    memory_window: int = 1000
    #: Seconds a line may stay unfinished after its first byte ("Line timeout"); 0: off.
    #: Idle connections with no partial line are never affected.
    line_timeout: float = DEFAULT_LINE_TIMEOUT
    #: Clients served at once (TCP and WebSocket together); one more gets
    #: "Too many connections" and is closed.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: Bytes of unfinished lines held across all connections; the connection that would
    #: pass it gets "Too much unfinished input" and is closed.
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    #: Topics the server keeps state for; a command that would create one more gets
    #: "Too many topics".
    max_topics: int = DEFAULT_MAX_TOPICS
    #: Bytes of cached messages across all topics (in memory); beyond it the oldest
    #: cached messages are evicted (and counted as evictions for the epoch extension).
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES
    #: With data_dir: start even though committed data is found missing or corrupt
    #: (starts a new epoch, so resuming clients learn of the gap).
    accept_data_loss: bool = False
    #: The auth file (docs/security.md): None lets every client do everything.
    auth_file: str | None = None
    #: With auth_file: seconds a client has to authenticate after connecting.
    auth_timeout: float = DEFAULT_AUTH_TIMEOUT
    #: TLS on the TCP and WebSocket ports: certificate chain and key (PEM), both or none.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: With TLS: clients must present a certificate signed by this CA (mutual TLS).
    tls_client_ca: str | None = None
    #: With TLS: seconds a client has to complete the handshake.
    tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT
    #: The HTTP port for /metrics, /healthz, /stats, /connections, /topics (None: off;
    #: 0 picks a free one), and its address (loopback unless asked).
    http_port: int | None = None
    http_host: str = DEFAULT_HOST
    #: Work queues: seconds a consumer has to ack a job before it is redelivered.
    ack_timeout: float = DEFAULT_ACK_TIMEOUT
    #: Deliveries of a job before it moves to the dead-letter topic.
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    #: Seconds a send's message id is remembered (a repeat gets the original index).
    dedupe_window: float = DEFAULT_DEDUPE_WINDOW
    #: Jobs waiting or in flight per topic; one more gets "Queue full".
    max_queue_jobs: int = DEFAULT_MAX_QUEUE_JOBS
    #: Bytes of jobs waiting or in flight across all topics; beyond it "Queue full".
    max_job_bytes: int = DEFAULT_MAX_JOB_BYTES

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def limits(self) -> Limits:
        return Limits(
            max_pending_bytes=self.max_pending_bytes,
            max_line_bytes=self.max_line_bytes,
            flush_timeout=self.shutdown_grace,
            line_timeout=self.line_timeout,
            auth_timeout=self.auth_timeout,
        )

    def check(self) -> None:
        """Raise ValueError for settings that cannot work together."""
        if self.cache_size < 0:
            raise ValueError("cache size must be >= 0")
        if self.max_line_bytes < 1:
            raise ValueError("max line bytes must be >= 1")
        if self.max_pending_bytes < 2 * self.max_line_bytes:
            # A single maximal message would otherwise disconnect every subscriber.
            raise ValueError("max pending bytes must be at least twice max line bytes")
        if self.shutdown_grace < 0:
            raise ValueError("shutdown grace must be >= 0")
        if self.ws_ping_interval < 0:
            raise ValueError("WebSocket ping interval must be >= 0")
        OriginPolicy.from_config(self.ws_allowed_origins)  # ValueError for a bad origin
        if self.fsync not in ("always", "everysec", "never"):
            raise ValueError("fsync must be always, everysec or never")
        if self.memory_window < 1:
            raise ValueError("memory window must be >= 1")
        if self.line_timeout < 0:
            raise ValueError("line timeout must be >= 0 (0: off)")
        if self.max_connections < 1:
            raise ValueError("max connections must be >= 1")
        if self.max_input_bytes < self.max_line_bytes:
            raise ValueError("max input bytes must be at least max line bytes")
        if self.max_topics < 1:
            raise ValueError("max topics must be >= 1")
        if self.max_cache_bytes < 0:
            raise ValueError("max cache bytes must be >= 0")
        if self.auth_timeout <= 0:
            raise ValueError("auth timeout must be > 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate (--tls-cert) and a key (--tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("a client CA (--tls-client-ca) needs TLS (--tls-cert, --tls-key)")
        if self.tls_handshake_timeout <= 0:
            raise ValueError("TLS handshake timeout must be > 0")
        if self.ack_timeout <= 0:
            raise ValueError("ack timeout must be > 0")
        if self.max_deliveries < 1:
            raise ValueError("max deliveries must be >= 1")
        if self.dedupe_window < 0:
            raise ValueError("dedupe window must be >= 0 (0: off)")
        if self.max_queue_jobs < 1:
            raise ValueError("max queue jobs must be >= 1")
        if self.max_job_bytes < self.max_line_bytes:
            raise ValueError("max job bytes must be at least max line bytes")
        if self.cluster_lease <= 0:
            raise ValueError("cluster lease must be > 0")
        if self.cluster is not None and self.data_dir is not None:
            raise ValueError("--cluster and --data-dir do not combine: in cluster mode "
                             "the history is in Redis (make Redis durable: appendonly)")


async def open_listeners(config: Config) -> list[trio.SocketListener]:
    """Bind the TCP port (port 0 picks a free one). Raises OSError, e.g. port in use."""
    return await trio.open_tcp_listeners(config.port, host=config.host)


async def open_ws_listeners(config: Config) -> list[trio.SocketListener]:
    """Bind the WebSocket port, if one is configured (``ws_host`` defaults to ``host``)."""
    if config.ws_port is None:
        return []
    host = config.ws_host if config.ws_host is not None else config.host
    return await trio.open_tcp_listeners(config.ws_port, host=host)


async def open_http_listeners(config: Config) -> list[trio.SocketListener]:
    """Bind the HTTP port (metrics, health, introspection), if one is configured."""
    if config.http_port is None:
        return []
    return await trio.open_tcp_listeners(config.http_port, host=config.http_host)


@attrs.define(eq=False)
class Server:
    """A running server, as reported by ``nursery.start(serve, config)``."""

    config: Config
    broker: Broker
    listeners: list[trio.SocketListener]
    #: The WebSocket/page listeners; empty when the WebSocket endpoint is off.
    ws_listeners: list[trio.SocketListener] = attrs.field(factory=list)
    #: The HTTP listeners (--http-port); empty when off.
    http_listeners: list[trio.SocketListener] = attrs.field(factory=list)
    connections: Registry = attrs.field(factory=Registry)
    _accept_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _connections_scope: trio.CancelScope | None = None
    #: Set once shutdown() was called.
    stopping: bool = False
    #: Set when serve() has returned (after a shutdown, every connection is closed).
    stopped: trio.Event = attrs.field(factory=trio.Event)
    _limits: Limits = attrs.field(init=False)
    #: Outboxes whose writers a command just woke; its reader writes them (Outbox.attach).
    _ready: Ready = attrs.field(init=False, factory=lambda: Ready(WriteTurns()))
    #: Unfinished input of all TCP connections: --line-timeout and --max-input-bytes.
    input_guard: InputGuard = attrs.field(init=False)
    #: Cancels the connections of cut-off slow consumers, a few per scheduler pass.
    reaper: Pacer = attrs.field(init=False, factory=lambda: Pacer(CUTOFFS_PER_PASS))
    #: Streams of the WebSocket port accepted and not (yet, or any more) a connection
    #: in ``connections``: they count toward --max-connections too.
    _ws_handshakes: int = attrs.field(init=False, default=0)
    #: Clients of the TCP port in their TLS handshake (not yet in ``connections``):
    #: they count toward --max-connections too.
    _tls_handshakes: int = attrs.field(init=False, default=0)
    #: TLS handshakes that failed or timed out (logged at a bounded rate).
    tls_failures: int = attrs.field(init=False, default=0)
    _tls_log: LogThrottle = attrs.field(
        init=False, factory=lambda: LogThrottle(_ACCEPT_LOG_INTERVAL)
    )
    _refused_log: LogThrottle = attrs.field(
        init=False, factory=lambda: LogThrottle(_ACCEPT_LOG_INTERVAL)
    )
    #: With --auth: who may connect and do what (docs/security.md); None: everyone.
    authenticator: Authenticator | None = None
    #: The nursery of the server's own tasks, while it runs.
    _tasks: trio.Nursery | None = attrs.field(init=False, default=None)
    #: With --tls-cert/--tls-key: TLS on both ports (built once by ``serve``).
    ssl_context: ssl.SSLContext | None = None

    def __attrs_post_init__(self) -> None:
        self._limits = self.config.limits  # one shared object, not one per connection
        self.input_guard = InputGuard(self.config.max_input_bytes, self.config.line_timeout)

    @property
    def ws_handshakes(self) -> int:
        return self._ws_handshakes

    @ws_handshakes.setter
    def ws_handshakes(self, value: int) -> None:
        self._ws_handshakes = value
        if self.connections.changed:
            self.connections.changed.unpark_all()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds, checked again whenever a connection opens
        or closes (``connections``, ``open_connections``)."""
        while not predicate():
            await self.connections.changed.park()

    @property
    def tls_handshakes(self) -> int:
        return self._tls_handshakes

    @tls_handshakes.setter
    def tls_handshakes(self, value: int) -> None:
        self._tls_handshakes = value
        if self.connections.changed:
            self.connections.changed.unpark_all()

    @property
    def stats(self) -> Stats:
        """Server-wide counters (metrics; server/_stats.py)."""
        return self.connections.stats

    @property
    def refused(self) -> int:
        """Clients refused as too many (``Too many connections``)."""
        return self.connections.stats.refused

    @property
    def healthy(self) -> bool:
        """Serving: not stopping, and the history can write (``GET /healthz``)."""
        return not self.stopping and self.broker.history.stats().available

    @property
    def open_connections(self) -> int:
        """Clients counted against --max-connections (TCP and WebSocket together)."""
        return len(self.connections) + self.ws_handshakes + self.tls_handshakes

    def _admit(self) -> bool:
        """Whether one more client may be served; logs refusals at a bounded rate."""
        if self.open_connections < self.config.max_connections:
            return True
        self.stats.refused += 1
        if self._refused_log.allow() is not None:
            log.warning("refusing clients: %d connections open (--max-connections); "
                        "%d refused so far", self.open_connections, self.stats.refused)
        return False

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        return int(self.listeners[0].socket.getsockname()[1])

    @property
    def ws_port(self) -> int | None:
        """The bound WebSocket port (None when the endpoint is off)."""
        if not self.ws_listeners:
            return None
        return int(self.ws_listeners[0].socket.getsockname()[1])

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port (None when off)."""
        if not self.http_listeners:
            return None
        return int(self.http_listeners[0].socket.getsockname()[1])

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listeners[0].socket.getsockname()[:2]
        return str(host), int(port)

    def shutdown(self) -> None:
        """Stop accepting, ask every connection to flush and close, bound the wait."""
        self.stopping = True
        log.info("shutting down: closing %d connection(s)", len(self.connections))
        self._accept_scope.cancel()
        for conn in list(self.connections):
            conn.stop()
        if self._connections_scope is not None:
            self._connections_scope.deadline = (
                trio.current_time() + self.config.shutdown_grace
            )

    def reload_auth(self) -> bool:
        """Re-read the auth file (SIGHUP): new rules for new commands at once; a file
        that fails to load keeps the old rules (a reload must never let everyone in)."""
        if self.authenticator is None:
            log.info("reload: no auth file (--auth) to reload")
            return False
        from ..auth import AuthConfigError

        try:
            self.authenticator.reload()
        except AuthConfigError as exc:
            log.error("reload failed, keeping the previous rules: %s", exc)
            return False
        log.info("reloaded %s", self.authenticator.path)
        if self._tasks is not None:
            self._tasks.start_soon(self.recheck_connections)
        return True

    async def recheck_connections(self) -> None:
        """After a reload: every authenticated connection under the new rules at once,
        not at its next command (an idle subscriber too). A connection whose identity
        is gone (or whose password or token changed) is closed; subscriptions the new
        rules deny are ended. A few hundred connections per scheduler pass."""
        for i, conn in enumerate(list(self.connections)):
            conn.recheck_grant()
            if i % _RECHECKS_PER_PASS == _RECHECKS_PER_PASS - 1:
                await trio.lowlevel.checkpoint()

    def connection(self, transport: Transport) -> Connection:
        """A connection of this server over ``transport``; ``await conn.run()`` serves it."""
        return Connection(
            transport, self.broker, self._limits, self.connections,
            self._ready, self.reaper, self.authenticator,
        )

    async def handle_transport(self, transport: Transport) -> None:
        """Serve one client on any transport; a failure stays inside this connection."""
        await self.connection(transport).run()

    async def _accept_tcp(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept TCP clients; each one's task runs ``Connection.run`` itself.

        trio.serve_listeners would wrap each client in a SocketStream and run it under a
        handler task frame; neither is used by the TCP transport, and 10,000 idle
        connections pay for every object kept per connection.
        """
        async with listener:  # closed however accepting ends
            await self._accept_loop(listener.socket, nursery)

    async def _accept_ws(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept clients of the WebSocket port (the same loop as TCP: its handling of
        descriptor exhaustion, its bounded logging)."""
        async with listener:
            await self._accept_loop(listener.socket, nursery, self._start_ws)

    def _start_ws(self, client: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        admitted = self._admit()
        if admitted:
            self.ws_handshakes += 1  # handle_stream gives it back
        nursery.start_soon(
            handle_stream, self, trio.SocketStream(client), not admitted, name=_WS_TASK
        )

    def _start_tcp(self, client: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        if self.ssl_context is not None:
            # The handshake is the client's own task: the accept loop never waits on it.
            admitted = self._admit()
            if admitted:
                self.tls_handshakes += 1  # _serve_tls gives it back
            nursery.start_soon(self._serve_tls, client, admitted, name=_TLS_TASK)
            return
        if tcp.DIRECT_IO:
            tcp.configure_socket(client)
            stream: trio.socket.SocketType | trio.SocketStream = client
        else:
            stream = trio.SocketStream(client)
        if not self._admit():
            nursery.start_soon(_refuse_tcp, TCPTransport(stream), name=_REFUSED_TASK)
            return
        conn = self.connection(
            TCPTransport(stream, self.config.max_line_bytes, self.input_guard)
        )
        # Counted from now (Connection.run adds it too): a burst of accepts in one pass
        # cannot pass --max-connections.
        self.connections.add(conn)
        nursery.start_soon(conn.run, name=_CONNECTION_TASK)

    async def tls_handshake(
        self, stream: trio.SSLStream[tls.LingeringStream], refused: bool = False
    ) -> bool:
        """The server side of a client's TLS handshake, within --tls-handshake-timeout
        (a refused client: within the refusal's time); a failure is logged at a bounded
        rate and counted in ``tls_failures``."""
        seconds = self.config.tls_handshake_timeout
        if refused:
            seconds = min(seconds, _REFUSE_TIMEOUT)
        problem = await tls.handshake(stream, seconds)
        if problem is None:
            return True
        self.tls_failures += 1
        more = self._tls_log.allow()
        if more is not None:
            log.info("TLS handshake with %s failed: %s%s",
                     tcp.peer_name(stream.transport_stream.socket), problem,
                     f" ({more} more failed since the last such line)" if more else "")
        return False

    async def _serve_tls(self, client: trio.socket.SocketType, admitted: bool) -> None:
        """One client of the TCP port with TLS: the handshake (bounded; counted against
        --max-connections meanwhile), then a connection over the ``SSLStream``; a refused
        client gets ``Too many connections`` after its handshake (bounded too)."""
        assert self.ssl_context is not None
        try:
            stream = tls.server_stream(trio.SocketStream(client), self.ssl_context)
        except Exception:  # contained: it must not end the connections nursery
            log.exception("TLS for %s failed", tcp.peer_name(client))
            client.close()
            if admitted:
                self.tls_handshakes -= 1
            return
        del client
        transport: TCPTransport | None = None
        try:
            if await self.tls_handshake(stream, not admitted):
                transport = TCPTransport(stream, self.config.max_line_bytes, self.input_guard,
                                         tls.peer_subject(stream))
        except Exception:  # contained: it must not end the connections nursery
            log.exception("TLS handshake with %s failed",
                          tcp.peer_name(stream.transport_stream.socket))
        finally:
            if transport is None:
                if admitted:
                    self.tls_handshakes -= 1
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
        if transport is None:
            return
        if not admitted or self.stopping:
            if admitted:
                self.tls_handshakes -= 1
            await _refuse_tcp(transport, None if admitted else _TOO_MANY_CONNECTIONS)
            return
        conn = self.connection(transport)
        self.connections.add(conn)  # counted as a connection from now, not a handshake
        self.tls_handshakes -= 1
        await conn.run()

    async def _accept_loop(
        self,
        sock: trio.socket.SocketType,
        nursery: trio.Nursery,
        start: Callable[[trio.socket.SocketType, trio.Nursery], None] | None = None,
    ) -> None:
        if start is None:
            start = self._start_tcp
        # Out of descriptors, accept() fails every retry: log the first failure, then
        # at most one line per _ACCEPT_LOG_INTERVAL counting the failures in between.
        failing = False
        unlogged = 0  # failures since the last line
        next_log = 0.0
        while True:
            try:
                client, _ = await sock.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY_ERRNOS:
                    continue  # the client gave up before it was accepted
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                now = trio.current_time()
                if not failing:
                    failing = True
                    log.error("accept failed: %s; retrying every %.1f s",
                              os.strerror(exc.errno), _ACCEPT_CAPACITY_SLEEP)
                    next_log = now + _ACCEPT_LOG_INTERVAL
                elif now >= next_log:
                    log.error("accept failed: %s; %d more failures since the last report",
                              os.strerror(exc.errno), unlogged + 1)
                    unlogged = 0
                    next_log = now + _ACCEPT_LOG_INTERVAL
                else:
                    unlogged += 1
                await trio.sleep(_ACCEPT_CAPACITY_SLEEP)
                continue
            if failing:
                log.warning("accepting again (%d failures since the last report)", unlogged)
                failing = False
                unlogged = 0
            start(client, nursery)
            # no local: it would keep the last connection alive until the next accept
            del client

    async def run(self, task_status: trio.TaskStatus[Server]) -> None:
        """Accept on every listener until ``shutdown``, then wait for the connections."""
        async with trio.open_nursery() as connections:
            self._connections_scope = connections.cancel_scope
            # The HTTP port outlives accepting: /healthz says "stopping" during the grace.
            for listener in self.http_listeners:
                connections.start_soon(serve_admin, self, listener)
                host, port = listener.socket.getsockname()[:2]
                log.info("listening on %s:%d (http: /metrics, /healthz, /stats)", host, port)
            with self._accept_scope:
                async with trio.open_nursery() as accept:
                    self._tasks = accept
                    security = ""
                    if self.ssl_context is not None:
                        security = ", mutual tls" if self.config.tls_client_ca else ", tls"
                    for listener in self.listeners:
                        accept.start_soon(self._accept_tcp, listener, connections)
                        host, port = listener.socket.getsockname()[:2]
                        log.info("listening on %s:%d (tcp%s)", host, port, security)
                    # Same nurseries as TCP: shutdown stops both, connections share one.
                    scheme = "http" if self.ssl_context is None else "https"
                    for listener in self.ws_listeners:
                        accept.start_soon(self._accept_ws, listener, connections)
                        host, port = listener.socket.getsockname()[:2]
                        log.info("listening on %s:%d (websocket%s, page at %s://%s:%d/)",
                                 host, port, security, scheme, host, port)
                    self._warn_if_open()
                    if self.config.line_timeout > 0:
                        accept.start_soon(self.input_guard.sweep)
                    accept.start_soon(self.reaper.run)
                    accept.start_soon(self._run_job_timers)
                    accept.start_soon(self._settle_jobs)
                    assert self._ready.turns is not None
                    accept.start_soon(self._ready.turns.run)  # big fan-outs, over passes
                    if self.broker.shared is not None:
                        # A cluster's intake writes what it delivered, as a reader does
                        # at the end of its chunk.
                        ready = self._ready
                        self.broker.history.after_deliveries = (  # type: ignore[attr-defined]
                            lambda: send_ready(ready))
                    task_status.started(self)
            # Stop accepting at the socket level too: a listening socket left open would
            # still complete handshakes into its backlog, for clients nobody will serve.
            for listener in (*self.listeners, *self.ws_listeners):
                listener.socket.close()
            self.connections.changed.unpark_all()  # serve_admin ends with the last one
            # Only a shutdown ends the accept scope; the connections nursery now waits
            # for the connections it was given a deadline for.


    async def _run_job_timers(self) -> None:
        """Job deadlines and nack delays: sleeps until the earliest is due (woken when
        an earlier one is set), then redelivers, at most 10,000 per scheduler pass."""
        jobs = self.broker.jobs
        wake = trio.Event()

        def poke() -> None:
            wake.set()

        jobs.on_timer = poke
        while True:
            due = jobs.expire(trio.current_time())
            jobs.wake_at = due
            if due <= trio.current_time():
                await trio.lowlevel.checkpoint()
                continue
            with trio.move_on_at(due):
                await wake.wait()
            wake = trio.Event()

    async def _settle_jobs(self) -> None:
        """Jobs become deliverable once the history has written them (durable mode):
        waits for the oldest undecided write, then settles everything decided."""
        jobs = self.broker.jobs
        wake = trio.Event()

        def poke() -> None:
            wake.set()

        jobs.on_undecided = poke
        while True:
            if not jobs.undecided:
                await wake.wait()
                wake = trio.Event()
                continue
            ticket = jobs.undecided[0].ticket
            if ticket is not None:
                await ticket.wait()
            jobs.settle()

    def _warn_if_open(self) -> None:
        """Loopback without auth is the embedded default; anything else without auth is
        open to whoever can reach it, which deserves a line at start."""
        if self.authenticator is not None:
            return
        for listener in (*self.listeners, *self.ws_listeners):
            host = listener.socket.getsockname()[0]
            if not is_loopback(host):
                log.warning(
                    "listening on %s without authentication: anyone who can reach it "
                    "may read and publish every topic (see --auth, docs/security.md)", host
                )
                return


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


async def _refuse_tcp(
    transport: TCPTransport, reply: bytes | None = _TOO_MANY_CONNECTIONS
) -> None:
    """One ``Too many connections`` line, then close (giving the client a moment to read
    it: closing with its input unread would reset the connection). Over TLS the same,
    after the handshake (``Server._serve_tls``); ``reply`` None: just the close."""
    if reply is not None:
        with trio.move_on_after(_REFUSE_TIMEOUT):
            try:
                await transport.send_batch([reply])
            except trio.BrokenResourceError:
                pass
    with trio.CancelScope(shield=True), trio.move_on_after(_REFUSE_TIMEOUT):
        await transport.aclose()


async def serve(
    config: Config,
    *,
    broker: Broker | None = None,
    listeners: list[trio.SocketListener] | None = None,
    ws_listeners: list[trio.SocketListener] | None = None,
    http_listeners: list[trio.SocketListener] | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until cancelled or until ``Server.shutdown()`` completes.

    Start it with ``server = await nursery.start(serve, config)``; with ``port=0`` the
    bound port is ``server.port``.
    """
    config.check()
    ssl_context = None
    if config.tls_cert is not None and config.tls_key is not None:
        # Once, before listening: a bad file refuses to start (TLSConfigError).
        ssl_context = tls.server_ssl_context(
            config.tls_cert, config.tls_key, config.tls_client_ca
        )
    if listeners is None:
        listeners = await open_listeners(config)
    if ws_listeners is None:
        ws_listeners = await open_ws_listeners(config)
    if http_listeners is None:
        http_listeners = await open_http_listeners(config)
    authenticator = None
    if config.auth_file is not None:
        from ..auth import Authenticator  # only --auth needs argon2 and PyJWT

        authenticator = Authenticator.load(config.auth_file)  # AuthConfigError
    servers: list[Server] = []  # (the one built inside the block, once it is)
    try:
        async with _open_broker(config, broker) as broker:
            broker.configure_jobs(
                ack_timeout=config.ack_timeout, max_deliveries=config.max_deliveries,
                max_queue_jobs=config.max_queue_jobs, max_job_bytes=config.max_job_bytes,
                # (the clock's own method: trio.current_time looks up the run first)
                dedupe_window=config.dedupe_window,
                clock=trio.lowlevel.current_clock().current_time,
            )
            server = Server(config, broker, listeners, ws_listeners, http_listeners,
                            authenticator=authenticator, ssl_context=ssl_context)
            servers.append(server)
            await server.run(task_status)
    finally:
        # Only once the store is closed: a new server on the same data directory may
        # start as soon as this one says it stopped.
        for server in servers:
            server.stopped.set()


@asynccontextmanager
async def _open_broker(
    config: Config, broker: Broker | None
) -> AsyncIterator[Broker]:
    """The broker over its history: in memory, the durable store, or Redis (cluster)."""
    if config.cluster is not None:
        if broker is not None:
            raise ValueError("a broker cannot be passed together with cluster")
        from ..cluster._node import open_node  # only cluster mode needs hiredis

        async with open_node(config.cluster, cache_size=config.cache_size,
                             dedupe_window=config.dedupe_window,
                             lease=config.cluster_lease, ack_timeout=config.ack_timeout,
                             max_queue_jobs=config.max_queue_jobs) as history:
            yield Broker(history, max_topics=config.max_topics)
        return
    if config.data_dir is None:
        yield broker or Broker(
            MemoryHistory(config.cache_size, max_cache_bytes=config.max_cache_bytes),
            max_topics=config.max_topics,
        )
        return
    if broker is not None:
        raise ValueError("a broker cannot be passed together with data_dir")
    from ..store import open_durable  # only durable mode needs sqlite3

    async with open_durable(
        config.data_dir,
        cache_size=config.cache_size,
        fsync=config.fsync,  # type: ignore[arg-type]  # checked by Config.check
        memory_window=config.memory_window,
        max_cache_bytes=config.max_cache_bytes,
        accept_data_loss=config.accept_data_loss,
    ) as durable:
        yield Broker(durable.history, max_topics=config.max_topics)
    # leaving the block wrote what was queued and closed the store
