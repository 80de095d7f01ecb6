"""Running under a service manager (#13 point 4): systemd readiness through
NOTIFY_SOCKET (a fake one here: a datagram socket in a temporary directory), and
``--log-format json`` with the client's peer on connection lines."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mq_trio.cli._service import JSONFormatter, notify


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mq_trio", "serve", *args],
        stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
    )


def test_readiness_reload_and_stopping_reach_the_notify_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(path)
        manager.settimeout(30)
        port = free_port()
        proc = serve(["--port", str(port)], {"NOTIFY_SOCKET": path})
        try:
            ready = manager.recv(4096).decode()
            assert ready.startswith("READY=1\n")
            assert f"STATUS=listening on 127.0.0.1:{port}" in ready
            assert f"MAINPID={proc.pid}" in ready
            # ready means serving: a client is answered at once
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(b'{"command": "subscribe", "topic": "t"}\n')
                assert client.recv(100) == b'{"success": true}\r\n'
            proc.send_signal(signal.SIGHUP)
            reloading = manager.recv(4096).decode()
            assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=")
            assert int(reloading.rsplit("=", 1)[1]) > 0
            assert manager.recv(4096) == b"READY=1"
            proc.send_signal(signal.SIGTERM)
            assert manager.recv(4096) == b"STOPPING=1"
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_notify_without_a_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert notify("READY=1") is False  # logged, never raised: the server serves on


def test_json_log_lines_carry_the_peer(tmp_path: Path) -> None:
    port = free_port()
    proc = serve(["--port", str(port), "--log-format", "json", "--max-line-bytes", "100",
                  "--max-pending-bytes", "1000"])
    assert proc.stderr is not None
    try:
        first = json.loads(proc.stderr.readline())
        assert first["level"] == "info" and first["logger"] == "mq_trio.server"
        assert first["message"].startswith("listening on")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"x" * 200 + b"\n")
            assert client.recv(100) == b'{"success": false, "reason": "Line too long"}\r\n'
            host, client_port = client.getsockname()[:2]
            peer = f"{host}:{client_port}"
        line = json.loads(proc.stderr.readline())
        assert line["peer"] == peer
        assert line["message"].startswith(f"closing {peer}")
        assert line["time"].endswith("Z") and "T" in line["time"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        for rest in proc.stderr.read().decode().splitlines():
            json.loads(rest)  # every line is one JSON object
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_json_formatter_exception_and_no_peer() -> None:
    formatter = JSONFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("mq_trio.x", logging.ERROR, __file__, 1, "bad %s", ("thing",),
                                   sys.exc_info())
    out = json.loads(formatter.format(record))
    assert out["message"] == "bad thing" and out["level"] == "error"
    assert "peer" not in out
    assert "ValueError: boom" in out["exception"]
