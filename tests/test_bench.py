"""The bench tool itself: every scenario runs briefly and reports consistent numbers.

Nothing here asserts on speed; the benchmarks are run by hand (bench/compare.sh).
The server runs in a subprocess (``mq-trio serve``) because the generator is plain
blocking-socket code with worker processes, which must not share a thread with trio.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import attrs
import pytest

from mq_trio.benchmark import report
from mq_trio.benchmark.dialects import (
    MQ,
    REDIS,
    REDIS_STREAM,
    StampReader,
    TokenCounter,
    resp_command,
)
from mq_trio.benchmark.scenarios import (
    Result,
    Settings,
    Target,
    latency_summary,
    run_conns,
    run_e2e,
    run_fanout,
    run_publish,
    run_rtt,
)
from mq_trio.cli import main

QUICK = Settings(duration=0.3, window=64, rate=2000, conns=40, procs=2, stall_timeout=10)


def assert_latencies(r: Result) -> None:
    m = r.metrics
    assert m["n"] > 0
    assert 0 < m["p50_us"] <= m["p90_us"] <= m["p99_us"] <= m["p999_us"] <= m["max_us"]
    assert len(r.samples_us) == m["n"]


# /proc counts CPU time in clock ticks: a figure over a 0.3 s run may be off by a few %
CPU_SLACK_PCT = 100 * 2 / (os.sysconf("SC_CLK_TCK") * QUICK.duration)


def assert_cpu(r: Result, generator_processes: int = 1) -> None:
    # both sides did real work during the run, and no more than their processes can
    assert r.gen_cpu_pct is not None
    assert 0 < r.gen_cpu_pct <= 100 * generator_processes + CPU_SLACK_PCT, r.gen_cpu_pct
    assert r.server_cpu_pct is not None  # the server is one trio thread
    assert 0 < r.server_cpu_pct <= 100 + CPU_SLACK_PCT, r.server_cpu_pct


class TopicCounter:
    """Counts, from the server's side, the messages published to a topic meanwhile: a
    subscriber of its own (no cache), read in a thread up to a marker sent at the end."""

    def __init__(self, target: Target, topic: str) -> None:
        self.target = target
        self.topic = topic
        self.marker = f"end of count {time.monotonic_ns()}"
        self.sock = socket.create_connection((target.host, target.port), timeout=30)
        self.buffer = b""
        self.counted: int | None = None
        self.sock.sendall(self.command("subscribe", cache=False))
        assert json.loads(self.readline()) == {"success": True}
        self.reader = threading.Thread(target=self.read_to_marker, daemon=True)
        self.reader.start()

    def command(self, command: str, **extra: object) -> bytes:
        obj = {"command": command, "topic": self.topic, **extra}
        return json.dumps(obj).encode() + b"\n"

    def readline(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("the server closed the counting subscriber")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def read_to_marker(self) -> None:
        # as fast as the publishers (or the server cuts this reader off): count line ends,
        # and stop once the marker's line, the last one, is complete
        marker = json.dumps(self.marker).encode()
        lines = self.buffer.count(b"\r\n")
        tail = self.buffer
        while not (marker in tail and tail.endswith(b"\r\n")):
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("the server closed the counting subscriber")
            lines += data.count(b"\r\n")
            tail = tail[-len(marker) - 200:] + data
        self.counted = lines - 1

    def count(self) -> int:
        with socket.create_connection((self.target.host, self.target.port), timeout=30) as s:
            s.sendall(self.command("send", msg=self.marker, delivery="all", cache=False))
            assert s.recv(100) == b'{"success": true}\r\n'
        self.reader.join(timeout=30)
        self.sock.close()
        assert self.counted is not None, "the counting subscriber did not see the marker"
        return self.counted


# --- scenarios against mq-trio --------------------------------------------------------


def test_rtt(mq: Target) -> None:
    counter = TopicCounter(mq, "bench.rtt")
    r = run_rtt(mq, QUICK)
    assert r.ok, r.errors
    assert_latencies(r)
    m = r.metrics
    measured = counter.count() - 200  # after the warm-up round trips
    assert m["n"] == measured
    assert m["per_s"] == round(measured / QUICK.duration)
    # one request at a time: the round trips fit in the run, the last one may end after it
    assert sum(r.samples_us) / 1e6 <= QUICK.duration + m["max_us"] / 1e6
    assert_cpu(r)


def test_e2e(mq: Target) -> None:
    r = run_e2e(mq, QUICK)
    assert r.ok, r.errors
    m = r.metrics
    assert m["delivered"] == m["sent"] == 600  # 2000 a second for 0.3 s
    assert m["n"] == 540  # the first 60 (the warm-up tenth) are left out of the percentiles
    assert_latencies(r)


def test_publish_several_publishers(mq: Target) -> None:
    counter = TopicCounter(mq, "bench.publish")
    t0 = time.perf_counter()
    r = run_publish(mq, QUICK, publishers=2)
    outer = time.perf_counter() - t0
    assert r.ok, r.errors
    m = r.metrics
    assert m["acked"] == counter.count()  # every send the server took was acknowledged
    assert m["acked"] >= 2 * QUICK.window
    # each publisher runs for the duration, then drains its window; all within our call
    assert QUICK.duration <= m["seconds"] <= outer
    assert m["acked"] / outer - 1 <= m["per_s"] <= m["acked"] / QUICK.duration + 1
    assert_cpu(r, generator_processes=3)  # two publisher processes and this one


@pytest.mark.parametrize("subscribers", [1, 5])
def test_fanout_accounts_for_every_message(mq: Target, subscribers: int) -> None:
    t0 = time.perf_counter()
    r = run_fanout(mq, QUICK, subscribers)
    outer = time.perf_counter() - t0
    assert r.ok, r.errors
    m = r.metrics
    assert m["published"] > 0
    assert m["delivered"] == subscribers * m["published"]
    # publishing lasts the duration, the last delivery comes after it; all within our call
    assert QUICK.duration <= m["seconds"] <= outer
    assert m["delivered"] / outer - 1 <= m["per_s"] <= m["delivered"] / QUICK.duration + 1
    assert_cpu(r, generator_processes=1 + min(QUICK.procs, subscribers))  # + subscriber procs


def test_conns(mq: Target) -> None:
    r = run_conns(mq, QUICK, settle=0.1)
    assert r.ok, r.errors
    m = r.metrics
    assert m["setup_s"] > 0 and m["delivery_s"] > 0
    assert "rss_per_conn_kib" in m  # the pid is known, so RSS is measured


def test_failed_scenario_is_reported_not_raised() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    from mq_trio.benchmark.cli import ProgressBar, run_scenario

    r = run_scenario("rtt", Target("nobody", "127.0.0.1", port, MQ), QUICK,
                     ProgressBar(False), None)
    assert not r.ok and r.errors[0].startswith("failed:")


# --- against Redis (skipped where redis-server is not installed) -----------------------


def test_redis_scenarios(redis: Target) -> None:
    rtt = run_rtt(redis, QUICK)
    assert rtt.ok, rtt.errors
    assert_latencies(rtt)
    e2e = run_e2e(redis, QUICK)
    assert e2e.ok, e2e.errors
    assert e2e.metrics["delivered"] == e2e.metrics["sent"]
    fan = run_fanout(redis, QUICK, 3)
    assert fan.ok, fan.errors
    assert fan.metrics["delivered"] == 3 * fan.metrics["published"]
    conns = run_conns(redis, QUICK, settle=0.1)
    assert conns.ok, conns.errors


def test_redis_stream_publish_appends_to_a_capped_stream(redis: Target) -> None:
    """``--redis-stream``: each publish is an XADD with MAXLEN 100 (issue 16's durable
    comparison), and each reply (the entry id: two lines) is counted once."""
    stream = attrs.evolve(redis, dialect=REDIS_STREAM)
    r = run_publish(stream, QUICK)
    assert r.ok, r.errors
    assert r.metrics["acked"] > 0
    with socket.create_connection(("127.0.0.1", redis.port)) as s:
        s.sendall(resp_command("XLEN", "bench.publish"))
        assert s.recv(100) == b":100\r\n"


def test_redis_stream_needs_redis_and_publish_alone(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--redis-stream", "publish"]) == 2
    assert main(["bench", "--redis", "--redis-stream", "rtt"]) == 2
    assert "--redis-stream goes with --redis and the publish scenario" in capsys.readouterr().err


# --- the command line and the reports ---------------------------------------------------


def test_cli_json_markdown_and_plot(mq: Target, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    md = tmp_path / "bench.md"
    md.write_text(f"# Benchmarks\n\nprose before\n\n{report.BEGIN}\nold\n{report.END}\n\nafter\n")
    png = tmp_path / "plot.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plotting = False  # --plot is then refused up front (tests/test_bench_plot.py)
    else:
        plotting = True
    argv = ["bench", "rtt", "publish", "--port", str(mq.port), "--server-pid", str(mq.pid),
            "--duration", "0.2", "--window", "32", "--json", str(out), "--markdown", str(md),
            *(["--plot", str(png)] if plotting else []), "--no-progress"]
    assert main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["scenario"] for r in records] == ["rtt", "publish"]
    assert all(r["ok"] and r["target"] == "mq-trio" for r in records)
    text = md.read_text()
    assert "prose before" in text and "after" in text and "old" not in text
    assert "| rtt |" in text
    if plotting:
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert "![latency and throughput](plot.png)" in text


def test_cli_rejects_unknown_scenario() -> None:
    assert main(["bench", "nonsense", "--no-progress"]) == 2


def test_check_targets_ratios() -> None:
    def res(target: str, scenario: str, params: dict[str, int], **metrics: float) -> Result:
        return Result(target, scenario, params, dict(metrics))

    results = [
        res("mq-trio", "publish", {"publishers": 1}, per_s=400),
        res("redis", "publish", {"publishers": 1}, per_s=1000),
        res("mq-trio", "rtt", {}, p50_us=130),
        res("redis", "rtt", {}, p50_us=100),
        res("mq-trio", "e2e", {}, p99_us=400),
        res("redis", "e2e", {}, p99_us=300),
        res("mq-trio", "conns", {"conns": 10}, setup_s=1, delivery_s=3, rss_per_conn_kib=7),
    ]
    verdicts = {c.name: c.met for c in report.check_targets(results)}
    assert verdicts["publish P=1 throughput"] is True  # 0.4x
    assert verdicts["fanout S=100 delivered throughput"] is None  # not measured
    assert verdicts["rtt p50"] is False  # 1.3x
    assert verdicts["e2e p99"] is True  # 1.33x and under 500 µs
    assert verdicts["conns C=10: RSS per connection"] is True
    assert verdicts["conns C=10: setup / delivery"] is False


# --- the generator's byte-level helpers ----------------------------------------------


def test_token_counter_counts_tokens_split_across_chunks() -> None:
    counter = TokenCounter(b'"index"')
    stream = b'{"a": 1, "index": 0}\r\n{"index": 1}\r\n' * 3
    for i in range(len(stream)):  # every split point, in one-byte and larger chunks
        counter = TokenCounter(b'"index"')
        counter.feed(stream[:i])
        counter.feed(stream[i:])
        assert counter.count == 6
    counter = TokenCounter(b'"index"')
    for b in stream:
        counter.feed(bytes([b]))
    assert counter.count == 6


def test_stamp_reader_mq_and_redis() -> None:
    mq_stream = b"".join(
        b'{"command": "send", "topic": "t", "msg": "%020dxx", "delivery": "all", "index": %d}'
        b"\r\n" % (n, n) for n in range(5)
    )
    redis_stream = b"".join(
        b"*3\r\n$7\r\nmessage\r\n$1\r\nt\r\n$22\r\n%020dxx\r\n" % n for n in range(5)
    )
    for d, stream in ((MQ, mq_stream), (REDIS, redis_stream)):
        reader = StampReader(d.stamp_re)
        got: list[int] = []
        for i in range(0, len(stream), 7):
            got += reader.feed(stream[i:i + 7])
        assert got == list(range(5))


def test_resp_encoding_and_latency_summary() -> None:
    expected = b"*3\r\n$7\r\nPUBLISH\r\n$1\r\nt\r\n$3\r\nh\xc3\xa9\r\n"
    assert resp_command("PUBLISH", "t", "hé") == expected
    s = latency_summary(list(range(1000, 1_001_000, 1000)))  # 1..1000 µs
    assert (s["p50_us"], s["p99_us"], s["p999_us"], s["max_us"]) == (500, 990, 999, 1000)
