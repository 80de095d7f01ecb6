"""What one authenticated identity may do, and the memo that makes asking cheap."""

from __future__ import annotations

from typing import Literal

import attrs

from ._globs import GlobSet

#: A memo holds at most this many topics, then starts over: a client cycling through
#: topics costs a regex match per new topic, never memory.
MEMO_LIMIT = 10_000
#: Longer topics are checked every time instead of held in a memo (10,000 of 1 MiB each
#: would be 10 GiB); the check is linear in the topic, so this stays cheap enough.
MEMO_MAX_TOPIC = 1024

PERMISSION_KEYS = ("publish", "subscribe", "publish_deny", "subscribe_deny")


@attrs.frozen
class Rules:
    """The four glob lists of a user, a token, a JWT section or a JWT's claim, as written
    (``{user}`` not yet filled in)."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    publish_deny: tuple[str, ...] = ()
    subscribe_deny: tuple[str, ...] = ()

    def compile(self, user: str) -> Permissions:
        """ValueError when a glob is bad, or ``{user}`` cannot stand for ``user``."""
        return Permissions(
            allow_publish=GlobSet(self.publish, user=user),
            allow_subscribe=GlobSet(self.subscribe, user=user),
            deny_publish=GlobSet(self.publish_deny, user=user),
            deny_subscribe=GlobSet(self.subscribe_deny, user=user),
        )


def _check(allow: GlobSet, deny: GlobSet, memo: dict[str, bool], topic: str) -> bool:
    ok = allow.matches(topic) and not deny.matches(topic)  # deny wins; default deny
    if len(topic) <= MEMO_MAX_TOPIC:
        if len(memo) >= MEMO_LIMIT:
            memo.clear()
        memo[topic] = ok
    return ok


@attrs.define(eq=False)
class Permissions:
    """Compiled rules of one identity, shared by all its grants (and connections), so a
    topic's first check on any of them serves the rest."""

    allow_publish: GlobSet
    allow_subscribe: GlobSet
    deny_publish: GlobSet
    deny_subscribe: GlobSet
    publish_memo: dict[str, bool] = attrs.field(factory=dict, repr=False)
    subscribe_memo: dict[str, bool] = attrs.field(factory=dict, repr=False)

    def may_publish(self, topic: str) -> bool:
        return _check(self.allow_publish, self.deny_publish, self.publish_memo, topic)

    def may_subscribe(self, topic: str) -> bool:
        return _check(self.allow_subscribe, self.deny_subscribe, self.subscribe_memo, topic)


@attrs.define(eq=False)
class Generation:
    """One load of the auth file; a successful reload marks the previous one stale."""

    stale: bool = False


@attrs.frozen
class Source:
    """How a grant was obtained, so ``Authenticator.regrant`` can redo it under new rules:
    the user's or token's stored hash (a changed one is a rotated secret: no regrant), the
    certificate subject, or the JWT itself (verified again)."""

    kind: Literal["user", "token", "cert", "jwt"]
    name: str
    credential: str = attrs.field(default="", repr=False)


@attrs.define(eq=False)
class Grant:
    """What one authenticated identity may do. Grants of a user or token are shared by
    all its connections; JWT grants share their permissions by subject and claim."""

    #: For logs: "user:alice", "token:ingest-bot", "jwt:<sub>", "cert:<subject>".
    identity: str
    #: time.time() when it stops being valid (a JWT's exp); None: never.
    expires: float | None
    _permissions: Permissions = attrs.field(alias="permissions", repr=False)
    _generation: Generation = attrs.field(alias="generation", repr=False)
    source: Source = attrs.field(repr=False)
    _publish_memo: dict[str, bool] = attrs.field(init=False, repr=False)
    _subscribe_memo: dict[str, bool] = attrs.field(init=False, repr=False)
    _marked_stale: bool = attrs.field(default=False, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._publish_memo = self._permissions.publish_memo
        self._subscribe_memo = self._permissions.subscribe_memo

    @property
    def stale(self) -> bool:
        """True once a reload replaced the rules this grant was made from."""
        return self._marked_stale or self._generation.stale

    @stale.setter
    def stale(self, value: bool) -> None:
        """Marks this one grant (the reload marks a whole generation at once)."""
        self._marked_stale = value

    @property
    def publish_memo(self) -> dict[str, bool]:
        """The answers of ``may_publish`` so far (shared by the identity's grants): a
        caller may look a topic up here first and call ``may_publish`` on a miss."""
        return self._publish_memo

    def may_publish(self, topic: str) -> bool:
        ok = self._publish_memo.get(topic)
        if ok is None:
            return self._permissions.may_publish(topic)
        return ok

    def may_subscribe(self, topic: str) -> bool:
        ok = self._subscribe_memo.get(topic)
        if ok is None:
            return self._permissions.may_subscribe(topic)
        return ok
