"""docs/security.md stays true: its example file loads, and its glob table is what the
code does."""

from __future__ import annotations

import re
from pathlib import Path

import argon2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mq_trio.auth import Authenticator, GlobSet

DOC = Path(__file__).parent.parent / "docs" / "security.md"
FAST = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def section(title: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_the_example_loads(tmp_path: Path) -> None:
    example = re.search(r"```toml\n(.*?)```", section("The auth file"), re.S)
    assert example is not None
    text = example.group(1).replace("$argon2id$v=19$m=65536,t=3,p=4$...$...", FAST.hash("pw"))
    (tmp_path / "keys").mkdir()
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    (tmp_path / "keys" / "idp-es256.pem").write_bytes(public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    path = tmp_path / "auth.toml"
    path.write_text(text, encoding="utf-8")
    auth = Authenticator.load(path)
    alice = auth.certificate_grant("CN=alice,O=Example Corp")
    assert alice is not None
    assert alice.may_publish("inbox.alice.x") and not alice.may_publish("chat.announcements.x")
    backup = auth.certificate_grant("CN=backup.internal")
    assert backup is not None and backup.may_subscribe("a.b") and not backup.may_publish("a")
    assert auth._state.token_grant("foo").identity == "token:ingest-bot"  # sha256("foo")


def glob_rows() -> list[tuple[str, str | None, list[str], list[str]]]:
    rows = []
    for line in section("Topic globs").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        glob = re.match(r"`([^`]*)`(?: \(as (\w+)\))?", cells[0])
        assert glob is not None, line
        yes = re.findall(r"`([^`]*)`", cells[1])
        if "empty" in cells[1]:
            yes.append("")
        rows.append((glob.group(1), glob.group(2), yes, re.findall(r"`([^`]*)`", cells[2])))
    return rows


@pytest.mark.parametrize(("glob", "user", "yes", "no"), glob_rows())
def test_glob_table(glob: str, user: str | None, yes: list[str], no: list[str]) -> None:
    globs = GlobSet([glob], user=user)
    for topic in yes:
        assert globs.matches(topic), topic
    for topic in no:
        assert not globs.matches(topic), topic


def test_the_table_is_read() -> None:
    assert len(glob_rows()) >= 12
