"""Auth end to end: a real auth file, a real server, reloads (in process and by SIGHUP
to a real ``mq-trio serve``), the start-up checks and the warning for open servers."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from support import LineClient, start_server

from mq_trio.auth import new_token
from mq_trio.cli import main

OK = {"success": True}
DENIED = {"success": False, "reason": "Permission denied"}


def snd(topic: str, msg: str = "m") -> dict[str, Any]:
    return {"command": "send", "topic": topic, "msg": msg, "delivery": "all"}


def write_rules(path: Path, tokens: dict[str, tuple[str, list[str], list[str]]]) -> None:
    """tokens: name -> (hash, publish globs, subscribe globs)."""
    parts = []
    for name, (digest, publish, subscribe) in tokens.items():
        parts.append(
            f'[tokens.{name}]\nhash = "{digest}"\n'
            f"publish = {publish!r}\nsubscribe = {subscribe!r}\n".replace("'", '"')
        )
    path.write_text("\n".join(parts))


async def authed(port: int, token: str) -> LineClient:
    client = await LineClient.connect(port)
    assert await client.request({"command": "auth", "token": token}) == OK
    return client


async def test_rules_from_the_file_and_a_reload_applies_them_to_live_connections(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = tmp_path / "auth.toml"
    reader_token, reader_hash = new_token()
    writer_token, writer_hash = new_token()
    gone_token, gone_hash = new_token()
    write_rules(path, {
        "reader": (reader_hash, [], ["a.*", "b.*"]),
        "writer": (writer_hash, ["a.*", "b.*"], []),
        "gone": (gone_hash, [], ["a.*"]),
    })
    server = await start_server(nursery, auth_file=str(path))
    reader = await authed(server.port, reader_token)
    writer = await authed(server.port, writer_token)
    gone = await authed(server.port, gone_token)
    assert await reader.request({"command": "subscribe", "topic": "a.x"}) == OK
    assert await reader.request({"command": "subscribe", "topic": "b.x"}) == OK
    assert await reader.request({"command": "subscribe", "topic": "c.x"}) == DENIED
    assert await reader.request(snd("a.x")) == DENIED
    assert await gone.request({"command": "subscribe", "topic": "a.x"}) == OK
    assert await writer.request(snd("a.x", "1")) == OK
    assert (await reader.receive())["msg"] == "1"
    assert (await gone.receive())["msg"] == "1"

    # the reader loses "a.*", "gone" is removed from the file
    write_rules(path, {
        "reader": (reader_hash, [], ["b.*"]),
        "writer": (writer_hash, ["a.*", "b.*"], []),
    })
    assert server.reload_auth()
    with trio.fail_after(5):
        # the idle, removed identity is closed without sending anything
        assert await gone.receive() == {"success": False, "reason": "Authentication failed"}
        assert await gone.read_to_eof() == b""
    await server.wait_until(lambda: len(server.connections) == 2)
    # the reader's "a.x" subscription was ended; "b.x" stays
    assert await writer.request(snd("a.x", "2")) == OK
    assert await writer.request(snd("b.x", "3")) == OK
    assert (await reader.receive())["msg"] == "3"
    assert await reader.request({"command": "subscribe", "topic": "a.y"}) == DENIED


async def test_a_broken_reload_keeps_the_old_rules(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "auth.toml"
    token, digest = new_token()
    write_rules(path, {"app": (digest, ["a"], ["a"])})
    server = await start_server(nursery, auth_file=str(path))
    client = await authed(server.port, token)
    for broken in ("[tokens.app]\nhash = 1\n", "not toml at all [", ""):
        path.write_text(broken)
        with caplog.at_level(logging.ERROR, "mq_trio.server"):
            ok = server.reload_auth()
        assert ok is (broken == "")  # an empty file is valid: it lets nobody in
        if not ok:
            assert "keeping the previous rules" in caplog.text
            assert await client.request(snd("a")) == OK
            assert await (await authed(server.port, token)).request(snd("a")) == OK
    # the empty file did load: nobody gets in any more, and the client is closed
    with trio.fail_after(5):
        assert await client.receive() == {"success": False, "reason": "Authentication failed"}
    newcomer = await LineClient.connect(server.port)
    assert await newcomer.request({"command": "auth", "token": token}) == {
        "success": False, "reason": "Authentication failed"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_sighup_reloads_a_running_server(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    token, digest = new_token()
    write_rules(path, {"app": (digest, ["a"], [])})
    port = free_port()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mq_trio", "serve", "--port", str(port), "--auth", str(path),
         "--log-level", "info"],
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    log = b""

    async def wait_log(text: bytes) -> None:
        nonlocal log
        while text not in log:
            data = await proc.stderr.receive_some(4096)  # type: ignore[union-attr]
            assert data, log
            log += data

    try:
        with trio.fail_after(30):
            await wait_log(b"listening on")
            client = await authed(port, token)
            assert await client.request(snd("b")) == DENIED
            write_rules(path, {"app": (digest, ["b"], [])})
            proc.send_signal(signal.SIGHUP)
            await wait_log(b"reloaded")
            assert await client.request(snd("b")) == OK
            assert await client.request(snd("a")) == DENIED
            path.write_text("[broken")
            proc.send_signal(signal.SIGHUP)
            await wait_log(b"keeping the previous rules")
            assert await client.request(snd("b")) == OK
            await client.aclose()
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0


def test_serve_refuses_a_broken_auth_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "auth.toml"
    path.write_text("[users.alice]\npassword = 'plaintext'\n")
    assert main(["serve", "--port", "0", "--auth", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mq-trio: ") and str(path) in err and "\n" not in err
    assert main(["serve", "--port", "0", "--auth", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err


async def test_listening_beyond_loopback_without_auth_warns(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "mq_trio.server"):
        await start_server(nursery, host="127.0.0.1")
    assert "without authentication" not in caplog.text
    with caplog.at_level(logging.WARNING, "mq_trio.server"):
        server = await start_server(nursery, host="0.0.0.0")
    assert "listening on 0.0.0.0 without authentication" in caplog.text
    client = await LineClient.connect(server.port)  # served as before (over loopback)
    assert await client.request(snd("t")) == OK


async def test_an_authenticated_server_beyond_loopback_does_not_warn(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    path = tmp_path / "auth.toml"
    path.write_text("")
    with caplog.at_level(logging.WARNING, "mq_trio.server"):
        await start_server(nursery, host="0.0.0.0", auth_file=str(path))
    assert "without authentication" not in caplog.text


def test_is_loopback() -> None:
    from mq_trio.server._server import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.1")
