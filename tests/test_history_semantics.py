"""One semantic suite for every history behind the broker's seam (issue #10: "prove the
seam"): memory, SQLite (``data_dir``), :class:`delayed_history.DelayedHistory`, which
decides every write, replay and ``recovered`` answer a random number of scheduler passes
late, and Redis (``cluster``: one node of a cluster, over a real redis-server). Each
test runs against a real server through real TCP clients on 127.0.0.1 and checks
docs/protocol.md; replies are the only synchronisation points.

A failure names the history and the seam's random seed (rerun with MQ_TRIO_TEST_SEED).
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from delayed_history import Decider, DelayedHistory
from support import SEED, SEED_VARIABLE, LineClient, make_config

from mq_trio.broker import Broker, MemoryHistory
from mq_trio.server import Server, serve

HISTORIES = ["memory", "sqlite", "delayed", "cluster"]
pytest_plugins = ["redis_support"]
CACHE_SIZE = 4
GUARD_SECONDS = 60
SUCCESS: dict[str, Any] = {"success": True}
#: Not a topic any test uses: its unsubscribe's reply marks "everything before is here".
SYNC_TOPIC = "\x00sync"

Obj = dict[str, Any]


@contextmanager
def guard() -> Iterator[None]:
    """A bug must fail the test, not hang the suite (a guard, not a timing assertion)."""
    with trio.fail_after(GUARD_SECONDS):
        yield


@attrs.define(eq=False)
class Env:
    """A running server over one history, and the clients a test opened."""

    kind: str
    server: Server
    seed: str
    decider: Decider | None = None
    clients: list[LineClient] = attrs.field(factory=list)

    @property
    def why(self) -> str:
        """For assertion messages: which history, which seed."""
        return f"history={self.kind} seed={self.seed!r} ({SEED_VARIABLE}={SEED})"

    async def connect(self) -> LineClient:
        client = await LineClient.connect(self.server.port)
        self.clients.append(client)
        return client


@pytest.fixture(params=HISTORIES)
async def env(
    request: pytest.FixtureRequest, nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[Env]:
    kind: str = request.param
    seed = f"{SEED}:{request.node.nodeid}"
    decider: Decider | None = None
    broker: Broker | None = None
    overrides: dict[str, Any] = {"cache_size": CACHE_SIZE}
    if kind == "sqlite":
        overrides["data_dir"] = str(tmp_path / "data")
    elif kind == "cluster":
        pytest.importorskip("hiredis", reason="the 'cluster' extra is not installed")
        overrides["cluster"] = request.getfixturevalue("fresh_redis").url
    elif kind == "delayed":
        decider = Decider(random.Random(seed))
        nursery.start_soon(decider.run)
        broker = Broker(DelayedHistory(MemoryHistory(CACHE_SIZE), decider))
    server: Server = await nursery.start(
        functools.partial(serve, make_config(**overrides), broker=broker)
    )
    environment = Env(kind, server, seed, decider)
    yield environment
    with trio.fail_after(GUARD_SECONDS):
        for client in environment.clients:
            await client.aclose()
        server.shutdown()
        await server.stopped.wait()


# --- helpers --------------------------------------------------------------------------


def send(topic: str, msg: str, delivery: str = "all", **extra: Any) -> Obj:
    return {"command": "send", "topic": topic, "msg": msg, "delivery": delivery, **extra}


def delivered(command: Obj, index: int) -> Obj:
    """What a subscriber gets for ``command``: the command as sent plus its index."""
    return {**command, "index": index}


async def send_lines(client: LineClient, commands: list[Obj]) -> None:
    """All in one write: pipelined."""
    await client.send_raw(b"".join(json.dumps(c).encode() + b"\n" for c in commands))


async def sync(client: LineClient, env: Env) -> list[Obj]:
    """Round trip; return the deliveries that arrived before its reply (the server
    queued them before it read the request, so they are all there)."""
    await client.send({"command": "unsubscribe", "topic": SYNC_TOPIC})
    out: list[Obj] = []
    while True:
        line = await client.receive()
        if line == SUCCESS:
            return out
        assert line.get("command") == "send", (line, env.why)
        out.append(line)


async def publish(client: LineClient, env: Env, commands: list[Obj]) -> None:
    """Pipeline sends from a client subscribed to none of their topics; all succeed."""
    await send_lines(client, commands)
    replies = await client.receive_many(len(commands))
    assert replies == [SUCCESS] * len(commands), env.why


async def subscribe(client: LineClient, env: Env, topic: str, **extra: Any) -> list[Obj]:
    """Subscribe (version 1); return the replay that follows the reply."""
    await client.send({"command": "subscribe", "topic": topic, **extra})
    assert await client.receive() == SUCCESS, env.why
    return await sync(client, env)


async def subscribe_epoch(
    client: LineClient, env: Env, topic: str, last_seen: int, epoch: str, **extra: Any
) -> tuple[Obj, list[Obj]]:
    """Subscribe with the epoch extension: (its reply, the replay)."""
    await client.send({"command": "subscribe", "topic": topic, "last_seen": last_seen,
                       "epoch": epoch, **extra})
    reply = await client.receive()
    return reply, await sync(client, env)


def indexes(deliveries: list[Obj]) -> list[int]:
    return [d["index"] for d in deliveries]


# --- indexes --------------------------------------------------------------------------


async def test_index_per_topic_from_zero_never_reused(env: Env) -> None:
    with guard():
        watcher = await env.connect()
        assert await subscribe(watcher, env, "a") == []
        assert await subscribe(watcher, env, "b") == []
        pub = await env.connect()
        # Every accepted send takes an index: "one", cache false, other topics between.
        commands = [
            send("a", "a0"), send("b", "b0"), send("a", "a1", "one"),
            send("a", "a2", cache=False), send("b", "b1", "one", cache=False),
            send("a", "a3"), send("a", "a4"), send("a", "a5"), send("b", "b2"),
        ]
        await publish(pub, env, commands)
        got = await sync(watcher, env)
        per_topic: dict[str, list[Obj]] = {"a": [], "b": []}
        for command in commands:
            topic = per_topic[command["topic"]]
            topic.append(delivered(command, len(topic)))
        assert [d for d in got if d["topic"] == "a"] == per_topic["a"], env.why
        assert [d for d in got if d["topic"] == "b"] == per_topic["b"], env.why

        # a1 ("one", delivered) and a2 (cache false) were never cached. A replay, the
        # cache and a subscriber that leaves change nothing: the next index is 6.
        late = await env.connect()
        assert indexes(await subscribe(late, env, "a")) == [0, 3, 4, 5], env.why
        await watcher.send({"command": "unsubscribe", "topic": "a"})
        assert await watcher.receive() == SUCCESS
        await publish(pub, env, [send("a", "a6"), send("a", "a7", "one")])
        assert indexes(await sync(late, env)) == [6, 7], env.why
        fresh = await env.connect()
        assert indexes(await subscribe(fresh, env, "a", last_seen=5)) == [6], env.why


# --- delivery -------------------------------------------------------------------------


async def test_all_reaches_every_subscriber_in_index_order(env: Env) -> None:
    with guard():
        subs = [await env.connect() for _ in range(3)]
        for sub in subs:
            assert await subscribe(sub, env, "t") == []
        other = await env.connect()
        assert await subscribe(other, env, "elsewhere") == []
        pub = await env.connect()
        # Delivered as sent: odd text survives (escapes, non-ASCII, a JSON-looking body).
        odd = ["", "ü \u2028 \U0001f600", '{"index": 99}', "a\\b\"c\n"]
        commands = [send("t", f"m{i}{odd[i % len(odd)]}") for i in range(60)]
        await publish(pub, env, commands)
        expected = [delivered(c, i) for i, c in enumerate(commands)]
        for n, sub in enumerate(subs):
            assert await sync(sub, env) == expected, f"subscriber {n}: {env.why}"
        assert await sync(other, env) == [], env.why
        if env.decider is not None:
            assert env.decider.decided > 0, "the delayed history decided nothing late"


async def test_sender_gets_its_own_delivery_before_its_reply(env: Env) -> None:
    with guard():
        client = await env.connect()
        assert await subscribe(client, env, "mine") == []
        # Alone on "mine", so a "one" message is the sender's too; "theirs" is not its.
        commands: list[Obj] = []
        expected: list[Obj] = []
        index = 0
        for i in range(40):
            if i % 3 == 2:
                commands.append(send("theirs", f"t{i}"))
                expected.append(SUCCESS)
                continue
            command = send("mine", f"m{i}", "one" if i % 2 else "all", cache=i % 4 != 0)
            commands.append(command)
            expected += [delivered(command, index), SUCCESS]
            index += 1
        await send_lines(client, commands)
        assert await client.receive_many(len(expected)) == expected, env.why

        # With another subscriber, a "one" copy may go elsewhere; when the sender's own
        # copy comes, it comes right before the reply to that send.
        other = await env.connect()
        assert await subscribe(other, env, "mine", cache=False) == []
        ones = [send("mine", f"o{i}", "one") for i in range(40)]
        await send_lines(client, ones)
        mine: list[int] = []
        for _ in ones:
            line = await client.receive()
            if line != SUCCESS:
                assert line["command"] == "send", env.why
                mine.append(line["index"])
                assert await client.receive() == SUCCESS, f"no reply after {line}: {env.why}"
        theirs = indexes(await sync(other, env))
        assert sorted(mine + theirs) == list(range(index, index + len(ones))), env.why


async def test_one_goes_to_exactly_one_subscriber(env: Env) -> None:
    with guard():
        subs = [await env.connect() for _ in range(3)]
        for sub in subs:
            assert await subscribe(sub, env, "q") == []
        pub = await env.connect()
        commands = [send("q", f"job{i}", "one") for i in range(90)]
        await publish(pub, env, commands)
        got = [await sync(sub, env) for sub in subs]
        for share in got:
            assert indexes(share) == sorted(indexes(share)), env.why  # index order
            for d in share:
                assert d == delivered(commands[d["index"]], d["index"]), env.why
        everything = sorted(i for share in got for i in indexes(share))
        assert everything == list(range(len(commands))), env.why  # each exactly once
        # Uniformly random: a subscriber left out of 90 draws is a (3 * (2/3)**90) event.
        assert all(got), f"shares {[len(s) for s in got]}: {env.why}"
        # Delivered "one" messages are not cached.
        late = await env.connect()
        assert await subscribe(late, env, "q") == [], env.why


async def test_unsubscribe_and_disconnect_stop_deliveries(env: Env) -> None:
    with guard():
        a = await env.connect()
        b = await env.connect()
        for topic in ("t", "u"):
            assert await subscribe(a, env, topic) == []
        assert await subscribe(b, env, "t") == []
        assert await a.request({"command": "unsubscribe", "topic": "t"}) == SUCCESS
        # Unsubscribing from a topic one is not subscribed to also succeeds.
        assert await a.request({"command": "unsubscribe", "topic": "never"}) == SUCCESS
        pub = await env.connect()
        commands = [send("t", "t0"), send("u", "u0"), send("t", "t1", "one"),
                    send("t", "t2", "one"), send("u", "u1", "one")]
        await publish(pub, env, commands)
        assert await sync(a, env) == [delivered(commands[1], 0), delivered(commands[4], 1)], \
            env.why
        assert await sync(b, env) == [delivered(commands[0], 0), delivered(commands[2], 1),
                                      delivered(commands[3], 2)], env.why

        # Disconnect: once the server closed a's connection, a is nobody's subscriber.
        assert await subscribe(a, env, "t", cache=False) == []
        await a.send_raw(b"quit\n")
        await a.read_to_eof()
        ones = [send("t", f"j{i}", "one") for i in range(20)]
        await publish(pub, env, ones)
        assert indexes(await sync(b, env)) == list(range(3, 23)), env.why
        # No subscriber at all: "one" is cached for a later one.
        await b.send_raw(b"quit\n")
        await b.read_to_eof()
        await publish(pub, env, [send("t", "kept", "one")])
        c = await env.connect()
        assert indexes(await subscribe(c, env, "t")) == [0, 23], env.why


# --- cache replay ---------------------------------------------------------------------


async def test_replay_respects_last_seen(env: Env) -> None:
    with guard():
        pub = await env.connect()
        commands = [send("r", f"m{i}") for i in range(CACHE_SIZE)]
        await publish(pub, env, commands)
        expected = [delivered(c, i) for i, c in enumerate(commands)]
        for last_seen in (-1, 0, 1, CACHE_SIZE - 2, CACHE_SIZE - 1, 100):
            sub = await env.connect()
            got = await subscribe(sub, env, "r", last_seen=last_seen)
            assert got == expected[max(last_seen + 1, 0):], f"last_seen {last_seen}: {env.why}"
        # "all" messages stay cached after a replay; a second subscribe replays again.
        sub = await env.connect()
        assert await subscribe(sub, env, "r") == expected, env.why
        assert await subscribe(sub, env, "r", last_seen=2) == expected[3:], env.why
        # A subscription replays only its own topic.
        assert await subscribe(sub, env, "r-other") == [], env.why


async def test_subscribe_without_cache_skips_replay_and_keeps_the_cache(env: Env) -> None:
    with guard():
        pub = await env.connect()
        commands = [send("c", "all0"), send("c", "one1", "one")]
        await publish(pub, env, commands)
        first = await env.connect()
        assert await subscribe(first, env, "c", cache=False) == [], env.why
        # It is subscribed all the same.
        later = send("c", "all2")
        await publish(pub, env, [later])
        assert await sync(first, env) == [delivered(later, 2)], env.why
        assert await first.request({"command": "unsubscribe", "topic": "c"}) == SUCCESS
        # The "one" message is still cached: the first subscribe with cache takes it.
        second = await env.connect()
        assert await subscribe(second, env, "c") == [
            delivered(commands[0], 0), delivered(commands[1], 1), delivered(later, 2)
        ], env.why
        third = await env.connect()
        assert indexes(await subscribe(third, env, "c")) == [0, 2], env.why


async def test_cache_size_evicts_the_oldest(env: Env) -> None:
    with guard():
        pub = await env.connect()
        commands = [send("e", f"m{i}") for i in range(CACHE_SIZE + 3)]
        await publish(pub, env, commands)
        sub = await env.connect()
        got = await subscribe(sub, env, "e")
        assert got == [delivered(c, i) for i, c in enumerate(commands)][3:], env.why
        # Uncached messages neither appear nor evict; cached ones go on evicting.
        mixed = ([send("f", "c0"), send("f", "c1")]
                 + [send("f", f"u{i}", cache=False) for i in range(CACHE_SIZE + 2)]
                 + [send("f", "c2"), send("f", "c3", "one"), send("f", "c4")])
        await publish(pub, env, mixed)
        n = len(mixed)
        assert indexes(await subscribe(sub, env, "f")) == [1, n - 3, n - 2, n - 1], env.why


async def test_one_messages_are_replayed_once(env: Env) -> None:
    with guard():
        pub = await env.connect()
        commands = [send("o", "one0", "one"), send("o", "one1", "one"), send("o", "all2"),
                    send("o", "one3", "one"), send("o", "dropped4", "one", cache=False)]
        await publish(pub, env, commands)
        # Only "one" messages after last_seen leave the cache; one0 stays.
        a = await env.connect()
        assert await subscribe(a, env, "o", last_seen=0) == [
            delivered(commands[i], i) for i in (1, 2, 3)
        ], env.why
        assert await a.request({"command": "unsubscribe", "topic": "o"}) == SUCCESS
        b = await env.connect()
        assert indexes(await subscribe(b, env, "o")) == [0, 2], env.why
        assert await b.request({"command": "unsubscribe", "topic": "o"}) == SUCCESS
        c = await env.connect()
        assert indexes(await subscribe(c, env, "o")) == [2], env.why
        # Index 4 was taken (by the dropped message): the next send is 5.
        await c.send(send("o", "next"))
        assert (await c.receive())["index"] == 5, env.why
        assert await c.receive() == SUCCESS, env.why


# --- the epoch extension --------------------------------------------------------------


async def test_epoch_reply_tells_whether_nothing_was_lost(env: Env) -> None:
    with guard():
        epoch = env.server.broker.epoch
        assert re.fullmatch(r"[0-9a-f]{32}", epoch), env.why
        probe = await env.connect()

        async def recovered(topic: str, last_seen: int, given: str = epoch) -> bool:
            reply, _ = await subscribe_epoch(probe, env, topic, last_seen, given, cache=False)
            assert reply.keys() == {"success", "epoch", "recovered"}, (reply, env.why)
            assert reply["success"] is True and reply["epoch"] == epoch, (reply, env.why)
            assert isinstance(reply["recovered"], bool), (reply, env.why)
            return bool(reply["recovered"])

        def case(topic: str, last_seen: int, given: str = "mine") -> str:
            return f"{topic} last_seen={last_seen} epoch={given}: {env.why}"

        # A topic never sent to: only "nothing seen" is covered.
        assert await recovered("none", -1), case("none", -1)
        assert not await recovered("none", 0), case("none", 0)
        assert not await recovered("none", -1, ""), case("none", -1, "''")

        pub = await env.connect()
        commands = [send("t", f"m{i}") for i in range(CACHE_SIZE)]
        await publish(pub, env, commands)
        # The replay follows the epoch reply, unchanged.
        reader = await env.connect()
        reply, replay = await subscribe_epoch(reader, env, "t", -1, epoch)
        assert reply == {"success": True, "epoch": epoch, "recovered": True}, env.why
        assert replay == [delivered(c, i) for i, c in enumerate(commands)], env.why
        reply, replay = await subscribe_epoch(reader, env, "t", 1, "")
        assert reply == {"success": True, "epoch": epoch, "recovered": False}, env.why
        assert indexes(replay) == [2, 3], env.why

        # Two more: indexes 0 and 1 are evicted.
        await publish(pub, env, [send("t", "m4"), send("t", "m5")])
        n = CACHE_SIZE + 2
        for last_seen, want in [(-1, False), (0, False), (1, True), (2, True),
                                (n - 1, True), (n, False), (n + 5, False)]:
            assert await recovered("t", last_seen) is want, case("t", last_seen)
        other = "0" * 32 if epoch != "0" * 32 else "1" * 32
        assert not await recovered("t", 3, other), case("t", 3, other)

        # Never cached is not lost: cache false, and "one" messages taken by a subscriber.
        await publish(pub, env, [send("u", "c0")]
                      + [send("u", f"x{i}", cache=False) for i in range(CACHE_SIZE + 3)])
        assert await recovered("u", -1), case("u", -1)
        taker = await env.connect()
        assert await subscribe(taker, env, "w") == []
        await publish(pub, env, [send("w", f"j{i}", "one") for i in range(CACHE_SIZE + 3)])
        assert len(await sync(taker, env)) == CACHE_SIZE + 3, env.why
        assert await recovered("w", -1), case("w", -1)


async def test_version_1_subscribe_reply_is_unchanged(env: Env) -> None:
    with guard():
        client = await env.connect()
        await client.send({"command": "subscribe", "topic": "v1", "last_seen": 3})
        assert await client.readline() == b'{"success": true}', env.why
        await client.send({"command": "subscribe", "topic": "v1", "epoch": None})
        assert await client.receive() == {"success": False, "reason": "Malformed json message"}, \
            env.why


# --- pipelining against a model -------------------------------------------------------


@attrs.define
class TopicModel:
    next_index: int = 0
    #: (index, one, delivery)
    cache: list[tuple[int, bool, Obj]] = attrs.field(factory=list)
    evicted: int = -1


@attrs.define
class Model:
    """docs/protocol.md for one client alone on its topics: what it must read back."""

    epoch: str
    topics: dict[str, TopicModel] = attrs.field(factory=dict)
    subscribed: set[str] = attrs.field(factory=set)

    def send(self, command: Obj) -> list[Obj]:
        topic = self.topics.setdefault(command["topic"], TopicModel())
        index = topic.next_index
        topic.next_index += 1
        delivery = delivered(command, index)
        mine = command["topic"] in self.subscribed
        one = command["delivery"] == "one"
        if command.get("cache", True) and not (one and mine):
            if len(topic.cache) == CACHE_SIZE:
                topic.evicted = topic.cache.pop(0)[0]
            topic.cache.append((index, one, delivery))
        return ([delivery] if mine else []) + [SUCCESS]

    def subscribe(self, command: Obj) -> list[Obj]:
        name = command["topic"]
        last_seen = command.get("last_seen", -1)
        self.subscribed.add(name)
        topic = self.topics.get(name)
        out: list[Obj] = [SUCCESS]
        if "epoch" in command:
            if command["epoch"] != self.epoch:
                recovered = False
            elif topic is None:
                recovered = last_seen <= -1
            else:
                recovered = topic.evicted <= max(last_seen, -1) < topic.next_index
            out = [{"success": True, "epoch": self.epoch, "recovered": recovered}]
        if topic is None or not command.get("cache", True):
            return out
        out += [d for i, _, d in topic.cache if i > last_seen]
        topic.cache = [e for e in topic.cache if not (e[1] and e[0] > last_seen)]
        return out

    def unsubscribe(self, command: Obj) -> list[Obj]:
        self.subscribed.discard(command["topic"])
        return [SUCCESS]


async def test_pipelined_replies_and_deliveries_keep_their_order(env: Env) -> None:
    rng = random.Random(env.seed)
    with guard():
        client = await env.connect()
        model = Model(env.server.broker.epoch)
        topics = ["p", "q", "r"]
        lines: list[bytes] = []
        expected: list[Obj] = []
        for i in range(400):
            topic = rng.choice(topics)
            roll = rng.random()
            if roll < 0.55:
                command = send(topic, f"m{i}", rng.choice(["all", "one"]))
                if rng.random() < 0.2:
                    command["cache"] = rng.random() < 0.5
                expected += model.send(command)
            elif roll < 0.75:
                known = model.topics.get(topic)
                top = known.next_index if known else 0
                command = {"command": "subscribe", "topic": topic}
                if rng.random() < 0.7:
                    command["last_seen"] = rng.randint(-1, top + 1)
                if rng.random() < 0.2:
                    command["cache"] = rng.random() < 0.5
                if rng.random() < 0.5:
                    command["epoch"] = rng.choice([model.epoch, model.epoch, ""])
                expected += model.subscribe(command)
            elif roll < 0.9:
                command = {"command": "unsubscribe", "topic": topic}
                expected += model.unsubscribe(command)
            else:
                bad = rng.choice([
                    (b'{"command": "send", "topic": 5}',
                     {"success": False, "reason": "Malformed json message"}),
                    (b"not json", {"success": False, "reason": "Could not parse json"}),
                    (b"", None),  # a blank line gets no reply
                ])
                lines.append(bad[0] + b"\n")
                if bad[1] is not None:
                    expected.append(bad[1])
                continue
            lines.append(json.dumps(command).encode() + b"\n")
        # One write, split at random points: pipelined, lines across segments.
        data = b"".join(lines)
        cuts = sorted(rng.sample(range(1, len(data)), 20))
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            await client.send_raw(data[start:end])
        got = await client.receive_many(len(expected))
        for n, (line, want) in enumerate(zip(got, expected, strict=True)):
            assert line == want, f"line {n} of {len(expected)}: {env.why}"
        assert await sync(client, env) == [], env.why  # and nothing more
