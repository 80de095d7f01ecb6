"""The HTTP port (issue #13 points 2-3): /metrics, /healthz, /stats, /connections, /topics
over real sockets on 127.0.0.1, with a small raw HTTP/1.1 client over trio."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from support import FailingCommits, LineClient, make_config

from mq_trio.server import Server, _admin, serve

SUCCESS = {"success": True}
GUARD_SECONDS = 60


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


def parse_reply(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(status), headers, body)


async def read_all(stream: trio.SocketStream) -> bytes:
    chunks = []
    while chunk := await stream.receive_some(65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def request(port: int, target: str, method: str = "GET", raw: bytes | None = None,
                  ) -> Reply:
    """One request on a fresh connection; the server closes it after its response."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            raw or f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        reply = parse_reply(await read_all(stream))
    if method != "HEAD":
        assert int(reply.headers["content-length"]) == len(reply.body)
    return reply


async def get_json(server: Server, target: str) -> Any:
    assert server.http_port is not None
    reply = await request(server.http_port, target)
    assert reply.status == 200, reply.body
    return reply.json()


# --- a small Prometheus text-format parser ---------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


@attrs.define
class Exposition:
    types: dict[str, str] = attrs.Factory(dict)
    helps: dict[str, str] = attrs.Factory(dict)
    #: (name, frozenset of labels) -> value
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = attrs.Factory(dict)

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]


def parse_exposition(text: str) -> Exposition:
    """Parse, checking what Prometheus would reject or misread: every sample's metric has
    HELP and TYPE before it, no sample twice, histograms consistent."""
    out = Exposition()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in out.helps and help_text
            out.helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            assert name in out.helps and name not in out.types
            out.types[name] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, label_text, value = match.groups()
            labels: list[tuple[str, str]] = []
            if label_text:
                consumed = 0
                for label in _LABEL.finditer(label_text):
                    assert label.start() == consumed, line
                    consumed = label.end()
                    labels.append((label.group(1), label.group(2)))
                assert consumed == len(label_text), line
            family = name
            for suffix in ("_bucket", "_sum", "_count"):
                if name.endswith(suffix) and name[: -len(suffix)] in out.types:
                    family = name[: -len(suffix)]
                    assert out.types[family] == "histogram"
            assert family in out.types, f"sample without TYPE: {line!r}"
            assert family.startswith("mq_trio_")
            if out.types[family] == "counter":
                assert family.endswith("_total")
            key = (name, frozenset(labels))
            assert key not in out.samples, f"duplicate sample: {line!r}"
            out.samples[key] = float(value)
    for family, kind in out.types.items():
        if kind != "histogram":
            continue
        buckets = sorted(
            (float(dict(labels)["le"]), value)
            for (name, labels), value in out.samples.items() if name == family + "_bucket"
        )
        counts = [count for _, count in buckets]
        assert counts == sorted(counts), f"{family} buckets not cumulative"
        assert buckets[-1][0] == float("inf")
        assert buckets[-1][1] == out.value(family + "_count")
        assert (family + "_sum", frozenset()) in out.samples
    return out


async def scrape(server: Server) -> Exposition:
    assert server.http_port is not None
    reply = await request(server.http_port, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse_exposition(reply.body.decode())


# --- a server -----------------------------------------------------------------------------


@asynccontextmanager
async def running(**overrides: Any) -> AsyncIterator[Server]:
    """An in-process server with the HTTP port; leaving the block shuts it down."""
    overrides.setdefault("http_port", 0)
    with trio.fail_after(GUARD_SECONDS):  # a guard against a hang, not a timing assertion
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, make_config(**overrides))
            try:
                yield server
            finally:
                server.shutdown()
                await server.stopped.wait()


def send(topic: str, msg: str) -> dict[str, Any]:
    return {"command": "send", "topic": topic, "msg": msg, "delivery": "all"}


class CountingClient(LineClient):
    """A line client that counts the bytes it sends and receives."""

    sent = 0
    received = 0
    lines = 0

    @property
    def payload(self) -> int:
        """Bytes received without the line ends: what the server counts as bytes out
        (its outboxes count replies and deliveries, the framing is the transport's)."""
        return self.received - 2 * self.lines

    async def send(self, obj: Any) -> None:
        data = json.dumps(obj).encode() + b"\n"
        self.sent += len(data)
        await self.stream.send_all(data)

    async def readline(self) -> bytes:
        line = await super().readline()
        self.received += len(line) + 2
        self.lines += 1
        return line


async def counting(server: Server) -> CountingClient:
    return CountingClient(await trio.open_tcp_stream("127.0.0.1", server.port))


# --- /metrics and /stats -------------------------------------------------------------------


async def test_metrics_count_exactly_the_traffic() -> None:
    async with running() as server:
        pub = await counting(server)
        sub = await counting(server)
        assert await sub.request({"command": "subscribe", "topic": "t"}) == SUCCESS
        for i in range(5):
            assert (await pub.request(send("t", f"m{i}")))["success"] is True
        assert [m["msg"] for m in await sub.receive_many(5)] == [f"m{i}" for i in range(5)]
        before = await scrape(server)
        assert before.value("mq_trio_connections") == 2
        assert before.value("mq_trio_connections_total") == 2
        assert before.value("mq_trio_subscriptions") == 1
        assert before.value("mq_trio_topics") == 1
        assert before.value("mq_trio_messages_in_total") == 6  # 1 subscribe + 5 sends
        assert before.value("mq_trio_deliveries_total") == 5
        assert before.value("mq_trio_messages_out_total") == 11  # 6 replies + 5 deliveries
        assert before.value("mq_trio_bytes_in_total") == pub.sent + sub.sent
        assert before.value("mq_trio_bytes_out_total") == pub.payload + sub.payload
        assert before.value("mq_trio_max_connections") == server.config.max_connections
        assert before.value("mq_trio_store_available") == 1
        assert before.value("mq_trio_store_commit_seconds_count") == 0
        assert before.value("mq_trio_build_info", version="0.1.0",
                            python=__import__("platform").python_version()) == 1
        # three more sends: the counters move by exactly that
        sent_before, received_before = pub.sent + sub.sent, pub.payload + sub.payload
        for i in range(3):
            assert (await pub.request(send("t", f"n{i}")))["success"] is True
        await sub.receive_many(3)
        after = await scrape(server)
        assert after.value("mq_trio_messages_in_total") - before.value(
            "mq_trio_messages_in_total") == 3
        assert after.value("mq_trio_deliveries_total") - before.value(
            "mq_trio_deliveries_total") == 3
        assert after.value("mq_trio_messages_out_total") - before.value(
            "mq_trio_messages_out_total") == 6
        assert after.value("mq_trio_bytes_in_total") - before.value(
            "mq_trio_bytes_in_total") == pub.sent + sub.sent - sent_before
        assert after.value("mq_trio_bytes_out_total") - before.value(
            "mq_trio_bytes_out_total") == pub.payload + sub.payload - received_before
        # failures by reason, with the label value escaped as the format wants
        await pub.send_raw(b"not json\n")
        assert (await pub.receive())["success"] is False
        server.stats.fail('odd "reason"\\ with\nnewline')
        failed = await scrape(server)
        assert failed.value("mq_trio_failures_total", reason="Could not parse json") == 1
        assert failed.value("mq_trio_failures_total",
                            reason='odd \\"reason\\"\\\\ with\\nnewline') == 1


async def test_stats_matches_the_counters() -> None:
    async with running(cache_size=7) as server:
        pub = await counting(server)
        sub = await counting(server)
        assert await sub.request({"command": "subscribe", "topic": "a"}) == SUCCESS
        assert await sub.request({"command": "subscribe", "topic": "b"}) == SUCCESS
        assert (await pub.request(send("a", "x")))["success"] is True
        await sub.receive()
        stats = await get_json(server, "/stats")
        assert stats["version"] == "0.1.0"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stats["started"])
        assert 0 <= stats["uptime_seconds"] < GUARD_SECONDS
        assert {k: stats[k] for k in (
            "connections", "connections_total", "refused", "subscriptions", "topics",
            "messages_in", "messages_out", "deliveries", "slow_consumers", "failures",
            "store")} == {
            "connections": 2, "connections_total": 2, "refused": 0, "subscriptions": 2,
            "topics": 2, "messages_in": 3, "messages_out": 4, "deliveries": 1,
            "slow_consumers": 0, "failures": {}, "store": None}
        assert stats["bytes_in"] == pub.sent + sub.sent
        assert stats["bytes_out"] == pub.payload + sub.payload
        assert stats["max_connections"] == server.config.max_connections
        assert stats["cached_bytes"] > 0
        assert stats["config"]["cache_size"] == 7
        assert stats["config"]["max_pending_bytes"] == server.config.max_pending_bytes
        assert stats["config"]["max_topics"] == server.config.max_topics


async def test_traffic_of_closed_connections_stays_counted() -> None:
    """A counter never goes down: a client's bytes stay in the totals after it leaves."""
    async with running() as server:
        client = await counting(server)
        assert await client.request({"command": "subscribe", "topic": "t"}) == SUCCESS
        live = await scrape(server)
        await client.aclose()
        await server.wait_until(lambda: not server.connections)
        closed = await scrape(server)
        assert closed.value("mq_trio_connections") == 0
        for name in ("mq_trio_messages_in_total", "mq_trio_messages_out_total",
                     "mq_trio_bytes_in_total", "mq_trio_bytes_out_total"):
            assert closed.value(name) == live.value(name), name
        assert closed.value("mq_trio_bytes_in_total") == client.sent


# --- /healthz ---------------------------------------------------------------------------------


async def test_healthz_ok_then_stopping_while_connections_drain() -> None:
    async with running(shutdown_grace=30, max_pending_bytes=8 << 20) as server:
        port = server.http_port
        assert port is not None
        reply = await request(port, "/healthz")
        assert (reply.status, reply.json()) == (200, {"status": "ok"})
        # a subscriber that does not read: its output cannot drain, so its connection
        # outlives the shutdown until the grace ends (or it leaves)
        sub = await LineClient.connect(server.port)
        assert await sub.request({"command": "subscribe", "topic": "t"}) == SUCCESS
        pub = await LineClient.connect(server.port)
        big = "x" * (256 << 10)
        while not any(c.outbox.pending for c in server.connections):
            assert (await pub.request(send("t", big)))["success"] is True
        server.shutdown()
        reply = await request(port, "/healthz")
        assert (reply.status, reply.json()) == (503, {"status": "stopping"})
        assert (await scrape(server)).value("mq_trio_connections") >= 1
        head = await request(port, "/healthz", method="HEAD")
        assert head.status == 503 and head.body == b""
        await sub.aclose()
        await pub.aclose()
        await server.stopped.wait()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)


async def test_healthz_storage_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(data_dir=str(tmp_path)) as server:
        pub = await LineClient.connect(server.port)
        assert (await pub.request(send("t", "ok")))["success"] is True
        healthy = await scrape(server)
        assert healthy.value("mq_trio_store_commits_total") >= 1
        assert healthy.value("mq_trio_store_commit_seconds_count") == healthy.value(
            "mq_trio_store_commits_total")
        stats = await get_json(server, "/stats")
        assert stats["store"]["available"] is True
        assert stats["store"]["fsync"] == server.config.fsync
        commits = FailingCommits(monkeypatch)
        assert (await pub.request(send("t", "lost")))["success"] is False
        assert server.http_port is not None
        reply = await request(server.http_port, "/healthz")
        assert (reply.status, reply.json()) == (503, {"status": "storage unavailable"})
        sick = await scrape(server)
        assert sick.value("mq_trio_store_available") == 0
        assert sick.value("mq_trio_store_commit_failures_total") >= 1
        assert (await get_json(server, "/stats"))["store"]["available"] is False
        commits.failing = False
        assert (await pub.request(send("t", "back")))["success"] is True
        reply = await request(server.http_port, "/healthz")
        assert (reply.status, reply.json()) == (200, {"status": "ok"})


# --- /connections --------------------------------------------------------------------------


async def test_connections_rows_sorting_and_pages() -> None:
    async with running() as server:
        quiet = await LineClient.connect(server.port)
        busy = await LineClient.connect(server.port)
        assert await busy.request({"command": "subscribe", "topic": "a"}) == SUCCESS
        assert await busy.request({"command": "subscribe", "topic": "b"}) == SUCCESS
        assert (await busy.request(send("c", "x")))["success"] is True
        assert await quiet.request({"command": "unsubscribe", "topic": "z"}) == SUCCESS
        await server.wait_until(lambda: len(server.connections) == 2)
        view = await get_json(server, "/connections?sort=messages_in")
        assert (view["total"], view["offset"], view["limit"], view["sort"]) == (
            2, 0, 100, "messages_in")
        rows = view["connections"]
        assert [r["messages_in"] for r in rows] == [3, 1]
        first = rows[0]
        assert set(first) == {"peer", "transport", "tls", "user", "since", "subscriptions",
                              "pending_bytes", "messages_in", "bytes_in", "messages_out",
                              "bytes_out"}
        host, port = busy.stream.socket.getsockname()[:2]
        assert first["peer"] == f"{host}:{port}"
        assert (first["transport"], first["tls"], first["user"]) == ("tcp", False, None)
        assert (first["subscriptions"], first["messages_out"]) == (2, 3)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["since"])
        ascending = await get_json(server, "/connections?sort=messages_in&order=asc")
        assert [r["messages_in"] for r in ascending["connections"]] == [1, 3]
        page = await get_json(server, "/connections?sort=subscriptions&offset=1&limit=1")
        assert [r["subscriptions"] for r in page["connections"]] == [0]
        past = await get_json(server, "/connections?offset=5")
        assert (past["total"], past["connections"]) == (2, [])
        capped = await get_json(server, "/connections?limit=5000")
        assert capped["limit"] == 1000
        peers = await get_json(server, "/connections?sort=peer")
        assert [r["peer"] for r in peers["connections"]] == sorted(
            r["peer"] for r in rows)


async def test_connections_slow_consumer_first() -> None:
    """By default the connection with the most output queued comes first."""
    async with running() as server:
        readers = [await LineClient.connect(server.port) for _ in range(3)]
        for reader in readers:
            assert await reader.request({"command": "subscribe", "topic": "other"}) == SUCCESS
        stuck = await LineClient.connect(server.port)
        assert await stuck.request({"command": "subscribe", "topic": "t"}) == SUCCESS
        pub = await LineClient.connect(server.port)
        big = "x" * (256 << 10)
        while not any(c.outbox.pending for c in server.connections):
            assert (await pub.request(send("t", big)))["success"] is True
        host, port = stuck.stream.socket.getsockname()[:2]
        view = await get_json(server, "/connections")
        assert view["sort"] == "pending"
        top = view["connections"][0]
        assert top["peer"] == f"{host}:{port}" and top["pending_bytes"] > 0
        assert all(r["pending_bytes"] == 0 for r in view["connections"][1:])


@pytest.mark.parametrize("query", ["limit=-1", "limit=abc", "offset=1.5", "sort=bogus",
                                   "order=up", "limit=" + "9" * 30])
async def test_bad_query_values_are_400(query: str) -> None:
    async with running() as server:
        assert server.http_port is not None
        for path in ("/connections", "/topics"):
            reply = await request(server.http_port, f"{path}?{query}")
            assert reply.status == 400
            assert "error" in reply.json()


# --- /topics ---------------------------------------------------------------------------


async def _topics_fixture(server: Server) -> list[LineClient]:
    """Topics a/1 .. a/4 with 0..3 subscribers, b/1 with 1, c without history."""
    subs = [await LineClient.connect(server.port) for _ in range(3)]
    for i, sub in enumerate(subs):
        for topic in ("a/2", "a/3", "a/4")[i:]:
            assert await sub.request({"command": "subscribe", "topic": topic}) == SUCCESS
    assert await subs[0].request({"command": "subscribe", "topic": "b/1"}) == SUCCESS
    assert await subs[0].request({"command": "subscribe", "topic": "c"}) == SUCCESS
    pub = await LineClient.connect(server.port)  # after: no replays in the replies above
    for name in ("a/1", "a/2", "a/3", "a/4", "b/1"):
        assert (await pub.request(send(name, "m")))["success"] is True
    assert (await pub.request(send("a/4", "mm")))["success"] is True
    return [pub, *subs]


async def _check_topics(server: Server) -> None:
    view = await get_json(server, "/topics")
    assert (view["total"], view["offset"], view["limit"], view["sort"]) == (6, 0, 100, "name")
    assert [t["topic"] for t in view["topics"]] == ["a/1", "a/2", "a/3", "a/4", "b/1", "c"]
    by_name = {t["topic"]: t for t in view["topics"]}
    assert by_name["a/4"] == {"topic": "a/4", "subscribers": 3, "cached": 2,
                              "cached_bytes": by_name["a/4"]["cached_bytes"],
                              "next_index": 2}
    assert by_name["a/4"]["cached_bytes"] > by_name["a/1"]["cached_bytes"] > 0
    assert by_name["c"] == {"topic": "c", "subscribers": 1, "cached": 0, "cached_bytes": 0,
                            "next_index": 0}
    prefixed = await get_json(server, "/topics?prefix=a/&offset=1&limit=2")
    assert prefixed["total"] == 4
    assert [t["topic"] for t in prefixed["topics"]] == ["a/2", "a/3"]
    backwards = await get_json(server, "/topics?prefix=a/&order=desc&limit=3")
    assert [t["topic"] for t in backwards["topics"]] == ["a/4", "a/3", "a/2"]
    popular = await get_json(server, "/topics?sort=subscribers")
    assert [(t["topic"], t["subscribers"]) for t in popular["topics"]] == [
        ("a/4", 3), ("a/3", 2), ("a/2", 1), ("b/1", 1), ("c", 1), ("a/1", 0)]
    page = await get_json(server, "/topics?sort=subscribers&prefix=a&offset=2&limit=2")
    assert [t["topic"] for t in page["topics"]] == ["a/2", "a/1"]
    least = await get_json(server, "/topics?sort=subscribers&order=asc&limit=2")
    assert [t["topic"] for t in least["topics"]] == ["a/1", "a/2"]
    none = await get_json(server, "/topics?prefix=zzz")
    assert (none["total"], none["topics"]) == (0, [])


async def test_topics_by_name_prefix_and_subscribers() -> None:
    async with running() as server:
        clients = await _topics_fixture(server)  # kept: a dropped client disconnects
        await _check_topics(server)
        assert len(clients) == 4


async def test_topics_through_the_sliced_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path for a million topics, with tiny slices: the same answers."""
    from mq_trio.server import _introspect

    monkeypatch.setattr(_introspect, "EXACT_TOPICS", 0)
    monkeypatch.setattr(_introspect, "SORT_RUN", 2)
    monkeypatch.setattr(_introspect, "MERGE_SLICE", 3)
    monkeypatch.setattr(_introspect, "SCAN_SLICE", 2)
    monkeypatch.setattr(_introspect, "COPY_SLICE", 2)
    monkeypatch.setattr(_introspect, "ROWS_PER_SLICE", 2)
    monkeypatch.setattr(_introspect, "TOPICS_TTL", 0.0)
    async with running() as server:
        clients = await _topics_fixture(server)  # kept: a dropped client disconnects
        await _check_topics(server)
        assert len(clients) == 4


# --- HTTP edges and bounds -------------------------------------------------------------------


async def test_unknown_paths_methods_and_garbage() -> None:
    async with running() as server:
        port = server.http_port
        assert port is not None
        missing = await request(port, "/nope")
        assert missing.status == 404 and "error" in missing.json()
        posted = await request(port, "/metrics", method="POST")
        assert posted.status == 405 and posted.headers["allow"] == "GET, HEAD"
        head = await request(port, "/stats", method="HEAD")
        assert head.status == 200 and head.body == b"" and int(
            head.headers["content-length"]) > 0
        garbage = await request(port, "", raw=b"\x00\x01 nonsense\r\n\r\n")
        assert garbage.status == 400
        no_host = await request(port, "", raw=b"GET /healthz HTTP/1.1\r\n\r\n")
        assert no_host.status == 400  # HTTP/1.1 requires Host


async def test_oversize_head_is_431() -> None:
    async with running() as server:
        assert server.http_port is not None
        limit = _admin.LIMITS.max_head_bytes
        filler = b"X-Filler: " + b"y" * limit + b"\r\n"
        whole = b"GET /healthz HTTP/1.1\r\nHost: h\r\n" + filler + b"\r\n"
        assert (await request(server.http_port, "", raw=whole)).status == 431
        endless = b"GET /healthz HTTP/1.1\r\nHost: h\r\n" + filler  # no blank line
        assert (await request(server.http_port, "", raw=endless)).status == 431


async def test_slowloris_times_out_and_holds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_admin, "LIMITS", attrs.evolve(_admin.LIMITS, read_timeout=0.5))
    async with running() as server:
        port = server.http_port
        assert port is not None
        slow = await trio.open_tcp_stream("127.0.0.1", port)
        await slow.send_all(b"GET /healthz HTTP/1.1\r\nHost: h\r\n")  # and never the rest
        # meanwhile others are served
        assert (await request(port, "/healthz")).status == 200
        reply = parse_reply(await read_all(slow))
        assert reply.status == 408
        await slow.aclose()


async def test_concurrent_clients_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_admin, "LIMITS", attrs.evolve(_admin.LIMITS, max_clients=2))
    async with running() as server:
        port = server.http_port
        assert port is not None
        holders = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        for holder in holders:
            await holder.send_all(b"GET /healthz HTTP/1.1\r\n")  # unfinished: held
        refused = await request(port, "/healthz")
        assert refused.status == 503
        assert refused.json() == {"error": "Too many HTTP clients"}
        # the held ones finish their requests and get answers; then there is room again
        for holder in holders:
            await holder.send_all(b"Host: h\r\n\r\n")
            assert parse_reply(await read_all(holder)).status == 200
            await holder.aclose()
        assert (await request(port, "/healthz")).status == 200


async def test_http_clients_do_not_hold_up_the_stop() -> None:
    """With no connection left, a shutdown ends the HTTP port at once, even with a
    client in the middle of its request (the read timeout is 10 s)."""
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, make_config(http_port=0))
        assert server.http_port is not None
        slow = await trio.open_tcp_stream("127.0.0.1", server.http_port)
        await slow.send_all(b"GET /healthz HTTP/1.1\r\n")
        assert (await request(server.http_port, "/healthz")).status == 200  # accepted
        server.shutdown()
        with trio.fail_after(_admin.LIMITS.read_timeout / 2):
            await server.stopped.wait()
        assert await read_all(slow) == b""  # closed without an answer
        await slow.aclose()


async def test_http_port_off_by_default() -> None:
    async with running(http_port=None) as server:
        assert server.http_port is None and server.http_listeners == []


async def test_work_queues_in_stats_topics_and_metrics() -> None:
    """Queue depth, in flight, redeliveries and dead letters (issue 14, point 6)."""
    async with running(max_deliveries=1) as server:
        producer = await LineClient.connect(server.port)
        worker = await LineClient.connect(server.port)
        job = {"command": "send", "topic": "jobs", "msg": "j", "delivery": "one", "ack": True}
        for i in range(3):
            assert (await producer.request(job))["index"] == i
        await worker.send({"command": "subscribe", "topic": "jobs", "ack": True,
                           "prefetch": 2})
        got = await worker.receive_many(3)
        assert [m.get("index") for m in got[1:]] == [0, 1]
        assert await worker.request({"command": "ack", "topic": "jobs", "index": 0}) == {
            "success": True}
        assert (await worker.receive())["index"] == 2
        # job 1 comes back once (nack) and, out of deliveries, goes to $dead.jobs
        assert await worker.request({"command": "nack", "topic": "jobs", "index": 1}) == {
            "success": True}
        stats = await get_json(server, "/stats")
        assert stats["jobs"] == {
            "queues": 2, "jobs": 2, "in_flight": 1, "bytes": stats["jobs"]["bytes"],
            "delivered": 3, "redelivered": 0, "acked": 1, "dead_lettered": 1,
            "dead_letters_dropped": 0, "message_ids": 0,
        }
        topics = await get_json(server, "/topics?prefix=")
        rows = {row["topic"]: row for row in topics["topics"]}
        assert rows["jobs"]["jobs"] == {
            "waiting": 0, "in_flight": 1, "delayed": 0, "consumers": 1,
            "bytes": rows["jobs"]["jobs"]["bytes"], "delivered": 3, "redelivered": 0,
            "acked": 1, "dead_lettered": 1,
        }
        assert rows["$dead.jobs"]["jobs"]["waiting"] == 1
        out = await scrape(server)
        assert out.value("mq_trio_jobs") == 2
        assert out.value("mq_trio_jobs_in_flight") == 1
        assert out.value("mq_trio_jobs_acked_total") == 1
        assert out.value("mq_trio_dead_letters_total") == 1
