"""The auth file (docs/security.md, "The auth file"): what loads, what is refused and
how it says so, and the permissions that come out of it."""

from __future__ import annotations

import os
from pathlib import Path

import argon2
import pytest

from mq_trio.auth import AuthConfigError, Authenticator, GlobSet, Grant, new_token
from mq_trio.auth._grant import MEMO_LIMIT, MEMO_MAX_TOPIC

#: Cheap argon2id hashes for tests (the real default costs about 130 ms per verify).
FAST = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
ALICE_HASH = FAST.hash("alice-pw")
TOKEN, TOKEN_HASH = new_token()


def write(tmp_path: Path, text: str, name: str = "auth.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> Authenticator:
    return Authenticator.load(write(tmp_path, text))


def refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(AuthConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "auth.toml") in message
    return message


EXAMPLE = f"""
[users.alice]
password = "{ALICE_HASH}"
certificate = "CN=alice,O=Example"
publish = ["chat.**", "inbox.{{user}}.*"]
subscribe = ["chat.**", "inbox.{{user}}.*"]
publish_deny = ["chat.admin.**"]

[users.viewer]
password = "{ALICE_HASH}"
subscribe = ["**"]
subscribe_deny = ["secret.**"]

[users.nobody]
password = "{ALICE_HASH}"

[tokens.ingest-bot]
hash = "{TOKEN_HASH}"
publish = ["sensors.*"]
"""


def user_grant(auth: Authenticator, name: str) -> Grant:
    grant = auth._state.user_grants[name]
    assert grant.identity == f"user:{name}"
    return grant


def test_example_loads(tmp_path: Path) -> None:
    auth = load(tmp_path, EXAMPLE)
    assert auth.path == str(tmp_path / "auth.toml")
    alice = user_grant(auth, "alice")
    assert alice.expires is None and not alice.stale
    assert alice.may_publish("chat.room.1")
    assert not alice.may_publish("chat.admin.x")  # deny wins
    assert alice.may_subscribe("chat.admin.x")  # the deny is for publish only
    assert alice.may_publish("inbox.alice.x")
    assert not alice.may_publish("inbox.bob.x")
    assert not alice.may_publish("other")


def test_deny_wins_and_default_deny(tmp_path: Path) -> None:
    auth = load(tmp_path, EXAMPLE)
    viewer = user_grant(auth, "viewer")
    assert viewer.may_subscribe("anything.at.all")
    assert not viewer.may_subscribe("secret.plans")
    assert not viewer.may_publish("anything")  # no publish list: nothing
    nobody = user_grant(auth, "nobody")
    for topic in ("", "a", "chat.x", "inbox.nobody.x"):
        assert not nobody.may_publish(topic)
        assert not nobody.may_subscribe(topic)


def test_certificate_identity(tmp_path: Path) -> None:
    auth = load(tmp_path, EXAMPLE)
    grant = auth.certificate_grant("CN=alice,O=Example")
    assert grant is not None
    assert grant.identity == "cert:CN=alice,O=Example"
    assert grant.may_publish("inbox.alice.x")  # the user's permissions, {user} = alice
    assert auth.certificate_grant("CN=alice") is None
    assert auth.certificate_grant("CN=mallory,O=Example") is None


def test_certificate_only_user(tmp_path: Path) -> None:
    auth = load(tmp_path, '[users.robot]\ncertificate = "CN=robot"\npublish = ["x"]\n')
    grant = auth.certificate_grant("CN=robot")
    assert grant is not None and grant.may_publish("x")


def test_grants_are_shared_and_memoized(tmp_path: Path) -> None:
    auth = load(tmp_path, EXAMPLE)
    alice = user_grant(auth, "alice")
    assert auth._state.user_grants["alice"] is alice
    cert = auth.certificate_grant("CN=alice,O=Example")
    assert cert is not None
    assert alice.may_publish("chat.1")
    # the certificate grant shares alice's memo: the first check served both
    assert cert._publish_memo is alice._publish_memo
    assert alice._publish_memo == {"chat.1": True}


def test_memo_is_bounded(tmp_path: Path) -> None:
    alice = user_grant(load(tmp_path, EXAMPLE), "alice")
    for i in range(MEMO_LIMIT + 5):
        assert alice.may_publish(f"chat.{i}")
    assert len(alice._publish_memo) <= MEMO_LIMIT
    long_topic = "chat." + "x" * MEMO_MAX_TOPIC
    assert alice.may_publish(long_topic)
    assert long_topic not in alice._publish_memo  # checked every time, never kept


def test_memo_serves_repeated_checks(tmp_path: Path) -> None:
    alice = user_grant(load(tmp_path, EXAMPLE), "alice")
    alice.may_subscribe("chat.x")
    alice._subscribe_memo["chat.x"] = False  # proves the second answer is the memo's
    assert not alice.may_subscribe("chat.x")


def test_empty_file_lets_nobody_in(tmp_path: Path) -> None:
    auth = load(tmp_path, "")
    assert auth._state.user_grants == {} and auth._state.token_grants == {}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="cannot read"):
        Authenticator.load(tmp_path / "nope.toml")


def test_not_toml(tmp_path: Path) -> None:
    assert "not valid TOML" in refused(tmp_path, "[users.alice\n")


def test_duplicate_user(tmp_path: Path) -> None:
    text = f'[users.a]\npassword = "{ALICE_HASH}"\n[users.a]\npassword = "{ALICE_HASH}"\n'
    assert "not valid TOML" in refused(tmp_path, text)


def test_duplicate_token_name(tmp_path: Path) -> None:
    text = f'[tokens.t]\nhash = "{TOKEN_HASH}"\n[tokens.t]\nhash = "{TOKEN_HASH}"\n'
    assert "not valid TOML" in refused(tmp_path, text)


def test_same_token_twice(tmp_path: Path) -> None:
    text = f'[tokens.t1]\nhash = "{TOKEN_HASH}"\n[tokens.t2]\nhash = "{TOKEN_HASH}"\n'
    assert "[tokens.t2] hash: the same token as 't1'" in refused(tmp_path, text)


def test_same_certificate_twice(tmp_path: Path) -> None:
    text = '[users.a]\ncertificate = "CN=x"\n[users.b]\ncertificate = "CN=x"\n'
    assert "[users.b] certificate: the same subject as user 'a'" in refused(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("colour = 1\n", "auth.toml: colour: unknown key (known here: jwt, tokens, users)"),
        ("[users.a]\ncertificate = \"CN=a\"\npublsh = [\"x\"]\n", "[users.a] publsh: unknown key"),
        (f'[tokens.t]\nhash = "{TOKEN_HASH}"\nextra = 1\n', "[tokens.t] extra: unknown key"),
        ("[users.a]\ncertificate = \"CN=a\"\npublish = \"x\"\n",
         "[users.a] publish: must be a list of strings, not a string"),
        ("[users.a]\ncertificate = \"CN=a\"\nsubscribe = [1]\n",
         "[users.a] subscribe: must be a list of strings, not a list containing a number"),
        ("[[users]]\npassword = \"x\"\n",
         "[users]: must be a table, not a list containing a table"),
        ("[users.a]\npassword = 5\n", "[users.a] password: must be a string, not a number"),
        ("[users.a]\ncertificate = \"\"\n", "[users.a] certificate: must not be empty"),
        ("users = 3\n", "[users]: must be a table, not a number"),
        ("[users]\na = 3\n", "[users.a]: must be a table"),
        ("[users.a]\npublish = [\"x\"]\n", "[users.a]: a user needs a password, a certificate"),
        ('[users.a]\npassword = "plaintext"\n', "[users.a] password: not an argon2id hash"),
        ('[users.a]\npassword = "$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g"\n',
         "not an argon2id hash"),
        ('[users.a]\npassword = "$argon2id$v=19$garbage"\n', "a malformed argon2id hash"),
        ("[tokens.t]\npublish = [\"x\"]\n", "[tokens.t] hash: missing"),
        ('[tokens.t]\nhash = "mqt_plaintexttoken"\n', "a token hash starts with 'sha256:'"),
        ('[tokens.t]\nhash = "sha256:ABC"\n', "64 lowercase hex"),
        ("[users.a]\ncertificate = \"CN=a\"\npublish = [\"a.***\"]\n",
         "[users.a] publish: bad glob"),
        ("[users.a]\ncertificate = \"CN=a\"\npublish_deny = [\"\"]\n",
         "[users.a] publish_deny: bad glob"),
        ("[users.\"a.b\"]\ncertificate = \"CN=a\"\npublish = [\"inbox.{user}\"]\n",
         "[users.\"a.b\"] publish: bad glob"),
        ("[users.\"\"]\ncertificate = \"CN=a\"\n", 'a name must be non-empty'),
        ("[jwt]\nalgorithm = \"none\"\n", "[jwt] algorithm: must be one of"),
    ],
)
def test_refused(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in refused(tmp_path, text)


def test_token_lists_and_user_placeholder(tmp_path: Path) -> None:
    auth = load(tmp_path, f'[tokens.bot-1]\nhash = "{TOKEN_HASH}"\npublish = ["{{user}}.out"]\n')
    grant = auth._state.token_grants[TOKEN_HASH]
    assert grant.identity == "token:bot-1"
    assert grant.may_publish("bot-1.out")
    assert not grant.may_subscribe("bot-1.out")


def test_relative_key_file_resolves_against_the_auth_file(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    (sub / "jwt.secret").write_bytes(b"k" * 32 + b"\n")
    path = write(sub, '[jwt]\nalgorithm = "HS256"\nsecret_file = "jwt.secret"\n')
    cwd = os.getcwd()
    os.chdir(tmp_path)  # not the auth file's directory
    try:
        auth = Authenticator.load(path)
    finally:
        os.chdir(cwd)
    config = auth._state.file.jwt
    assert config is not None and config.key == b"k" * 32  # the trailing newline is dropped


def test_unreadable_key_file(tmp_path: Path) -> None:
    message = refused(tmp_path, '[jwt]\nalgorithm = "RS256"\npublic_key_file = "missing.pem"\n')
    assert "[jwt] public_key_file: cannot read" in message
    assert str(tmp_path / "missing.pem") in message


def test_globset_public_api() -> None:
    assert GlobSet(["a.*"]).matches("a.b")
