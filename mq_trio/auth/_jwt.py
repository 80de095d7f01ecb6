"""JWT verification (PyJWT): the ``[jwt]`` section and what a token proves.

Exactly the configured algorithm is accepted (so ``alg: none`` and an HS256 token signed
with an RS256 public key fail); signature, ``exp``, ``nbf``, ``iss`` and ``aud`` are
checked; ``sub`` is the identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ._errors import AuthFailed
from ._grant import PERMISSION_KEYS, Rules
from ._toml import Table

if TYPE_CHECKING:
    from jwt.algorithms import AllowedPublicKeys

#: HMAC algorithms and the least secret length RFC 7518 asks for (the hash's size).
HMAC = {"HS256": 32, "HS384": 48, "HS512": 64}
_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
ALGORITHMS = (*HMAC, *_RSA, *_CURVES, "EdDSA")
MIN_RSA_BITS = 2048


@attrs.frozen
class JwtConfig:
    algorithm: str
    key: bytes | AllowedPublicKeys = attrs.field(repr=False)
    issuer: str | None
    audience: tuple[str, ...] | None
    leeway: float
    require_exp: bool
    permissions_claim: str | None
    rules: Rules


@attrs.frozen
class Claims:
    """What a verified token says: who, until when, and (from the claim) what it may do."""

    sub: str
    exp: float | None
    rules: Rules | None  # None: the section's own rules


def _resolve(base: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else base / path


def _read_key_file(table: Table, key: str, base: Path) -> bytes:
    name = table.string(key, required=True)
    assert name is not None
    path = _resolve(base, name)
    try:
        return path.read_bytes()
    except OSError as exc:
        table.fail(key, f"cannot read {path}: {exc.strerror or exc}")


def _public_key(table: Table, algorithm: str, base: Path) -> AllowedPublicKeys:
    pem = _read_key_file(table, "public_key_file", base)
    try:
        key: object = load_pem_public_key(pem)
    except ValueError:
        try:
            key = x509.load_pem_x509_certificate(pem).public_key()
        except ValueError:
            table.fail("public_key_file", "not a PEM public key or certificate")
    if algorithm in _RSA:
        if not isinstance(key, rsa.RSAPublicKey):
            table.fail("public_key_file", f"{algorithm} needs an RSA key")
        if key.key_size < MIN_RSA_BITS:
            table.fail("public_key_file", f"an RSA key needs {MIN_RSA_BITS} bits or more")
        return key
    if algorithm in _CURVES:
        curve = _CURVES[algorithm]
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, curve):
            table.fail("public_key_file", f"{algorithm} needs an EC key on {curve.name}")
        return key
    if not isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        table.fail("public_key_file", "EdDSA needs an Ed25519 or Ed448 key")
    return key


def _secret(table: Table, algorithm: str, base: Path) -> bytes:
    if table.has("secret") == table.has("secret_file"):
        table.fail(None, f"{algorithm} needs one of secret and secret_file")
    if table.has("secret"):
        text = table.string("secret")
        assert text is not None
        secret = text.encode()
    else:
        secret = _read_key_file(table, "secret_file", base).rstrip(b"\r\n")
    if len(secret) < HMAC[algorithm]:
        table.fail(None, f"an {algorithm} secret needs {HMAC[algorithm]} bytes or more")
    return secret


def read_jwt(table: Table, base: Path, rules: Rules) -> JwtConfig:
    """The ``[jwt]`` section; key files relative to ``base`` (the auth file's directory)."""
    algorithm = table.string("algorithm", required=True)
    if algorithm not in ALGORITHMS:
        table.fail("algorithm", f"must be one of {', '.join(ALGORITHMS)}")
    assert algorithm is not None
    key: bytes | AllowedPublicKeys
    if algorithm in HMAC:
        key = _secret(table, algorithm, base)
    else:
        key = _public_key(table, algorithm, base)
    audience = table.raw("audience")
    if isinstance(audience, str):
        audience = [audience]
    if audience is not None and (
        not isinstance(audience, list)
        or not audience
        or not all(isinstance(a, str) and a for a in audience)
    ):
        table.fail("audience", "must be a string or a list of strings")
    config = JwtConfig(
        algorithm=algorithm,
        key=key,
        issuer=table.string("issuer"),
        audience=None if audience is None else tuple(audience),
        leeway=table.seconds("leeway", 0.0),
        require_exp=table.boolean("require_exp", True),
        permissions_claim=table.string("permissions_claim"),
        rules=rules,
    )
    table.done()
    return config


def verify(config: JwtConfig, token: str) -> Claims:
    """The token's claims, or AuthFailed saying why (never the token itself)."""
    required = ["sub"]
    if config.require_exp:
        required.append("exp")
    if config.issuer is not None:
        required.append("iss")
    if config.audience is not None:
        required.append("aud")
    try:
        payload = jwt.decode(
            token,
            config.key,
            algorithms=[config.algorithm],
            options={"require": required},
            audience=config.audience,
            issuer=config.issuer,
            leeway=config.leeway,
        )
    except (jwt.PyJWTError, ValueError) as exc:
        raise AuthFailed(f"JWT refused: {type(exc).__name__}: {exc}") from None
    sub = payload.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthFailed("JWT refused: sub must be a non-empty string")
    exp = payload.get("exp")
    rules = None
    if config.permissions_claim is not None and config.permissions_claim in payload:
        rules = claim_rules(config.permissions_claim, payload[config.permissions_claim])
    return Claims(sub, None if exp is None else float(exp), rules)


def claim_rules(name: str, value: Any) -> Rules:
    """Permissions from the token's claim: an object with the permission keys, each a list
    of globs; anything else refuses the token (a malformed grant must not become "all")."""
    if not isinstance(value, dict):
        raise AuthFailed(f"JWT refused: claim {name!r} must be an object")
    lists: dict[str, tuple[str, ...]] = {}
    for key, patterns in value.items():
        if key not in PERMISSION_KEYS:
            raise AuthFailed(f"JWT refused: claim {name!r} has an unknown key {key[:40]!r}")
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise AuthFailed(f"JWT refused: claim {name!r}: {key} must be a list of strings")
        lists[key] = tuple(patterns)
    return Rules(**lists)
