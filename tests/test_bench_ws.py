"""The bench tool's WebSocket subscribers and its NATS dialect (issue 16): every delivery
is counted exactly, whatever the frames and reads look like.

No speed is asserted; bench/ws_compare.sh measures. The NATS tests need Debian's
nats-server (``apt-get install -y nats-server``; bench/ws_compare.sh installs it) and are
skipped without it, as the Redis ones are without redis-server.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from mq_trio.benchmark import ws_report
from mq_trio.benchmark.cli import _free_port, started_server
from mq_trio.benchmark.dialects import MQ, NATS, StampReader
from mq_trio.benchmark.scenarios import Settings, Target, run_e2e, run_fanout
from mq_trio.benchmark.ws import WsReader, client_frame, deliveries, ws_connect, ws_subscribe
from mq_trio.cli import main

QUICK = Settings(duration=0.3, window=64, rate=2000, procs=2, stall_timeout=10)


def server_frame(payload: bytes, opcode: int = 1, fin: bool = True) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        return bytes((b0, n)) + payload
    if n < 65536:
        return bytes((b0, 126)) + n.to_bytes(2, "big") + payload
    return bytes((b0, 127)) + n.to_bytes(8, "big") + payload


def feed_in_pieces(reader: WsReader, data: bytes, rng: random.Random) -> tuple[int, int]:
    frames = lines = pos = 0
    while pos < len(data):
        step = rng.choice((1, 2, 3, 7, 100, 5000))
        f, n = reader.feed(data[pos:pos + step])
        frames += f
        lines += n
        pos += step
    return frames, lines


# --- the frame reader, on made-up streams ----------------------------------------------


def test_reader_counts_frames_split_anywhere(rng: random.Random) -> None:
    payloads = [b"x" * n for n in (0, 1, 125, 126, 127, 300, 65535, 65536, 70000)]
    stream = b"".join(server_frame(p) for p in payloads)
    stream += server_frame(b"", opcode=9) + server_frame(b"x\n", opcode=10)  # ping, pong
    reader = WsReader(keep_payload=True)
    frames, lines = feed_in_pieces(reader, stream, rng)
    assert (frames, lines) == (len(payloads), 0)  # control frames are not deliveries
    assert bytes(reader.payload) == b"".join(payloads)
    assert not reader.closed


def test_reader_counts_nats_deliveries_across_frames(rng: random.Random) -> None:
    # NATS frames follow its write buffers, not its messages: count whole deliveries' lines
    msgs = b"".join(b"MSG t 1 3\r\n%03d\r\n" % i for i in range(500))
    cuts = sorted(rng.sample(range(1, len(msgs)), 40))
    pieces = [msgs[a:b] for a, b in zip([0, *cuts], [*cuts, len(msgs)], strict=True)]
    # a message in several frames is continuation frames after a first, unfinished one
    stream = server_frame(pieces[0], opcode=1, fin=False)
    stream += b"".join(server_frame(p, opcode=0, fin=False) for p in pieces[1:-1])
    stream += server_frame(pieces[-1], opcode=0, fin=True)
    reader = WsReader()
    frames, lines = feed_in_pieces(reader, stream, rng)
    assert frames == 1  # one message in 41 fragments
    assert deliveries(NATS, frames, lines) == 500
    assert deliveries(MQ, 7, 0) == 7


def test_reader_notices_a_close_frame() -> None:
    reader = WsReader()
    assert reader.feed(server_frame(b"\x03\xe8", opcode=8)) == (0, 0)
    assert reader.closed


def test_client_frames_are_masked() -> None:
    for n in (0, 5, 125, 126, 1000, 70000):
        payload = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
        frame = client_frame(payload)
        assert frame[0] == 0x81 and frame[1] & 0x80  # final text frame, masked
        head = {126: 4, 127: 10}.get(frame[1] & 0x7F, 2)
        mask = frame[head:head + 4]
        body = frame[head + 4:]
        assert bytes(b ^ mask[i % 4] for i, b in enumerate(body)) == payload


def test_nats_stamps_are_found() -> None:
    reader = StampReader(NATS.stamp_re)
    stamp = b"%020d" % 123456789
    data = b"MSG bench.e2e.1 1 24\r\n" + stamp + b"xxxx\r\n"
    assert reader.feed(data[:10]) == []
    assert reader.feed(data[10:]) == [123456789]


# --- against a real mq-trio with a WebSocket port -------------------------------------


@pytest.fixture(scope="module")
def mq_ws() -> Iterator[Target]:
    """``mq-trio serve`` in a process, with a WebSocket port."""
    ws_port = _free_port("127.0.0.1")
    with started_server("127.0.0.1", None, "--ws-port", str(ws_port)) as (port, pid):
        yield Target("mq-trio over WebSocket", "127.0.0.1", port, MQ, pid, ws_port=ws_port)


@pytest.mark.parametrize("subscribers", [1, 5])
def test_fanout_over_websocket_counts_every_delivery(mq_ws: Target, subscribers: int) -> None:
    r = run_fanout(mq_ws, QUICK, subscribers)
    # run_fanout reports an error unless each subscriber got exactly what was published
    assert r.ok, r.errors
    m = r.metrics
    assert m["published"] > 0
    assert m["delivered"] == subscribers * m["published"]


def test_e2e_over_websocket(mq_ws: Target) -> None:
    r = run_e2e(mq_ws, QUICK)
    assert r.ok, r.errors
    m = r.metrics
    assert m["delivered"] == m["sent"] == 600  # 2000 a second for 0.3 s
    assert m["n"] == 540  # the warm-up tenth is left out
    assert 0 < m["p50_us"] <= m["p99_us"] <= m["max_us"]


def test_cli_fanout_over_websocket(capsys: pytest.CaptureFixture[str], tmp_path: Path
                                   ) -> None:
    out = tmp_path / "r.jsonl"
    code = main(["bench", "--start-server", "--ws", "--duration", "0.2", "--subscribers",
                 "2", "--rate", "500", "--no-progress", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "mq-trio over WebSocket" in text
    assert out.read_text().count('"ok": true') == 2  # fanout, e2e


def test_cli_ws_needs_a_port_and_subscribers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--ws"]) == 2
    assert "--ws-port" in capsys.readouterr().err
    assert main(["bench", "--ws", "--ws-port", "1", "publish"]) == 2
    assert "only fanout, e2e" in capsys.readouterr().err
    assert main(["bench", "--ws", "--redis", "--ws-port", "1"]) == 2
    assert main(["bench", "--nats", "conns"]) == 2
    assert "only rtt, e2e, publish, fanout" in capsys.readouterr().err


# --- against a real nats-server -------------------------------------------------------


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Target, Target]]:
    """Debian's nats-server with a WebSocket listener: (TCP target, WebSocket target)."""
    binary = shutil.which("nats-server")
    if binary is None:
        pytest.skip("nats-server is not installed (apt-get install -y nats-server)")
    port, ws_port = _free_port("127.0.0.1"), _free_port("127.0.0.1")
    conf = tmp_path_factory.mktemp("nats") / "nats.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\nping_interval: "10m"\n'
                    f'websocket {{ listen: "127.0.0.1:{ws_port}", no_tls: true }}\n')
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for p in (port, ws_port):
            for _ in range(250):
                try:
                    socket.create_connection(("127.0.0.1", p), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.02)
        yield (Target("nats", "127.0.0.1", port, NATS, proc.pid),
               Target("nats over WebSocket", "127.0.0.1", port, NATS, proc.pid,
                      ws_port=ws_port))
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("over", ["tcp", "ws"])
@pytest.mark.parametrize("subscribers", [1, 5])
def test_nats_fanout_counts_every_delivery(nats: tuple[Target, Target], over: str,
                                           subscribers: int) -> None:
    target = nats[over == "ws"]
    r = run_fanout(target, QUICK, subscribers)
    assert r.ok, r.errors
    m = r.metrics
    assert m["published"] > 0
    assert m["delivered"] == subscribers * m["published"]


@pytest.mark.parametrize("over", ["tcp", "ws"])
def test_nats_pings_are_answered_not_counted(nats: tuple[Target, Target], over: str) -> None:
    # nats-server PINGs each client ~2 s after it connected: a run longer than that once
    # waited forever for an ack that a PING had been counted as
    r = run_fanout(nats[over == "ws"], attrs.evolve(QUICK, duration=2.6), 2)
    assert r.ok, r.errors
    assert r.metrics["delivered"] == 2 * r.metrics["published"] > 0


def test_nats_count_matches_an_independent_subscriber(nats: tuple[Target, Target]) -> None:
    # A plain NATS client of its own (TCP, quiet) counts the MSGs of the published topic:
    # the generator's count over WebSocket must be that number, not just self-consistent.
    tcp, ws = nats
    topic = "bench.check"
    with socket.create_connection((tcp.host, tcp.port), timeout=10) as own:
        own.recv(4096)  # INFO
        own.sendall(b'CONNECT {"verbose":false}\r\nSUB bench.check 9\r\nPING\r\n')
        buf = b""
        while b"PONG\r\n" not in buf:
            buf += own.recv(4096)
        sock, first = ws_connect(ws)
        with sock:
            reader = ws_subscribe(sock, first, NATS, topic)
            with socket.create_connection((tcp.host, tcp.port)) as pub:
                pub.recv(4096)
                pub.sendall(b'CONNECT {"verbose":false}\r\n'
                            + NATS.publish(topic, "x" * 3000) * 2000 + b"PING\r\n")
                seen = b""
                while b"PONG" not in seen:
                    seen += pub.recv(4096)
            frames = lines = 0
            while deliveries(NATS, frames, lines) < 2000:
                f, n = reader.feed(sock.recv(1 << 20))
                frames += f
                lines += n
            assert deliveries(NATS, frames, lines) == 2000
        got = b""
        while got.count(b"MSG ") < 2000:
            got += own.recv(1 << 20)
        assert got.count(b"MSG ") == 2000


def test_cli_nats_over_websocket(nats: tuple[Target, Target],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    tcp, ws = nats
    assert ws.ws_port is not None
    code = main(["bench", "--nats", "--port", str(tcp.port), "--ws", "--ws-port",
                 str(ws.ws_port), "--duration", "0.2", "--subscribers", "2", "--rate", "500",
                 "--no-progress"])
    assert code == 0
    assert "nats over WebSocket" in capsys.readouterr().out


# --- bench/ws_compare.sh's table ------------------------------------------------------


def test_ws_report_ratios_and_targets(tmp_path: Path) -> None:
    def row(target: str, scenario: str, metrics: dict[str, float], s: int | None = None
            ) -> str:
        params = {"subscribers": s} if s is not None else {"rate": 5000}
        return json.dumps({"target": target, "scenario": scenario, "params": params,
                           "metrics": metrics, "ok": True, "errors": []})

    lines = [
        row(ws_report.MQ_TCP, "fanout", {"per_s": 4_000_000}, 100),
        row(ws_report.MQ_WS, "fanout", {"per_s": 1_000_000}, 100),
        row(ws_report.NATS_WS, "fanout", {"per_s": 2_000_000}, 100),
        row(ws_report.MQ_TCP, "e2e", {"p99_us": 100.0}),
        row(ws_report.MQ_WS, "e2e", {"p99_us": 140.0}),
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    text = ws_report.markdown(ws_report.load([str(path)]))
    assert "| S=100 | 4,000,000 | 1,000,000 | 2,000,000 | - | 0.25x | 0.50x |" in text
    assert "| >= 0.5x mq-trio's TCP fan-out | 0.25x | no |" not in text
    assert "TCP fan-out | 0.25x | no |" in text
    assert "NATS over WebSocket | 0.50x | no |" in text
    assert "within 1.5x" not in text and "<= 1.5x TCP | 1.40x | yes |" in text
