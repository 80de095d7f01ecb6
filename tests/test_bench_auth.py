"""``mq-trio bench`` against a server with ``--auth``: the generator's connections
authenticate, and ``--compare-auth`` measures with and without in one command."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mq_trio.auth import new_token
from mq_trio.benchmark import report
from mq_trio.benchmark.cli import auth_file_text, started_server
from mq_trio.benchmark.dialects import MQ
from mq_trio.benchmark.scenarios import (
    BenchError,
    Settings,
    Target,
    run_conns,
    run_e2e,
    run_fanout,
    run_publish,
    run_rtt,
)
from mq_trio.cli import main
from mq_trio.protocol import encode_auth, frame
from mq_trio.testing import Certificates

QUICK = Settings(duration=0.3, window=64, rate=2000, conns=40, procs=2, stall_timeout=10)


@pytest.fixture(scope="module")
def token_and_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Target]]:
    yield from _server(tmp_path_factory)


@pytest.fixture
def refusing_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Target]]:
    """A server of its own: the failures slow down (and then refuse) this host there."""
    yield from _server(tmp_path_factory)


def _server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Target]]:
    token, token_hash = new_token()
    path = tmp_path_factory.mktemp("bench-auth") / "auth.toml"
    path.write_text(auth_file_text(token_hash))
    with started_server("127.0.0.1", None, "--auth", str(path)) as (port, pid):
        yield token, Target("mq-trio+auth", "127.0.0.1", port, MQ, pid,
                            auth=frame([encode_auth(token=token)]))


def test_every_scenario_authenticates(token_and_server: tuple[str, Target]) -> None:
    _, target = token_and_server
    publish = run_publish(target, QUICK, 1)
    assert publish.ok and publish.metrics["acked"] > 0, publish.errors
    rtt = run_rtt(target, QUICK)
    assert rtt.ok and rtt.metrics["n"] > 0, rtt.errors
    e2e = run_e2e(target, QUICK)
    assert e2e.ok and e2e.metrics["delivered"] == e2e.metrics["sent"] > 0, e2e.errors
    fan = run_fanout(target, QUICK, 2)
    assert fan.ok and fan.metrics["delivered"] == 2 * fan.metrics["published"], fan.errors
    conns = run_conns(target, QUICK, settle=0.0)
    assert conns.ok, conns.errors


def test_without_the_token_every_command_is_refused(
    token_and_server: tuple[str, Target]
) -> None:
    _, target = token_and_server
    anonymous = Target("anonymous", target.host, target.port, MQ)
    rtt = run_rtt(anonymous, Settings(duration=0.05))
    assert rtt.errors and "error replies" in rtt.errors[0]
    with pytest.raises(BenchError, match="Not authenticated"):
        run_conns(anonymous, QUICK, settle=0.0)


def test_a_wrong_token_fails_the_scenario(refusing_server: tuple[str, Target]) -> None:
    _, target = refusing_server
    wrong = Target("wrong", target.host, target.port, MQ,
                   auth=frame([encode_auth(token="mqt_wrong")]))
    with pytest.raises(BenchError, match="authentication refused.*Authentication failed"):
        run_rtt(wrong, QUICK)
    # Publishers in worker processes: the refusal is the error (not a stall, not a
    # broken barrier), at once (the stall timeout here is 10 s).
    t0 = time.monotonic()
    with pytest.raises(BenchError, match="^authentication refused.*Authentication failed"):
        run_publish(wrong, QUICK, 2)
    assert time.monotonic() - t0 < QUICK.stall_timeout
    # (last: its many refusals slow down this host's next attempts on this server)
    with pytest.raises(BenchError, match="Authentication failed"):
        run_conns(wrong, QUICK, settle=0.0)


def test_cli_token_and_env(token_and_server: tuple[str, Target], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    token, target = token_and_server
    base = ["bench", "rtt", "--port", str(target.port), "--duration", "0.1", "--no-progress",
            "--json", "-"]
    assert main([*base, "--token", token]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["ok"]
    monkeypatch.setenv("MQ_TRIO_TOKEN", token)
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "--token", "mqt_wrong"]) == 1
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert not record["ok"] and "Authentication failed" in record["errors"][0]
    assert token not in json.dumps(record)


def test_compare_auth_is_one_command(capsys: pytest.CaptureFixture[str], tmp_path: Path
                                     ) -> None:
    md = tmp_path / "auth.md"
    argv = ["bench", "publish", "--start-server", "--compare-auth", "--duration", "0.3",
            "--window", "64", "--no-progress", "--json", "-", "--markdown", str(md)]
    main(argv)  # the exit status depends on the machine's speed: the check may miss
    text = md.read_text()
    assert "| publish P=1 throughput with auth | >= 0.9x without |" in text
    assert f"| {report.AUTH_NAME} |" in text
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [(r["scenario"], r["target"]) for r in records] == [
        ("publish", report.MQ_NAME), ("publish", report.AUTH_NAME)]
    assert all(r["ok"] and r["metrics"]["acked"] > 0 for r in records)
    assert "publish P=1 throughput with auth" in captured.err
    assert "measured (with auth vs without)" in captured.err


def test_compare_auth_needs_its_own_servers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "publish", "--compare-auth", "--no-progress"]) == 2
    assert "--compare-auth needs --start-server" in capsys.readouterr().err
    assert main(["bench", "publish", "--start-server", "--compare-auth", "--token", "t",
                 "--no-progress"]) == 2


def test_auth_checks_verdicts() -> None:
    from mq_trio.benchmark.scenarios import Result

    def publish(target: str, per_s: int) -> Result:
        return Result(target, "publish", {"publishers": 1, "window": 1, "size": 1},
                      {"per_s": per_s})

    [met] = report.auth_checks([publish(report.MQ_NAME, 100), publish(report.AUTH_NAME, 91)])
    [missed] = report.auth_checks([publish(report.MQ_NAME, 100), publish(report.AUTH_NAME, 89)])
    assert met.met is True and missed.met is False
    assert report.auth_checks([publish(report.MQ_NAME, 100)]) == []


# --- over TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[Certificates, str, Target]]:
    certs = Certificates(lambda: tmp_path_factory.mktemp("bench-tls"))
    token, token_hash = new_token()
    path = certs.directory / "auth.toml"
    path.write_text(auth_file_text(token_hash))
    with started_server("127.0.0.1", None, "--auth", str(path),
                        "--tls-cert", str(certs.cert_file),
                        "--tls-key", str(certs.key_file)) as (port, pid):
        yield certs, token, Target("tls", "127.0.0.1", port, MQ, pid,
                                   auth=frame([encode_auth(token=token)]),
                                   ssl_context=certs.client_context())


def test_rtt_and_publish_over_tls(tls_server: tuple[Certificates, str, Target]) -> None:
    from mq_trio.benchmark.cli import ProgressBar, run_scenario

    _, _, target = tls_server
    rtt = run_rtt(target, QUICK)
    assert rtt.ok and rtt.metrics["n"] > 0, rtt.errors
    publish = run_publish(target, QUICK, 2)
    assert publish.ok and publish.metrics["acked"] > 0, publish.errors
    e2e = run_scenario("e2e", target, QUICK, ProgressBar(False), None)
    assert e2e.errors == ["failed: not run over TLS (only rtt, publish are)"]


def test_cli_cafile(tls_server: tuple[Certificates, str, Target],
                    capsys: pytest.CaptureFixture[str]) -> None:
    certs, token, target = tls_server
    argv = ["bench", "rtt", "publish", "--port", str(target.port), "--duration", "0.2",
            "--window", "32", "--no-progress", "--json", "-", "--token", token]
    assert main([*argv, "--cafile", str(certs.ca_file)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["scenario"], r["ok"]) for r in records] == [("rtt", True), ("publish", True)]
    # --tls alone: the system's CAs do not know the test CA
    assert main([*argv, "--tls"]) == 1
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all("CERTIFICATE_VERIFY_FAILED" in r["errors"][0] for r in records)
