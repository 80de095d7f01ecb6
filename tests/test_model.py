"""Randomised differential test: the server over real TCP against a model of PROTOCOL.md §4.

The model below is written from the contract text alone (not from mq_trio/broker.py). Several
clients issue random commands one at a time; after each command every client's received
lines must be exactly what the model predicts. A ``one`` delivery with several subscribers
may go to any of them: the test finds which one got it and tells the model.

Reproduce a failure with ``MQ_TRIO_TEST_SEED=<seed printed in the failure> pytest
tests/test_model.py``.
"""

from __future__ import annotations

import os
import random
from collections import deque
from typing import Any

import attrs
import pytest
import trio
from support import SEED, SEED_VARIABLE, LineClient, start_server

CACHE_SIZE = 3
CLIENTS = 4
STEPS = 300
TOPICS = ["a", "b", "", "é \"q\""]
SYNC = {"command": "unsubscribe", "topic": "never used: sync marker"}
BARRIER = {"command": "subscribe", "topic": "never sent to: barrier", "cache": False}


@attrs.define
class Cached:
    index: int
    one: bool
    delivered: dict[str, Any]


@attrs.define
class Model:
    """Section 4, literally: per topic subscribers, a bounded cache and the next index."""

    cache_size: int
    subscribers: dict[str, set[int]] = attrs.field(factory=dict)
    cache: dict[str, deque[Cached]] = attrs.field(factory=dict)
    next_index: dict[str, int] = attrs.field(factory=dict)

    def _cache(self, topic: str) -> deque[Cached]:
        return self.cache.setdefault(topic, deque(maxlen=self.cache_size))

    def subscribe(self, client: int, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        topic = cmd["topic"]
        self.subscribers.setdefault(topic, set()).add(client)
        out: list[dict[str, Any]] = [{"success": True}]
        if cmd.get("cache", True):
            last_seen = cmd.get("last_seen", -1)
            sent = [m for m in self._cache(topic) if m.index > last_seen]
            out += [m.delivered for m in sent]
            gone = {id(m) for m in sent if m.one}
            kept = [m for m in self._cache(topic) if id(m) not in gone]
            self.cache[topic] = deque(kept, maxlen=self.cache_size)
        return out

    def unsubscribe(self, client: int, cmd: dict[str, Any]) -> None:
        self.subscribers.get(cmd["topic"], set()).discard(client)

    def disconnect(self, client: int) -> None:
        for subs in self.subscribers.values():
            subs.discard(client)

    def send(self, cmd: dict[str, Any]) -> tuple[dict[str, Any], set[int], bool]:
        """Consume the index; return the delivery, its candidate recipients, and whether
        exactly one of them gets it. The caller then calls :meth:`delivered_one` for a
        ``one`` with candidates."""
        topic = cmd["topic"]
        index = self.next_index.get(topic, 0)
        self.next_index[topic] = index + 1
        delivered = {**cmd, "index": index}
        subs = set(self.subscribers.get(topic, ()))
        cache = cmd.get("cache", True)
        if cmd["delivery"] == "all":
            if cache:
                self._cache(topic).append(Cached(index, False, delivered))
            return delivered, subs, False
        if subs:
            return delivered, subs, True  # never cached
        if cache:
            self._cache(topic).append(Cached(index, True, delivered))
        return delivered, set(), True


def random_command(rng: random.Random, model: Model) -> dict[str, Any]:
    topic = rng.choice(TOPICS)
    r = rng.random()
    if r < 0.3:
        cmd: dict[str, Any] = {"command": "subscribe", "topic": topic}
        if rng.random() < 0.5:
            top = model.next_index.get(topic, 0)
            cmd["last_seen"] = rng.randint(-3, top + 1)
        if rng.random() < 0.3:
            cmd["cache"] = rng.random() < 0.5
        return cmd
    if r < 0.4:
        return {"command": "unsubscribe", "topic": topic}
    cmd = {
        "command": "send",
        "topic": topic,
        "msg": rng.choice(["", "x", "hé\n\"", str(rng.random())]),
        "delivery": rng.choice(["all", "one"]),
    }
    if rng.random() < 0.4:
        cmd["cache"] = rng.random() < 0.6
    if rng.random() < 0.03:
        cmd["cache"] = 1  # malformed: no index consumed, nothing changes
    return cmd


async def read_until_successes(client: LineClient, n: int) -> list[Any]:
    """Everything the client receives up to and including its n-th reply."""
    lines: list[Any] = []
    seen = 0
    while seen < n:
        obj = await client.receive()
        lines.append(obj)
        if "success" in obj:
            seen += 1
    return lines


async def check_model(seed: int, cluster: str | None = None) -> None:
    """The model against one server, or (``cluster``: a Redis URL) against two nodes
    of a cluster with the clients spread over them."""
    rng = random.Random(seed)
    where = f"(seed {seed}; rerun with {SEED_VARIABLE}={seed})"
    async with trio.open_nursery() as nursery:
        if cluster is None:
            ports = [(await start_server(nursery, cache_size=CACHE_SIZE)).port]
        else:
            ports = [(await start_server(nursery, cache_size=CACHE_SIZE, cluster=cluster)).port
                     for _ in range(2)]
        clients = [await LineClient.connect(ports[c % len(ports)]) for c in range(CLIENTS)]
        _sync = _cluster_sync if cluster is not None else _local_sync
        model = Model(CACHE_SIZE)
        for step in range(STEPS):
            actor = rng.randrange(CLIENTS)
            if rng.random() < 0.03:
                # a client leaves (EOF) and a new one takes its place
                await clients[actor].send_raw(b"quit\n")
                assert await clients[actor].read_to_eof() == b"", f"step {step} {where}"
                await clients[actor].aclose()
                model.disconnect(actor)
                clients[actor] = await LineClient.connect(ports[actor % len(ports)])
                if cluster is not None:  # (its node's count is in Redis before the next)
                    assert await _sync(clients[actor]) == [], f"step {step} {where}"
                continue
            cmd = random_command(rng, model)
            expected: list[list[Any]] = [[] for _ in range(CLIENTS)]
            one: tuple[dict[str, Any], set[int]] | None = None
            if type(cmd.get("cache", True)) is not bool:
                expected[actor] = [{"success": False, "reason": "Malformed json message"}]
            elif cmd["command"] == "subscribe":
                expected[actor] = model.subscribe(actor, cmd)
            elif cmd["command"] == "unsubscribe":
                model.unsubscribe(actor, cmd)
                expected[actor] = [{"success": True}]
            else:
                delivered, recipients, single = model.send(cmd)
                if single and len(recipients) > 1:
                    one = (delivered, recipients)
                else:
                    for c in recipients:
                        expected[c].append(delivered)
                expected[actor].append({"success": True})
            with trio.fail_after(10):
                await clients[actor].send(cmd)
                got = [await read_until_successes(clients[actor], 1)]
                got[0] += await _sync(clients[actor])
                for c in range(CLIENTS):
                    if c != actor:
                        got.append(await _sync(clients[c]))
            received = _by_client(got, actor)
            if one is not None:
                delivered, recipients = one
                takers = [c for c in range(CLIENTS) if delivered in received[c]]
                assert len(takers) == 1 and takers[0] in recipients, (
                    f"step {step}: one-delivery {delivered} went to {takers}, "
                    f"candidates {recipients} {where}"
                )
                taker = takers[0]
                pos = 0 if taker != actor else len(expected[actor]) - 1
                expected[taker].insert(pos, delivered)
            for c in range(CLIENTS):
                assert received[c] == expected[c], (
                    f"step {step}: client {c} after {cmd} by client {actor} {where}"
                )
        nursery.cancel_scope.cancel()


async def _local_sync(client: LineClient) -> list[Any]:
    """What the client received before a no-op round trip (its reply is dropped)."""
    await client.send(SYNC)
    lines = await read_until_successes(client, 1)
    assert lines[-1] == {"success": True}
    return lines[:-1]


async def _cluster_sync(client: LineClient) -> list[Any]:
    """``_local_sync`` on a cluster node: first a subscribe to a topic nobody uses, whose
    reply comes once the node delivered everything Redis had before it (docs/cluster.md:
    a subscribe marks its place in the channel), so every other node's deliveries of
    the step are here too."""
    await client.send(BARRIER)
    lines = await read_until_successes(client, 1)
    assert lines[-1] == {"success": True}
    return lines[:-1] + await _local_sync(client)


def _by_client(got: list[list[Any]], actor: int) -> list[list[Any]]:
    """Reorder ``[actor's lines, the others' lines in order]`` into per-client lists."""
    others = iter(got[1:])
    return [got[0] if c == actor else next(others) for c in range(CLIENTS)]


def seeds() -> list[int]:
    """Two fixed seeds and the run's; only the given one with MQ_TRIO_TEST_SEED set."""
    if os.environ.get(SEED_VARIABLE):
        return [SEED]
    return [0, 1, SEED]


@pytest.mark.parametrize("seed", seeds())
async def test_server_matches_model(seed: int) -> None:
    print(f"model test seed: {seed} (rerun with {SEED_VARIABLE}={seed})")
    await check_model(seed)


def test_model_itself() -> None:
    """The model's own reading of the contract, on the cases the contract spells out."""
    m = Model(cache_size=2)
    send_all = {"command": "send", "topic": "t", "msg": "m", "delivery": "all"}
    send_one = {**send_all, "delivery": "one"}
    assert m.send(send_one)[0]["index"] == 0  # no subscriber: cached
    assert m.send({**send_one, "cache": False})[0]["index"] == 1  # dropped
    assert m.send(send_all)[0]["index"] == 2
    assert [d["index"] for d in m.subscribe(1, {"command": "subscribe", "topic": "t"})[1:]] == [
        0, 2
    ]
    assert [c.index for c in m.cache["t"]] == [2]  # the one was taken
    delivered, recipients, single = m.send(send_one)
    assert recipients == {1} and single and [c.index for c in m.cache["t"]] == [2]
    m.send(send_all)
    m.send(send_all)
    assert [c.index for c in m.cache["t"]] == [4, 5]  # evicted at the cache size
    assert m.subscribe(2, {"command": "subscribe", "topic": "t", "cache": False}) == [
        {"success": True}
    ]
    m.disconnect(1)
    assert m.subscribers["t"] == {2}
