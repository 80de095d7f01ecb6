"""The HTTP port's work in slices (server/_introspect.py), without sockets: the same
answers as the one-call versions, other tasks running in between, copies that survive
changes of the live structure, and the topic snapshot's reuse window."""

from __future__ import annotations

import random
import string

import pytest
import trio
import trio.testing
from support import make_config

from mq_trio.broker import Broker
from mq_trio.protocol import Send
from mq_trio.server import Server, _introspect
from mq_trio.server._introspect import (
    TopicNames,
    copy_in_slices,
    sort_in_slices,
    topics_view,
)


class Ticker:
    """Counts how often it gets to run: proof that a computation yields."""

    def __init__(self) -> None:
        self.ticks = 0

    async def run(self) -> None:
        while True:
            self.ticks += 1
            await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("reverse", [False, True])
async def test_sort_in_slices_is_sorted_and_yields(
    rng: random.Random, monkeypatch: pytest.MonkeyPatch, reverse: bool
) -> None:
    monkeypatch.setattr(_introspect, "SORT_RUN", 50)
    monkeypatch.setattr(_introspect, "MERGE_SLICE", 30)
    items = [(rng.randrange(100), i) for i in range(2000)]  # unique, with equal firsts
    ticker = Ticker()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        result = await sort_in_slices(items, reverse=reverse)
        nursery.cancel_scope.cancel()
    assert result == sorted(items, reverse=reverse)
    assert ticker.ticks >= 2000 // 50  # one turn per sorted run at least


async def test_copy_in_slices_restarts_when_the_collection_changes(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_introspect, "COPY_SLICE", 10)
    live = dict.fromkeys(f"t{i}" for i in range(100))

    async def add_one_topic() -> None:
        await trio.lowlevel.checkpoint()  # after the copy's first slice
        live["new"] = None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(add_one_topic)
        copy = await copy_in_slices(live.keys())
    assert sorted(copy) == sorted(live)  # the second try saw the final state


async def test_copy_in_slices_gives_up_slicing_under_constant_change(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_introspect, "COPY_SLICE", 10)
    live = dict.fromkeys(f"t{i}" for i in range(100))
    copies: list[list[str]] = []

    async def churn() -> None:
        n = 0
        while not copies:
            live[f"churn{n}"] = None
            n += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(churn)
        copies.append(await copy_in_slices(live.keys()))
    assert sorted(copies[0]) == sorted(live)  # made at once: consistent


def _offline_server() -> Server:
    """A Server object that is never run: the views read only its broker and config."""
    return Server(make_config(), Broker(), [])


async def test_topic_snapshot_is_reused_for_its_ttl(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_introspect, "EXACT_TOPICS", 0)
    server = _offline_server()
    server.broker.publish(Send("b", "m", "all"))
    names = TopicNames()
    assert await names.sorted_names(server) == ["b"]
    server.broker.publish(Send("a", "m", "all"))
    assert await names.sorted_names(server) == ["b"]  # within the TTL: the old list
    view = await topics_view(server, {}, names)
    assert [t["topic"] for t in view["topics"]] == ["b"]
    await trio.sleep(_introspect.TOPICS_TTL * 1.5)
    assert await names.sorted_names(server) == ["a", "b"]


async def test_small_topic_sets_are_always_fresh() -> None:
    server = _offline_server()
    names = TopicNames()
    server.broker.publish(Send("b", "m", "all"))
    assert await names.sorted_names(server) == ["b"]
    server.broker.publish(Send("a", "m", "all"))
    assert await names.sorted_names(server) == ["a", "b"]


async def test_prefix_pages_match_a_plain_filter(
    rng: random.Random, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_introspect, "EXACT_TOPICS", 0)
    monkeypatch.setattr(_introspect, "SORT_RUN", 7)
    monkeypatch.setattr(_introspect, "MERGE_SLICE", 5)
    monkeypatch.setattr(_introspect, "SCAN_SLICE", 3)
    monkeypatch.setattr(_introspect, "COPY_SLICE", 13)
    server = _offline_server()
    alphabet = "ab/\u00e9\U0010ffff" + string.digits[:2]
    topics = {"".join(rng.choices(alphabet, k=rng.randrange(1, 6))) for _ in range(300)}
    for topic in topics:
        server.broker.publish(Send(topic, "m", "all"))
    names = TopicNames()
    for prefix in ["", "a", "ab", "a\U0010ffff", "\U0010ffff", "/", "zzz", *rng.sample(
            sorted(topics), 10)]:
        expected = sorted(t for t in topics if t.startswith(prefix))
        got: list[str] = []
        offset = 0
        while True:
            view = await topics_view(
                server, {"prefix": prefix, "offset": str(offset), "limit": "17"}, names)
            assert view["total"] == len(expected), prefix
            if not view["topics"]:
                break
            got.extend(t["topic"] for t in view["topics"])
            offset += 17
        assert got == expected, prefix
        backwards = await topics_view(server, {"prefix": prefix, "order": "desc",
                                               "limit": "1000"}, names)
        assert [t["topic"] for t in backwards["topics"]] == expected[::-1]


async def test_release_empties_a_list_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_introspect, "RELEASE_SLICE", 10)
    items = list(range(95))
    ticker = Ticker()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        await _introspect.release(items)
        nursery.cancel_scope.cancel()
    assert items == []
    assert ticker.ticks >= 9  # a turn for the others after each slice


async def test_a_snapshot_in_use_is_not_emptied_by_a_rebuild(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_introspect, "EXACT_TOPICS", 0)
    server = _offline_server()
    server.broker.publish(Send("a", "m", "all"))
    names = TopicNames()
    held = await names.sorted_names(server)  # a request still paging through it
    await trio.sleep(_introspect.TOPICS_TTL * 1.5)
    server.broker.publish(Send("b", "m", "all"))
    assert await names.sorted_names(server) == ["a", "b"]
    assert held == ["a"]
