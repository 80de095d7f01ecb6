"""TLS on the TCP port (docs/security.md, "TLS"): the context and its errors, the
handshake under a timeout, mutual TLS and the client certificate's subject, and the
close path (the last reply arrives over TLS every time, then close_notify).

Certificates come from ``trustme``; servers and clients use real sockets on 127.0.0.1.
The helpers here (``Certs``, ``TLSLineClient``) are shared with ``test_tls_ws.py`` and
``test_browser_tls.py``.
"""

from __future__ import annotations

import json
import logging
import ssl
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trustme
from support import make_config, start_server

from mq_trio import protocol
from mq_trio.cli import main
from mq_trio.server import Server, serve
from mq_trio.transports._tcp import TCPTransport
from mq_trio.transports._tls import (
    TLSConfigError,
    escape_value,
    server_ssl_context,
    subject_string,
)

LINE_TOO_LONG = protocol.failure_bytes("Line too long") + b"\r\n"
OK = {"success": True}


@attrs.frozen
class Certs:
    """A test CA, the server's certificate files and what clients need."""

    ca: trustme.CA
    cert: str
    key: str
    #: The CA file (for --tls-client-ca) and the directory of the files.
    ca_file: str
    directory: Path

    def client_context(self, client_cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
        """A client context trusting the test CA (and presenting ``client_cert``)."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if client_cert is not None:
            client_cert.configure_cert(context)
        return context

    def client_cert(self, **names: Any) -> trustme.LeafCert:
        return self.ca.issue_cert("client@example.com", **names)

    def config(self, mutual: bool = False, **overrides: Any) -> dict[str, Any]:
        """Config overrides for TLS with these files."""
        return {
            "tls_cert": self.cert,
            "tls_key": self.key,
            "tls_client_ca": self.ca_file if mutual else None,
            **overrides,
        }


def make_certs(directory: Path) -> Certs:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    for pem in leaf.cert_chain_pems[1:]:
        pem.write_to_path(str(cert), append=True)
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(ca, str(cert), str(key), str(ca_file), directory)


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path)


class TLSLineClient:
    """A raw line client over TLS (as ``support.LineClient`` over plain TCP)."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self._buffer = b""

    @classmethod
    async def connect(cls, port: int, context: ssl.SSLContext) -> TLSLineClient:
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
        await stream.do_handshake()
        return cls(stream)

    async def send(self, obj: Any) -> None:
        await self.stream.send_all(json.dumps(obj).encode() + b"\n")

    async def receive(self) -> Any:
        while b"\r\n" not in self._buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(f"connection closed; unterminated: {self._buffer[:100]!r}")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return json.loads(line)

    async def request(self, obj: Any) -> Any:
        await self.send(obj)
        return await self.receive()

    async def read_to_eof(self) -> bytes:
        """Everything until the server's close_notify (a TLS error raises: the server
        must close cleanly)."""
        received, self._buffer = self._buffer, b""
        while data := await self.stream.receive_some(65536):
            received += data
        return received

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def refused_by_server(stream: trio.SSLStream[trio.SocketStream]) -> bool:
    """Whether the server ends this TLS connection without ever serving it: the
    handshake fails, or (TLS 1.3: the server judges the client's certificate after the
    client's side of the handshake is done) the first read finds an alert or the end."""
    try:
        await stream.do_handshake()
        await stream.send_all(b'{"command": "subscribe", "topic": "t"}\n')
        return await stream.receive_some(65536) == b""
    except trio.BrokenResourceError:
        return True
    finally:
        await trio.aclose_forcefully(stream)


def sub(topic: str = "t") -> dict[str, Any]:
    return {"command": "subscribe", "topic": topic}


def snd(topic: str = "t", msg: str = "m") -> dict[str, Any]:
    return {"command": "send", "topic": topic, "msg": msg, "delivery": "all"}


def tls_transports(server: Server) -> list[TCPTransport]:
    return [c.transport for c in server.connections if isinstance(c.transport, TCPTransport)]


# --- the context ----------------------------------------------------------------------


def test_context_defaults(certs: Certs) -> None:
    context = server_ssl_context(certs.cert, certs.key)
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    mutual = server_ssl_context(certs.cert, certs.key, certs.ca_file)
    assert mutual.verify_mode == ssl.CERT_REQUIRED
    # only the given CA: not the system's (any public client certificate would pass)
    assert len(mutual.get_ca_certs()) == 1
    assert context.get_ca_certs() == []


@pytest.fixture
def other_key(tmp_path: Path) -> str:
    path = tmp_path / "other-key.pem"
    trustme.CA().issue_cert("x").private_key_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def encrypted_key(certs: Certs, tmp_path: Path) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(certs.key).read_bytes(), None)
    path = tmp_path / "encrypted-key.pem"
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ))
    return str(path)


@pytest.fixture
def not_pem(tmp_path: Path) -> str:
    path = tmp_path / "not.pem"
    path.write_text("hello\n")
    return str(path)


def test_context_errors_name_the_file_and_why(
    certs: Certs, tmp_path: Path, other_key: str, encrypted_key: str, not_pem: str
) -> None:
    missing = str(tmp_path / "missing.pem")
    bad_block = tmp_path / "bad-block.pem"
    bad_block.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    cases: list[tuple[tuple[str, str, str | None], str]] = [
        ((missing, certs.key, None), f"cannot read TLS certificate {missing}: No such file"),
        ((certs.cert, missing, None), f"cannot read TLS key {missing}: No such file"),
        ((not_pem, certs.key, None), f"TLS certificate {not_pem} is not PEM"),
        ((str(bad_block), certs.key, None), f"TLS certificate {bad_block} holds no valid"),
        ((certs.key, certs.key, None), f"TLS certificate {certs.key} holds no valid"),
        ((certs.cert, not_pem, None), f"TLS key {not_pem} is not PEM"),
        ((certs.cert, certs.cert, None), f"TLS key {certs.cert} holds no usable PEM private"),
        ((certs.cert, other_key, None),
         f"TLS key {other_key} does not match the certificate {certs.cert}"),
        ((certs.cert, encrypted_key, None), f"TLS key {encrypted_key} is encrypted"),
        ((certs.cert, certs.key, missing), f"cannot read TLS client CA {missing}"),
        ((certs.cert, certs.key, certs.key), f"TLS client CA {certs.key} holds no valid"),
    ]
    for args, message in cases:
        with pytest.raises(TLSConfigError) as info:
            server_ssl_context(*args)
        text = str(info.value)
        assert text.startswith(message), (args, text)
        assert "\n" not in text


def test_serve_with_a_missing_certificate_exits_2_with_one_line(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "missing.pem")
    code = main(["serve", "--port", "0", "--tls-cert", missing, "--tls-key", certs.key])
    assert code == 2
    err = capsys.readouterr().err
    assert err == f"mq-trio: cannot read TLS certificate {missing}: No such file or directory\n"
    code = main(["serve", "--port", "0", "--tls-cert", certs.cert, "--tls-key", certs.key,
                 "--tls-client-ca", certs.key])
    assert code == 2
    assert capsys.readouterr().err.count("\n") == 1


async def test_serve_raises_before_listening(certs: Certs, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(TLSConfigError, match="cannot read TLS key"):
        await serve(make_config(tls_cert=certs.cert, tls_key=missing))


# --- the subject string -----------------------------------------------------------------


def test_subject_string_order_names_and_escapes() -> None:
    cert = {"subject": (
        (("domainComponent", "org"),), (("domainComponent", "example"),),
        (("countryName", "DE"),), (("stateOrProvinceName", "Berlin"),),
        (("localityName", "Berlin"),), (("organizationName", "Example, Inc."),),
        (("organizationalUnitName", "Ops"), ("organizationalUnitName", "Dev")),
        (("commonName", "alice"),), (("emailAddress", "alice@example.com"),),
        (("title", "boss"),),
    )}
    assert subject_string(cert) == (
        "DC=org,DC=example,C=DE,ST=Berlin,L=Berlin,O=Example\\, Inc.,OU=Ops+OU=Dev,"
        "CN=alice,emailAddress=alice@example.com,title=boss"
    )
    assert subject_string({}) == ""
    assert escape_value('a+b,c;d<e>f"g\\h') == 'a\\+b\\,c\\;d\\<e\\>f\\"g\\\\h'
    assert escape_value("#lead and trail ") == "\\#lead and trail\\ "
    assert escape_value(" x=y") == "\\ x=y"
    assert escape_value("nul\x00") == "nul\\00"
    assert escape_value("Zoë") == "Zoë"


def test_subject_string_of_a_real_certificate(certs: Certs, tmp_path: Path) -> None:
    """As ``openssl x509 -subject -nameopt RFC2253,-dn_rev,-esc_msb`` prints it: the
    certificate's order (trustme issues O, OU, CN)."""
    leaf = certs.client_cert(common_name="al,ice", organization_name="Example Corp",
                             organization_unit_name="Ops")
    path = tmp_path / "client.pem"
    leaf.cert_chain_pems[0].write_to_path(str(path))
    decoded = ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]
    assert subject_string(decoded) == "O=Example Corp,OU=Ops,CN=al\\,ice"


# --- the TCP port over TLS ----------------------------------------------------------------


async def test_round_trip_over_tls(
    nursery: trio.Nursery, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mq_trio.server")
    server = await start_server(nursery, **certs.config())
    assert f"listening on 127.0.0.1:{server.port} (tcp, tls)" in caplog.text
    context = certs.client_context()
    a = await TLSLineClient.connect(server.port, context)
    b = await TLSLineClient.connect(server.port, context)
    assert await a.request(sub()) == OK
    assert await b.request(snd(msg="hello")) == OK
    assert await a.receive() == {**snd(msg="hello"), "index": 0}
    # pipelined: many commands in one write, replies in order
    await b.stream.send_all(b"".join(json.dumps(snd(msg=str(i))).encode() + b"\n"
                                     for i in range(200)))
    assert [await b.receive() for _ in range(200)] == [OK] * 200
    assert [(await a.receive())["msg"] for _ in range(200)] == [str(i) for i in range(200)]
    transports = tls_transports(server)
    assert len(transports) == 2
    assert [t.tls_subject for t in transports] == [None, None]
    assert all(t.peer.startswith("127.0.0.1:") for t in transports)
    # quit: the server closes cleanly (close_notify: a clean end of stream)
    await a.stream.send_all(b"quit\n")
    assert await a.read_to_eof() == b""
    await b.aclose()
    await server.wait_until(lambda: server.open_connections == 0)


async def test_plain_client_on_a_tls_port_is_closed(nursery: trio.Nursery,
                                                    certs: Certs) -> None:
    server = await start_server(nursery, **certs.config())
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(b'{"command": "subscribe", "topic": "t"}\n')
    with trio.fail_after(5):
        try:
            data = await stream.receive_some(1000)
        except trio.BrokenResourceError:
            data = b""
    assert not data.startswith(b"{")  # no reply in clear text; at most an alert
    await stream.aclose()
    await server.wait_until(lambda: server.tls_failures == 1 and server.open_connections == 0)


async def test_client_rejects_a_server_from_another_ca(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path
) -> None:
    server = await start_server(nursery, **certs.config())
    (tmp_path / "other").mkdir()
    other = make_certs(tmp_path / "other")
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", server.port, ssl_context=other.client_context()
    )
    with pytest.raises(trio.BrokenResourceError) as info:
        await stream.do_handshake()
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    await trio.aclose_forcefully(stream)
    await server.wait_until(lambda: server.tls_failures == 1 and server.open_connections == 0)
    assert set(server.connections) == set()


async def test_handshake_timeout_and_it_counts_as_a_connection(
    nursery: trio.Nursery, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that never completes the handshake is closed after
    --tls-handshake-timeout; meanwhile it counts against --max-connections (a client
    over the limit gets ``Too many connections`` after its handshake)."""
    caplog.set_level(logging.INFO, "mq_trio.server")
    server = await start_server(nursery, **certs.config(tls_handshake_timeout=0.5),
                                max_connections=1)
    silent = await trio.open_tcp_stream("127.0.0.1", server.port)
    started = trio.current_time()
    await server.wait_until(lambda: server.tls_handshakes == 1)
    assert server.open_connections == 1
    refused = await TLSLineClient.connect(server.port, certs.client_context())
    assert await refused.receive() == {"success": False, "reason": "Too many connections"}
    assert await refused.read_to_eof() == b""
    with trio.fail_after(5):
        assert await silent.receive_some(100) == b""  # closed by the server
    assert trio.current_time() - started >= 0.45
    await silent.aclose()
    await server.wait_until(lambda: server.open_connections == 0)
    assert "TLS handshake with 127.0.0.1:" in caplog.text
    assert "not completed within 0.5 s" in caplog.text
    served = await TLSLineClient.connect(server.port, certs.client_context())
    assert await served.request(sub()) == OK
    await served.aclose()


async def test_silent_clients_do_not_hold_up_the_others(
    nursery: trio.Nursery, certs: Certs
) -> None:
    """The accept loop never waits on a handshake: clients that connect and send
    nothing each wait in their own task while the next client is served at once."""
    server = await start_server(nursery, **certs.config())
    silent = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(20)]
    await server.wait_until(lambda: server.tls_handshakes == 20)
    with trio.fail_after(2):  # --tls-handshake-timeout is 10 s
        client = await TLSLineClient.connect(server.port, certs.client_context())
        assert await client.request(sub()) == OK
    assert server.open_connections == 21
    await client.aclose()
    for stream in silent:
        await stream.aclose()
    await server.wait_until(lambda: server.open_connections == 0)


# --- mutual TLS ---------------------------------------------------------------------------


async def test_mutual_tls(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TLS with a bad client certificate: none, or one from another CA, is refused (and
    never becomes a connection); a good one is served, and its transport carries the
    certificate's subject for the auth file's ``certificate = "..."``."""
    caplog.set_level(logging.INFO, "mq_trio.server")
    server = await start_server(nursery, **certs.config(mutual=True))
    assert f"listening on 127.0.0.1:{server.port} (tcp, mutual tls)" in caplog.text

    async def connect(context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
        return await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port,
                                                   ssl_context=context)

    # no client certificate
    with trio.fail_after(5):
        assert await refused_by_server(await connect(certs.client_context()))
    await server.wait_until(lambda: server.tls_failures == 1 and server.open_connections == 0)
    # a certificate from another CA
    stranger = trustme.CA().issue_cert("mallory@example.com", common_name="mallory")
    with trio.fail_after(5):
        assert await refused_by_server(await connect(certs.client_context(stranger)))
    await server.wait_until(lambda: server.tls_failures == 2 and server.open_connections == 0)
    assert set(server.connections) == set()
    # (one line per 10 s at most: the second failure is counted, not logged)
    assert "failed: PEER_DID_NOT_RETURN_A_CERTIFICATE" in caplog.text
    # a good one
    alice = certs.client_cert(common_name="alice", organization_name="Example Corp",
                              organization_unit_name="Ops")
    client = await TLSLineClient.connect(server.port, certs.client_context(alice))
    assert await client.request(sub()) == OK
    assert [t.tls_subject for t in tls_transports(server)] == ["O=Example Corp,OU=Ops,CN=alice"]
    await client.aclose()


# --- the close path -----------------------------------------------------------------------


@pytest.mark.parametrize("extra", [b"", b"y" * 300_000])
async def test_line_too_long_arrives_over_tls_every_time(
    nursery: trio.Nursery, certs: Certs, extra: bytes
) -> None:
    """TLS has no half-close: the server sends the reply, then close_notify, then
    half-closes TCP and discards input, so the client always reads ``Line too long``
    and a clean end of stream, never a reset (it was 13 of 20 before)."""
    server = await start_server(nursery, **certs.config(), max_line_bytes=100)
    context = certs.client_context()
    results: list[bytes] = []

    async def one() -> None:
        client = await TLSLineClient.connect(server.port, context)
        await client.stream.send_all(b"x" * 200 + b"\n" + extra)
        results.append(await client.read_to_eof())
        await client.aclose()

    with trio.fail_after(30):
        async with trio.open_nursery() as clients:
            for _ in range(24):
                clients.start_soon(one)
    assert results == [LINE_TOO_LONG] * 24
    # one after the other too, with a subscription and a reply before it
    for _ in range(4):
        client = await TLSLineClient.connect(server.port, context)
        await client.stream.send_all(json.dumps(sub()).encode() + b"\n" + b"x" * 200
                                     + b"\n" + extra)
        assert await client.receive() == OK
        assert await client.read_to_eof() == LINE_TOO_LONG
        await client.aclose()


async def test_line_timeout_arrives_over_tls(nursery: trio.Nursery, certs: Certs) -> None:
    """A closing reply from the input guard (the reader woken by a cancelled receive)."""
    server = await start_server(nursery, **certs.config(), line_timeout=0.3)
    client = await TLSLineClient.connect(server.port, certs.client_context())
    await client.stream.send_all(b'{"command": "subscr')
    with trio.fail_after(5):
        assert await client.read_to_eof() == protocol.failure_bytes("Line timeout") + b"\r\n"
    await client.aclose()


async def test_shutdown_flushes_and_closes_tls_connections(
    nursery: trio.Nursery, certs: Certs
) -> None:
    server = await start_server(nursery, **certs.config())
    subscriber = await TLSLineClient.connect(server.port, certs.client_context())
    assert await subscriber.request(sub()) == OK
    publisher = await TLSLineClient.connect(server.port, certs.client_context())
    await publisher.stream.send_all(b"".join(
        json.dumps(snd(msg="m" * 1000)).encode() + b"\n" for _ in range(100)))
    assert [await publisher.receive() for _ in range(100)] == [OK] * 100
    server.shutdown()
    with trio.fail_after(10):
        data = await subscriber.read_to_eof()
    assert data.count(b"\r\n") == 100
    await server.stopped.wait()


async def test_a_certificate_named_in_the_auth_file_authenticates(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path
) -> None:
    """With --auth: the subject string of a verified client certificate is what the auth
    file's ``certificate = "..."`` names (then no ``auth`` command is needed)."""
    auth = tmp_path / "auth.toml"
    auth.write_text(
        '[users.alice]\ncertificate = "O=Example Corp,OU=Ops,CN=alice"\n'
        'publish = ["**"]\nsubscribe = ["**"]\n'
    )
    server = await start_server(nursery, **certs.config(mutual=True), auth_file=str(auth))
    alice = certs.client_cert(common_name="alice", organization_name="Example Corp",
                              organization_unit_name="Ops")
    client = await TLSLineClient.connect(server.port, certs.client_context(alice))
    assert await client.request(sub()) == OK
    assert await client.request(snd("u")) == OK
    await client.aclose()
    bob = certs.client_cert(common_name="bob", organization_name="Example Corp",
                            organization_unit_name="Ops")
    client = await TLSLineClient.connect(server.port, certs.client_context(bob))
    assert await client.request(sub()) == {"success": False, "reason": "Not authenticated"}
    await client.aclose()


async def test_authentication_failed_arrives_over_tls(
    nursery: trio.Nursery, certs: Certs, tmp_path: Path
) -> None:
    """Another closing reply: a failed ``auth`` with more input behind it."""
    auth = tmp_path / "auth.toml"
    auth.write_text('[users.alice]\ncertificate = "CN=nobody"\nsubscribe = ["**"]\n')
    server = await start_server(nursery, **certs.config(), auth_file=str(auth))
    for _ in range(3):  # (failures from one host are slowed: 0.25 s, then 0.5 s)
        client = await TLSLineClient.connect(server.port, certs.client_context())
        await client.stream.send_all(
            json.dumps({"command": "auth", "token": "wrong"}).encode() + b"\n"
            + json.dumps(sub()).encode() + b"\n" + b"y" * 300_000
        )
        with trio.fail_after(10):
            assert await client.read_to_eof() == (
                protocol.failure_bytes("Authentication failed") + b"\r\n")
        await client.aclose()
