"""The pytest plugin's security fixtures (``mq_auth``, ``mq_tls``, ``auth=True``,
``tls=True``), used the way a user's project would use them, and from this suite."""

from __future__ import annotations

import ssl
import sys
from functools import partial

import pytest
import trio

from mq_trio import Client, MQError, Server
from mq_trio.client import AuthError, open_client
from mq_trio.testing import AuthFile, Certificates, ClientFactory, ServerFactory

AUTH_TESTS = '''
import pytest
import mq_trio


@pytest.mark.mq_server(auth=True)
async def test_the_fixture_client_authenticates(mq_server, mq_client, mq_auth):
    assert mq_server.config.auth_file == str(mq_auth.path)
    await mq_client.subscribe("t")
    await mq_client.send("t", "hello")
    assert (await mq_client.receive()).msg == "hello"


@pytest.mark.mq_server(auth=True)
async def test_anonymous_and_password_clients(mq_client_factory, mq_auth):
    anonymous = await mq_client_factory(token=None)
    with pytest.raises(mq_trio.MQError, match="Not authenticated"):
        await anonymous.send("t", "x")
    by_password = await mq_client_factory(user=mq_auth.user, password=mq_auth.password)
    await by_password.send("t", "x")


async def test_own_identities(mq_server_factory, mq_client_factory, mq_auth):
    reader = mq_auth.add_token("reader", publish=[], subscribe=["news.*"])
    mq_auth.add_user("writer", "writer's password", publish=["news.*"], subscribe=[])
    server = await mq_server_factory(auth=True)
    r = await mq_client_factory(server, token=reader)
    w = await mq_client_factory(server, user="writer", password="writer's password")
    await r.subscribe("news.today")
    with pytest.raises(mq_trio.MQError, match="Permission denied"):
        await r.send("news.today", "x")
    with pytest.raises(mq_trio.MQError, match="Permission denied"):
        await w.subscribe("news.today")
    await w.send("news.today", "extra")
    assert (await r.receive()).msg == "extra"


async def test_without_the_marker_there_is_no_auth(mq_server, mq_client):
    assert mq_server.config.auth_file is None
    await mq_client.send("t", "x")
'''

TLS_TESTS = '''
import ssl

import pytest
import mq_trio


@pytest.mark.mq_server(tls=True)
async def test_the_fixture_client_speaks_tls(mq_server, mq_client, mq_tls):
    assert mq_server.config.tls_cert == str(mq_tls.cert_file)
    await mq_client.subscribe("t")
    await mq_client.send("t", "over TLS")
    assert (await mq_client.receive()).msg == "over TLS"


@pytest.mark.mq_server(tls=True)
async def test_open_client_with_the_test_ca(mq_server, mq_tls):
    async with mq_trio.open_client(*mq_server.address,
                                   ssl_context=mq_tls.client_context()) as client:
        await client.send("t", "x")
    with pytest.raises(mq_trio.ConnectError, match="certificate verification failed"):
        async with mq_trio.open_client(*mq_server.address,
                                       ssl_context=ssl.create_default_context()):
            pass


@pytest.mark.mq_server(tls="mutual")
async def test_mutual_tls(mq_server, mq_client_factory, mq_tls):
    assert mq_server.config.tls_client_ca == str(mq_tls.ca_file)
    alice = await mq_client_factory(ssl_context=mq_tls.client_context(cert="alice"))
    await alice.send("t", "x")


@pytest.mark.mq_server(tls=True, auth=True)
async def test_tls_and_auth(mq_client):
    await mq_client.send("t", "both")
'''


def run_user_tests(pytester: pytest.Pytester, tests: str) -> pytest.RunResult:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_user=tests)
    return pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider")


def test_auth_fixtures_in_a_user_project(pytester: pytest.Pytester) -> None:
    run_user_tests(pytester, AUTH_TESTS).assert_outcomes(passed=4)


def test_tls_fixtures_in_a_user_project(pytester: pytest.Pytester) -> None:
    run_user_tests(pytester, TLS_TESTS).assert_outcomes(passed=4)


def test_the_marker_documents_tls_and_auth(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.mq_server(**settings)*tls=True*auth=True*"])


def test_a_bad_tls_setting_is_an_error(pytester: pytest.Pytester) -> None:
    result = run_user_tests(pytester, """
import pytest

@pytest.mark.mq_server(tls="yes")
async def test_typo(mq_server):
    pass
""")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) + outcomes.get("errors", 0) == 1
    result.stdout.fnmatch_lines(["*tls= takes True or 'mutual', not 'yes'*"])


# --- in this suite -----------------------------------------------------------------------


def test_auth_file_text(mq_auth: AuthFile) -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

    from mq_trio.auth import Authenticator

    token = mq_auth.add_token("t1", publish=["a.*"], subscribe_deny=["secret.**"])
    data = tomllib.loads(mq_auth.write().read_text())
    assert set(data["tokens"]) == {"mq-test-token", "t1"}
    assert data["tokens"]["t1"]["publish"] == ["a.*"]
    assert data["tokens"]["t1"]["subscribe_deny"] == ["secret.**"]
    assert data["users"]["mq-test-user"]["password"].startswith("$argon2id$")
    assert token not in mq_auth.path.read_text()  # only its hash
    assert mq_auth.password not in mq_auth.path.read_text()
    Authenticator.load(mq_auth.path)  # the server's own loader accepts it


@pytest.mark.mq_server(auth=True)
async def test_auth_marker_in_this_suite(
    mq_server: Server, mq_client: Client, mq_client_factory: ClientFactory, mq_auth: AuthFile
) -> None:
    await mq_client.send("t", "x")
    with pytest.raises(AuthError):
        await mq_client_factory(token="mqt_wrong")
    anonymous = await mq_client_factory(token=None)
    with pytest.raises(MQError, match="Not authenticated"):
        await anonymous.subscribe("t")


async def test_certificates_serve_a_tls_server(nursery: trio.Nursery, mq_tls: Certificates
                                               ) -> None:
    """The files work for any TLS server, and the client contexts trust them."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(mq_tls.cert_file, mq_tls.key_file)
    context.load_verify_locations(mq_tls.ca_file)
    context.verify_mode = ssl.CERT_REQUIRED
    subjects = []

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.do_handshake()
        cert = stream.getpeercert()
        assert cert is not None
        subjects.append(dict(x[0] for x in cert["subject"])["commonName"])
        async for data in stream:  # ends cleanly: the client closes with a close_notify
            await stream.send_all(b'{"success": true}\r\n' * data.count(b"\n"))

    listeners = await nursery.start(
        partial(trio.serve_ssl_over_tcp, handler, 0, context, host="127.0.0.1"))
    port = listeners[0].transport_listener.socket.getsockname()[1]
    for host in ("127.0.0.1", "localhost"):
        async with open_client(host, port, ssl_context=mq_tls.client_context(cert="carol")
                               ) as client:
            await client.send("t", "x")
    assert subjects == ["carol", "carol"]
    chain, key = mq_tls.client_cert_files("dave")
    assert chain.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" in key.read_text()


async def test_factory_tls_setting(mq_server_factory: ServerFactory, mq_tls: Certificates,
                                   mq_client_factory: ClientFactory) -> None:
    server = await mq_server_factory(tls=True)
    assert server.config.tls_cert == str(mq_tls.cert_file)
    assert server.config.tls_key == str(mq_tls.key_file)
    client = await mq_client_factory(server)
    await client.send("t", "x")
