"""``mq-trio passwd``: hash lines and tokens that paste into a working auth file."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mq_trio.auth import Authenticator
from mq_trio.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]


def prompts(monkeypatch: pytest.MonkeyPatch, *answers: str) -> list[str]:
    asked: list[str] = []
    replies: Iterator[str] = iter(answers)

    def fake_getpass(prompt: str = "Password: ") -> str:
        asked.append(prompt)
        return next(replies)

    monkeypatch.setattr("getpass.getpass", fake_getpass)
    return asked


async def test_prompted_password_pastes_into_a_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    asked = prompts(monkeypatch, "s3cret pass", "s3cret pass")
    assert main(["passwd", "alice"]) == 0
    assert len(asked) == 2
    out = capsys.readouterr().out
    assert "s3cret" not in out
    table = tomllib.loads(out)
    assert table["users"]["alice"]["password"].startswith("$argon2id$")
    path = tmp_path / "auth.toml"
    path.write_text(out + 'publish = ["x"]\n', encoding="utf-8")
    auth = Authenticator.load(path)
    grant = await auth.authenticate(user="alice", password="s3cret pass", peer="192.0.2.1")
    assert grant.may_publish("x")


def test_mismatch(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    prompts(monkeypatch, "one", "two")
    assert main(["passwd"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "do not match" in captured.err


def test_empty(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    prompts(monkeypatch, "", "")
    assert main(["passwd"]) == 1
    assert "empty" in capsys.readouterr().err


def test_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("from a script\nignored\n"))
    prompts(monkeypatch)  # never asked
    assert main(["passwd", "--stdin"]) == 0
    line = capsys.readouterr().out
    assert line.startswith('password = "$argon2id$') and line.count("\n") == 1
    from argon2 import PasswordHasher

    assert PasswordHasher().verify(tomllib.loads(line)["password"], "from a script")


def test_name_needing_quotes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    assert main(["passwd", "--stdin", 'bob "the" smith']) == 0
    table = tomllib.loads(capsys.readouterr().out)
    assert list(table["users"]) == ['bob "the" smith']


def test_token(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["passwd", "--token", "ingest-bot"]) == 0
    captured = capsys.readouterr()
    token, *snippet = captured.out.splitlines()
    assert token.startswith("mqt_") and len(token) > 40
    assert "shown only this once" in captured.err
    text = "\n".join(snippet)
    assert token not in text  # only the hash goes in the file
    assert tomllib.loads(text)["tokens"]["ingest-bot"]["hash"].startswith("sha256:")
    path = tmp_path / "auth.toml"
    path.write_text(text + '\nsubscribe = ["**"]\n', encoding="utf-8")
    assert Authenticator.load(path)._state.token_grant(token).identity == "token:ingest-bot"


def test_token_pasted_whole_is_not_toml(capsys: pytest.CaptureFixture[str]) -> None:
    """Pasting all of stdout by mistake fails to load, rather than storing the token."""
    assert main(["passwd", "--token"]) == 0
    with pytest.raises(tomllib.TOMLDecodeError):
        tomllib.loads(capsys.readouterr().out)


def test_token_refuses_stdin(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passwd", "--token", "--stdin"]) == 2


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["passwd", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in ("--token", "--stdin", "argon2id", "NAME", "docs/security.md"):
        assert word in out


def test_password_is_never_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["passwd", "--password", "x"])
