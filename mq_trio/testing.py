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

Security (docs/security.md, docs/testing.md):

* ``mq_tls``: a test certificate authority (``trustme``, installed with the ``test``
  extra or ``pip install trustme``), made on first use: ``mq_tls.cert_file``/``key_file``
  (a server certificate for 127.0.0.1, ::1 and localhost), ``mq_tls.ca_file`` (for
  ``--cafile`` or ``ssl.create_default_context(cafile=...)``), ``mq_tls.client_context()``
  (an ``ssl.SSLContext`` trusting it; ``client_context(cert="alice")`` also presents a
  client certificate for mutual TLS, whose subject ``mq_tls.client_subject("alice")``
  can name a user in the auth file), ``mq_tls.server_settings(mutual=False)``.
* ``@pytest.mark.mq_server(tls=True)`` (or ``tls="mutual"``): the server speaks TLS with
  ``mq_tls``'s certificate (``"mutual"``: and requires client certificates from it); the
  client fixtures then trust it by themselves. ``mq_server_factory(tls=True)`` likewise.
* ``mq_auth``: an auth file for the test, made on first use: ``mq_auth.token`` (a token
  allowed everything), ``mq_auth.user``/``mq_auth.password`` (a user allowed
  everything), ``mq_auth.add_user(...)``/``add_token(...)`` for identities with their own
  ``publish``/``subscribe`` globs, ``mq_auth.enable_jwt(...)`` and ``mq_auth.jwt(sub,
  expires_in=...)`` for JWTs, ``mq_auth.path`` (write it with ``mq_auth.write()``).
* ``@pytest.mark.mq_server(auth=True)``: the server runs with ``mq_auth``'s file; the
  client fixtures authenticate with ``mq_auth.token`` unless given other credentials
  (``mq_client_factory(token=None)`` connects without any).

Work queues (docs/testing.md, "Jobs"):

* ``queue_state(server, topic)``: the topic's :class:`~mq_trio.broker.QueueInfo` now
  (``waiting``, ``in_flight``, ``delayed``, ``consumers``, ``delivered_total``,
  ``redelivered_total``, ``acked_total``, ``dead_lettered_total``).
* ``await wait_for_queue(server, topic, lambda q: q.acked_total == 3)``: until the
  predicate holds, failing the test (``AssertionError`` with the last state) after
  ``timeout`` seconds.

Servers and clients live in tasks of the test's nursery rather than in the fixtures'
own tasks: a nursery (and the client owns one) must be closed by the task that opened
it, and the factories are called from the test's task.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import attrs
import pytest
import trio

from .client import Client, open_client
from .server import Config, Server, serve

if TYPE_CHECKING:
    import trustme

    from .broker import QueueInfo

__all__ = [
    "AuthFile",
    "Certificates",
    "ClientFactory",
    "ServerFactory",
    "mq_auth",
    "mq_client",
    "mq_client_factory",
    "mq_server",
    "mq_server_factory",
    "mq_tls",
    "queue_state",
    "restart_server",
    "server_config",
    "start_client",
    "start_server",
    "wait_for_queue",
]

MARKER = "mq_server"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**settings): settings for the mq_server fixture, any mq_trio.Config "
        "field (cache_size=5, max_pending_bytes=65536, ...), tls=True or 'mutual' (TLS "
        "with the mq_tls test CA), auth=True (the mq_auth file; clients use its token)",
    )


_CREDENTIALS = frozenset(("token", "user", "password"))


# --- TLS ---------------------------------------------------------------------------------


class Certificates:
    """A test certificate authority (trustme) and the PEM files a TLS test needs.

    Everything is made on first use, in ``directory`` (a callable, so that no
    directory is created for a test that never asks).
    """

    #: The names the server certificate is valid for.
    SERVER_NAMES = ("127.0.0.1", "::1", "localhost")

    def __init__(self, directory: Callable[[], Path]) -> None:
        self._directory = directory
        self._ca: trustme.CA | None = None
        self._dir: Path | None = None
        self._clients: dict[str, trustme.LeafCert] = {}

    @property
    def ca(self) -> trustme.CA:
        """The ``trustme.CA`` (to issue more certificates)."""
        if self._ca is None:
            try:
                import trustme
            except ImportError:  # pragma: no cover - a test extra
                raise RuntimeError(
                    "mq_tls needs the trustme package (pip install trustme)"
                ) from None
            self._ca = trustme.CA()
        return self._ca

    @property
    def directory(self) -> Path:
        if self._dir is None:
            self._dir = self._directory()
            self.ca.cert_pem.write_to_path(str(self._dir / "ca.pem"))
            cert = self.ca.issue_cert(*self.SERVER_NAMES)
            cert.private_key_and_cert_chain_pem.write_to_path(str(self._dir / "server.pem"))
            cert.private_key_pem.write_to_path(str(self._dir / "server.key"))
        return self._dir

    @property
    def ca_file(self) -> Path:
        """The CA certificate (PEM): for clients (``--cafile``) and ``tls_client_ca``."""
        return self.directory / "ca.pem"

    @property
    def cert_file(self) -> Path:
        """The server's certificate chain (PEM; the key is in it too): ``tls_cert``."""
        return self.directory / "server.pem"

    @property
    def key_file(self) -> Path:
        """The server's private key (PEM): ``tls_key``."""
        return self.directory / "server.key"

    def server_settings(self, mutual: bool = False) -> dict[str, str]:
        """``tls_cert``/``tls_key`` (and with ``mutual``, ``tls_client_ca``) for a server."""
        settings = {"tls_cert": str(self.cert_file), "tls_key": str(self.key_file)}
        if mutual:
            settings["tls_client_ca"] = str(self.ca_file)
        return settings

    def client_cert(self, name: str) -> trustme.LeafCert:
        """The client certificate issued to ``name`` (made once per name)."""
        if name not in self._clients:
            self._clients[name] = self.ca.issue_cert(name, common_name=name)
        return self._clients[name]

    def client_subject(self, name: str) -> str:
        """The subject of ``client_cert(name)`` as the auth file's ``certificate`` key
        names it (RFC 4514 attributes in certificate order, e.g.
        ``O=trustme v1.2.1,OU=Testing cert #...,CN=alice``)."""
        from cryptography import x509

        pem = self.client_cert(name).cert_chain_pems[0].bytes()
        subject = x509.load_pem_x509_certificate(pem).subject
        return ",".join(rdn.rfc4514_string() for rdn in subject.rdns)

    def client_context(self, cert: str | None = None) -> ssl.SSLContext:
        """A client ``SSLContext`` trusting this CA; with ``cert="alice"`` it presents
        ``client_cert("alice")`` (mutual TLS)."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if cert is not None:
            self.client_cert(cert).configure_cert(context)
        return context

    def client_cert_files(self, name: str) -> tuple[Path, Path]:
        """``client_cert(name)`` as files, for programs that take them: (chain, key)."""
        issued = self.client_cert(name)
        chain, key = self.directory / f"client-{name}.pem", self.directory / f"client-{name}.key"
        issued.cert_chain_pems[0].write_to_path(str(chain))
        issued.private_key_pem.write_to_path(str(key))
        return chain, key

    def trusts(self, server: Server) -> bool:
        """Whether ``server`` runs with this CA's certificate."""
        return self._dir is not None and server.config.tls_cert == str(self.cert_file)


# --- authentication ----------------------------------------------------------------------

#: Every topic, in the auth file's glob language (docs/security.md, "Topic globs").
ALL_TOPICS = ("**",)
_PASSWORD_HASHES: dict[str, str] = {}


def _toml_string(text: str) -> str:
    # A JSON string is a TOML basic string (json.dumps escapes nothing TOML lacks).
    return json.dumps(text)


@attrs.define
class _Identity:
    table: Literal["users", "tokens"]
    name: str
    secret: dict[str, str] = attrs.field(repr=False)
    rules: dict[str, tuple[str, ...]]


class AuthFile:
    """An auth file for tests (``--auth``; docs/security.md), written to ``path``.

    It starts with two identities allowed everything: the user ``mq_auth.user`` (password
    ``mq_auth.password``) and a static token ``mq_auth.token``. ``add_user`` and
    ``add_token`` add more; ``write()`` (re)writes the file and returns its path. Hashes
    come from :func:`mq_trio.auth.hash_password` and :func:`mq_trio.auth.new_token`.
    """

    user = "mq-test-user"

    def __init__(self, directory: Callable[[], Path]) -> None:
        self._directory = directory
        self._path: Path | None = None
        self._identities: list[_Identity] = []
        self._token: str | None = None
        #: The default user's password.
        self.password = "mq-test-password"
        self._jwt: dict[str, str] | None = None
        self._jwt_rules: dict[str, tuple[str, ...]] = {}

    def _ensure_defaults(self) -> None:
        if self._token is None:
            self._token = self.add_token("mq-test-token")
            self.add_user(self.user, self.password)

    @property
    def token(self) -> str:
        """A static token allowed to publish and subscribe everywhere."""
        self._ensure_defaults()
        assert self._token is not None
        return self._token

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = self._directory() / "auth.toml"
        return self._path

    def add_user(
        self,
        name: str,
        password: str | None = None,
        *,
        publish: tuple[str, ...] | list[str] = ALL_TOPICS,
        subscribe: tuple[str, ...] | list[str] = ALL_TOPICS,
        publish_deny: tuple[str, ...] | list[str] = (),
        subscribe_deny: tuple[str, ...] | list[str] = (),
        certificate: str | None = None,
    ) -> None:
        """A user with a password (argon2id-hashed here), a client certificate subject
        that authenticates it with mutual TLS (``mq_tls.client_subject(name)``), or
        both; and its topic globs."""
        from .auth import hash_password

        if password is None and certificate is None:
            raise ValueError("a user needs a password, a certificate or both")
        secret: dict[str, str] = {}
        if password is not None:
            if password not in _PASSWORD_HASHES:  # ~0.1 s per hash: once a session
                _PASSWORD_HASHES[password] = hash_password(password)
            secret["password"] = _PASSWORD_HASHES[password]
        if certificate is not None:
            secret["certificate"] = certificate
        self._identities.append(_Identity("users", name, secret, _rules(
            publish, subscribe, publish_deny, subscribe_deny)))

    def add_token(
        self,
        name: str,
        *,
        publish: tuple[str, ...] | list[str] = ALL_TOPICS,
        subscribe: tuple[str, ...] | list[str] = ALL_TOPICS,
        publish_deny: tuple[str, ...] | list[str] = (),
        subscribe_deny: tuple[str, ...] | list[str] = (),
    ) -> str:
        """A new static token (only its hash goes in the file); returns the token."""
        from .auth import new_token

        token, token_hash = new_token()
        self._identities.append(_Identity("tokens", name, {"hash": token_hash}, _rules(
            publish, subscribe, publish_deny, subscribe_deny)))
        return token

    def enable_jwt(
        self,
        *,
        publish: tuple[str, ...] | list[str] = ALL_TOPICS,
        subscribe: tuple[str, ...] | list[str] = ALL_TOPICS,
        permissions_claim: str | None = None,
    ) -> None:
        """Accept JWTs signed (HS256) with a secret made here; ``publish``/``subscribe``:
        what a token may do (``{user}`` is its ``sub``). Mint them with :meth:`jwt`."""
        import secrets

        self._jwt = {"algorithm": "HS256", "secret": secrets.token_urlsafe(48)}
        if permissions_claim is not None:
            self._jwt["permissions_claim"] = permissions_claim
        self._jwt_rules = _rules(publish, subscribe, (), ())

    def jwt(self, sub: str, *, expires_in: float = 3600.0, **claims: Any) -> str:
        """A JWT for ``sub`` signed with :meth:`enable_jwt`'s secret, expiring in
        ``expires_in`` seconds (``exp`` is whole seconds); more claims as keywords."""
        import time

        import jwt

        if self._jwt is None:
            raise RuntimeError("call mq_auth.enable_jwt() (and write()) first")
        payload = {"sub": sub, "exp": int(time.time() + expires_in), **claims}
        return jwt.encode(payload, self._jwt["secret"], algorithm="HS256")

    def text(self) -> str:
        """The file's TOML."""
        self._ensure_defaults()
        out: list[str] = []
        if self._jwt is not None:
            out.append("[jwt]")
            out += [f"{key} = {_toml_string(value)}" for key, value in self._jwt.items()]
            out += [f"{key} = [{', '.join(_toml_string(g) for g in globs)}]"
                    for key, globs in self._jwt_rules.items() if globs]
            out.append("")
        for identity in self._identities:
            out.append(f"[{identity.table}.{_toml_string(identity.name)}]")
            for key, value in identity.secret.items():
                out.append(f"{key} = {_toml_string(value)}")
            for key, globs in identity.rules.items():
                if globs:
                    out.append(f"{key} = [{', '.join(_toml_string(g) for g in globs)}]")
            out.append("")
        return "\n".join(out)

    def write(self) -> Path:
        """Write the file (again, after changes: a server reloads it on SIGHUP)."""
        self.path.write_text(self.text(), encoding="utf-8")
        return self.path

    def used_by(self, server: Server) -> bool:
        return self._path is not None and server.config.auth_file == str(self._path)


def _rules(*lists: tuple[str, ...] | list[str]) -> dict[str, tuple[str, ...]]:
    keys = ("publish", "subscribe", "publish_deny", "subscribe_deny")
    return {key: tuple(globs) for key, globs in zip(keys, lists, strict=True)}


def _security_settings(
    settings: dict[str, Any], tls: Certificates | None, auth: AuthFile | None = None
) -> dict[str, Any]:
    """Turn the plugin's own ``tls=`` and ``auth=`` into Config fields."""
    if settings.pop("auth", False):
        if auth is None:  # pragma: no cover - the fixtures always pass one
            raise TypeError("auth=True needs the mq_auth fixture")
        settings["auth_file"] = str(auth.write())
    mode: bool | Literal["mutual"] = settings.pop("tls", False)
    if mode:
        if tls is None:  # pragma: no cover - the fixtures always pass one
            raise TypeError("tls=True needs the mq_tls fixture")
        if mode not in (True, "mutual"):
            raise TypeError(f"tls= takes True or 'mutual', not {mode!r}")
        settings.update(tls.server_settings(mutual=mode == "mutual"))
    return settings


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


# --- work queues ---------------------------------------------------------------------


def queue_state(server: Server, topic: str) -> QueueInfo:
    """The jobs of ``topic`` on ``server`` now: waiting, in flight, delayed, consumers and
    the totals (a topic without jobs: all zero)."""
    return server.broker.queue_info(topic)


#: How often ``wait_for_queue`` looks again.
QUEUE_POLL_INTERVAL = 0.005


async def wait_for_queue(
    server: Server,
    topic: str,
    predicate: Callable[[QueueInfo], bool],
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - the failure shows the last state
) -> QueueInfo:
    """Wait until ``predicate(queue_state(server, topic))`` holds; return that state.

    Raises ``AssertionError`` (the test fails, showing the last state) after ``timeout``
    seconds. The broker has no change notification for queues, so this looks every
    few milliseconds: the server runs in the test's own trio run, so each look is a
    synchronous read between two of its steps (never a torn state), and the timeout
    turns a condition that never comes into a failure instead of a hung test.
    """
    deadline = trio.current_time() + timeout
    while True:
        state = queue_state(server, topic)
        if predicate(state):
            return state
        if trio.current_time() >= deadline:
            name = getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(
                f"queue {topic!r}: {name} did not hold within {timeout:g} s; last "
                f"state: {state!r}"
            )
        await trio.sleep(QUEUE_POLL_INTERVAL)


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
def mq_tls(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A test CA with a server certificate for 127.0.0.1/::1/localhost (see
    :class:`Certificates`); its files are made when first asked for."""
    return Certificates(lambda: tmp_path_factory.mktemp("mq_tls"))


@pytest.fixture
def mq_auth(tmp_path_factory: pytest.TempPathFactory) -> AuthFile:
    """An auth file with a user and a token allowed everything, and room for more (see
    :class:`AuthFile`); made when first asked for."""
    return AuthFile(lambda: tmp_path_factory.mktemp("mq_auth"))


@pytest.fixture
def mq_server_factory(
    nursery: trio.Nursery, mq_tls: Certificates, mq_auth: AuthFile
) -> ServerFactory:
    """``await mq_server_factory(**settings)``: another server, stopped at test end.

    Besides the Config fields, ``tls=True`` (or ``"mutual"``) serves TLS with ``mq_tls``,
    and ``auth=True`` requires authentication with ``mq_auth``'s file.
    """

    async def factory(**settings: Any) -> Server:
        return await start_server(nursery, **_security_settings(settings, mq_tls, mq_auth))

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
def mq_client_factory(
    mq_server: Server, nursery: trio.Nursery, mq_tls: Certificates, mq_auth: AuthFile
) -> ClientFactory:
    """``await mq_client_factory(**options)``: another client, closed at test end.

    Connects to ``mq_server`` by default; pass a ``Server``, a host and port, or a
    ``ws://`` URL to go elsewhere. ``options`` are those of
    :func:`mq_trio.open_client` (``reconnect=True``, ``max_buffered=...``). To a server
    serving TLS with ``mq_tls``, it connects over TLS trusting that CA unless given an
    ``ssl_context``; to one using ``mq_auth``'s file it authenticates with
    ``mq_auth.token`` unless given ``token=``, ``user=`` or ``password=`` (``token=None``:
    no credentials at all).
    """

    async def factory(
        target: Server | str | None = None, port: int | None = None, **options: Any
    ) -> Client:
        if target is None:
            target = mq_server
        if isinstance(target, Server):
            if "ssl_context" not in options and mq_tls.trusts(target):
                options["ssl_context"] = mq_tls.client_context()
            if not _CREDENTIALS & options.keys() and mq_auth.used_by(target):
                options["token"] = mq_auth.token
            host, server_port = target.address
            return await start_client(nursery, host, server_port, **options)
        return await start_client(nursery, target, port, **options)

    return factory


@pytest.fixture
async def mq_client(mq_server: Server, mq_client_factory: ClientFactory) -> Client:
    """A client connected to ``mq_server``."""
    return await mq_client_factory(mq_server)

