"""The Redis wire layer of cluster mode (mq_trio/cluster/), against real redis-server
processes on 127.0.0.1 (tests/redis_support.py): URLs, pipelined command connections,
cancellation, scripts, lost connections, pub/sub intake and its bound, Redis Cluster slots
and routing."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

pytest.importorskip(
    "hiredis", reason="hiredis is not installed (the cluster extra): cluster tests SKIPPED"
)

if TYPE_CHECKING:
    from redis_support import RedisCluster, RedisProcess

from mq_trio.cluster import (  # noqa: E402
    ClusterConnections,
    ClusterMap,
    RedisAddress,
    RedisConnection,
    RedisError,
    RedisUnavailable,
    Script,
    is_noscript,
    key_slot,
    load_scripts,
    open_cluster,
    open_redis,
    open_subscription,
    parse_redis_url,
    slot_tags,
)

pytest_plugins = ["redis_support"]

GUARD = 30  # seconds: a hang fails the test instead of the run (not a timing assertion)


def address(redis: RedisProcess, **changes: object) -> RedisAddress:
    parsed = parse_redis_url(redis.url)
    return RedisAddress(**{**_fields(parsed), **changes})  # type: ignore[arg-type]


def _fields(a: RedisAddress) -> dict[str, object]:
    return {"host": a.host, "port": a.port, "db": a.db, "tls": a.tls,
            "username": a.username, "password": a.password, "cluster": a.cluster}


# --- URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://localhost", RedisAddress("localhost")),
    ("redis://h:7000/3", RedisAddress("h", 7000, db=3)),
    ("redis://:s3cret@h", RedisAddress("h", password="s3cret")),
    ("redis://user:p%40ss@h:1/2", RedisAddress("h", 1, db=2, username="user", password="p@ss")),
    ("rediss://h", RedisAddress("h", tls=True)),
    ("redis+cluster://10.0.0.1:7000", RedisAddress("10.0.0.1", 7000, cluster=True)),
    ("rediss+cluster://h:7001/", RedisAddress("h", 7001, tls=True, cluster=True)),
    ("redis://[::1]:6380", RedisAddress("::1", 6380)),
    ("REDIS://H", RedisAddress("h")),
])
def test_parse_redis_url(url: str, expected: RedisAddress) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(("url", "reason"), [
    ("http://h", "scheme"),
    ("h:6379", "scheme"),
    ("redis://", "no host"),
    ("redis://h:0", "port"),
    ("redis://h:65536", "port"),
    ("redis://h:port", "port"),
    ("redis://h/one", "database number"),
    ("redis://h/-1", "database number"),
    ("redis://h/1/2", "database number"),
    ("redis+cluster://h/1", "only database 0"),
    ("redis://user@h", "needs a password"),
    ("redis://h?db=1", "query"),
    ("redis://:topsecret@h/x", "database number"),
])
def test_parse_redis_url_refuses(url: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_redis_url(url)
    message = str(info.value)
    assert reason in message
    assert "\n" not in message
    assert "topsecret" not in message  # error messages end up in logs


def test_address_hides_password() -> None:
    a = parse_redis_url("redis://u:topsecret@h:1/2")
    assert "topsecret" not in repr(a) and "topsecret" not in str(a)
    assert str(a) == "redis://h:1/2"


def test_package_import_leaves_cluster_and_hiredis_unloaded() -> None:
    """The embedded default never loads the cluster layer (nor hiredis)."""
    code = ("import sys, mq_trio, mq_trio.server, mq_trio.cli, mq_trio.client, "
            "mq_trio.broker, mq_trio.store\n"
            "bad = sorted(m for m in sys.modules if m == 'hiredis' "
            "or m.startswith('mq_trio.cluster'))\n"
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- commands ---------------------------------------------------------------------------


async def test_call_and_pipeline(redis_server: RedisProcess) -> None:
    async with open_redis(address(redis_server)) as conn:
        assert await conn.call("PING") == b"PONG"
        assert await conn.call("SET", "t:a", 1.5) == b"OK"
        assert await conn.call("GET", "t:a") == b"1.5"
        assert await conn.call("ECHO", "é") == "é".encode()
        assert await conn.call("GET", "t:missing") is None
        with pytest.raises(RedisError, match="^WRONGTYPE "):
            await conn.call("HGET", "t:a", "field")
        with pytest.raises(RedisError, match="unknown command"):
            await conn.call("NO-SUCH-COMMAND")
        replies = await conn.pipeline([
            ("INCR", "t:n"), ("HGET", "t:a", "f"), ("INCRBY", "t:n", 41), ("GET", b"t:n"),
            ("RPUSH", "t:l", "x", "y"), ("LRANGE", "t:l", 0, -1),
        ])
        assert replies[0] == 1
        assert isinstance(replies[1], RedisError) and str(replies[1]).startswith("WRONGTYPE")
        assert replies[2:] == [42, b"42", 2, [b"x", b"y"]]
        assert await conn.pipeline([]) == []
        assert conn.pending == 0 and not conn.closed
    assert conn.closed
    with pytest.raises(RedisUnavailable):
        await conn.call("PING")


async def test_select_and_auth(tmp_path: Path, redis_server: RedisProcess) -> None:
    async with open_redis(address(redis_server, db=3)) as db3, \
            open_redis(address(redis_server)) as db0:
        await db3.call("SET", "t:only-in-3", "x")
        assert await db3.call("GET", "t:only-in-3") == b"x"
        assert await db0.call("GET", "t:only-in-3") is None
    from redis_support import start_redis

    locked = await trio.to_thread.run_sync(
        lambda: start_redis(tmp_path / "auth", extra=("--requirepass", "pw"))
    )
    try:
        async with open_redis(address(locked, password="pw")) as conn:
            assert await conn.call("PING") == b"PONG"
        with pytest.raises(RedisError, match="WRONGPASS|invalid"):
            async with open_redis(address(locked, password="wrong")):
                pass
        async with open_redis(address(locked)) as anonymous:
            with pytest.raises(RedisError, match="NOAUTH"):
                await anonymous.call("GET", "x")
    finally:
        await trio.to_thread.run_sync(locked.kill)


async def test_many_tasks_get_their_own_replies(
    redis_server: RedisProcess, rng: random.Random
) -> None:
    async with open_redis(address(redis_server)) as conn:
        checked = 0

        async def worker(w: int) -> None:
            nonlocal checked
            for i in range(rng.randint(10, 60)):
                if rng.random() < 0.3:
                    values = [f"{w}:{i}:{k}:{rng.random()}" for k in range(rng.randint(1, 20))]
                    assert await conn.pipeline([("ECHO", v) for v in values]) == [
                        v.encode() for v in values
                    ]
                    checked += len(values)
                else:
                    value = f"{w}:{i}:{rng.random()}"
                    assert await conn.call("ECHO", value) == value.encode()
                    checked += 1
                for _ in range(rng.randint(0, 2)):
                    await trio.lowlevel.checkpoint()

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                for w in range(100):
                    nursery.start_soon(worker, w)
        assert checked >= 1000
        assert conn.pending == 0


async def blocked_call(conn: RedisConnection, key: str, scope: trio.CancelScope) -> None:
    with scope:
        await conn.call("BLPOP", key, 0)  # never returns by itself


async def test_cancelled_callers_do_not_shift_replies(
    redis_server: RedisProcess, rng: random.Random
) -> None:
    """Commands queue on Redis behind a BLPOP; callers cancelled while waiting for their
    replies (after sending) leave their replies to be dropped, not given to others."""
    key = f"t:block:{rng.random()}"
    async with open_redis(address(redis_server)) as conn, \
            open_redis(address(redis_server)) as other:
        results: dict[int, bytes] = {}
        scopes: dict[int, trio.CancelScope] = {}

        async def echo(i: int) -> None:
            with scopes[i]:
                if i % 3 == 0:
                    values = [f"{i}:{k}" for k in range(rng.randint(1, 5))]
                    got = await conn.pipeline([("ECHO", v) for v in values])
                    assert got == [v.encode() for v in values]
                    results[i] = got[0]
                else:
                    results[i] = await conn.call("ECHO", f"{i}")

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                head = trio.CancelScope()
                nursery.start_soon(blocked_call, conn, key, head)
                await trio.testing.wait_all_tasks_blocked()
                order = list(range(300))
                rng.shuffle(order)
                for i in order:
                    scopes[i] = trio.CancelScope()
                    nursery.start_soon(echo, i)
                await trio.testing.wait_all_tasks_blocked()
                assert conn.pending == 301  # every caller has sent and waits
                cancelled = set(rng.sample(order, 150))
                for i in cancelled:
                    scopes[i].cancel()
                head.cancel()
                await trio.testing.wait_all_tasks_blocked()
                assert conn.pending == 301  # the cancelled left their slots behind
                assert await other.call("RPUSH", key, "unblock") == 1
            # the BLPOP took the value: its reply came, and was dropped
            assert await other.call("LLEN", key) == 0
            assert set(results) == set(order) - cancelled
            for i, value in results.items():
                assert value.split(b":")[0] == str(i).encode()
            assert conn.pending == 0
            assert await conn.call("ECHO", "after") == b"after"
            assert await conn.pipeline([("ECHO", "a"), ("ECHO", "b")]) == [b"a", b"b"]


async def test_cancelled_before_sending_sends_nothing(redis_server: RedisProcess) -> None:
    async with open_redis(address(redis_server)) as conn:
        await conn.call("DEL", "t:never")
        with trio.move_on_after(0) as scope:
            await conn.call("SET", "t:never", "x")
        assert scope.cancelled_caught
        with trio.CancelScope() as scope:
            scope.cancel()
            await conn.pipeline([("SET", "t:never", "y")])
        assert scope.cancelled_caught
        assert await conn.call("GET", "t:never") is None
        assert conn.pending == 0


async def test_script_with_noscript_fallback(redis_server: RedisProcess) -> None:
    script = Script("redis.call('SET', KEYS[1], ARGV[1]) return redis.call('INCR', KEYS[2])")
    other = Script("return {KEYS[1], ARGV[1], tonumber(ARGV[2]) * 2}")
    assert len(script.sha) == 40 and script.sha != other.sha
    assert script == Script(script.source)  # the sha follows from the source
    async with open_redis(address(redis_server)) as conn:
        await conn.call("SCRIPT", "FLUSH")
        await conn.call("DEL", "t:s:count")
        assert await conn.call("SCRIPT", "EXISTS", script.sha) == [0]
        assert await script.run(conn, ["t:s:value", "t:s:count"], ["v"]) == 1
        assert await conn.call("SCRIPT", "EXISTS", script.sha) == [1]
        assert await script.run(conn, ["t:s:value", "t:s:count"], [b"w"]) == 2
        assert await conn.call("GET", "t:s:value") == b"w"
        await conn.call("SCRIPT", "FLUSH")
        (reply,) = await conn.pipeline([other.command(["k"], ["a", 21])])
        assert is_noscript(reply)
        await load_scripts(conn, [script, other])
        assert await conn.call("SCRIPT", "EXISTS", script.sha, other.sha) == [1, 1]
        assert await conn.pipeline([other.command(["k"], ["a", 21])]) == [[b"k", b"a", 42]]
        failing = Script("return redis.call('HGET', KEYS[1], 'f')")
        with pytest.raises(RedisError, match="WRONGTYPE"):
            await failing.run(conn, ["t:s:value"], [])
        with pytest.raises(RedisError):
            await load_scripts(conn, [Script("this is not lua")])


async def test_tls(tmp_path: Path) -> None:
    """rediss://: the same client over trio's SSLStream (a reader task reads for it)."""
    import ssl

    import trustme
    from redis_support import start_tls_redis

    ca = trustme.CA()
    redis, tls_port = await trio.to_thread.run_sync(start_tls_redis, tmp_path / "tls", ca)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    secure = RedisAddress("127.0.0.1", tls_port, tls=True)
    try:
        with trio.fail_after(GUARD):
            async with open_redis(secure, ssl_context=context) as conn, \
                    open_subscription(secure, ssl_context=context) as sub:
                assert await conn.call("ECHO", "over tls") == b"over tls"
                assert await conn.pipeline([("SET", "t:tls", 1), ("INCR", "t:tls")]) == [b"OK", 2]

                async def echo(i: int) -> None:
                    assert await conn.call("ECHO", str(i)) == str(i).encode()

                async with trio.open_nursery() as nursery:
                    for i in range(200):
                        nursery.start_soon(echo, i)
                await sub.subscribe("t:tls")
                total = 20_000
                assert await conn.pipeline(
                    [("PUBLISH", "t:tls", b"%08d" % i) for i in range(total)]
                ) == [1] * total
                got: list[tuple[bytes, bytes]] = []
                while len(got) < total:
                    got += await sub.receive()
                assert got == [(b"t:tls", b"%08d" % i) for i in range(total)]
            # the default context does not trust the test CA
            with pytest.raises(RedisUnavailable, match="cannot connect"):
                async with open_redis(secure):
                    pass
    finally:
        await trio.to_thread.run_sync(redis.kill)


# --- lost connections -------------------------------------------------------------------


async def test_killed_server_fails_pending_and_later_calls(fresh_redis: RedisProcess) -> None:
    errors: list[BaseException] = []

    async def pending(conn: RedisConnection) -> None:
        try:
            await conn.call("BLPOP", "t:never", 0)
        except RedisUnavailable as exc:
            errors.append(exc)

    with trio.fail_after(GUARD):
        async with open_redis(address(fresh_redis)) as conn, \
                open_subscription(address(fresh_redis)) as sub:
            await sub.subscribe("t:chan")
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(pending, conn)
                await trio.testing.wait_all_tasks_blocked()
                assert conn.pending == 3
                await trio.to_thread.run_sync(fresh_redis.kill)
            assert len(errors) == 3
            assert conn.closed
            with pytest.raises(RedisUnavailable):
                await conn.call("PING")
            with pytest.raises(RedisUnavailable):
                await conn.pipeline([("PING",)])
            with pytest.raises(RedisUnavailable):
                await sub.receive()
            assert sub.closed
            with pytest.raises(RedisUnavailable):
                await sub.subscribe("t:again")
        with pytest.raises(RedisUnavailable, match="cannot connect"):
            async with open_redis(address(fresh_redis)):
                pass
        with pytest.raises(RedisUnavailable, match="cannot connect"):
            async with open_subscription(address(fresh_redis)):
                pass
        # restarted on the same port: a new connection works (no reconnect in the old)
        await trio.to_thread.run_sync(fresh_redis.start)
        async with open_redis(address(fresh_redis)) as conn:
            assert await conn.call("PING") == b"PONG"


async def hold_connections(listener: trio.SocketListener) -> None:
    """Accept connections and keep them open, never reading."""
    held = []
    while True:
        held.append(await listener.accept())


async def test_silent_server_times_out_as_unavailable() -> None:
    """A peer that accepts but never answers AUTH: RedisUnavailable, not a hang."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_connections, listener)
            with pytest.raises(RedisUnavailable, match="timed out"):
                async with open_redis(RedisAddress("127.0.0.1", port, password="pw"),
                                      connect_timeout=0.2):
                    pass
            with pytest.raises(RedisUnavailable, match="timed out"):
                async with open_subscription(RedisAddress("127.0.0.1", port, password="pw"),
                                             connect_timeout=0.2):
                    pass
            nursery.cancel_scope.cancel()
    await listener.aclose()


# --- pub/sub ----------------------------------------------------------------------------


async def test_subscribe_receive_unsubscribe(redis_server: RedisProcess) -> None:
    with trio.fail_after(GUARD):
        async with open_redis(address(redis_server)) as conn, \
                open_subscription(address(redis_server)) as sub:
            await sub.subscribe("t:one", b"t:two")
            assert sub.channels == {b"t:one", b"t:two"}
            assert await conn.pipeline([
                ("PUBLISH", "t:one", "a"), ("PUBLISH", "t:two", b"\x00b"),
                ("PUBLISH", "t:none", "c"), ("PUBLISH", "t:one", "d"),
            ]) == [1, 1, 0, 1]
            got: list[tuple[bytes, bytes]] = []
            while len(got) < 3:
                got += await sub.receive()
            assert got == [(b"t:one", b"a"), (b"t:two", b"\x00b"), (b"t:one", b"d")]
            await sub.unsubscribe("t:one")
            assert sub.channels == {b"t:two"}
            assert await conn.call("PUBLISH", "t:one", "gone") == 0
            await sub.subscribe("t:three")
            await sub.unsubscribe()
            assert sub.channels == set()
            assert await conn.call("PUBLISH", "t:two", "gone") == 0
            await sub.unsubscribe()  # subscribed to nothing: Redis still confirms
            await sub.subscribe("t:two")
            assert await conn.call("PUBLISH", "t:two", "back") == 1
            assert await sub.receive() == [(b"t:two", b"back")]
            assert sub.buffered == 0


@pytest.mark.parametrize("inline", [False, True])
async def test_burst_arrives_complete_and_in_order(redis_server: RedisProcess,
                                                   inline: bool) -> None:
    """Also with ``read_inline`` (the receiving task reads the socket itself)."""
    total, chunk = 200_000, 10_000
    body = b"x" * 56
    with trio.fail_after(GUARD * 2):
        async with open_redis(address(redis_server)) as conn, \
                open_subscription(address(redis_server)) as sub:
            await sub.subscribe("t:burst")
            if inline:
                await sub.read_inline()

            async def publish() -> None:
                for start in range(0, total, chunk):
                    replies = await conn.pipeline([
                        ("PUBLISH", "t:burst", b"%08d" % i + body)
                        for i in range(start, start + chunk)
                    ])
                    assert replies == [1] * chunk

            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish)
                expected = 0
                batches = 0
                while expected < total:
                    for channel, data in await sub.receive():
                        assert channel == b"t:burst"
                        assert data == b"%08d" % expected + body
                        expected += 1
                    batches += 1
            assert expected == total
            assert batches < total / 10  # batches, not one await per message
            assert sub.buffered == 0


async def test_unread_messages_stay_within_the_bound(redis_server: RedisProcess) -> None:
    """While receive() is not called the reader stops at the bound (messages, or bytes)."""
    total = 50_000
    with trio.fail_after(GUARD):
        async with open_redis(address(redis_server)) as conn, \
                open_subscription(address(redis_server), max_buffered=1000) as by_count, \
                open_subscription(address(redis_server), max_buffered_bytes=10_000) as by_size:
            await by_count.subscribe("t:bound")
            await by_size.subscribe("t:bound")
            for start in range(0, total, 10_000):
                assert await conn.pipeline([
                    ("PUBLISH", "t:bound", b"%064d" % i) for i in range(start, start + 10_000)
                ]) == [2] * 10_000
                assert by_count.buffered <= 1000
                assert by_size.buffered <= 10_000 // 64 + 1
            # everything is published and nobody received: the readers sit at the bound
            await trio.testing.wait_all_tasks_blocked()
            assert by_count.buffered <= 1000
            assert by_size.buffered <= 10_000 // 64 + 1
            for sub, bound in ((by_count, 1000), (by_size, 10_000 // 64 + 1)):
                got = 0
                full = 0
                while got < total:
                    assert sub.buffered <= bound
                    batch = await sub.receive()
                    assert len(batch) <= bound
                    full += len(batch) == bound
                    assert batch[0][1] == b"%064d" % got
                    got += len(batch)
                assert got == total
                assert full > 0  # the reader did stop at the bound


async def test_subscriber_cut_off_by_redis_is_unavailable(fresh_redis: RedisProcess) -> None:
    """A subscriber that does not receive is cut off by Redis's output limit; it gets
    what arrived before, then RedisUnavailable."""
    with trio.fail_after(GUARD):
        async with open_redis(address(fresh_redis)) as conn, \
                open_subscription(address(fresh_redis), max_buffered=100) as sub:
            await conn.call("CONFIG", "SET", "client-output-buffer-limit", "pubsub 1mb 1mb 0")
            await sub.subscribe("t:flood")
            for _ in range(10):
                await conn.pipeline([("PUBLISH", "t:flood", b"y" * 1000)] * 1000)
            got = 0
            with pytest.raises(RedisUnavailable):
                while True:
                    got += len(await sub.receive())
            assert got < 10_000


# --- Redis Cluster ----------------------------------------------------------------------


def test_key_slot_known_values() -> None:
    assert key_slot("123456789") == 0x31C3  # the CRC-16/XMODEM check value
    assert key_slot("foo") == key_slot(b"foo") == 12182
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    assert key_slot("foo{}{bar}") == key_slot("foo{}{bar}")
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")
    assert key_slot("foo{bar}{zap}") == key_slot("bar")
    assert key_slot("{}x") != key_slot("x") or key_slot("{}x") == key_slot(b"{}x")


def test_slot_tags_land_in_their_slot() -> None:
    tags = slot_tags()
    assert len(tags) == 16384
    assert all(key_slot("{" + tag + "}") == slot for slot, tag in enumerate(tags))
    assert all(key_slot("{" + tag + "}:topic:abc") == slot for slot, tag in enumerate(tags))
    assert max(len(tag) for tag in tags) <= 4
    assert slot_tags() is tags  # computed once


def test_cluster_map_from_slots_reply() -> None:
    seed = RedisAddress("seed", 7000, tls=True, username="u", password="p", cluster=True)
    reply = [
        [0, 99, [b"10.0.0.2", 7001, b"id1"], [b"10.0.0.3", 7002, b"id2"]],
        [100, 16383, [b"", 7000, b"id0"]],
    ]
    m = ClusterMap.from_slots(seed, reply)
    a, b = m.masters()
    assert (a.host, a.port, b.host, b.port) == ("10.0.0.2", 7001, "seed", 7000)
    assert a.tls and a.username == "u" and a.password == "p"
    assert m.address_for_slot(0) == m.address_for_slot(99) == a
    assert m.address_for_slot(100) == m.address_for_slot(16383) == b
    assert m.slots_of(a) == list(range(100))
    assert m.slots_of(RedisAddress("elsewhere")) == []
    partial = ClusterMap.from_slots(seed, [[0, 10, [b"h", 1, b"x"]]])
    with pytest.raises(RedisUnavailable, match="slot 11"):
        partial.address_for_slot(11)


async def test_key_slot_matches_redis(redis_cluster: RedisCluster, rng: random.Random) -> None:
    def random_key() -> str:
        parts = ["".join(rng.choice("ab{}c:é0") for _ in range(rng.randint(0, 8)))
                 for _ in range(3)]
        return rng.choice(["{", "", "}"]).join(parts)

    keys = [random_key() for _ in range(300)]
    keys += ["{}", "{", "}", "{a}", "a{b}c{d}", "}{x}", "{{x}}", "x{}{y}"]
    tags = slot_tags()
    sample = rng.sample(range(16384), 200)
    async with open_redis(parse_redis_url(redis_cluster.nodes[0].url)) as conn:
        slots = await conn.pipeline([("CLUSTER", "KEYSLOT", key) for key in keys])
        assert slots == [key_slot(key) for key in keys]
        tagged = await conn.pipeline([("CLUSTER", "KEYSLOT", "{" + tags[s] + "}") for s in sample])
        assert tagged == sample


async def test_cluster_routes_by_slot(redis_cluster: RedisCluster) -> None:
    seed = parse_redis_url(redis_cluster.url)
    cluster_map = await ClusterMap.discover(seed)
    masters = cluster_map.masters()
    assert len(masters) == 3
    assert sorted(len(cluster_map.slots_of(m)) for m in masters) == [5461, 5461, 5462]
    tags = slot_tags()
    keys = [f"{{{tags[s]}}}:k" for m in masters for s in cluster_map.slots_of(m)[::500]]
    with trio.fail_after(GUARD):
        async with open_cluster(seed) as cluster:
            assert isinstance(cluster, ClusterConnections)
            sets = await cluster.pipeline([(key_slot(k), ("SET", k, k)) for k in keys])
            assert sets == [b"OK"] * len(keys)
            gets = await cluster.pipeline([(key_slot(k), ("GET", k)) for k in keys])
            assert gets == [k.encode() for k in keys]
            # each key really is on its slot's master
            for master in masters:
                async with open_redis(master) as conn:
                    mine = [k for k in keys if cluster_map.address_for_slot(key_slot(k)) == master]
                    assert mine and await conn.pipeline([("GET", k) for k in mine]) == [
                        k.encode() for k in mine
                    ]
            # a command sent for the wrong slot comes back MOVED and is retried where told
            key = keys[0]
            wrong = next(s for s in range(16384) if cluster_map.address_for_slot(s)
                         != cluster_map.address_for_slot(key_slot(key)))
            assert await cluster.pipeline([(wrong, ("GET", key))]) == [key.encode()]
            assert await cluster.call_slot(key_slot(key), "GET", key) == key.encode()
            with pytest.raises(RedisError, match="WRONGTYPE"):
                await cluster.call_slot(key_slot(key), "HGET", key, "f")


async def test_cluster_script_on_one_slot(redis_cluster: RedisCluster) -> None:
    seed = parse_redis_url(redis_cluster.url)
    script = Script(
        "local n = redis.call('INCR', KEYS[1]) "
        "redis.call('RPUSH', KEYS[2], ARGV[1] .. ':' .. n) "
        "return {n, redis.call('LLEN', KEYS[2])}"
    )
    with trio.fail_after(GUARD):
        async with open_cluster(seed) as cluster:
            keys = ["{topic-a}:n", "{topic-a}:log"]
            slot = key_slot(keys[0])
            await cluster.call_slot(slot, "DEL", *keys)
            await cluster.call_slot(slot, "SCRIPT", "FLUSH")
            assert await cluster.run_script(script, keys, ["m"]) == [1, 1]  # NOSCRIPT, loaded
            (reply,) = await cluster.pipeline([(slot, script.command(keys, ["m"]))])
            assert reply == [2, 2]
            assert await cluster.call_slot(slot, "LRANGE", keys[1], 0, -1) == [b"m:1", b"m:2"]
            with pytest.raises(RedisError, match="CROSSSLOT|different slot|cross"):
                await cluster.run_script(script, ["{topic-a}:n", "{topic-b}:log"], ["m"])
            other = Script("return 7")
            await cluster.load_scripts([script, other])
            for master in cluster.map.masters():
                conn = await cluster.connection(master)
                assert await conn.call("SCRIPT", "EXISTS", script.sha, other.sha) == [1, 1]


async def test_cluster_ask_during_a_slot_migration(redis_cluster: RedisCluster) -> None:
    """A key of a migrating slot that its old master no longer has: ASK, then the
    command goes to the importing node after ASKING."""
    seed = parse_redis_url(redis_cluster.url)
    cluster_map = await ClusterMap.discover(seed)
    source, target = cluster_map.masters()[:2]
    slot = cluster_map.slots_of(source)[7]
    key = "{" + slot_tags()[slot] + "}:asked"
    with trio.fail_after(GUARD):
        async with open_redis(source) as old, open_redis(target) as new:
            source_id = await old.call("CLUSTER", "MYID")
            target_id = await new.call("CLUSTER", "MYID")
            assert await new.call("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id) == b"OK"
            assert await old.call("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id) == b"OK"
            try:
                (asked,) = await old.pipeline([("SET", key, "v")])
                assert isinstance(asked, RedisError) and str(asked).startswith("ASK ")
                async with open_cluster(seed) as cluster:
                    assert await cluster.call_slot(slot, "SET", key, "v") == b"OK"
                    assert await cluster.pipeline([(slot, ("GET", key))]) == [b"v"]
                assert await new.pipeline([("ASKING",), ("GET", key)]) == [b"OK", b"v"]
            finally:
                await new.pipeline([("ASKING",), ("DEL", key)])
                await old.call("CLUSTER", "SETSLOT", slot, "STABLE")
                await new.call("CLUSTER", "SETSLOT", slot, "STABLE")


async def test_cluster_reconnects_a_lost_master(redis_cluster: RedisCluster) -> None:
    """A master's connection killed: the call that finds it raises RedisUnavailable (no
    reconnect inside a RedisConnection), the next one reconnects."""
    seed = parse_redis_url(redis_cluster.url)
    with trio.fail_after(GUARD):
        async with open_cluster(seed) as cluster:
            master = cluster.map.address_for_slot(0)
            assert await cluster.call_slot(0, "PING") == b"PONG"
            async with open_redis(master) as admin:
                assert await admin.call("CLIENT", "KILL", "TYPE", "normal") >= 1
            with pytest.raises(RedisUnavailable):
                await cluster.call_slot(0, "PING")
            assert await cluster.call_slot(0, "PING") == b"PONG"
            other = next(s for s in range(16384) if cluster.map.address_for_slot(s) != master)
            assert await cluster.pipeline([(0, ("ECHO", "a")), (other, ("ECHO", "b"))]) == [
                b"a", b"b"
            ]


async def test_sharded_subscription(redis_cluster: RedisCluster) -> None:
    seed = parse_redis_url(redis_cluster.url)
    cluster_map = await ClusterMap.discover(seed)
    channel = "t:sharded:{room}"
    slot = key_slot(channel)
    owner = cluster_map.address_for_slot(slot)
    elsewhere = next(m for m in cluster_map.masters() if m != owner)
    with trio.fail_after(GUARD):
        async with open_cluster(seed) as cluster, \
                open_subscription(owner, sharded=True) as sub:
            await sub.subscribe(channel)
            assert sub.channels == {channel.encode()}
            assert await cluster.call_slot(slot, "SPUBLISH", channel, "hello") == 1
            assert await cluster.call_slot(slot, "PUBLISH", channel, "not sharded") == 0
            assert await sub.receive() == [(channel.encode(), b"hello")]
            await sub.unsubscribe(channel)
            assert sub.channels == set()
            assert await cluster.call_slot(slot, "SPUBLISH", channel, "gone") == 0
        async with open_subscription(elsewhere, sharded=True) as wrong:
            with pytest.raises(RedisError, match="MOVED"):
                await wrong.subscribe(channel)
