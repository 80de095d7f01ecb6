"""``mq-trio pub``/``sub`` with credentials (``--token``, ``MQ_TRIO_TOKEN``, ``--user`` with
``MQ_TRIO_PASSWORD`` or a prompt on the terminal) and TLS (``--tls``, ``--cafile``): real
subprocesses against in-process servers."""

from __future__ import annotations

import fcntl
import os
import pty
import ssl
import subprocess
import sys
import termios
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from mq_trio import Message, open_client
from mq_trio.server import Server
from mq_trio.testing import AuthFile, Certificates, ServerFactory

COMMAND = [sys.executable, "-m", "mq_trio"]
#: The environment without the variables under test (the developer's own must not leak in).
BASE_ENV = {k: v for k, v in os.environ.items()
            if k not in ("MQ_TRIO_TOKEN", "MQ_TRIO_PASSWORD")}


async def mq(*args: str, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[bytes]:
    """Run ``mq-trio ARGS`` to completion in a new session: no controlling terminal, so
    a password prompt is impossible (as under cron or in CI)."""
    with trio.fail_after(30):
        return await trio.run_process(
            [*COMMAND, *args], stdin=b"", capture_stdout=True, capture_stderr=True,
            check=False, env={**BASE_ENV, **(env or {})}, start_new_session=True,
        )


@pytest.fixture
async def auth_server(mq_server_factory: ServerFactory) -> Server:
    return await mq_server_factory(auth=True)


def port_of(server: Server) -> list[str]:
    return ["--port", str(server.port)]


async def test_pub_with_token_flag_and_env(auth_server: Server, mq_auth: AuthFile) -> None:
    async with open_client(*auth_server.address, token=mq_auth.token) as client:
        await client.subscribe("t")
        result = await mq("pub", "t", "by flag", "--token", mq_auth.token, *port_of(auth_server))
        assert (result.returncode, result.stderr) == (0, b"")
        assert await client.receive() == Message("t", "by flag", 0)
        result = await mq("pub", "t", "by env", *port_of(auth_server),
                          env={"MQ_TRIO_TOKEN": mq_auth.token})
        assert (result.returncode, result.stderr) == (0, b"")
        assert (await client.receive()).msg == "by env"


async def test_sub_with_user_and_env_password(auth_server: Server, mq_auth: AuthFile) -> None:
    async with open_client(*auth_server.address, token=mq_auth.token) as client:
        await client.send("t", "cached")
    result = await mq("sub", "t", "--count", "1", "--user", mq_auth.user, *port_of(auth_server),
                      env={"MQ_TRIO_PASSWORD": mq_auth.password})
    assert (result.returncode, result.stdout, result.stderr) == (0, b"cached\n", b"")


async def test_user_without_password_and_without_terminal(auth_server: Server) -> None:
    result = await mq("pub", "t", "x", "--user", "alice", *port_of(auth_server))
    assert result.returncode == 2
    assert result.stderr == (b"mq-trio pub: --user alice: no password: set MQ_TRIO_PASSWORD "
                             b"(there is no terminal to ask on)\n")
    assert auth_server.broker.topic_count() == 0


async def test_password_prompt_on_the_terminal(auth_server: Server, mq_auth: AuthFile) -> None:
    """``--user`` with no MQ_TRIO_PASSWORD asks on the controlling terminal (a pty here),
    without echoing, and the password typed there authenticates."""
    primary, secondary = pty.openpty()

    def take_terminal() -> None:  # in the child, after setsid: the pty becomes its terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    async with open_client(*auth_server.address, token=mq_auth.token) as client:
        await client.subscribe("t")
        try:
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(partial(
                    trio.run_process, [*COMMAND, "pub", "t", "typed", "--user", mq_auth.user,
                                       *port_of(auth_server)],
                    stdin=secondary, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    check=False, env=BASE_ENV, start_new_session=True,
                    preexec_fn=take_terminal,
                ))
                seen = b""
                with trio.fail_after(20):
                    while b"password for mq-test-user: " not in seen:
                        seen += await trio.to_thread.run_sync(os.read, primary, 1024)
                    os.write(primary, mq_auth.password.encode() + b"\n")
                    assert (await client.receive()).msg == "typed"
                    assert await process.wait() == 0
        finally:
            os.close(primary)
            os.close(secondary)


async def test_refused_credentials_are_one_line(auth_server: Server, mq_auth: AuthFile) -> None:
    result = await mq("pub", "t", "x", "--token", "mqt_wrong", *port_of(auth_server))
    assert result.returncode == 1
    assert result.stderr == b"mq-trio pub: Authentication failed: the server refused the token\n"
    result = await mq("sub", "t", "--user", mq_auth.user, *port_of(auth_server),
                      env={"MQ_TRIO_PASSWORD": "Pw-not-this-one"})
    assert result.returncode == 1
    assert result.stderr == (b"mq-trio sub: Authentication failed: the server refused user "
                             b"'mq-test-user' and its password\n")
    assert b"Pw-not-this-one" not in result.stdout + result.stderr


async def test_no_credentials_for_a_server_that_needs_them(auth_server: Server) -> None:
    result = await mq("pub", "t", "x", *port_of(auth_server))
    assert result.returncode == 1
    assert result.stderr == b"mq-trio pub: Not authenticated: this server needs --token or --user\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--token", "t", "--user", "u"], "give either --token or --user, not both"),
        (["--tls", "--url", "ws://127.0.0.1:1/"], "--tls/--cafile need a wss:// URL, not ws://"),
        (["--cafile", "/nonexistent/ca.pem"], "--cafile /nonexistent/ca.pem: No such file"),
    ],
)
async def test_bad_security_arguments(args: list[str], message: str) -> None:
    result = await mq("pub", "t", "x", *args, env={"MQ_TRIO_PASSWORD": "p"})
    assert result.returncode == 2
    assert result.stderr.decode().startswith(f"mq-trio pub: {message}")
    assert result.stderr.count(b"\n") == 1


async def test_help_documents_the_security_flags() -> None:
    result = await mq("sub", "--help")
    text = result.stdout.decode()
    for flag in ("--token", "MQ_TRIO_TOKEN", "--user", "MQ_TRIO_PASSWORD", "--tls", "--cafile"):
        assert flag in text
    assert "--password" not in text


# --- TLS ---------------------------------------------------------------------------------


@asynccontextmanager
async def tls_line_server(mq_tls: Certificates) -> AsyncIterator[int]:
    """A TLS server answering every line with success (the client side alone is tested)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(mq_tls.cert_file, mq_tls.key_file)

    async def answer(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            async for data in stream:
                await stream.send_all(b'{"success": true}\r\n' * data.count(b"\n"))
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_ssl_over_tcp, answer, 0, context, host="127.0.0.1"))
        yield listeners[0].transport_listener.socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_cafile_and_tls(mq_tls: Certificates) -> None:
    async with tls_line_server(mq_tls) as port:
        result = await mq("pub", "t", "x", "--port", str(port), "--cafile", str(mq_tls.ca_file))
        assert (result.returncode, result.stderr) == (0, b"")
        # --tls alone trusts the system's CAs, which do not include the test CA
        result = await mq("pub", "t", "x", "--port", str(port), "--tls")
        assert result.returncode == 1
        line = result.stderr.decode()
        assert line.startswith(f"mq-trio pub: TLS handshake with 127.0.0.1:{port} failed: "
                               "TLS certificate verification failed: ")
        assert line.count("\n") == 1


async def test_handshake_that_never_completes(nursery: trio.Nursery, tmp_path: Path,
                                              mq_tls: Certificates) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    result = await mq("pub", "t", "x", "--port", str(port), "--cafile", str(mq_tls.ca_file),
                      "--connect-timeout", "0.5")
    assert result.returncode == 1
    assert result.stderr == (f"mq-trio pub: TLS handshake with 127.0.0.1:{port} did not "
                             "complete within 0.5 s\n").encode()


async def test_real_server_with_tls_and_auth(mq_server_factory: ServerFactory,
                                             mq_tls: Certificates, mq_auth: AuthFile) -> None:
    server = await mq_server_factory(tls=True, auth=True, ws_port=0)
    ca = ["--cafile", str(mq_tls.ca_file)]
    async with open_client(*server.address, ssl_context=mq_tls.client_context(),
                           token=mq_auth.token) as client:
        await client.subscribe("t")
        result = await mq("pub", "t", "tcp", *port_of(server), *ca, "--token", mq_auth.token)
        assert (result.returncode, result.stderr) == (0, b"")
        assert (await client.receive()).msg == "tcp"
        result = await mq("pub", "t", "wss", "--url", f"wss://localhost:{server.ws_port}/",
                          *ca, env={"MQ_TRIO_TOKEN": mq_auth.token})
        assert (result.returncode, result.stderr) == (0, b"")
        assert (await client.receive()).msg == "wss"
    # The same server without --cafile: its certificate is not trusted.
    result = await mq("pub", "t", "x", "--url", f"wss://localhost:{server.ws_port}/",
                      "--token", mq_auth.token)
    assert result.returncode == 1
    assert b"certificate verification failed" in result.stderr
