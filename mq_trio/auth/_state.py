"""One generation of rules: the grants built from one load of the auth file, and the
lookups that need no waiting (tokens, JWTs, certificates, regrants). Sans-IO."""

from __future__ import annotations

from collections import Counter

import attrs

from ._config import AuthFile, UserEntry
from ._errors import AuthFailed
from ._grant import Generation, Grant, Permissions, Rules, Source
from ._jwt import verify
from ._secrets import dummy_hash, same_hash, token_hash

#: Distinct (sub, permissions) pairs of JWTs kept compiled, then the cache starts over.
JWT_CACHE_LIMIT = 10_000


def printable(name: str, limit: int = 200) -> str:
    """A client-chosen name as it may appear in a log line (no newlines, bounded)."""
    if name.isprintable() and len(name) <= limit:
        return name
    return repr(name[:limit])


@attrs.define(eq=False)
class State:
    generation: Generation
    file: AuthFile
    user_grants: dict[str, Grant]
    cert_grants: dict[str, Grant]
    #: Stored token hash ("sha256:...") -> the token's grant.
    token_grants: dict[str, Grant]
    _jwt_permissions: dict[tuple[str, Rules], Permissions] = attrs.field(factory=dict)
    _dummy: str | None = None

    @classmethod
    def build(cls, file: AuthFile) -> State:
        """Grants for every user, certificate and token (globs were checked on load)."""
        generation = Generation()
        users: dict[str, Grant] = {}
        certs: dict[str, Grant] = {}
        for user in file.users.values():
            permissions = user.rules.compile(user.name)
            source = Source("user", user.name, user.password or "")
            users[user.name] = Grant(f"user:{user.name}", None, permissions, generation, source)
            if user.certificate is not None:
                subject = user.certificate
                cert = Source("cert", subject)
                certs[subject] = Grant(f"cert:{subject}", None, permissions, generation, cert)
        tokens: dict[str, Grant] = {}
        for token in file.tokens.values():
            permissions = token.rules.compile(token.name)
            source = Source("token", token.name, token.hash)
            tokens[token.hash] = Grant(
                f"token:{token.name}", None, permissions, generation, source
            )
        return cls(generation, file, users, certs, tokens)

    def user(self, name: str) -> UserEntry | None:
        return self.file.users.get(name)

    def dummy(self) -> str:
        """A hash to verify against for unknown users, as costly as the file's own hashes
        (made on first use, in the worker thread: it costs as much as a verification)."""
        if self._dummy is None:
            hashes = [u.password for u in self.file.users.values() if u.password]
            # "$argon2id$v=19$m=65536,t=3,p=4": the cost, without salt and digest
            costs = Counter(h.rsplit("$", 2)[0] for h in hashes).most_common(1)
            like = next(h for h in hashes if h.startswith(costs[0][0])) if costs else None
            self._dummy = dummy_hash(like)
        return self._dummy

    def token_grant(self, token: str) -> Grant:
        """A static token's grant, else a JWT's; AuthFailed otherwise."""
        digest = token_hash(token)
        grant = self.token_grants.get(digest)
        if grant is not None and same_hash(grant.source.credential, digest):
            return grant
        if self.file.jwt is not None and token.count(".") == 2:
            return self.jwt_grant(token)
        raise AuthFailed("unknown token")

    def jwt_grant(self, token: str) -> Grant:
        config = self.file.jwt
        if config is None:
            raise AuthFailed("no [jwt] section")
        claims = verify(config, token)
        rules = config.rules if claims.rules is None else claims.rules
        key = (claims.sub, rules)
        permissions = self._jwt_permissions.get(key)
        if permissions is None:
            try:
                permissions = rules.compile(claims.sub)
            except ValueError as exc:
                raise AuthFailed(f"JWT refused: {exc}") from None
            if len(self._jwt_permissions) >= JWT_CACHE_LIMIT:
                self._jwt_permissions.clear()
            self._jwt_permissions[key] = permissions
        identity = f"jwt:{printable(claims.sub)}"
        source = Source("jwt", claims.sub, token)
        return Grant(identity, claims.exp, permissions, self.generation, source)

    def regrant(self, source: Source) -> Grant | None:
        """The grant ``source`` gets under these rules; None when it no longer would (the
        user, token or certificate is gone, the password or token was changed, or the JWT
        no longer verifies)."""
        if source.kind == "user":
            user = self.user(source.name)
            if user is None or not user.password:
                return None
            if not same_hash(user.password, source.credential):
                return None
            return self.user_grants[source.name]
        if source.kind == "cert":
            return self.cert_grants.get(source.name)
        if source.kind == "token":
            return self.token_grants.get(source.credential)
        try:
            return self.jwt_grant(source.credential)
        except AuthFailed:
            return None
