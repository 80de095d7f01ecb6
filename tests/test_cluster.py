"""Cluster mode (issue #15, docs/cluster.md): several nodes over one real redis-server.

Nodes run in-process (``serve(cluster=...)``) unless a test kills one, which then runs as
its own ``mq-trio serve`` process. Replies are the synchronisation points; a barrier
(``settle``) is a subscribe, whose reply comes once its node delivered everything Redis
had before it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from support import LineClient, start_server
from test_model import check_model

from mq_trio.client import open_client
from mq_trio.server import Server

if TYPE_CHECKING:
    from redis_support import RedisCluster, RedisProcess

pytest_plugins = ["redis_support"]
pytest.importorskip("hiredis", reason="the 'cluster' extra is not installed")

Obj = dict[str, Any]
SUCCESS: Obj = {"success": True}
GUARD = 60
BARRIER: Obj = {"command": "subscribe", "topic": "\x00barrier", "cache": False}


def send(topic: str, msg: str, delivery: str = "all", **extra: Any) -> Obj:
    return {"command": "send", "topic": topic, "msg": msg, "delivery": delivery, **extra}


async def settle(client: LineClient) -> list[Obj]:
    """Everything delivered to ``client`` from what Redis had before this call."""
    await client.send(BARRIER)
    out: list[Obj] = []
    while True:
        line = await client.receive()
        if line == SUCCESS:
            break
        out.append(line)
    await client.send({"command": "unsubscribe", "topic": "\x00never"})
    while True:
        line = await client.receive()
        if line == SUCCESS:
            return out
        out.append(line)


@pytest.fixture
async def nodes(nursery: trio.Nursery, fresh_redis: RedisProcess) -> AsyncIterator[list[Server]]:
    """Two nodes over one Redis (cache size 4)."""
    yield [await start_server(nursery, cluster=fresh_redis.url, cache_size=4)
           for _ in range(2)]


async def test_the_family_model_holds_with_clients_over_two_nodes(
        fresh_redis: RedisProcess) -> None:
    """The randomised differential test of docs/protocol.md, clients spread over two
    nodes (test_model.py's model, unchanged)."""
    for seed in (0, 1):
        await check_model(seed, cluster=fresh_redis.url)
        fresh_redis.cli("FLUSHALL")  # (the next run starts from an empty Redis)


async def test_one_index_sequence_and_fanout_across_nodes(nodes: list[Server]) -> None:
    with trio.fail_after(GUARD):
        subs = [await LineClient.connect(nodes[i % 2].port) for i in range(4)]
        for sub in subs:
            assert await sub.request({"command": "subscribe", "topic": "t"}) == SUCCESS
        pubs = [await LineClient.connect(node.port) for node in nodes]
        # Both nodes publish, interleaved and pipelined: one sequence of indexes.
        for i in range(50):
            await pubs[i % 2].send(send("t", f"m{i}"))
        for pub in pubs:
            assert [await pub.receive() for _ in range(25)] == [SUCCESS] * 25
        seen = [await settle(sub) for sub in subs]
        assert [d["index"] for d in seen[0]] == list(range(50))
        assert all(s == seen[0] for s in seen)  # same order everywhere
        assert sorted(d["msg"] for d in seen[0]) == sorted(f"m{i}" for i in range(50))


async def test_sender_gets_its_own_delivery_before_its_reply(nodes: list[Server]) -> None:
    with trio.fail_after(GUARD):
        other = await LineClient.connect(nodes[1].port)
        assert await other.request({"command": "subscribe", "topic": "t"}) == SUCCESS
        me = await LineClient.connect(nodes[0].port)
        assert await me.request({"command": "subscribe", "topic": "t"}) == SUCCESS
        commands = [send("t", f"m{i}") for i in range(30)]
        await me.send_raw(b"".join(json.dumps(c).encode() + b"\n" for c in commands))
        got = [await me.receive() for _ in range(60)]
        assert got == [x for i, c in enumerate(commands)
                       for x in ({**c, "index": i}, SUCCESS)]


async def test_one_goes_to_exactly_one_subscriber_cluster_wide(nodes: list[Server]) -> None:
    with trio.fail_after(GUARD):
        subs = [await LineClient.connect(nodes[i % 2].port) for i in range(4)]
        for sub in subs:
            assert await sub.request({"command": "subscribe", "topic": "jobs"}) == SUCCESS
        pub = await LineClient.connect(nodes[0].port)
        for i in range(200):
            await pub.send(send("jobs", f"j{i}", "one"))
        assert [await pub.receive() for _ in range(200)] == [SUCCESS] * 200
        got = [await settle(sub) for sub in subs]
        indexes = sorted(d["index"] for g in got for d in g)
        assert indexes == list(range(200))  # each exactly once
        assert all(len(g) > 10 for g in got), [len(g) for g in got]  # spread over both nodes


async def test_cache_replay_resume_and_epoch_on_another_node(nodes: list[Server]) -> None:
    with trio.fail_after(GUARD):
        pub = await LineClient.connect(nodes[0].port)
        for i in range(6):
            assert await pub.request(send("c", f"m{i}")) == SUCCESS
        assert await pub.request(send("c", "taken", "one")) == SUCCESS  # index 6, cached
        late = await LineClient.connect(nodes[1].port)
        reply = await late.request({"command": "subscribe", "topic": "c", "last_seen": 3,
                                    "epoch": ""})
        epoch = reply["epoch"]
        assert reply == {"success": True, "epoch": epoch, "recovered": False}
        assert epoch == nodes[0].broker.epoch == nodes[1].broker.epoch
        # cache size 4: indexes 3..6 are cached; after last_seen 3: 4, 5, 6 (the "one")
        assert [d["index"] for d in await settle(late)] == [4, 5, 6]
        again = await LineClient.connect(nodes[0].port)
        reply = await again.request({"command": "subscribe", "topic": "c", "last_seen": 5,
                                     "epoch": epoch})
        assert reply == {"success": True, "epoch": epoch, "recovered": True}
        assert await settle(again) == []  # the "one" left the cache with its replay


async def test_batches_and_ids_across_nodes(nodes: list[Server]) -> None:
    with trio.fail_after(GUARD):
        a = await LineClient.connect(nodes[0].port)
        b = await LineClient.connect(nodes[1].port)
        batch = {"command": "batch", "topic": "b", "msgs": ["x", "y", "z"],
                 "delivery": "all", "id": "batch-1"}
        assert await a.request(batch) == {"success": True, "index": 0, "count": 3}
        # The same id on the other node: the original's reply, nothing published again.
        assert await b.request(batch) == {"success": True, "index": 0, "count": 3,
                                          "duplicate": True}
        one = send("b", "w", id="msg-1")
        assert await b.request(one) == {"success": True, "index": 3}
        assert await a.request(one) == {"success": True, "index": 3, "duplicate": True}
        reader = await LineClient.connect(nodes[0].port)
        assert await reader.request({"command": "subscribe", "topic": "b"}) == SUCCESS
        assert [d["msg"] for d in await settle(reader)] == ["x", "y", "z", "w"]


async def test_a_batch_larger_than_the_cache_keeps_its_newest(nodes: list[Server]) -> None:
    """Cache size 4: a batch of 10 after 2 messages leaves indexes 8-11 cached, and
    everything up to 7 counts as evicted for the epoch extension."""
    with trio.fail_after(GUARD):
        pub = await LineClient.connect(nodes[0].port)
        for i in range(2):
            assert await pub.request(send("big", f"m{i}")) == SUCCESS
        batch = {"command": "batch", "topic": "big", "msgs": [f"b{i}" for i in range(10)],
                 "delivery": "all"}
        assert await pub.request(batch) == {"success": True, "index": 2, "count": 10}
        epoch = nodes[1].broker.epoch
        for last_seen, recovered in ((6, False), (7, True)):
            sub = await LineClient.connect(nodes[1].port)
            reply = await sub.request({"command": "subscribe", "topic": "big",
                                       "last_seen": last_seen, "epoch": epoch})
            assert reply == {"success": True, "epoch": epoch, "recovered": recovered}
            assert [d["msg"] for d in await settle(sub)] == [f"b{i}" for i in range(6, 10)]


async def test_a_client_that_pipelines_subscribes_without_reading_is_paused(
        nursery: trio.Nursery, fresh_redis: RedisProcess) -> None:
    """Pending subscribes count against the client's output budget: a client that
    writes 30,000 of them and reads nothing is paused, its node's queue for Redis stays
    small, and others are served meanwhile."""
    budget = 64 * 1024
    node = await start_server(nursery, cluster=fresh_redis.url, max_pending_bytes=budget,
                              max_line_bytes=1024)
    with trio.fail_after(GUARD):
        flood = await LineClient.connect(node.port)
        line = json.dumps({"command": "subscribe", "topic": "t", "cache": False}).encode()
        nursery.start_soon(flood.send_raw, b"\n".join([line] * 30_000) + b"\n")
        other = await LineClient.connect(node.port)
        for i in range(20):  # served throughout
            assert await other.request(send("u", f"m{i}")) == SUCCESS
            history = node.broker.history
            queued = len(history._ops) + len(history._in_flight)  # type: ignore[attr-defined]
            assert queued <= budget // 256 + 50
        assert all(c.outbox.pending <= budget for c in node.connections)


async def test_redis_down_sends_fail_subscribers_stay_and_service_resumes(
        nursery: trio.Nursery, fresh_redis: RedisProcess) -> None:
    with trio.fail_after(GUARD):
        node = await start_server(nursery, cluster=fresh_redis.url)
        sub = await LineClient.connect(node.port)
        assert await sub.request({"command": "subscribe", "topic": "t"}) == SUCCESS
        pub = await LineClient.connect(node.port)
        assert await pub.request(send("t", "before")) == SUCCESS
        assert [d["msg"] for d in await settle(sub)] == ["before"]
        await trio.to_thread.run_sync(fresh_redis.stop)
        unavailable = {"success": False, "reason": "Storage unavailable"}
        # Redis is gone: the send's write fails, and so does every send after it, at
        # once, until Redis is back.
        assert await pub.request(send("t", "lost")) == unavailable
        assert await pub.request(send("t", "lost again")) == unavailable
        assert not node.broker.history.stats().available
        await trio.to_thread.run_sync(fresh_redis.start)  # with its data (AOF off: none)
        while (reply := await pub.request(send("t", "after"))) != SUCCESS:
            assert reply == unavailable
            await trio.sleep(0.05)
        # The subscriber never left, and gets what was sent once Redis was back.
        got = await settle(sub)
        assert [d["msg"] for d in got][-1:] == ["after"]


async def test_redis_restarted_without_data_is_a_new_epoch(
        nursery: trio.Nursery, fresh_redis: RedisProcess) -> None:
    with trio.fail_after(GUARD):
        node = await start_server(nursery, cluster=fresh_redis.url)
        client = await LineClient.connect(node.port)
        assert await client.request(send("t", "m0")) == SUCCESS
        old = node.broker.epoch
        await trio.to_thread.run_sync(lambda: fresh_redis.restart(keep_data=False))
        while (reply := await client.request(send("t", "m1"))) != SUCCESS:
            assert reply == {"success": False, "reason": "Storage unavailable"}
            await trio.sleep(0.05)  # (the node reconnects by itself, with a backoff)
        assert node.broker.epoch != old
        resumed = await LineClient.connect(node.port)
        reply = await resumed.request({"command": "subscribe", "topic": "t", "last_seen": 0,
                                       "epoch": old})
        assert reply == {"success": True, "epoch": node.broker.epoch, "recovered": False}


def _node_process(redis: RedisProcess, port: int, *extra: str) -> subprocess.Popen[bytes]:
    return _node_process_url(redis.url, port, *extra)


async def _wait_listening(port: int) -> None:
    while True:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.05)
            continue
        await stream.aclose()
        return


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_killed_nodes_clients_resume_on_another_without_gap_or_duplicate(
        fresh_redis: RedisProcess) -> None:
    """Two nodes as processes; one is killed with SIGKILL under its client."""
    port, survivor_port = _free_port(), _free_port()
    doomed = _node_process(fresh_redis, port)
    survivor = _node_process(fresh_redis, survivor_port)
    try:
        with trio.fail_after(GUARD):
            await _wait_listening(port)
            await _wait_listening(survivor_port)
            targets = [f"127.0.0.1:{port}", f"127.0.0.1:{survivor_port}"]
            async with open_client(targets, reconnect=True, epoch=True) as client:
                await client.subscribe("t")
                pub = await LineClient.connect(survivor_port)
                for i in range(5):
                    assert await pub.request(send("t", f"m{i}")) == SUCCESS
                got = [(await client.receive()).index for _ in range(5)]
                doomed.send_signal(signal.SIGKILL)
                for i in range(5, 8):  # while the client is away
                    assert await pub.request(send("t", f"m{i}")) == SUCCESS
                got += [(await client.receive()).index for _ in range(3)]
                assert got == list(range(8))  # no gap, no duplicate
                assert client.gaps == []
                assert client.target is not None and client.target.port == survivor_port
    finally:
        for node in (doomed, survivor):
            node.kill()
            node.wait()


async def test_a_dead_nodes_counts_expire(nursery: trio.Nursery,
                                          fresh_redis: RedisProcess) -> None:
    """A node killed without a goodbye keeps its subscribers counted for "one" only
    until its lease ends (``--cluster-lease``); then "one" goes to the living."""
    live = await start_server(nursery, cluster=fresh_redis.url, cluster_lease=1.0)
    port = _free_port()
    doomed = _node_process(fresh_redis, port, "--cluster-lease", "1")
    try:
        with trio.fail_after(GUARD):
            await _wait_listening(port)
            ghost = await LineClient.connect(port)
            assert await ghost.request({"command": "subscribe", "topic": "w"}) == SUCCESS
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
            worker = await LineClient.connect(live.port)
            assert await worker.request({"command": "subscribe", "topic": "w"}) == SUCCESS
            pub = await LineClient.connect(live.port)
            await trio.sleep(1.2)  # the dead node's lease (1 s) runs out: no event for that
            for i in range(20):
                assert await pub.request(send("w", f"j{i}", "one")) == SUCCESS
            assert len(await settle(worker)) == 20
    finally:
        doomed.kill()
        doomed.wait()


# --- Redis Cluster: three masters, sharded pub/sub (redis+cluster://) ---


@pytest.fixture
async def sharded_nodes(nursery: trio.Nursery, redis_cluster: RedisCluster
                        ) -> AsyncIterator[list[Server]]:
    """Two nodes over a three-master Redis Cluster (a clean one: FLUSHALL each)."""
    for node in redis_cluster.nodes:
        node.cli("FLUSHALL")
    yield [await start_server(nursery, cluster=redis_cluster.url, cache_size=4)
           for _ in range(2)]


async def settle_topic(client: LineClient, topic: str) -> list[Obj]:
    """``settle`` for one topic: with Redis Cluster the channels are per slot, so the
    barrier is a subscribe to that topic itself (no replay)."""
    await client.send({"command": "subscribe", "topic": topic, "cache": False})
    out: list[Obj] = []
    while (line := await client.receive()) != SUCCESS:
        out.append(line)
    await client.send({"command": "unsubscribe", "topic": "\x00never"})
    while (line := await client.receive()) != SUCCESS:
        out.append(line)
    return out


async def test_redis_cluster_topics_in_every_shard(sharded_nodes: list[Server]) -> None:
    """Topics spread over the three masters: one index sequence each, fan-out across
    nodes in order, "one" exactly once, replay and resume on the other node."""
    with trio.fail_after(GUARD):
        a, b = sharded_nodes
        topics = [f"topic-{i}" for i in range(12)]  # (they land on all three masters)
        sub = await LineClient.connect(b.port)
        for topic in topics:
            assert await sub.request({"command": "subscribe", "topic": topic}) == SUCCESS
        pubs = [await LineClient.connect(a.port), await LineClient.connect(b.port)]
        for i in range(60):
            await pubs[i % 2].send(send(topics[i % 12], f"m{i}", "all" if i % 3 else "one"))
        for pub in pubs:
            assert [await pub.receive() for _ in range(30)] == [SUCCESS] * 30
        got: dict[str, list[int]] = {}
        for topic in topics:
            for delivery in await settle_topic(sub, topic):
                got.setdefault(delivery["topic"], []).append(delivery["index"])
        assert got == {topic: list(range(5)) for topic in topics}
        late = await LineClient.connect(a.port)
        # (topics[1] got m1, m13, m25, ...: all "all" messages, so all cached)
        reply = await late.request({"command": "subscribe", "topic": topics[1],
                                    "last_seen": 2, "epoch": a.broker.epoch})
        assert reply == {"success": True, "epoch": a.broker.epoch, "recovered": True}
        assert [d["index"] for d in await settle_topic(late, topics[1])] == [3, 4]
        assert a.broker.epoch == b.broker.epoch


async def test_redis_cluster_three_nodes_as_processes(redis_cluster: RedisCluster) -> None:
    """Three ``mq-trio serve --cluster redis+cluster://...`` processes: a message sent
    on each reaches the subscribers on all three, in one index order."""
    for node in redis_cluster.nodes:
        node.cli("FLUSHALL")
    ports = [_free_port() for _ in range(3)]
    procs = [_node_process_url(redis_cluster.url, port) for port in ports]
    try:
        with trio.fail_after(GUARD):
            for port in ports:
                await _wait_listening(port)
            subs = [await LineClient.connect(port) for port in ports]
            for sub in subs:
                assert await sub.request({"command": "subscribe", "topic": "t"}) == SUCCESS
            for i, port in enumerate(ports):
                pub = await LineClient.connect(port)
                assert await pub.request(send("t", f"from {i}")) == SUCCESS
            for sub in subs:
                got = await settle_topic(sub, "t")
                assert [(d["index"], d["msg"]) for d in got] == [
                    (0, "from 0"), (1, "from 1"), (2, "from 2")]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _node_process_url(url: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mq_trio", "serve", "--host", "127.0.0.1", "--port",
         str(port), "--cluster", url, "--log-level", "warning", *extra],
        cwd=Path(__file__).parent.parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})


# --- the command line ---


async def test_a_node_from_a_config_file(tmp_path: Path, fresh_redis: RedisProcess) -> None:
    """``cluster`` and ``cluster-lease`` from a config file: printed, and served."""
    port = _free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'port = {port}\ncluster = "{fresh_redis.url}"\ncluster-lease = 3.0\n')
    argv = [sys.executable, "-m", "mq_trio", "serve", "--config", str(config)]
    printed = await trio.run_process([*argv, "--print-config"], capture_stdout=True)
    shown = {line.split("=")[0].strip(): " ".join(line.split("=", 1)[1].split())
             for line in printed.stdout.decode().splitlines() if " = " in line}
    assert shown["cluster"] == f'"{fresh_redis.url}" # {config}'
    assert shown["cluster-lease"] == f"3.0 # {config}"
    proc = _popen([*argv, "--log-level", "warning"], tmp_path)
    try:
        with trio.fail_after(GUARD):
            await _wait_listening(port)
            client = await LineClient.connect(port)
            assert await client.request({"command": "subscribe", "topic": "t"}) == SUCCESS
            assert await client.request(send("t", "m")) == {
                "command": "send", "topic": "t", "msg": "m", "delivery": "all", "index": 0}
            assert await client.receive() == SUCCESS
    finally:
        proc.kill()
        proc.wait()


def _popen(argv: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, cwd=cwd)


@pytest.mark.parametrize(("args", "code", "says"), [
    (["--cluster", "http://127.0.0.1:6379"], 2, "--cluster: invalid Redis URL"),
    (["--cluster", "redis://127.0.0.1:6379", "--data-dir", "d"], 2,
     "--cluster and --data-dir do not combine"),
    (["--cluster", "redis://127.0.0.1:6379", "--cluster-lease", "0"], 2,
     "cluster lease must be > 0"),
])
def test_serve_refuses_cluster_settings_that_cannot_work(
        tmp_path: Path, args: list[str], code: int, says: str) -> None:
    done = subprocess.run([sys.executable, "-m", "mq_trio", "serve", "--port", "0", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == code
    assert says in done.stderr


def test_a_node_without_redis_does_not_start(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{_free_port()}"  # nothing listens there
    done = subprocess.run([sys.executable, "-m", "mq_trio", "serve", "--port", "0",
                           "--cluster", url], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert f"mq-trio: cannot use Redis at {url}: " in done.stderr


# --- acknowledged jobs across nodes (docs/protocol.md "Acknowledged jobs") ---


def job(topic: str, msg: str, **extra: Any) -> Obj:
    return send(topic, msg, "one", ack=True, **extra)


async def consume(client: LineClient, topic: str, prefetch: int) -> None:
    assert await client.request({"command": "subscribe", "topic": topic, "ack": True,
                                 "prefetch": prefetch}) == SUCCESS


@pytest.fixture
async def job_nodes(nursery: trio.Nursery, fresh_redis: RedisProcess
                    ) -> AsyncIterator[list[Server]]:
    """Two nodes with a short ack timeout and three deliveries at most."""
    yield [await start_server(nursery, cluster=fresh_redis.url, ack_timeout=1.0,
                              max_deliveries=3, max_queue_jobs=50)
           for _ in range(2)]


async def test_jobs_go_to_consumers_on_every_node_once(job_nodes: list[Server]) -> None:
    with trio.fail_after(GUARD):
        producer = await LineClient.connect(job_nodes[0].port)
        for i in range(40):
            assert await producer.request(job("work", f"j{i}")) == {
                "success": True, "index": i}
        workers = [await LineClient.connect(node.port) for node in job_nodes]
        done: dict[int, int] = {}
        all_done = trio.Event()

        async def work(n: int, worker: LineClient) -> None:
            await consume(worker, "work", 3)
            while True:  # deliveries and ack replies interleave: both are read here
                line = await worker.receive()
                if line == SUCCESS:
                    continue
                assert line["deliveries"] == 1 and line["index"] not in done
                done[line["index"]] = n
                if len(done) == 40:
                    all_done.set()
                await worker.send({"command": "ack", "topic": "work", "index": line["index"]})

        async with trio.open_nursery() as tasks:
            for n, worker in enumerate(workers):
                tasks.start_soon(work, n, worker)
            await all_done.wait()
            tasks.cancel_scope.cancel()
        assert sorted(done) == list(range(40))
        assert set(done.values()) == {0, 1}  # both nodes' consumers took some


async def test_prefetch_holds_across_nodes_and_acks_make_room(job_nodes: list[Server]) -> None:
    with trio.fail_after(GUARD):
        producer = await LineClient.connect(job_nodes[0].port)
        for i in range(5):
            assert (await producer.request(job("p", f"j{i}")))["success"]
        worker = await LineClient.connect(job_nodes[1].port)
        await consume(worker, "p", 2)
        first = [await worker.receive() for _ in range(2)]
        assert [d["index"] for d in first] == [0, 1]
        assert await settle(worker) == []  # no third while two are held
        await worker.send({"command": "ack", "topic": "p", "index": 0})
        assert await worker.receive() == SUCCESS
        assert (await worker.receive())["index"] == 2


async def test_a_departed_consumers_jobs_go_to_another_node(job_nodes: list[Server]) -> None:
    with trio.fail_after(GUARD):
        producer = await LineClient.connect(job_nodes[0].port)
        for i in range(3):
            assert (await producer.request(job("d", f"j{i}")))["success"]
        leaving = await LineClient.connect(job_nodes[0].port)
        await consume(leaving, "d", 5)
        assert [(await leaving.receive())["index"] for _ in range(3)] == [0, 1, 2]
        staying = await LineClient.connect(job_nodes[1].port)
        await consume(staying, "d", 5)
        await leaving.aclose()
        got = [await staying.receive() for _ in range(3)]
        assert [(d["index"], d["deliveries"]) for d in got] == [(0, 2), (1, 2), (2, 2)]


async def test_unacknowledged_jobs_come_back_then_die_into_the_dead_letter_topic(
        job_nodes: list[Server]) -> None:
    """ack timeout 1 s, 3 deliveries at most: a job never acknowledged is delivered three
    times, then moves to ``$dead.<topic>`` (consumed on the other node)."""
    with trio.fail_after(GUARD):
        producer = await LineClient.connect(job_nodes[0].port)
        assert (await producer.request(job("slow", "never done")))["success"]
        sleeper = await LineClient.connect(job_nodes[0].port)
        await consume(sleeper, "slow", 1)
        graveyard = await LineClient.connect(job_nodes[1].port)
        await consume(graveyard, "$dead.slow", 1)
        counts = [(await sleeper.receive())["deliveries"] for _ in range(3)]
        assert counts == [1, 2, 3]
        dead = await graveyard.receive()
        assert (dead["topic"], dead["msg"], dead["from_topic"], dead["from_index"]) == (
            "$dead.slow", "never done", "slow", 0)


async def test_nack_with_a_delay_and_progress(job_nodes: list[Server]) -> None:
    with trio.fail_after(GUARD):
        producer = await LineClient.connect(job_nodes[0].port)
        assert (await producer.request(job("n", "again")))["success"]
        worker = await LineClient.connect(job_nodes[1].port)
        await consume(worker, "n", 1)
        assert (await worker.receive())["deliveries"] == 1
        assert await worker.request({"command": "nack", "topic": "n", "index": 0,
                                     "delay": 0.3}) == SUCCESS
        again = await worker.receive()
        assert (again["index"], again["deliveries"]) == (0, 2)
        assert await worker.request({"command": "progress", "topic": "n", "index": 0}) == SUCCESS
        assert await worker.request({"command": "ack", "topic": "n", "index": 0}) == SUCCESS
        assert await worker.request({"command": "ack", "topic": "n", "index": 0}) == {
            "success": False, "reason": "Unknown job"}


async def test_a_full_queue_refuses_and_loses_nothing(job_nodes: list[Server]) -> None:
    with trio.fail_after(GUARD):
        producer = await LineClient.connect(job_nodes[1].port)
        batch = {"command": "batch", "topic": "f", "msgs": [f"j{i}" for i in range(50)],
                 "delivery": "one", "ack": True}
        assert await producer.request(batch) == {"success": True, "index": 0, "count": 50}
        assert await producer.request(job("f", "one more")) == {
            "success": False, "reason": "Queue full"}
        worker = await LineClient.connect(job_nodes[0].port)
        await consume(worker, "f", 100)
        assert [(await worker.receive())["index"] for _ in range(50)] == list(range(50))


async def test_a_killed_nodes_jobs_are_taken_back_by_another(
        nursery: trio.Nursery, fresh_redis: RedisProcess) -> None:
    """A node killed with jobs held: once their claims end (ack timeout 1 s, plus as
    much), the other node's consumer gets them, marked as redelivered."""
    survivor = await start_server(nursery, cluster=fresh_redis.url, ack_timeout=1.0)
    port = _free_port()
    doomed = _node_process(fresh_redis, port, "--ack-timeout", "1")
    try:
        with trio.fail_after(GUARD):
            await _wait_listening(port)
            producer = await LineClient.connect(survivor.port)
            for i in range(2):
                assert (await producer.request(job("k", f"j{i}")))["success"]
            victim = await LineClient.connect(port)
            await consume(victim, "k", 5)
            assert [(await victim.receive())["index"] for _ in range(2)] == [0, 1]
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
            heir = await LineClient.connect(survivor.port)
            await consume(heir, "k", 5)
            got = [await heir.receive() for _ in range(2)]
            assert [(d["index"], d["deliveries"]) for d in got] == [(0, 2), (1, 2)]
    finally:
        doomed.kill()
        doomed.wait()


async def test_the_protocol_and_client_suites_pass_against_a_node(
        fresh_redis: RedisProcess) -> None:
    """tests/test_tcp.py (docs/protocol.md over real sockets) and tests/test_client.py,
    with their ``server`` fixture a cluster node ($MQ_TRIO_TEST_CLUSTER, conftest.py)."""
    root = Path(__file__).parent.parent
    done = await trio.run_process(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_tcp.py", "tests/test_client.py"],
        cwd=root, env={**os.environ, "MQ_TRIO_TEST_CLUSTER": fresh_redis.url},
        capture_stdout=True, capture_stderr=True, check=False)
    out = done.stdout.decode()
    assert done.returncode == 0, out[-3000:]
    assert " passed" in out and "failed" not in out and "skipped" not in out


async def test_a_node_over_tls_to_redis(tmp_path: Path) -> None:
    """``rediss://``: the node verifies Redis's certificate against the system's CAs
    (here the test CA, through OpenSSL's $SSL_CERT_FILE) and works as over plain TCP."""
    trustme = pytest.importorskip("trustme")
    from redis_support import start_tls_redis

    ca = trustme.CA()
    redis, tls_port = await trio.to_thread.run_sync(start_tls_redis, tmp_path / "tls", ca)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    port = _free_port()
    node = await trio.to_thread.run_sync(lambda: subprocess.Popen(
        [sys.executable, "-m", "mq_trio", "serve", "--port", str(port), "--cluster",
         f"rediss://127.0.0.1:{tls_port}", "--log-level", "warning"],
        cwd=tmp_path, env={**os.environ, "SSL_CERT_FILE": str(ca_file)}))
    try:
        with trio.fail_after(GUARD):
            await _wait_listening(port)
            client = await LineClient.connect(port)
            assert await client.request({"command": "subscribe", "topic": "t"}) == SUCCESS
            assert await client.request(send("t", "secret")) == {**send("t", "secret"),
                                                                  "index": 0}
            assert await client.receive() == SUCCESS
        # Without the CA, the certificate is not trusted: the node does not start.
        refused = await trio.run_process(
            [sys.executable, "-m", "mq_trio", "serve", "--port", "0", "--cluster",
             f"rediss://127.0.0.1:{tls_port}"], cwd=tmp_path, capture_stderr=True,
            check=False, env={k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"})
        assert refused.returncode == 1
        assert b"cannot use Redis at rediss://" in refused.stderr
    finally:
        node.kill()
        node.wait()
        redis.stop()


async def test_a_cut_channel_is_resubscribed_and_what_passed_meanwhile_delivered(
        nodes: list[Server], fresh_redis: RedisProcess) -> None:
    """Redis drops node A's pub/sub connection (as its output limit would): A
    resubscribes by itself and delivers, from the cache, what node B sent meanwhile."""
    with trio.fail_after(GUARD):
        a, b = nodes
        sub = await LineClient.connect(a.port)
        assert await sub.request({"command": "subscribe", "topic": "t"}) == SUCCESS
        pub = await LineClient.connect(b.port)
        assert await pub.request(send("t", "before")) == SUCCESS
        assert [d["msg"] for d in await settle(sub)] == ["before"]
        # A's frames connection (named after its node), paused for a moment: what B sends
        # meanwhile is not in what A receives after it is back.
        node = a.broker.history.node  # type: ignore[attr-defined]
        frames = [line for line in fresh_redis.cli("CLIENT", "LIST").splitlines()
                  if f"name=mq-trio:{node}:frames" in line]
        assert len(frames) == 1
        client_id = frames[0].split("id=")[1].split()[0]
        fresh_redis.cli("CLIENT", "KILL", "ID", client_id)
        for i in range(3):  # accepted by B, whose channel is fine
            assert await pub.request(send("t", f"during {i}")) == SUCCESS
        got: list[Obj] = []
        while True:  # A takes no subscribe until its channel is back (with a backoff)
            await sub.send(BARRIER)
            while "success" not in (line := await sub.receive()):
                got.append(line)
            if line == SUCCESS:
                break
            assert line == {"success": False, "reason": "Storage unavailable"}
            await trio.sleep(0.05)
        got += await settle(sub)
        assert [d["msg"] for d in got] == [f"during {i}" for i in range(3)]
        assert [d["index"] for d in got] == [1, 2, 3]


async def test_a_flood_is_taken_in_without_the_channel_being_cut(
        nursery: trio.Nursery, nodes: list[Server]) -> None:
    """100,000 pipelined sends on node A to a subscriber on node B: all arrive, in
    order, and neither node's frames channel was cut off by Redis (its output buffer
    limit for pub/sub clients) along the way."""
    a, b = nodes
    total = 100_000
    with trio.fail_after(GUARD * 2):
        sub = await LineClient.connect(b.port)
        assert await sub.request({"command": "subscribe", "topic": "flood"}) == SUCCESS
        pub = await LineClient.connect(a.port)
        line = json.dumps(send("flood", "x" * 64)).encode() + b"\n"

        async def produce() -> None:
            for _ in range(0, total, 10_000):
                await pub.send_raw(line * 10_000)

        async def drain_replies() -> None:
            replies = 0
            while replies < total:
                replies += (await pub.stream.receive_some(1 << 20)).count(b"\r\n")

        nursery.start_soon(produce)
        nursery.start_soon(drain_replies)
        expected = 0
        while expected < total:
            delivery = await sub.receive()
            assert delivery["index"] == expected
            expected += 1
    assert a.broker.history.subscriptions == b.broker.history.subscriptions == 1  # type: ignore[attr-defined]


async def test_a_shard_that_lost_its_data_moves_the_cluster_to_a_new_epoch(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """A Redis Cluster master restarted without its data (no persistence here): its
    slots' copies of the epoch are gone; the first node to notice moves every slot to
    a new epoch, the other node follows, and resuming clients learn of the gap."""
    from redis_support import start_cluster

    cluster = await trio.to_thread.run_sync(start_cluster, tmp_path / "rc")
    try:
        with trio.fail_after(GUARD * 2):
            a, b = [await start_server(nursery, cluster=cluster.url, cache_size=4)
                    for _ in range(2)]
            old = a.broker.epoch
            assert b.broker.epoch == old
            topics = [f"topic-{i}" for i in range(12)]  # (on all three masters)
            pub = await LineClient.connect(a.port)
            for topic in topics:
                assert await pub.request(send(topic, "before")) == SUCCESS
            await trio.to_thread.run_sync(cluster.nodes[1].restart)
            for topic in topics:  # each until its master and the node's links are back
                while (reply := await pub.request(send(topic, "after"))) != SUCCESS:
                    assert reply == {"success": False, "reason": "Storage unavailable"}
                    await trio.sleep(0.1)
            assert a.broker.epoch != old
            # Node B learns it from its next scripts (once its own link to the restarted
            # master is back: until then, Storage unavailable).
            new = a.broker.epoch
            resumed = await LineClient.connect(b.port)
            unavailable = {"success": False, "reason": "Storage unavailable"}
            subscribe = {"command": "subscribe", "topic": topics[0], "last_seen": 0,
                         "epoch": old, "cache": False}
            while (reply := await resumed.request(subscribe)) != {
                    "success": True, "epoch": new, "recovered": False}:
                assert reply == unavailable or reply["epoch"] == old, reply
                await trio.sleep(0.1)
            while b.broker.epoch != new:  # (B rereads it before its next flush)
                await resumed.request(subscribe)
                await trio.sleep(0.1)
    finally:
        await trio.to_thread.run_sync(cluster.stop)
