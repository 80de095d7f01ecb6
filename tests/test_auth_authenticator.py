"""The authenticator: passwords off the event loop, timing equalised, failures slowed
per host, a bounded queue; tokens inline (docs/security.md, "Brute force and cost")."""

from __future__ import annotations

import threading
from pathlib import Path

import argon2
import pytest
import trio
import trio.testing

from mq_trio.auth import Authenticator, AuthFailed, new_token
from mq_trio.auth import _authenticator as authenticator_module
from mq_trio.auth._secrets import verify_password
from mq_trio.auth._throttle import Throttle, host_key

FAST = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
TOKEN, TOKEN_HASH = new_token()
TEXT = f"""
[users.alice]
password = "{FAST.hash("right")}"
publish = ["a.*"]

[users.robot]
certificate = "CN=robot"

[tokens.bot]
hash = "{TOKEN_HASH}"
subscribe = ["**"]
"""


@pytest.fixture
def auth(tmp_path: Path) -> Authenticator:
    path = tmp_path / "auth.toml"
    path.write_text(TEXT, encoding="utf-8")
    return Authenticator.load(path)


async def test_password(auth: Authenticator) -> None:
    grant = await auth.authenticate(user="alice", password="right", peer="192.0.2.1")
    assert grant.identity == "user:alice"
    assert grant.may_publish("a.b")
    again = await auth.authenticate(user="alice", password="right", peer="192.0.2.2")
    assert again is grant  # one grant per identity: connections share its memo


async def test_wrong_password(auth: Authenticator) -> None:
    with pytest.raises(AuthFailed, match="wrong password for user alice") as info:
        await auth.authenticate(user="alice", password="wrong", peer="192.0.2.1")
    assert "wrong" not in str(info.value).replace("wrong password", "")


async def test_unknown_user(auth: Authenticator) -> None:
    with pytest.raises(AuthFailed, match="unknown user 'mallory'"):
        await auth.authenticate(user="mallory", password="x", peer="192.0.2.1")


async def test_certificate_only_user_has_no_password(auth: Authenticator) -> None:
    with pytest.raises(AuthFailed, match="certificate only"):
        await auth.authenticate(user="robot", password="", peer="192.0.2.1")


async def test_token(auth: Authenticator) -> None:
    grant = await auth.authenticate(token=TOKEN, peer="192.0.2.1")
    assert grant.identity == "token:bot" and grant.may_subscribe("any.thing")
    with pytest.raises(AuthFailed, match="unknown token"):
        await auth.authenticate(token=TOKEN + "x", peer="192.0.2.9")


async def test_credentials_shape(auth: Authenticator) -> None:
    with pytest.raises(AuthFailed):
        await auth.authenticate(peer="192.0.2.1")
    with pytest.raises(AuthFailed):
        await auth.authenticate(user="alice", peer="192.0.2.1")
    with pytest.raises(AuthFailed, match="not both"):
        await auth.authenticate(token=TOKEN, user="alice", password="right")


async def test_unknown_user_costs_a_verification(
    auth: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same work for an unknown user as for a wrong password: a dummy hash of the same
    cost, verified in a worker thread."""
    calls: list[tuple[str, bool]] = []
    real = verify_password

    def spy(stored: str, password: str) -> bool:
        calls.append((stored, threading.current_thread() is threading.main_thread()))
        return real(stored, password)

    monkeypatch.setattr("mq_trio.auth._authenticator.verify_password", spy)
    for user in ("alice", "mallory"):
        with pytest.raises(AuthFailed):
            await auth.authenticate(user=user, password="guess", peer=f"198.51.100.{len(user)}")
    (alice_hash, alice_on_main), (dummy, dummy_on_main) = calls
    assert not alice_on_main and not dummy_on_main
    assert dummy != alice_hash
    assert argon2.extract_parameters(dummy) == argon2.extract_parameters(alice_hash)


async def test_threads_are_limited_and_the_queue_bounded(
    auth: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def slow(stored: str, password: str) -> bool:
        release.wait(10)
        return True

    monkeypatch.setattr("mq_trio.auth._authenticator.verify_password", slow)
    auth.threads = 2
    auth.max_pending = 3
    results: list[str] = []

    async def login(n: int) -> None:
        try:
            grant = await auth.authenticate(user="alice", password="x", peer=f"192.0.2.{n}")
            results.append(grant.identity)
        except AuthFailed as exc:
            results.append(str(exc))

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(login, n)
        await trio.testing.wait_all_tasks_blocked()
        limiter = auth._limiter
        assert limiter is not None
        assert limiter.borrowed_tokens == 2  # two verify, one waits for a thread
        assert limiter.statistics().tasks_waiting == 1
        await login(3)  # the fourth: beyond the bound, refused at once
        assert results == ["too many authentications in progress"]
        release.set()
    assert sorted(results) == ["too many authentications in progress"] + ["user:alice"] * 3


async def test_failures_slow_down_their_host(
    auth: Authenticator, autojump_clock: trio.testing.MockClock
) -> None:
    async def attempt(token: str, peer: str = "203.0.113.5") -> float:
        start = trio.current_time()
        try:
            await auth.authenticate(token=token, peer=peer)
        except AuthFailed:
            pass
        return trio.current_time() - start

    assert await attempt("bad") == 0  # the first failure is not delayed
    assert await attempt("bad") == pytest.approx(0.25)
    assert await attempt("bad") == pytest.approx(0.5)
    assert await attempt("bad") == pytest.approx(1.0)
    assert await attempt(TOKEN) == pytest.approx(2.0)  # a good credential waits its turn
    assert await attempt(TOKEN, peer="203.0.113.6") == 0  # other hosts are not slowed
    for _ in range(10):
        await attempt("bad")
    assert await attempt("bad") == pytest.approx(10.0)  # the cap
    await trio.sleep(auth.throttle.forget_after + 1)
    assert await attempt(TOKEN) == 0  # forgotten after a quiet period


async def test_parallel_attempts_take_turns(
    auth: Authenticator, autojump_clock: trio.testing.MockClock
) -> None:
    """Opening many connections at once does not multiply a failing host's guesses."""
    with pytest.raises(AuthFailed):
        await auth.authenticate(token="bad", peer="203.0.113.7")
    done: list[float] = []
    start = trio.current_time()

    async def attempt() -> None:
        with pytest.raises(AuthFailed):
            await auth.authenticate(token="bad", peer="203.0.113.7")
        done.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(attempt)
    assert done == pytest.approx([0.25, 0.5, 0.75])  # one after the other
    # and the four failures so far make the next attempt wait 2 s after the last
    await attempt()
    assert done[-1] == pytest.approx(0.75 + 2.0)


async def test_too_many_waiting_from_one_host(autojump_clock: trio.testing.MockClock) -> None:
    throttle = Throttle(max_waiting=2)
    throttle.failed("203.0.113.8")
    outcomes: list[str] = []

    async def wait() -> None:
        try:
            await throttle.wait_turn("203.0.113.8")
            outcomes.append("turn")
        except AuthFailed:
            outcomes.append("refused")

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(wait)
    assert sorted(outcomes) == ["refused", "turn", "turn"]


async def test_host_table_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    throttle = Throttle(max_hosts=3)
    for n in range(10):
        throttle.failed(f"198.51.100.{n}")
    assert len(throttle) == 3
    start = trio.current_time()
    await throttle.wait_turn("198.51.100.9")  # the newest are kept
    assert trio.current_time() - start == pytest.approx(0.25)


def test_host_key() -> None:
    assert host_key("192.0.2.1") == "192.0.2.1"
    assert host_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert host_key("[2001:db8:1:2::9]") == "2001:db8:1:2::/64"  # one network, one unit
    assert host_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert host_key("fe80::1%eth0") == "fe80::/64"
    assert host_key("") == ""
    assert host_key("some-name") == "some-name"


async def test_cancelled_wait_leaves_no_trace(autojump_clock: trio.testing.MockClock) -> None:
    throttle = Throttle()
    throttle.failed("192.0.2.50")
    with trio.move_on_after(0.1):
        await throttle.wait_turn("192.0.2.50")
    assert throttle._hosts[host_key("192.0.2.50")].waiting == 0


def test_default_sizes(auth: Authenticator) -> None:
    assert auth.threads >= 1
    assert auth.max_pending == authenticator_module.PENDING_PER_CPU * auth.threads
