"""A real ``mq-trio serve --config FILE`` (#13 point 5): a file setting every option, an
environment and flags over it, and proof over real sockets on 127.0.0.1 that each layer
took effect where it should (``--print-config`` with the same file, environment and
flags for the settings a client cannot see).

The subprocess gets an environment without the caller's ``MQ_TRIO_*`` variables (tox
passes them through): only this test's layers count."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
from test_config_file import KEYS, parse_printed
from test_tls import Certs, TLSLineClient, make_certs, refused_by_server

OK = {"success": True}
NOT_AUTHENTICATED = {"success": False, "reason": "Not authenticated"}
TIMEOUT = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    """Enough TOML for the test's values (JSON's strings and arrays are TOML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def clean_environment(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQ_TRIO_")}
    env.update(settings)
    return env


async def make_auth_file(directory: Path) -> tuple[Path, str]:
    """An auth file with one token allowed everything, made as an operator would: with
    ``mq-trio passwd --token``."""
    done = await trio.run_process(
        [sys.executable, "-m", "mq_trio", "passwd", "--token", "app"],
        capture_stdout=True, capture_stderr=True,
    )
    out = done.stdout.decode()
    (token,) = [word for word in out.split() if word.startswith("mqt_")]
    table = out[out.index("[tokens.app]"):]
    path = directory / "auth.toml"
    path.write_text(table + 'publish = ["**"]\nsubscribe = ["**"]\n')
    return path, token


class Served:
    """The server's JSON log lines, read from its stderr as they come."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self._buffer = b""

    async def wait_for(self, text: str) -> dict[str, Any]:
        """The first log line whose message contains ``text`` (every line must be JSON)."""
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if text in line["message"]:
                    return line
            seen = len(self.lines)
            assert self.proc.stderr is not None
            data = await self.proc.stderr.receive_some(65536)
            assert data, f"server exited: {self.lines} {self._buffer!r}"
            self._take(data)

    async def drain(self) -> None:
        """The rest of the log, to the end (after the server exited)."""
        assert self.proc.stderr is not None
        while data := await self.proc.stderr.receive_some(65536):
            self._take(data)
        assert self._buffer == b""

    def _take(self, data: bytes | bytearray) -> None:
        self._buffer += data
        *complete, self._buffer = self._buffer.split(b"\n")
        self.lines += [json.loads(line) for line in complete]


async def websocket_status(port: int, context: ssl.SSLContext, origin: str) -> bytes:
    """The status line the WebSocket port answers an upgrade from ``origin`` with."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    try:
        await stream.send_all(
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n" not in head:
            data = await stream.receive_some(4096)
            assert data, head
            head += data
        return head.split(b"\r\n", 1)[0]
    finally:
        await trio.aclose_forcefully(stream)


async def test_every_option_from_a_file_with_environment_and_flags_over_it(
    tmp_path: Path,
) -> None:
    certs: Certs = make_certs(tmp_path)
    auth_file, token = await make_auth_file(tmp_path)
    file_port, env_port, ws_port, http_port = (free_port() for _ in range(4))
    data_dir = tmp_path / "data"
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": file_port,  # MQ_TRIO_PORT wins
        "cache-size": 10,  # MQ_TRIO_CACHE_SIZE=5 would win, but --cache-size 3 does
        "max-pending-bytes": "4MiB",
        "max-line-bytes": "64KiB",
        "shutdown-grace": 2.5,
        "ws-port": ws_port,
        "ws-host": "127.0.0.1",
        "ws-allowed-origins": ["https://app.example"],
        "ws-ping-interval": 7.5,
        "cluster-lease": 20.0,
        "data-dir": str(data_dir),
        "fsync": "always",
        "memory-window": 2,
        "line-timeout": 12.0,
        "max-connections": 50,
        "max-input-bytes": "1MiB",
        "max-topics": 100,
        "max-cache-bytes": "32MiB",
        "accept-data-loss": True,
        "auth": str(auth_file),
        "auth-timeout": 4.0,
        "tls-cert": certs.cert,
        "tls-key": certs.key,
        "tls-client-ca": certs.ca_file,
        "tls-handshake-timeout": 6.0,
        "http-port": http_port,
        "http-host": "127.0.0.1",
        "ack-timeout": 9.0,
        "max-deliveries": 3,
        "dedupe-window": 60.0,
        "max-queue-jobs": 1000,
        "max-job-bytes": "16MiB",
        "log-level": "debug",  # MQ_TRIO_LOG_LEVEL=error would win, but --log-level info does
        "log-format": "json",
    }
    # (all but "cluster", which does not combine with data-dir: test_cluster.py serves
    # a node from a file with it)
    assert sorted(values) == sorted(k for k in KEYS if k != "cluster"), \
        "the file must set every option"
    config = tmp_path / "mq-trio.toml"
    config.write_text("".join(f"{key} = {toml_value(v)}\n" for key, v in values.items()))
    env = clean_environment(MQ_TRIO_PORT=str(env_port), MQ_TRIO_CACHE_SIZE="5",
                            MQ_TRIO_LOG_LEVEL="error")
    # --log-level repeats its default: given, it still wins over the environment.
    argv = [sys.executable, "-m", "mq_trio", "serve", "--config", str(config),
            "--cache-size", "3", "--log-level", "info"]

    printed = await trio.run_process([*argv, "--print-config"], env=env,
                                     capture_stdout=True, capture_stderr=True)
    assert printed.stderr == b""
    shown = parse_printed(printed.stdout.decode())
    expected = {key: (value, str(config)) for key, value in values.items()}
    expected["port"] = (env_port, "MQ_TRIO_PORT")
    expected["cache-size"] = (3, "--cache-size")
    expected["log-level"] = ("info", "--log-level")
    expected["cluster"] = (None, "default")
    assert shown == expected

    proc = await trio.lowlevel.open_process(argv, env=env, stderr=subprocess.PIPE)
    served = Served(proc)
    try:
        with trio.fail_after(TIMEOUT):
            # JSON lines (log-format), at info (not the file's debug, not the env's error)
            tcp = await served.wait_for("(tcp")
            ws = await served.wait_for("(websocket")
            http = await served.wait_for("(http")
            assert tcp["message"] == f"listening on 127.0.0.1:{env_port} (tcp, mutual tls)"
            assert ws["message"].startswith(f"listening on 127.0.0.1:{ws_port} (websocket, "
                                            f"mutual tls, page at https://")
            assert http["message"].startswith(f"listening on 127.0.0.1:{http_port} (http")
            assert [p.name for p in data_dir.iterdir()], "the data directory is in use"

            # Mutual TLS: no client certificate, no service.
            bare = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", env_port, ssl_context=certs.client_context())
            assert await refused_by_server(bare)
            context = certs.client_context(certs.client_cert())
            client = await TLSLineClient.connect(env_port, context)
            # Auth: nothing before the token from the auth file.
            send = {"command": "send", "topic": "t", "msg": "m", "delivery": "all"}
            assert await client.request(send) == NOT_AUTHENTICATED
            assert await client.request({"command": "auth", "token": token}) == OK
            for i in range(6):
                assert await client.request({**send, "msg": f"m{i}"}) == OK
            # Cache size 3 (the flag), not 5 (the environment) nor 10 (the file).
            await client.send({"command": "subscribe", "topic": "t", "last_seen": -1})
            await client.send({"command": "unsubscribe", "topic": "end"})
            assert await client.receive() == OK
            replayed = []
            while (item := await client.receive()) != OK:
                replayed.append(item["msg"])
            assert replayed == ["m3", "m4", "m5"]
            # max-line-bytes 64KiB: a longer line is refused and the connection closed.
            await client.stream.send_all(b"x" * (70 << 10) + b"\n")
            assert b"Line too long" in await client.read_to_eof()
            await client.aclose()

            # The WebSocket port, over TLS, with the file's allowed origin only.
            assert await websocket_status(ws_port, context, "https://evil.example") == (
                b"HTTP/1.1 403 Forbidden")
            assert await websocket_status(ws_port, context, "https://app.example") == (
                b"HTTP/1.1 101 Switching Protocols")
            # The HTTP port listens where the file says.
            http_stream = await trio.open_tcp_stream("127.0.0.1", http_port)
            await http_stream.aclose()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(TIMEOUT):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        with trio.fail_after(TIMEOUT):
            await served.drain()
        assert proc.stderr is not None
        await proc.stderr.aclose()
    assert proc.returncode == 0
    # Info, not the file's debug (which logs every connect): the flag won.
    assert {line["level"] for line in served.lines} <= {"info", "warning"}
    assert served.lines[-1]["message"] == "stopped"
