"""The authenticator: credentials in, a Grant out, without stalling the event loop.

Argon2 verification (about 130 ms of CPU) runs in worker threads, as many at once as
there are CPUs, with a bounded queue; beyond it, logins fail at once rather than pile
up. Failed attempts slow down their host (``_throttle``). Tokens and JWTs are checked
inline: they cost microseconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import trio

from ._config import load_auth_file
from ._errors import AuthFailed
from ._grant import Grant
from ._secrets import verify_password
from ._state import State
from ._throttle import Throttle

#: Password verifications that may wait for a thread, per CPU: about 4 s of work at
#: 130 ms each, a little under the default --auth-timeout.
PENDING_PER_CPU = 32


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


@attrs.define(eq=False)
class Authenticator:
    """Built by :meth:`load`; :meth:`reload` swaps in a new file's rules all at once."""

    path: str
    _state: State = attrs.field(alias="state", repr=False)
    threads: int = attrs.field(factory=cpu_count)
    #: Password verifications waiting or running; beyond it, fail closed.
    max_pending: int = attrs.field(default=attrs.Factory(
        lambda self: PENDING_PER_CPU * self.threads, takes_self=True))
    throttle: Throttle = attrs.field(factory=Throttle)
    _limiter: trio.CapacityLimiter | None = attrs.field(default=None, init=False, repr=False)
    _pending: int = attrs.field(default=0, init=False, repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Authenticator:
        """Read the auth file; AuthConfigError (one line) when it is missing or invalid."""
        return cls(os.fspath(path), State.build(load_auth_file(Path(path))))

    def reload(self) -> None:
        """Re-read :attr:`path`. On any error raise AuthConfigError and keep the current
        rules (a failed reload must never let everyone in); on success, the grants handed
        out so far become stale and :meth:`regrant` maps them to the new rules."""
        state = State.build(load_auth_file(Path(self.path)))
        old, self._state = self._state, state
        old.generation.stale = True

    async def authenticate(
        self,
        *,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        peer: str = "",
    ) -> Grant:
        """The grant for a token (static or JWT), or for a user and password; AuthFailed
        otherwise. ``peer`` is the client's host, whose failures slow its next attempts."""
        if token is not None:
            if user is not None or password is not None:
                raise AuthFailed("a token, or a user and a password, not both")
            await self.throttle.wait_turn(peer)
            try:
                return self._state.token_grant(token)
            except AuthFailed:
                self.throttle.failed(peer)
                raise
        if user is None or password is None:
            raise AuthFailed("a token, or a user and a password")
        await self.throttle.wait_turn(peer)
        state = self._state
        entry = state.user(user)
        stored = entry.password if entry is not None else None
        if not await self._verify(state, stored, password):
            self.throttle.failed(peer)
            if entry is None:
                raise AuthFailed(f"unknown user {user[:64]!r}")
            if stored is None:
                raise AuthFailed(f"user {user} has no password (certificate only)")
            raise AuthFailed(f"wrong password for user {user}")
        return state.user_grants[user]

    async def _verify(self, state: State, stored: str | None, password: str) -> bool:
        """argon2 in a worker thread; an unknown user is verified against a dummy hash of
        the same cost, so timing does not tell which user names exist."""
        if self._pending >= self.max_pending:
            await trio.lowlevel.checkpoint()
            raise AuthFailed("too many authentications in progress")
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self.threads)

        def work() -> bool:
            ok = verify_password(stored or state.dummy(), password)
            return ok and stored is not None

        self._pending += 1
        try:
            return await trio.to_thread.run_sync(work, limiter=self._limiter)
        finally:
            self._pending -= 1

    def certificate_grant(self, subject: str) -> Grant | None:
        """Mutual TLS: the grant of the user whose ``certificate`` is ``subject``."""
        return self._state.cert_grants.get(subject)

    def regrant(self, grant: Grant) -> Grant | None:
        """``grant``'s identity under the current rules (itself when nothing was reloaded);
        None when it no longer exists: the server then closes that connection."""
        if not grant.stale:
            return grant
        new = self._state.regrant(grant.source)
        if new is grant:  # marked stale by hand, and its generation is current
            grant.stale = False
        return new
