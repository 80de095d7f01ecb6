"""Password hashes and static tokens: making them (``mq-trio passwd``) and checking them.

Passwords are argon2id (argon2-cffi's defaults: RFC 9106's low-memory profile); tokens
are 256 random bits, so a plain SHA-256 of them is as safe to store as a slow hash and
costs microseconds to check.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

TOKEN_PREFIX = "mqt_"
TOKEN_HASH_PREFIX = "sha256:"
_HEX = frozenset("0123456789abcdef")

_hasher = argon2.PasswordHasher()


def hash_password(password: str) -> str:
    """An argon2id hash of ``password``, for a user's ``password`` key."""
    return _hasher.hash(password)


def new_token() -> tuple[str, str]:
    """A new random token for a client, and the hash to put in the auth file."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    """The stored form of a token: ``sha256:<64 hex digits>``."""
    digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
    return TOKEN_HASH_PREFIX + digest


def check_token_hash(text: str) -> str | None:
    """Why ``text`` is not a stored token hash, or None when it is one."""
    if not text.startswith(TOKEN_HASH_PREFIX):
        return f"a token hash starts with {TOKEN_HASH_PREFIX!r} (mq-trio passwd --token)"
    digest = text[len(TOKEN_HASH_PREFIX) :]
    if len(digest) != 64 or not _HEX.issuperset(digest):
        return "a token hash is 'sha256:' and 64 lowercase hex digits"
    return None


def same_hash(a: str, b: str) -> bool:
    """Constant-time equality of two stored hashes."""
    return hmac.compare_digest(a.encode(), b.encode())


def check_password_hash(text: str) -> str | None:
    """Why ``text`` is not a usable argon2id hash, or None when it is one."""
    if not text.startswith("$argon2id$"):
        return "not an argon2id hash (make one with mq-trio passwd)"
    try:
        argon2.extract_parameters(text)
    except InvalidHashError:
        return "a malformed argon2id hash"
    return None


def dummy_hash(like: str | None) -> str:
    """A hash of a random password with the same cost as ``like`` (or the default), so a
    login as an unknown user takes as long as a wrong password."""
    hasher = _hasher
    if like is not None:
        hasher = argon2.PasswordHasher.from_parameters(argon2.extract_parameters(like))
    return hasher.hash(secrets.token_urlsafe(16))


def verify_password(stored: str, password: str) -> bool:
    """Whether ``password`` matches the argon2 hash ``stored``. Slow (about 130 ms of CPU
    at the default cost): the authenticator runs it in a worker thread."""
    try:
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
