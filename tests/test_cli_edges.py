"""``mq-trio serve`` rough edges (#13, points 7 and 8): help text, option typos, ports."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from mq_trio.cli import main


def serve_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_serve_help_has_no_duplicate_or_none_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(serve_help(capsys).split())  # undo the wrapping
    assert "(default: None)" not in text
    assert "(default: False)" not in text
    # No option's help says its default twice.
    for entry in re.split(r" (?=--[a-z])", text):
        assert entry.lower().count("default") <= 1, entry


def test_serve_help_shows_sizes_as_the_readme_does(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(serve_help(capsys).split())
    for size in ("8MiB", "1MiB", "256MiB", "1GiB"):
        assert f"(default: {size})" in text
    assert "8388608" not in text
    assert "1073741824" not in text


def test_serve_help_points_at_the_source_tree_for_docs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = " ".join(serve_help(capsys).split())
    for name in re.findall(r"docs/\w+\.md", text):
        assert f"{name} in the source tree" in text, name


def test_serve_option_typo_prints_serve_usage_and_a_suggestion(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--prot", "7000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mq-trio serve ")
    assert err.endswith("mq-trio serve: error: unknown option --prot; did you mean --port?\n")


def test_sub_option_typo_suggests_too(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["sub", "t", "--urll", "ws://127.0.0.1:1/"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mq-trio sub ")
    assert "unknown option --urll; did you mean --url?" in err


def test_an_option_nothing_like_any_gets_no_suggestion(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--zzzzzz"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.endswith("error: unknown option --zzzzzz\n")


def test_ws_port_equal_to_port_is_refused_at_start() -> None:
    with socket.socket() as s:  # a port nobody uses: the check comes before any bind
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    result = subprocess.run(
        [sys.executable, "-m", "mq_trio", "serve", "--port", port, "--ws-port", port],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"mq-trio: --ws-port {port} is also --port: the TCP and WebSocket listeners need "
        "different ports (or --ws-port 0 for a free one)\n"
    )
