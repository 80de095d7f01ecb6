"""The command line, as a user runs it: ``python -m mq_trio`` in a subprocess."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import mq_trio
from mq_trio.cli import build_parser

LISTENING = re.compile(r"listening on (\S+):(\d+)")
TIMEOUT = 20.0


def run(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mq_trio", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Served:
    """A ``mq_trio serve`` subprocess and what it printed."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: list[str]) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    def stop(self, signum: int) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=TIMEOUT)


def read_line(proc: subprocess.Popen[bytes], deadline: float) -> str:
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no complete log line in time; got {buf!r}")
        chunk = os.read(fd, 1)
        if not chunk:
            raise EOFError(f"server exited early: {buf!r}")
        buf += chunk
    return buf.decode()


@contextlib.contextmanager
def launch(*extra: str) -> Iterator[Served]:
    """``mq_trio serve --port 0 ...`` until its ``listening on`` line; killed at exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mq_trio", "serve", "--port", "0", *extra],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        log: list[str] = []
        while True:
            line = read_line(proc, deadline)
            log.append(line)
            m = LISTENING.search(line)
            if m:
                assert m.group(1) == "127.0.0.1"
                yield Served(proc, int(m.group(2)), log)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.fixture
def serve() -> Iterator[Served]:
    with launch("--shutdown-grace", "10") as served:
        yield served


def request(sock: socket.socket, obj: object) -> object:
    sock.sendall(json.dumps(obj).encode() + b"\n")
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    return json.loads(data)


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"mq-trio {mq_trio.__version__}"


def test_no_command_prints_help_and_fails() -> None:
    result = run()
    assert result.returncode == 2
    assert "serve" in result.stdout


def serve_options() -> list[argparse.Action]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    serve_parser = sub.choices["serve"]
    return [a for a in serve_parser._actions if a.option_strings and a.dest != "help"]


def test_serve_help_mentions_every_flag() -> None:
    result = run("serve", "--help")
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    options = serve_options()
    flags = {f for a in options for f in a.option_strings}
    for required in ("--host", "--port", "--cache-size", "--max-pending-bytes",
                     "--max-line-bytes", "--log-level"):
        assert required in flags
    for action in options:
        for flag in action.option_strings:
            assert flag in help_text
        assert action.help and " ".join(action.help.split())[:30] in help_text, action.dest


def test_port_in_use_is_one_line_and_exit_1() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run("serve", "--port", str(port))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "mq-trio:" in line]
    assert len(errors) == 1 and str(port) in errors[0]
    assert "Traceback" not in result.stderr
    assert "listening on" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "abc"], "--port"),
        (["--port", "70000"], "--port"),
        (["--port", "-1"], "--port"),
        (["--cache-size", "many"], "--cache-size"),
        (["--cache-size", "-1"], "cache size"),
        (["--max-pending-bytes", "12xyz"], "--max-pending-bytes"),
        (["--max-line-bytes", "0"], "line"),
        (["--max-pending-bytes", "1k", "--max-line-bytes", "1k"], "pending"),
        (["--log-level", "loud"], "--log-level"),
        (["--shutdown-grace", "soon"], "--shutdown-grace"),
        (["--shutdown-grace", "-1"], "grace"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_flag_values(args: list[str], message: str) -> None:
    result = run("serve", *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert "listening on" not in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_stops_gracefully(serve: Served, signum: int) -> None:
    with socket.create_connection(("127.0.0.1", serve.port), timeout=TIMEOUT) as c:
        assert request(c, {"command": "subscribe", "topic": "t"}) == {"success": True}
        assert serve.stop(signum) == 0
        assert c.recv(100) == b""  # closed by the server
    assert serve.proc.stderr is not None
    rest = serve.proc.stderr.read().decode()
    assert "Traceback" not in rest
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", serve.port), timeout=TIMEOUT).close()


def test_idle_server_stops_on_signal(serve: Served) -> None:
    assert serve.stop(signal.SIGTERM) == 0


def test_queued_output_is_flushed_on_shutdown(serve: Served) -> None:
    n = 5000
    with (
        socket.create_connection(("127.0.0.1", serve.port), timeout=TIMEOUT) as reader,
        socket.create_connection(("127.0.0.1", serve.port), timeout=TIMEOUT) as watcher,
    ):
        assert request(watcher, {"command": "subscribe", "topic": "sync"}) == {"success": True}
        lines = [{"command": "subscribe", "topic": "t"}]
        lines += [
            {"command": "send", "topic": "t", "msg": f"{i:06d}" + "x" * 200, "delivery": "all"}
            for i in range(n)
        ]
        lines.append({"command": "send", "topic": "sync", "msg": "done", "delivery": "all"})
        reader.sendall(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
        # the watcher sees "done" once the server has processed every line of the reader
        data = b""
        while b"done" not in data:
            chunk = watcher.recv(65536)
            assert chunk
            data += chunk
        serve.proc.send_signal(signal.SIGTERM)
        out = b""
        while True:
            chunk = reader.recv(1 << 20)
            if not chunk:
                break
            out += chunk
        assert serve.proc.wait(timeout=TIMEOUT) == 0
    replies = [json.loads(x) for x in out.split(b"\r\n")[:-1]]
    assert out.endswith(b"\r\n")
    assert len(replies) == 1 + 2 * n + 1
    assert [r["index"] for r in replies if "index" in r] == list(range(n))


def test_console_script() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "mq-trio")
    if not os.path.exists(script):
        pytest.skip("the mq-trio console script is not installed next to this python")
    result = subprocess.run([script, "--version"], capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0
    assert result.stdout.strip() == f"mq-trio {mq_trio.__version__}"


def test_shutdown_stops_accepting_and_a_second_signal_stops_at_once() -> None:
    with launch("--shutdown-grace", "600", "--max-pending-bytes", "64M") as served:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.settimeout(TIMEOUT)
        stuck.connect(("127.0.0.1", served.port))
        with stuck, socket.create_connection(("127.0.0.1", served.port), TIMEOUT) as pub:
            assert request(stuck, {"command": "subscribe", "topic": "t"}) == {"success": True}
            for _ in range(12):  # 12 MB for a client that reads nothing: more than the
                # kernel buffers can take (tcp_wmem max is typically 4 MB), less than the budget
                body = [{"command": "send", "topic": "t", "msg": "s" * 2000, "delivery": "all"}]
                pub.sendall(b"".join(json.dumps(x).encode() + b"\n" for x in body * 500))
                got = b""
                while got.count(b"\r\n") < 500:
                    chunk = pub.recv(65536)
                    assert chunk
                    got += chunk
            served.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + TIMEOUT
            while "shutting down" not in served.log[-1]:
                served.log.append(read_line(served.proc, deadline))
            # still flushing to the stuck client (600 s of grace), but no longer accepting
            assert served.proc.poll() is None
            # the listening socket closes right after the log line: poll for the refusal
            while True:
                try:
                    socket.create_connection(("127.0.0.1", served.port), TIMEOUT).close()
                except (ConnectionRefusedError, ConnectionResetError):
                    # refused; or reset, when the SYN raced the listening socket's close
                    break
                assert time.monotonic() < deadline, "still accepting connections"
                time.sleep(0.05)
            assert served.proc.poll() is None
            served.proc.send_signal(signal.SIGTERM)
            assert served.proc.wait(timeout=TIMEOUT) == 0
