"""The ``queue`` bench scenario: acknowledged jobs against mq-trio and Redis Streams.

Runs are a fraction of a second and assert on accounting, never on speed: every job a
producer had accepted was acknowledged exactly once, and the server agrees afterwards
(mq-trio: nothing left to deliver, the next index is the number of jobs accepted; Redis:
the stream's length, nothing pending in the group). The servers are subprocesses (the
generator forks workers and must not share a thread with trio); Redis only where
redis-server is installed (bench/queue_compare.sh installs it).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from mq_trio.benchmark import report
from mq_trio.benchmark.dialects import MQ, resp_command
from mq_trio.benchmark.queue import (
    GROUP,
    MQConsumer,
    ProducerReplies,
    RedisConsumer,
    auto_backlog,
    job_template,
    run_queue,
)
from mq_trio.benchmark.scenarios import BenchError, Result, Settings, Target
from mq_trio.cli import main

QUICK = Settings(duration=0.4, window=20, producers=2, consumers=2, prefetch=10,
                 stall_timeout=10)


def assert_accounted(r: Result) -> None:
    """What every run must show: jobs flowed, and each accepted job was acked once."""
    assert r.ok, r.errors
    m = r.metrics
    assert m["sent"] > 0 and m["accepted"] == m["sent"] == m["acked"]
    assert 0 < m["acked_in_window"] <= m["acked"]
    assert m["per_s"] == round(m["acked_in_window"] / QUICK.duration)
    assert m["n"] > 0 and 0 < m["p50_us"] <= m["p99_us"] <= m["max_us"]
    assert r.server_cpu_pct is not None and r.server_cpu_pct > 0
    assert r.gen_cpu_pct is not None and r.gen_cpu_pct > 0


# --- against servers ---------------------------------------------------------------------


def lines(sock: socket.socket, n: int) -> list[bytes]:
    buf = b""
    while buf.count(b"\n") < n:
        data = sock.recv(1 << 16)
        assert data, "connection closed"
        buf += data
    return buf.splitlines()


def test_mq_every_job_acked_once(mq: Target) -> None:
    topic = f"bench.queue.test.{time.monotonic_ns()}"
    r = run_queue(mq, QUICK, topic=topic)
    assert_accounted(r)
    assert r.params == {"producers": 2, "consumers": 2, "prefetch": 10, "window": 20,
                        "backlog": auto_backlog(QUICK), "size": 64, "server": "mq"}
    # The server's side: a new consumer gets nothing (an unacknowledged job would be
    # delivered to it), and the next job's index is the number accepted (0, 1, ...).
    with socket.create_connection((mq.host, mq.port), timeout=5) as sock:
        sock.sendall(b'{"command": "subscribe", "topic": "%b", "ack": true, "prefetch": 1000}\n'
                     % topic.encode())
        assert json.loads(lines(sock, 1)[0]) == {"success": True}
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1 << 16)
        sock.settimeout(5)
        sock.sendall(b'{"command": "send", "topic": "%b", "msg": "last", "delivery": "one",'
                     b' "ack": true}\n' % topic.encode())
        replies = [json.loads(x) for x in lines(sock, 2)]
    assert {"success": True, "index": r.metrics["accepted"]} in replies


def test_mq_one_producer_one_consumer_prefetch_one(mq: Target) -> None:
    st = Settings(duration=0.3, window=5, producers=1, consumers=1, prefetch=1,
                  stall_timeout=10)
    r = run_queue(mq, st)
    assert r.ok, r.errors
    assert r.metrics["acked"] == r.metrics["accepted"] > 0


def test_redis_streams_every_entry_acked_once(redis: Target) -> None:
    stream = f"bench.queue.test.{time.monotonic_ns()}"
    r = run_queue(redis, QUICK, topic=stream)
    assert_accounted(r)
    assert r.params["server"] == "redis"
    with socket.create_connection((redis.host, redis.port), timeout=5) as sock:
        sock.sendall(resp_command("XLEN", stream))
        assert lines(sock, 1) == [b":%d" % r.metrics["accepted"]]
        sock.sendall(resp_command("XPENDING", stream, GROUP))
        assert lines(sock, 5)[:2] == [b"*4", b":0"]  # nothing delivered and not acked
        sock.sendall(resp_command("DEL", stream))
        assert lines(sock, 1) == [b":1"]


def test_redis_stream_dropped_after_a_default_run(redis: Target) -> None:
    with socket.create_connection((redis.host, redis.port), timeout=5) as sock:
        sock.sendall(resp_command("DBSIZE"))
        before = lines(sock, 1)
        r = run_queue(redis, Settings(duration=0.2, window=10, producers=1, consumers=1,
                                      prefetch=5, stall_timeout=10))
        assert r.ok, r.errors
        sock.sendall(resp_command("DBSIZE"))
        assert lines(sock, 1) == before


def test_nobody_listening_is_an_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises((BenchError, OSError)):
        run_queue(Target("nobody", "127.0.0.1", port, MQ), QUICK)


def test_cli_queue_names_only(mq: Target, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q.jsonl"
    argv = ["bench", "queue", "--port", str(mq.port), "--server-pid", str(mq.pid),
            "--duration", "0.3", "--window", "20", "--producers", "1", "--consumers", "3",
            "--prefetch", "7", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    (record,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert record["ok"] and record["scenario"] == "queue"
    assert record["params"]["consumers"] == 3 and record["params"]["prefetch"] == 7
    assert "acked jobs/s" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(["bench", "queue", "--consumers", "0", "--no-progress"])
    assert refused.value.code == 2


# --- the generator's parsing, chunk boundaries anywhere ---------------------------------


def mq_delivery(topic: str, stamp: int, index: int, deliveries: int = 1) -> bytes:
    return (b'{"command": "send", "topic": "%b", "msg": "%020dxx", "delivery": "one", '
            b'"ack": true, "index": %d, "deliveries": %d}\r\n'
            % (topic.encode(), stamp, index, deliveries))


def feed_split(consumer: MQConsumer | RedisConsumer, stream: bytes, at: int
               ) -> tuple[list[bytes], bytes]:
    stamps_a, out_a = consumer.feed(stream[:at])
    stamps_b, out_b = consumer.feed(stream[at:])
    return stamps_a + stamps_b, out_a + out_b


def test_mq_consumer_acks_each_delivery_wherever_the_chunks_split() -> None:
    stream = (mq_delivery("q", 11, 0) + b'{"success": true}\r\n' + mq_delivery("q", 22, 1)
              + b'{"success": false, "reason": "Unknown job"}\r\n'
              + mq_delivery("q", 33, 2, deliveries=2))
    for at in range(len(stream) + 1):
        c = MQConsumer("q", 10)
        stamps, out = feed_split(c, stream, at)
        assert stamps == [b"%020d" % s for s in (11, 22, 33)]
        assert [json.loads(x) for x in out.splitlines()] == [
            {"command": "ack", "topic": "q", "index": i} for i in (0, 1, 2)]
        assert (c.acked, c.failed, c.redelivered, c.index_sum) == (1, 1, 1, 3)


def redis_batch(stream: bytes, entries: list[tuple[bytes, int]]) -> bytes:
    out = b"*1\r\n*2\r\n$%d\r\n%b\r\n*%d\r\n" % (len(stream), stream, len(entries))
    for entry_id, stamp in entries:
        msg = b"%020dxxxx" % stamp
        out += b"*2\r\n$%d\r\n%b\r\n*2\r\n$1\r\nm\r\n$%d\r\n%b\r\n" % (
            len(entry_id), entry_id, len(msg), msg)
    return out


def test_redis_consumer_acks_each_entry_and_reads_on_after_a_whole_batch() -> None:
    ids = [b"1700000000000-0", b"1700000000000-1", b"1700000000001-0"]
    stream = (redis_batch(b"s", [(ids[0], 5), (ids[1], 6)]) + b":1\r\n:1\r\n"
              + redis_batch(b"s", [(ids[2], 7)]) + b":0\r\n")
    for at in range(len(stream) + 1):
        c = RedisConsumer("s", "c0", 2)
        stamps, out = feed_split(c, stream, at)
        assert stamps == [b"%020d" % s for s in (5, 6, 7)]
        acks = b"".join(resp_command("XACK", "s", GROUP, i.decode()) for i in ids[:2])
        # after each whole batch (and only then): the next XREADGROUP
        assert out == acks + c.read + resp_command("XACK", "s", GROUP, ids[2].decode()) + c.read
        assert (c.acked, c.failed) == (2, 1)


def test_redis_consumer_error_is_fatal() -> None:
    c = RedisConsumer("s", "c0", 2)
    with pytest.raises(BenchError, match="NOGROUP"):
        c.feed(b"-NOGROUP No such key 's' or consumer group 'bench'\r\n")
    with pytest.raises(BenchError, match="unexpected"):  # a reply the consumer never asks for
        RedisConsumer("s", "c0", 2).feed(b"+OK\r\n")
    with pytest.raises(BenchError, match="unexpected"):  # no entry is that long
        RedisConsumer("s", "c0", 2, size=10).feed(b"*" + b"x" * ((1 << 20) + 100))


def test_producer_replies() -> None:
    mq_replies = b'{"success": true, "index": 0}\r\n{"success": false, "reason": "Queue full"}\r\n'
    for at in range(len(mq_replies) + 1):
        p = ProducerReplies("mq")
        p.feed(mq_replies[:at])
        p.feed(mq_replies[at:])
        assert (p.replies, p.errors) == (2, 1)
    p = ProducerReplies("redis")
    p.feed(b"$15\r\n1700000000000-0\r\n$15\r\n17000000")
    p.feed(b"00000-1\r\n")
    assert (p.replies, p.errors) == (2, 0)
    with pytest.raises(BenchError, match="OOM"):
        ProducerReplies("redis").feed(b"-OOM command not allowed\r\n")
    with pytest.raises(BenchError, match="ERR"):
        q = ProducerReplies("redis")
        q.feed(b"$3\r\n1-0\r\n")
        q.feed(b"-ERR x\r\n")


def test_job_templates_carry_the_stamp_where_the_consumers_look() -> None:
    mq_job = job_template("mq", "q", 64).chunk(2, 123)
    (line, _, _) = mq_job.partition(b"\n")
    assert json.loads(line) == {"command": "send", "topic": "q", "msg": f"{123:020d}" + "x" * 44,
                                "delivery": "one", "ack": True}
    assert mq_job == line + b"\n" + line + b"\n"
    assert job_template("redis", "s", 10).chunk(1, 9) == resp_command(
        "XADD", "s", "*", "m", f"{9:020d}")  # at least 20 characters: the stamp


# --- the comparison table ------------------------------------------------------------------


def queue_result(target: str, server: str, per_s: int, ok: bool = True) -> Result:
    return Result(target, "queue", {"server": server},
                  {"per_s": per_s, "p50_us": 900.0, "p99_us": 12_500.0},
                  errors=[] if ok else ["stalled"])


def test_queue_summary_pairs_each_mq_run_with_the_redis_run_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = [
        queue_result("redis memory", "redis", 100_000),
        queue_result("mq-trio memory", "mq", 60_000),
        queue_result("redis aof", "redis", 80_000),
        queue_result("mq-trio --data-dir", "mq", 20_000),
    ]
    rows = report.queue_rows(results)
    assert [(r[0], r[4], r[8], r[9]) for r in rows] == [
        ("redis memory", "mq-trio memory", "0.60x", "met"),
        ("redis aof", "mq-trio --data-dir", "0.25x", "NOT met"),
    ]
    assert rows[0][2:4] == ("900 µs", "12.5 ms")
    path = tmp_path / "q.jsonl"
    with path.open("w") as f:
        report.write_json_lines(results, f)
    assert report.queue_summary_main([str(path), "--markdown"]) == 0
    assert "| redis aof | 80,000 |" in capsys.readouterr().out
    failed = [results[0], queue_result("mq-trio memory", "mq", 0, ok=False)]
    assert "stalled" in report.queue_rows(failed)[0][9]
    with path.open("w") as f:
        report.write_json_lines(failed, f)
    assert report.queue_summary_main([str(path)]) == 1
