"""The bench's cross-node mode (issue 15, point 6): publishers on node A, subscribers on
node B of a two-node cluster over a real redis-server; and bench/cluster_compare.sh's
report.

Nothing here asserts on speed. The nodes are ``mq-trio serve --cluster`` processes (the
generator is blocking-socket code with worker processes, kept out of trio's thread).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

pytest.importorskip(
    "hiredis", reason="hiredis is not installed (the cluster extra): cluster tests SKIPPED"
)

if TYPE_CHECKING:
    from redis_support import RedisProcess

from mq_trio.benchmark import cluster_report  # noqa: E402
from mq_trio.benchmark.cli import started_server  # noqa: E402
from mq_trio.benchmark.dialects import MQ  # noqa: E402
from mq_trio.benchmark.report import SUB_SERVER  # noqa: E402
from mq_trio.benchmark.scenarios import (  # noqa: E402
    Result,
    Settings,
    Target,
    run_e2e,
    run_fanout,
    run_publish,
)
from mq_trio.cli import main  # noqa: E402

pytest_plugins = ["redis_support"]

HOST = "127.0.0.1"
QUICK = Settings(duration=0.3, window=64, rate=2000, procs=2, stall_timeout=20)
PROCESSES = {"server", SUB_SERVER, "redis"}


@pytest.fixture(scope="module")
def cluster(redis_server: RedisProcess) -> Iterator[Target]:
    """Two nodes sharing the module's Redis; the target publishes to A, subscribes on B,
    and measures the CPU of A, B and Redis."""
    assert redis_server.proc is not None
    with started_server(HOST, None, "--cluster", redis_server.url) as (a_port, a_pid), \
            started_server(HOST, None, "--cluster", redis_server.url) as (b_port, b_pid):
        yield Target("cluster A->B", HOST, a_port, MQ, a_pid, sub_port=b_port,
                     cpu_pids={SUB_SERVER: b_pid, "redis": redis_server.proc.pid})


def assert_cpu_of_all_three(r: Result) -> None:
    assert set(r.cpu_s) == PROCESSES, r.cpu_s
    assert all(v >= 0 for v in r.cpu_s.values())
    assert sum(r.cpu_s.values()) > 0
    assert r.to_json()["cpu_s"] == r.cpu_s


def test_subscriber_side_is_the_other_node() -> None:
    t = Target("x", "10.0.0.1", 7000, MQ, 1, sub_port=7001)
    side = t.subscriber_side()
    assert (side.host, side.port, side.sub_port) == ("10.0.0.1", 7001, None)
    assert side.subscriber_side() is side
    other = Target("x", "10.0.0.1", 7000, MQ, sub_host="10.0.0.2")
    assert (other.subscriber_side().host, other.subscriber_side().port) == ("10.0.0.2", 7000)
    plain = Target("x", "10.0.0.1", 7000, MQ)
    assert plain.subscriber_side() is plain


@pytest.mark.parametrize("subscribers", [1, 4])
def test_cross_node_fanout(cluster: Target, subscribers: int) -> None:
    r = run_fanout(cluster, QUICK, subscribers)
    assert r.ok, r.errors
    m = r.metrics
    assert m["published"] > 0
    # every message published on A reached every subscriber on B, exactly once
    assert m["delivered"] == subscribers * m["published"]
    assert m["per_s"] > 0
    assert_cpu_of_all_three(r)


def test_cross_node_e2e(cluster: Target) -> None:
    r = run_e2e(cluster, QUICK)
    assert r.ok, r.errors
    m = r.metrics
    assert m["delivered"] == m["sent"] == 600  # 2000 a second for 0.3 s
    assert m["n"] == 540  # less the warm-up tenth
    assert 0 < m["p50_us"] <= m["p99_us"] <= m["max_us"]
    assert_cpu_of_all_three(r)


def test_cross_node_publish(cluster: Target) -> None:
    r = run_publish(cluster, QUICK)
    assert r.ok, r.errors
    assert r.metrics["acked"] > 0 and r.metrics["per_s"] > 0
    assert_cpu_of_all_three(r)


def test_subscribers_connect_to_the_sub_port(cluster: Target) -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        nowhere = s.getsockname()[1]  # nothing listens here
    lost = Target("lost", HOST, cluster.port, MQ, sub_port=nowhere)
    with pytest.raises(ConnectionRefusedError):
        run_e2e(lost, QUICK)


def test_cli_sub_port_json(cluster: Target, redis_server: RedisProcess, tmp_path: Path
                           ) -> None:
    assert redis_server.proc is not None and cluster.sub_port is not None
    out = tmp_path / "out.jsonl"
    status = main(["bench", "--port", str(cluster.port), "--sub-port", str(cluster.sub_port),
                   "--cpu-pid", f"redis={redis_server.proc.pid}", "--duration", "0.3",
                   "--window", "64", "--rate", "2000", "--subscribers", "2",
                   "--no-progress", "--json", str(out), "fanout", "e2e"])
    assert status == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["scenario"] for r in records] == ["fanout", "e2e"]
    for r in records:
        assert r["ok"], r["errors"]
        assert r["target"] == f"mq-trio (subscribers on {HOST}:{cluster.sub_port})"
        assert set(r["cpu_s"]) == PROCESSES  # B's pid found by its port, Redis's given
    fanout, e2e = records
    assert fanout["metrics"]["delivered"] == 2 * fanout["metrics"]["published"] > 0
    assert e2e["metrics"]["delivered"] == e2e["metrics"]["sent"] > 0
    assert {"p50_us", "p99_us", "n"} <= set(e2e["metrics"])


@pytest.mark.parametrize("extra", [
    ["conns"],
    ["queue"],
    ["--start-server", "e2e"],
])
def test_cli_sub_port_usage(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--sub-port", "1", "--no-progress", *extra]) == 2
    assert "--sub-port" in capsys.readouterr().err


def test_cli_named_pid_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--cpu-pid", "12", "e2e"])
    assert "NAME=PID" in capsys.readouterr().err


# --- bench/cluster_compare.sh's report ------------------------------------------------


def _row(target: str, scenario: str, metrics: dict[str, float], cpu: dict[str, float],
         subscribers: int | None = None) -> dict[str, Any]:
    params: dict[str, int] = {"rate": 5000}
    if subscribers is not None:
        params = {"subscribers": subscribers}
    return {"target": target, "scenario": scenario, "params": params, "metrics": metrics,
            "cpu_s": cpu, "saturated": False, "ok": True, "errors": []}


def test_report_ratios_costs_and_targets(tmp_path: Path) -> None:
    c, s, r = cluster_report.CLUSTER, cluster_report.SINGLE, cluster_report.REDIS
    three = {"server": 1.0, SUB_SERVER: 0.5, "redis": 2.0}
    rows = [
        _row(s, "publish", {"acked": 1_000_000, "per_s": 500_000, "seconds": 2.0},
             {"server": 2.0}),
        _row(c, "publish", {"acked": 200_000, "per_s": 100_000, "seconds": 2.0}, three),
        _row(r, "publish", {"acked": 4_000_000, "per_s": 2_000_000, "seconds": 2.0}, {}),
        _row(s, "fanout", {"published": 600_000, "delivered": 600_000, "per_s": 300_000,
                           "seconds": 2.0}, {"server": 2.0}, 1),
        _row(c, "fanout", {"published": 200_000, "delivered": 200_000, "per_s": 100_000,
                           "seconds": 2.0}, three, 1),
        _row(s, "e2e", {"p50_us": 80.0, "p99_us": 100.0, "p999_us": 400.0, "sent": 10_000,
                        "achieved_rate": 5000}, {"server": 0.4}),
        _row(c, "e2e", {"p50_us": 500.0, "p99_us": 2500.0, "p999_us": 5000.0, "sent": 10_000,
                        "achieved_rate": 5000}, three),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    text = cluster_report.markdown(cluster_report.load([str(path)]))
    assert "| publish (acked msg/s) | 500,000 | 100,000 | 2,000,000 | 0.20x | 0.05x |" in text
    assert "| fanout S=1 (deliveries/s) | 300,000 | 100,000 | - | 0.33x | - |" in text
    assert "| e2e p99 (µs) | 100.0 | 2,500.0 | - | 25.00x | - |" in text
    # CPU µs per published message: 1 s / 200,000 = 5 µs on A, 2.5 on B, 10 in Redis
    assert "| publish | 100,000 | 5.00 | 2.50 | 10.00 | 17.50 | - | 2.00 |" in text
    assert "| fanout S=1 | 100,000 | 5.00 | 2.50 | 10.00 | 17.50 | 2.50 | 3.33 |" in text
    # 1/3 exactly is enough; per CPU second: 200,000 / 3.5 s vs 600,000 / 2 s
    assert "100,000 vs 300,000 = 0.33x | yes | 57,143 vs 300,000 = 0.19x | **no** |" in text
    assert "| cross-node e2e p99 < 2 ms | 2,500.0 µs | **no** |" in text

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nprose\n")
    cluster_report.splice(doc, "first")
    cluster_report.splice(doc, "second")
    after = doc.read_text()
    assert after.count(cluster_report.SECTION) == 1 and "first" not in after
    assert after.startswith("# Benchmarks\n\nprose\n") and "second" in after


def test_report_takes_the_median_of_rounds() -> None:
    c = cluster_report.CLUSTER
    rows = [_row(c, "publish", {"acked": n, "per_s": n, "seconds": 1.0}, {"server": 1.0})
            for n in (300, 100, 200)]
    assert cluster_report.rounds(rows) == 3
    median = cluster_report.find(rows, c, "publish")
    assert median is not None and median["metrics"]["per_s"] == 200
    text = cluster_report.markdown(rows)
    assert text.startswith("Each figure is the median of 3 rounds")
    assert "| publish (acked msg/s) | - | 200 | - |" in text
