"""Reload (SIGHUP): a broken file keeps the old rules (Mosquitto #588: a reload must
never let everyone in); a good one makes old grants stale and ``regrant`` maps them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import argon2
import jwt
import pytest
import trio
import trio.testing

from mq_trio.auth import AuthConfigError, Authenticator, Grant, new_token

FAST = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
ALICE = FAST.hash("alice-pw")
BOB = FAST.hash("bob-pw")
TOKEN, TOKEN_HASH = new_token()
SECRET = "j" * 32


def rules(alice_publish: str = "a.*", bob: bool = True, token_hash: str = TOKEN_HASH,
          alice_hash: str = ALICE, secret: str = SECRET) -> str:
    text = f"""
[users.alice]
password = "{alice_hash}"
certificate = "CN=alice"
publish = ["{alice_publish}"]

[tokens.bot]
hash = "{token_hash}"
publish = ["bot.*"]

[jwt]
algorithm = "HS256"
secret = "{secret}"
subscribe = ["j.*"]
"""
    if bob:
        text += f'\n[users.bob]\npassword = "{BOB}"\nsubscribe = ["b.*"]\n'
    return text


def rewrite(path: Path, text: str | None) -> None:
    """Replace the auth file (None: delete it), as an operator would before SIGHUP."""
    if text is None:
        path.unlink()
    else:
        path.write_text(text, encoding="utf-8")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "auth.toml"
    rewrite(path, rules())
    return path


async def login(auth: Authenticator, user: str) -> Grant:
    return await auth.authenticate(user=user, password=f"{user}-pw", peer="192.0.2.1")


def jwt_token(secret: str = SECRET) -> str:
    return jwt.encode({"sub": "carl", "exp": int(time.time()) + 600}, secret, "HS256")


@pytest.mark.parametrize(
    "broken",
    [
        "[users.alice\n",  # not TOML
        rules(alice_publish="a.***"),  # a bad glob
        rules().replace("publish", "publsh", 1),  # an unknown key
        rules(alice_hash="plain-text"),  # not argon2id
        None,  # the file is gone
    ],
)
async def test_failed_reload_keeps_the_old_rules(path: Path, broken: str | None) -> None:
    auth = Authenticator.load(path)
    alice = await login(auth, "alice")
    assert alice.may_publish("a.x")
    rewrite(path, broken)
    with pytest.raises(AuthConfigError):
        auth.reload()
    assert not alice.stale  # the old grant is untouched ...
    assert alice.may_publish("a.x")
    assert not alice.may_publish("b.x")
    assert auth.regrant(alice) is alice
    assert await login(auth, "alice") is alice  # ... and so are new logins
    assert (await auth.authenticate(token=TOKEN)).identity == "token:bot"
    with pytest.raises(Exception, match="wrong password"):
        await auth.authenticate(user="alice", password="anything", peer="192.0.2.1")


async def test_good_reload_makes_grants_stale(path: Path) -> None:
    auth = Authenticator.load(path)
    alice = await login(auth, "alice")
    bob = await login(auth, "bob")
    bot = await auth.authenticate(token=TOKEN)
    cert = auth.certificate_grant("CN=alice")
    carl = await auth.authenticate(token=jwt_token())
    assert cert is not None
    rewrite(path, rules(alice_publish="c.*", bob=False))
    auth.reload()
    for grant in (alice, bob, bot, cert, carl):
        assert grant.stale
    new_alice = auth.regrant(alice)
    assert new_alice is not None and not new_alice.stale
    assert new_alice.may_publish("c.x") and not new_alice.may_publish("a.x")
    assert auth.regrant(bob) is None  # removed: the server closes that connection
    new_cert = auth.regrant(cert)
    assert new_cert is not None and new_cert.may_publish("c.x")
    assert new_cert.identity == "cert:CN=alice"
    new_bot = auth.regrant(bot)
    assert new_bot is not None and new_bot.may_publish("bot.x")
    new_carl = auth.regrant(carl)
    assert new_carl is not None and new_carl.identity == "jwt:carl"
    assert new_carl.may_subscribe("j.x")
    assert await login(auth, "alice") is new_alice  # new logins get the new grant


async def test_two_reloads(path: Path) -> None:
    auth = Authenticator.load(path)
    alice = await login(auth, "alice")
    auth.reload()
    auth.reload()
    again = auth.regrant(alice)
    assert again is not None and not again.stale
    assert again is await login(auth, "alice")


async def test_rotated_secrets_end_the_old_grants(path: Path) -> None:
    """A changed password, token or JWT key is a rotation: who logged in with the old
    one must log in again."""
    auth = Authenticator.load(path)
    alice = await login(auth, "alice")
    bot = await auth.authenticate(token=TOKEN)
    carl = await auth.authenticate(token=jwt_token())
    new_token_text, new_hash = new_token()
    rewrite(path, rules(alice_hash=FAST.hash("new-pw"), token_hash=new_hash, secret="k" * 32))
    auth.reload()
    assert auth.regrant(alice) is None
    assert auth.regrant(bot) is None
    assert auth.regrant(carl) is None
    assert (await auth.authenticate(token=new_token_text)).identity == "token:bot"


async def test_removed_certificate(path: Path) -> None:
    auth = Authenticator.load(path)
    cert = auth.certificate_grant("CN=alice")
    assert cert is not None
    rewrite(path, rules().replace('certificate = "CN=alice"\n', ""))
    auth.reload()
    assert auth.regrant(cert) is None
    assert auth.certificate_grant("CN=alice") is None


async def test_marking_one_grant_stale(path: Path) -> None:
    """``stale`` can be set on one grant (as a test double of a reload would)."""
    auth = Authenticator.load(path)
    alice = await login(auth, "alice")
    bob = await login(auth, "bob")
    alice.stale = True
    assert alice.stale and not bob.stale
    again = auth.regrant(alice)
    assert again is alice and not alice.stale  # the rules did not change: unmarked


async def test_reload_during_a_password_check(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A login verified under the old rules while a reload happens comes back stale, and
    the server's regrant puts it under the new rules."""
    auth = Authenticator.load(path)
    release = threading.Event()

    def slow(stored: str, password: str) -> bool:
        release.wait(10)
        return True

    monkeypatch.setattr("mq_trio.auth._authenticator.verify_password", slow)
    grants: list[Grant] = []

    async def log_in() -> None:
        grants.append(await login(auth, "alice"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(log_in)
        await trio.testing.wait_all_tasks_blocked()
        rewrite(path, rules(alice_publish="c.*"))
        auth.reload()
        release.set()
    (grant,) = grants
    assert grant.stale and grant.may_publish("a.x")
    new = auth.regrant(grant)
    assert new is not None and new.may_publish("c.x") and not new.may_publish("a.x")
