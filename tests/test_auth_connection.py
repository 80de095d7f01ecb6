"""Auth in the connection (docs/protocol.md, "Authentication"): what a client may do
before and after ``auth``, over real sockets, with an authenticator double whose rules
are plain dicts (the auth file's own rules are tested in tests/test_auth_*.py)."""

from __future__ import annotations

import json
import time
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from support import LineClient, replay, start_server

from mq_trio.auth import AuthFailed
from mq_trio.server import Server
from mq_trio.transports._tcp import TCPTransport

OK = {"success": True}
NOT_AUTHENTICATED = {"success": False, "reason": "Not authenticated"}
DENIED = {"success": False, "reason": "Permission denied"}
FAILED = {"success": False, "reason": "Authentication failed"}


def snd(topic: str, msg: str = "m") -> dict[str, Any]:
    return {"command": "send", "topic": topic, "msg": msg, "delivery": "all"}


def sub(topic: str) -> dict[str, Any]:
    return {"command": "subscribe", "topic": topic}


@attrs.define(eq=False)
class FakeGrant:
    identity: str
    publish: frozenset[str]
    subscribe: frozenset[str]
    expires: float | None = None
    stale: bool = False
    #: Topics known allowed (the connection looks here first); filled by may_publish.
    publish_memo: dict[str, bool] = attrs.field(factory=dict)

    def may_publish(self, topic: str) -> bool:
        ok = self.publish_memo[topic] = topic in self.publish
        return ok

    def may_subscribe(self, topic: str) -> bool:
        return topic in self.subscribe


@attrs.define(eq=False)
class FakeAuthenticator:
    """Tokens map to (publish topics, subscribe topics); ``expires_in`` for JWT-like
    grants; ``regrant`` reads the current ``tokens`` again, as a reload would."""

    tokens: dict[str, tuple[set[str], set[str]]]
    path: str = "fake"
    expires_in: float | None = None
    gate: trio.Event | None = None
    attempts: int = 0
    subjects: dict[str, str] = attrs.field(factory=dict)

    def _grant(self, token: str) -> FakeGrant:
        publish, subscribe = self.tokens[token]
        expires = None if self.expires_in is None else time.time() + self.expires_in
        return FakeGrant(token, frozenset(publish), frozenset(subscribe), expires)

    async def authenticate(self, *, token: str | None = None, user: str | None = None,
                           password: str | None = None, peer: str = "") -> FakeGrant:
        self.attempts += 1
        assert peer == "127.0.0.1"
        if self.gate is not None:
            await self.gate.wait()
        if user is not None:
            token = f"{user}:{password}"
        if token not in self.tokens:
            raise AuthFailed("unknown token")
        return self._grant(token)

    def certificate_grant(self, subject: str) -> FakeGrant | None:
        token = self.subjects.get(subject)
        return None if token is None else self._grant(token)

    def regrant(self, grant: FakeGrant) -> FakeGrant | None:
        if grant.identity not in self.tokens:
            return None
        return self._grant(grant.identity)

    def reload(self) -> None:
        pass


ALICE = {"alice": ({"a", "shared"}, {"a", "shared"}), "bob:pw": ({"b"}, {"shared"})}


async def auth_server(nursery: trio.Nursery, fake: FakeAuthenticator, **settings: Any) -> Server:
    server = await start_server(nursery, **settings)
    server.authenticator = fake  # type: ignore[assignment]  # the double, duck-typed
    return server


async def test_commands_before_auth_are_refused_and_the_connection_stays() -> None:
    async with trio.open_nursery() as nursery:
        server = await auth_server(nursery, FakeAuthenticator(ALICE))
        c = await LineClient.connect(server.port)
        assert await c.request(snd("a")) == NOT_AUTHENTICATED
        assert await c.request(sub("a")) == NOT_AUTHENTICATED
        assert await c.request({"command": "unsubscribe", "topic": "a"}) == NOT_AUTHENTICATED
        assert await c.request({"command": "auth", "token": "alice"}) == OK
        assert await c.request(sub("a")) == OK
        # a sender's own delivery comes before its success
        assert await c.request(snd("a", "hello")) == {
            "command": "send", "topic": "a", "msg": "hello", "delivery": "all", "index": 0
        }
        assert await c.receive() == OK
        nursery.cancel_scope.cancel()


async def test_permissions_per_topic_deny_keeps_the_connection() -> None:
    async with trio.open_nursery() as nursery:
        server = await auth_server(nursery, FakeAuthenticator(ALICE))
        c = await LineClient.connect(server.port)
        assert await c.request({"command": "auth", "user": "bob", "password": "pw"}) == OK
        assert await c.request(snd("a")) == DENIED
        assert await c.request(sub("a")) == DENIED
        assert await c.request(snd("b")) == OK
        assert await c.request(sub("shared")) == OK
        # unsubscribing needs no permission once authenticated
        assert await c.request({"command": "unsubscribe", "topic": "a"}) == OK
        # a subscriber that may read "shared" gets what alice publishes there
        a = await LineClient.connect(server.port)
        assert await a.request({"command": "auth", "token": "alice"}) == OK
        await a.send(snd("shared", "x"))
        assert await a.receive() == OK
        delivered = await c.receive()
        assert delivered["msg"] == "x" and delivered["topic"] == "shared"
        nursery.cancel_scope.cancel()


async def test_failed_auth_replies_then_closes_and_later_lines_are_not_handled() -> None:
    async with trio.open_nursery() as nursery:
        fake = FakeAuthenticator(ALICE)
        server = await auth_server(nursery, fake)
        c = await LineClient.connect(server.port)
        # pipelined: the auth fails, the send after it must not be handled
        await c.send_raw(
            b'{"command": "auth", "token": "mallory"}\n'
            b'{"command": "send", "topic": "a", "msg": "m", "delivery": "all"}\n'
        )
        assert await c.receive() == FAILED
        assert await c.read_to_eof() == b""
        assert fake.attempts == 1
        reader = await LineClient.connect(server.port)
        assert await reader.request({"command": "auth", "token": "alice"}) == OK
        assert await replay(reader, "a") == []
        nursery.cancel_scope.cancel()


async def test_lines_pipelined_after_auth_wait_for_it_in_order() -> None:
    async with trio.open_nursery() as nursery:
        gate = trio.Event()
        fake = FakeAuthenticator(ALICE, gate=gate)
        server = await auth_server(nursery, fake)
        c = await LineClient.connect(server.port)
        await c.send_raw(
            b'{"command": "send", "topic": "a", "msg": "early", "delivery": "all"}\n'
            b'{"command": "auth", "token": "alice"}\n'
            b'{"command": "send", "topic": "a", "msg": "late", "delivery": "all"}\n'
        )
        # the reply before the auth is not held back while the auth is verified
        assert await c.receive() == NOT_AUTHENTICATED
        # another client is served meanwhile (verification does not block the server)
        other = await LineClient.connect(server.port)
        assert await other.request(snd("a")) == NOT_AUTHENTICATED
        gate.set()
        assert await c.receive() == OK
        assert await c.receive() == OK
        assert [m["msg"] for m in await replay(c, "a")] == ["late"]
        nursery.cancel_scope.cancel()


async def test_no_auth_within_the_timeout_closes() -> None:
    async with trio.open_nursery() as nursery:
        server = await auth_server(nursery, FakeAuthenticator(ALICE), auth_timeout=0.2)
        idle = await LineClient.connect(server.port)
        authed = await LineClient.connect(server.port)
        assert await authed.request({"command": "auth", "token": "alice"}) == OK
        with trio.fail_after(5):
            assert await idle.receive() == {
                "success": False, "reason": "Authentication timeout"
            }
            assert await idle.read_to_eof() == b""
        # the authenticated client outlives the deadline it would have had
        await server.wait_until(lambda: len(server.connections) == 1)
        assert await authed.request(sub("a")) == OK
        nursery.cancel_scope.cancel()


async def test_an_expiring_grant_closes_unless_refreshed() -> None:
    async with trio.open_nursery() as nursery:
        fake = FakeAuthenticator(ALICE, expires_in=0.3)
        server = await auth_server(nursery, fake, auth_timeout=30)
        c = await LineClient.connect(server.port)
        assert await c.request({"command": "auth", "token": "alice"}) == OK
        with trio.fail_after(5):
            assert await c.receive() == {"success": False, "reason": "Token expired"}
            assert await c.read_to_eof() == b""
        # a refresh before expiry moves the deadline: a grant for 60 s this time
        c = await LineClient.connect(server.port)
        assert await c.request({"command": "auth", "token": "alice"}) == OK
        fake.expires_in = 60
        assert await c.request({"command": "auth", "token": "alice"}) == OK
        expired = await LineClient.connect(server.port)
        fake.expires_in = 0.3
        assert await expired.request({"command": "auth", "token": "alice"}) == OK
        with trio.fail_after(5):
            assert await expired.receive() == {"success": False, "reason": "Token expired"}
        assert await c.request(sub("a")) == OK  # still served after the first deadline
        nursery.cancel_scope.cancel()


async def test_a_failed_refresh_closes_an_authenticated_connection() -> None:
    async with trio.open_nursery() as nursery:
        server = await auth_server(nursery, FakeAuthenticator(ALICE))
        c = await LineClient.connect(server.port)
        assert await c.request({"command": "auth", "token": "alice"}) == OK
        assert await c.request({"command": "auth", "token": "wrong"}) == FAILED
        assert await c.read_to_eof() == b""
        nursery.cancel_scope.cancel()


async def test_stale_grants_follow_the_new_rules_and_removed_identities_end() -> None:
    async with trio.open_nursery() as nursery:
        fake = FakeAuthenticator({k: v for k, v in ALICE.items()})
        server = await auth_server(nursery, fake)
        alice = await LineClient.connect(server.port)
        bob = await LineClient.connect(server.port)
        assert await alice.request({"command": "auth", "token": "alice"}) == OK
        assert await bob.request({"command": "auth", "user": "bob", "password": "pw"}) == OK
        assert await alice.request(snd("a")) == OK
        # "reload": alice loses "a", bob is removed
        fake.tokens = {"alice": ({"shared"}, {"shared"})}
        for conn in server.connections:
            assert conn.grant is not None
            conn.grant.stale = True
        assert await alice.request(snd("a")) == DENIED
        assert await alice.request(snd("shared")) == OK
        assert await bob.request(snd("b")) == FAILED
        assert await bob.read_to_eof() == b""
        nursery.cancel_scope.cancel()


async def test_a_certificate_subject_in_the_rules_authenticates_at_once() -> None:
    from mq_trio.server._connection import Connection

    async with trio.open_nursery() as nursery:
        fake = FakeAuthenticator(ALICE, subjects={"CN=alice": "alice"})
        server = await auth_server(nursery, fake)
        left, right = trio.testing.memory_stream_pair()

        transport = TCPTransport(right)
        transport.tls_subject = "CN=alice"  # what TLS sets for a verified certificate
        conn: Connection = server.connection(transport)
        nursery.start_soon(conn.run)
        await left.send_all(b'{"command": "subscribe", "topic": "a"}\n')
        data = b""
        while b"\n" not in data:
            data += await left.receive_some(1000)
        assert data == b'{"success": true}\r\n'
        assert conn.grant is not None and conn.grant.identity == "alice"
        nursery.cancel_scope.cancel()


async def test_auth_when_auth_is_off_succeeds() -> None:
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery)
        c = await LineClient.connect(server.port)
        assert await c.request({"command": "auth", "token": "anything"}) == OK
        assert await c.request(snd("a")) == OK
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "line",
    [
        {"command": "auth"},
        {"command": "auth", "token": 1},
        {"command": "auth", "user": "u"},
        {"command": "auth", "token": "t", "user": "u", "password": "p"},
        {"command": "auth", "token": "t", "topic": "x"},
    ],
)
async def test_malformed_auth_is_malformed(line: dict[str, Any]) -> None:
    async with trio.open_nursery() as nursery:
        fake = FakeAuthenticator(ALICE)
        server = await auth_server(nursery, fake)
        c = await LineClient.connect(server.port)
        assert await c.request(line) == {"success": False, "reason": "Malformed json message"}
        assert await c.request({"command": "auth", "token": "alice"}) == OK
        assert fake.attempts == 1
        nursery.cancel_scope.cancel()


async def test_websocket_auth_failure_and_timeout_close_with_1008() -> None:
    import trio_websocket

    async with trio.open_nursery() as nursery:
        server = await auth_server(nursery, FakeAuthenticator(ALICE), ws_port=0,
                                   auth_timeout=0.3)
        url = f"ws://127.0.0.1:{server.ws_port}/"
        for first, reason in (
            ('{"command": "auth", "token": "mallory"}', "Authentication failed"),
            (None, "Authentication timeout"),
        ):
            async with trio_websocket.open_websocket_url(url) as ws:
                if first is not None:
                    await ws.send_message(first)
                with trio.fail_after(5):
                    assert json.loads(await ws.get_message()) == {
                        "success": False, "reason": reason}
                    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                        await ws.get_message()
                assert closed.value.reason is not None
                assert (closed.value.reason.code, closed.value.reason.reason) == (1008, reason)
        nursery.cancel_scope.cancel()


async def test_work_queue_commands_follow_the_permissions() -> None:
    """Jobs and batches need publish permission, consumers subscribe permission; ack,
    nack and progress only an authenticated connection (docs/protocol.md)."""
    async with trio.open_nursery() as nursery:
        rules = {"producer": ({"jobs"}, set()), "worker": (set(), {"jobs"})}
        server = await auth_server(nursery, FakeAuthenticator(rules))
        job = {"command": "send", "topic": "jobs", "msg": "j", "delivery": "one",
               "ack": True}
        batch = {"command": "batch", "topic": "jobs", "msgs": ["x"], "delivery": "one",
                 "ack": True}
        consume = {"command": "subscribe", "topic": "jobs", "ack": True}
        anonymous = await LineClient.connect(server.port)
        for line in (job, batch, consume, {"command": "ack", "topic": "jobs", "index": 0}):
            assert await anonymous.request(line) == NOT_AUTHENTICATED
        producer = await LineClient.connect(server.port)
        worker = await LineClient.connect(server.port)
        assert await producer.request({"command": "auth", "token": "producer"}) == OK
        assert await worker.request({"command": "auth", "token": "worker"}) == OK
        assert await producer.request(consume) == DENIED
        assert await worker.request(job) == DENIED
        assert await worker.request(batch) == DENIED
        assert await producer.request(job) == {"success": True, "index": 0}
        assert await worker.request(consume) == OK
        assert (await worker.receive())["index"] == 0
        assert await worker.request({"command": "ack", "topic": "jobs", "index": 0}) == OK
        nursery.cancel_scope.cancel()
