"""The auth file (docs/security.md, "The auth file"): TOML to checked, plain data.

Everything that can be wrong is found here, at load time, so a reload either has all
of the new rules or none of them.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from ._globs import GlobSet
from ._grant import PERMISSION_KEYS, Rules
from ._jwt import JwtConfig, read_jwt
from ._secrets import check_password_hash, check_token_hash
from ._toml import Table, read_toml

#: What ``{user}`` stands for while a JWT section's globs are checked (the real ``sub``
#: is only known per token).
_PLACEHOLDER_USER = "x"


@attrs.frozen
class UserEntry:
    name: str
    password: str | None = attrs.field(repr=False)  # argon2id hash
    certificate: str | None
    rules: Rules


@attrs.frozen
class TokenEntry:
    name: str
    hash: str = attrs.field(repr=False)  # sha256:<hex>
    rules: Rules


@attrs.frozen
class AuthFile:
    path: Path
    users: dict[str, UserEntry]
    tokens: dict[str, TokenEntry]
    jwt: JwtConfig | None


def read_rules(table: Table, user: str) -> Rules:
    """The four glob lists of a table, each glob checked (``{user}`` as ``user``)."""
    lists: dict[str, tuple[str, ...]] = {}
    for key in PERMISSION_KEYS:
        patterns = table.strings(key)
        try:
            GlobSet(patterns, user=user)
        except ValueError as exc:
            table.fail(key, f"bad glob: {exc}")
        lists[key] = patterns
    return Rules(**lists)


def _check_name(table: Table) -> str:
    name = table.name
    if not name or not name.isprintable():
        table.fail(None, "a name must be non-empty printable text")
    return name


def _read_user(table: Table) -> UserEntry:
    name = _check_name(table)
    password = table.string("password")
    if password is not None:
        why = check_password_hash(password)
        if why:
            table.fail("password", why)
    certificate = table.string("certificate")
    if password is None and certificate is None:
        table.fail(None, "a user needs a password, a certificate or both")
    rules = read_rules(table, name)
    table.done()
    return UserEntry(name, password, certificate, rules)


def _read_token(table: Table) -> TokenEntry:
    name = _check_name(table)
    stored = table.string("hash", required=True)
    assert stored is not None
    why = check_token_hash(stored)
    if why:
        table.fail("hash", why)
    rules = read_rules(table, name)
    table.done()
    return TokenEntry(name, stored, rules)


def load_auth_file(path: Path) -> AuthFile:
    """Read and check the whole file; AuthConfigError (one line) on the first problem."""
    top = Table(path, (), read_toml(path))
    users: dict[str, UserEntry] = {}
    subjects: dict[str, str] = {}
    for table in top.subtables("users"):
        user = _read_user(table)
        if user.certificate is not None:
            other = subjects.setdefault(user.certificate, user.name)
            if other != user.name:
                table.fail("certificate", f"the same subject as user {other!r}")
        users[user.name] = user
    tokens: dict[str, TokenEntry] = {}
    hashes: dict[str, str] = {}
    for table in top.subtables("tokens"):
        token = _read_token(table)
        other = hashes.setdefault(token.hash, token.name)
        if other != token.name:
            table.fail("hash", f"the same token as {other!r}")
        tokens[token.name] = token
    jwt_table = top.subtable("jwt")
    jwt = None
    if jwt_table is not None:
        jwt = read_jwt(jwt_table, path.parent, read_rules(jwt_table, _PLACEHOLDER_USER))
    top.done()
    return AuthFile(path, users, tokens, jwt)
