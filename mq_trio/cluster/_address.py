"""Where Redis is: ``--cluster redis://...`` parsed into a :class:`RedisAddress` (sans-IO)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import attrs

DEFAULT_PORT = 6379

#: scheme -> (tls, cluster)
_SCHEMES = {
    "redis": (False, False),
    "rediss": (True, False),
    "redis+cluster": (False, True),
    "rediss+cluster": (True, True),
}


@attrs.frozen
class RedisAddress:
    """One Redis server (or a Redis Cluster's seed node when ``cluster``)."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)  # kept out of logs
    cluster: bool = False

    def __str__(self) -> str:
        """The address without credentials, for messages and logs."""
        scheme = ("rediss" if self.tls else "redis") + ("+cluster" if self.cluster else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        db = f"/{self.db}" if self.db else ""
        return f"{scheme}://{host}:{self.port}{db}"


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS), and
    ``redis+cluster://host:port`` / ``rediss+cluster://`` (a Redis Cluster seed node).

    Raises ValueError with a one-line message for anything else.
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced [ in the host
        raise ValueError(f"invalid Redis URL {_redacted(url)!r}: {exc}") from None
    url = _redacted(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(
            f"invalid Redis URL {url!r}: the scheme must be one of "
            "redis://, rediss://, redis+cluster://, rediss+cluster://"
        )
    tls, cluster = _SCHEMES[scheme]
    if parts.query or parts.fragment:
        raise ValueError(f"invalid Redis URL {url!r}: no ?query or #fragment is allowed")
    host = parts.hostname
    if not host:
        raise ValueError(f"invalid Redis URL {url!r}: no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid Redis URL {url!r}: the port must be 1-65535") from None
    if port == 0:
        raise ValueError(f"invalid Redis URL {url!r}: the port must be 1-65535")
    path = parts.path.strip("/")
    db = 0
    if path:
        if not path.isdigit():
            raise ValueError(
                f"invalid Redis URL {url!r}: the path must be a database number, not {path!r}"
            )
        db = int(path)
    if cluster and db != 0:
        raise ValueError(f"invalid Redis URL {url!r}: a Redis Cluster has only database 0")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username is not None and password is None:
        raise ValueError(
            f"invalid Redis URL {url!r}: a user needs a password (redis://user:password@host)"
        )
    return RedisAddress(
        host=host,
        port=port or DEFAULT_PORT,
        db=db,
        tls=tls,
        username=username,
        password=password,
        cluster=cluster,
    )


def _redacted(url: str) -> str:
    """The URL with its password hidden: error messages end up in logs."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if not sep or "@" not in netloc:
        return url
    userinfo, _, hostport = netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{hostport}{slash}{path}"
