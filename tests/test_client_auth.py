"""The client's authentication (``open_client(token=..., user=..., password=...)``) against
the real server with ``--auth`` (an auth file from the plugin's ``mq_auth``)."""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Any

import pytest
import trio

from mq_trio import ConnectError, MQError
from mq_trio.client import AuthError, Backoff, ConnectionLost, open_client
from mq_trio.protocol import AUTH_FAILED, NOT_AUTHENTICATED, TOKEN_EXPIRED
from mq_trio.server import Server
from mq_trio.testing import AuthFile, ServerFactory, restart_server

FAST = Backoff(initial=0.01, maximum=0.05)


@pytest.fixture
async def auth_server(mq_server_factory: ServerFactory) -> Server:
    return await mq_server_factory(auth=True, ws_port=0)


async def test_token(auth_server: Server, mq_auth: AuthFile) -> None:
    async with open_client(*auth_server.address, token=mq_auth.token) as client:
        await client.subscribe("t")
        await client.send("t", "with a token")
        assert (await client.receive()).msg == "with a token"


async def test_user_and_password(auth_server: Server, mq_auth: AuthFile) -> None:
    async with open_client(*auth_server.address, user=mq_auth.user,
                           password=mq_auth.password) as client:
        await client.send("t", "with a password")


async def test_token_over_websocket(auth_server: Server, mq_auth: AuthFile) -> None:
    url = f"ws://127.0.0.1:{auth_server.ws_port}/"
    async with open_client(url, token=mq_auth.token) as client:
        await client.subscribe("t")
        await client.send("t", "ws")
        assert (await client.receive()).msg == "ws"
    with pytest.raises(AuthError, match=AUTH_FAILED):
        async with open_client(url, token="mqt_wrong"):
            pass


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param({"user": "mq-test-user", "password": "Pw-9f3k-not-right"},
                     id="wrong-password"),
        pytest.param({"user": "nobody", "password": "Pw-77ab-whatever"}, id="unknown-user"),
        pytest.param({"token": "mqt_not-a-token-of-this-server"}, id="bad-token"),
    ],
)
async def test_refused_credentials_raise_auth_error(
    auth_server: Server, credentials: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(10), pytest.raises(AuthError) as caught:
        async with open_client(*auth_server.address, reconnect=FAST, **credentials):
            pytest.fail("connected with refused credentials")
    error = caught.value
    assert isinstance(error, ConnectError) and isinstance(error, MQError)
    assert error.reason == AUTH_FAILED
    secret = credentials.get("password") or credentials["token"]
    assert secret not in str(error) and secret not in repr(error)
    assert secret not in caplog.text


async def test_no_credentials_get_not_authenticated(auth_server: Server) -> None:
    async with open_client(*auth_server.address) as client:
        with pytest.raises(MQError, match=NOT_AUTHENTICATED):
            await client.send("t", "anonymous")


async def test_credentials_to_a_server_without_auth_are_accepted(mq_server: Server) -> None:
    async with open_client(*mq_server.address, token="anything") as client:
        await client.send("t", "x")


async def test_reconnect_authenticates_before_resubscribing(
    nursery: trio.Nursery, auth_server: Server, mq_auth: AuthFile
) -> None:
    async with open_client(*auth_server.address, token=mq_auth.token, reconnect=FAST) as sub:
        await sub.subscribe("t")
        new = await restart_server(nursery, auth_server)
        async with open_client(*new.address, token=mq_auth.token) as pub:
            await pub.send("t", "after the restart")
        with trio.fail_after(10):
            # Only a resubscribe that came after a successful auth gets this delivery
            # (before it, the server answers Not authenticated and subscribes nothing).
            assert (await sub.receive()).msg == "after the restart"
        assert sub.reconnects == 1
        await sub.send("t", "still authenticated")


async def test_revoked_credentials_end_the_reconnecting(
    nursery: trio.Nursery, auth_server: Server, mq_auth: AuthFile
) -> None:
    kept = mq_auth.add_token("kept")
    revoked = mq_auth.add_token("revoked")
    mq_auth.write()
    assert auth_server.reload_auth()
    async with open_client(*auth_server.address, token=revoked, reconnect=FAST) as client:
        await client.subscribe("t")
        mq_auth._identities = [i for i in mq_auth._identities if i.name != "revoked"]
        mq_auth.write()
        new = await restart_server(nursery, auth_server)
        with trio.fail_after(10), pytest.raises(ConnectionLost) as caught:
            await client.receive()
        assert AUTH_FAILED in caught.value.reason
        assert client.closed and client.reconnects == 0
        with pytest.raises(ConnectionLost):
            await client.send("t", "x")
    # The server still serves the token that is left.
    async with open_client(*new.address, token=kept) as other:
        await other.send("t", "x")


async def test_authenticate_again_with_new_credentials(
    nursery: trio.Nursery, auth_server: Server, mq_auth: AuthFile
) -> None:
    first = mq_auth.add_token("first")
    second = mq_auth.add_token("second", publish=["news.*"])
    mq_auth.write()
    assert auth_server.reload_auth()
    async with open_client(*auth_server.address, token=first, reconnect=FAST) as client:
        await client.authenticate(token=second)
        # The second token's rules apply now.
        await client.send("news.today", "allowed")
        with pytest.raises(MQError, match="Permission denied"):
            await client.send("other", "denied")
        await client.subscribe("news.today")
        assert (await client.receive()).msg == "allowed"
        # ... and reconnects use it: the first token is gone after the restart.
        mq_auth._identities = [i for i in mq_auth._identities if i.name != "first"]
        mq_auth.write()
        new = await restart_server(nursery, auth_server)
        async with open_client(*new.address, token=second) as pub:
            await pub.send("news.today", "after")
        with trio.fail_after(10):
            assert (await client.receive()).msg == "after"
        with pytest.raises(AuthError, match=AUTH_FAILED):
            await client.authenticate(token="mqt_wrong")


async def test_bad_credential_combinations() -> None:
    combinations: list[dict[str, Any]] = [{"token": "t", "user": "u", "password": "p"},
                                          {"user": "u"}, {"password": "p"}]
    for kwargs in combinations:
        with pytest.raises(ValueError):
            async with open_client("127.0.0.1", 1, **kwargs):
                pass


async def test_secrets_are_in_no_repr(auth_server: Server, mq_auth: AuthFile) -> None:
    async with open_client(*auth_server.address, user=mq_auth.user,
                           password=mq_auth.password) as client:
        assert mq_auth.password not in repr(vars(client)) + repr(client)
        # Commands waiting in the queue or in flight hide their lines in their repr.
        from mq_trio.client._client import _Command

        command = _Command(b'{"command": "auth", "token": "s3cret"}', "auth", "")
        assert "s3cret" not in repr(command)


async def test_a_token_expired_notice_closes_with_its_reason(nursery: trio.Nursery) -> None:
    """The server's own failure line before it closes (a JWT ran out) answers no command:
    the client reports it as the reason the connection ended."""
    got_subscribe = trio.Event()

    async def server(stream: trio.SocketStream) -> None:
        buffer = b""
        while b"\n" not in buffer:
            buffer += await stream.receive_some(1024)
        assert b'"auth"' in buffer
        await stream.send_all(b'{"success": true}\r\n')
        while b"subscribe" not in buffer:
            buffer += await stream.receive_some(1024)
        got_subscribe.set()
        # the subscribe is not answered: the token runs out first
        await stream.send_all(b'{"success": false, "reason": "Token expired"}\r\n')
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, server, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    async with open_client("127.0.0.1", port, token="jwt") as client:
        with pytest.raises(ConnectionLost) as caught:
            await client.subscribe("t")
        assert got_subscribe.is_set()
        assert caught.value.reason == f"closed by the server: {TOKEN_EXPIRED}"


async def fake_server(nursery: trio.Nursery, reply: bytes | None) -> int:
    """A server that reads the first line and answers ``reply`` (None: never)."""

    async def handler(stream: trio.SocketStream) -> None:
        buffer = b""
        while b"\n" not in buffer:
            buffer += await stream.receive_some(1024)
        if reply is not None:
            await stream.send_all(reply)
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def test_no_reply_to_auth_times_out(nursery: trio.Nursery) -> None:
    port = await fake_server(nursery, None)
    with pytest.raises(ConnectError) as caught:
        async with open_client("127.0.0.1", port, token="t", connect_timeout=0.3):
            pass
    assert not isinstance(caught.value, AuthError)  # a timeout is worth retrying
    assert caught.value.reason == (f"127.0.0.1:{port}: not authenticated within 0.3 s of "
                                   "connecting (no reply to the auth command)")


async def test_a_server_without_the_auth_command(nursery: trio.Nursery) -> None:
    """A protocol-v1 server of the family that does not know ``auth``."""
    port = await fake_server(
        nursery, b'{"success": false, "reason": "Malformed json message"}\r\n')
    with pytest.raises(AuthError, match="does not support authentication"):
        async with open_client("127.0.0.1", port, token="t"):
            pass


async def test_a_failed_attempt_keeps_what_the_next_connection_must_send(
    nursery: trio.Nursery,
) -> None:
    """Connection 1 drops with a subscribe in flight; attempt 2 fails (closed during
    authentication); connection 3 must still carry the subscribe, after the auth."""
    attempts: list[list[bytes]] = []

    async def handler(stream: trio.SocketStream) -> None:
        n = len(attempts)
        lines: list[bytes] = []
        attempts.append(lines)
        buffer = b""
        while True:
            while b"\n" not in buffer:
                data = await stream.receive_some(1024)
                if not data:
                    return
                buffer += data
            line, buffer = buffer.split(b"\n", 1)
            lines.append(line)
            if n == 1:  # attempt 2: no verdict, just gone
                await stream.aclose()
                return
            if b'"subscribe"' in line and n == 0:  # connection 1: dropped in flight
                await stream.aclose()
                return
            await stream.send_all(b'{"success": true}\r\n')

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    async with open_client("127.0.0.1", port, token="tok", reconnect=FAST) as client:
        with trio.fail_after(10):
            await client.subscribe("t")
        assert client.reconnects == 1
    assert len(attempts) == 3
    assert [len(lines) for lines in attempts[:2]] == [2, 1]
    auth, subscribe = attempts[2][:2]
    assert json.loads(auth) == {"command": "auth", "token": "tok"}
    assert json.loads(subscribe)["command"] == "subscribe"


async def test_an_expiring_jwt_and_its_refresh(
    mq_server_factory: ServerFactory, mq_auth: AuthFile, caplog: pytest.LogCaptureFixture
) -> None:
    mq_auth.enable_jwt()
    server = await mq_server_factory(auth=True)
    # (exp is whole seconds: 2 leaves at least 1 s to connect and refresh)
    short = mq_auth.jwt("app", expires_in=2)
    async with open_client(*server.address, token=short) as plain, open_client(
        *server.address, token=short, reconnect=FAST
    ) as reconnecting, open_client(*server.address, token=short) as refreshed:
        await refreshed.authenticate(token=mq_auth.jwt("app", expires_in=3600))
        with trio.fail_after(10):
            with pytest.raises(ConnectionLost) as caught:
                await plain.receive()
            assert caught.value.reason == f"closed by the server: {TOKEN_EXPIRED}"
            # Reconnecting with the expired token is refused, and not tried again.
            with pytest.raises(ConnectionLost) as caught:
                await reconnecting.receive()
            assert caught.value.reason == f"{AUTH_FAILED} (on reconnecting)"
            assert reconnecting.reconnects == 0
        # The connection that authenticated again is still up, past the first expiry.
        await refreshed.send("t", "still here")
    assert "Token expired" in caplog.text
