"""JWT tokens (docs/security.md, "The auth file", [jwt]): every way a token must fail,
and permissions from the section or from the token's claim."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from mq_trio.auth import AuthConfigError, Authenticator, AuthFailed, Grant

SECRET = "s" * 40
CONFIG = f"""
[jwt]
algorithm = "HS256"
secret = "{SECRET}"
issuer = "https://issuer.example"
audience = "mq-trio"
leeway = 5
permissions_claim = "mq"
publish = ["jwt.{{user}}.*"]
subscribe = ["jwt.**"]
subscribe_deny = ["jwt.private.**"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "auth.toml"
    path.write_text(text, encoding="utf-8")
    return path


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "carol",
        "iss": "https://issuer.example",
        "aud": "mq-trio",
        "exp": int(time.time()) + 600,
    }
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def hs256(**extra: Any) -> str:
    return jwt.encode(claims(**extra), SECRET, algorithm="HS256")


@pytest.fixture
def auth(tmp_path: Path) -> Authenticator:
    return Authenticator.load(write(tmp_path, CONFIG))


async def grant_for(auth: Authenticator, token: str) -> Grant:
    return await auth.authenticate(token=token, peer="192.0.2.1")


async def refused(auth: Authenticator, token: str, reason: str) -> None:
    with pytest.raises(AuthFailed, match=reason) as info:
        await grant_for(auth, token)
    assert token not in str(info.value)
    auth.throttle._hosts.clear()  # each refusal would slow the next attempt


async def test_valid_token(auth: Authenticator) -> None:
    exp = int(time.time()) + 600
    grant = await grant_for(auth, hs256(exp=exp))
    assert grant.identity == "jwt:carol"
    assert grant.expires == exp
    assert grant.may_publish("jwt.carol.x")  # the section's rules, {user} = sub
    assert not grant.may_publish("jwt.dave.x")
    assert grant.may_subscribe("jwt.a.b")
    assert not grant.may_subscribe("jwt.private.x")


async def test_grants_of_a_subject_share_permissions(auth: Authenticator) -> None:
    one = await grant_for(auth, hs256(exp=int(time.time()) + 600))
    two = await grant_for(auth, hs256(exp=int(time.time()) + 700))
    assert one is not two and one.expires != two.expires
    assert one._permissions is two._permissions  # one memo for the subject


async def test_expired(auth: Authenticator) -> None:
    await refused(auth, hs256(exp=int(time.time()) - 60), "ExpiredSignature")


async def test_leeway(auth: Authenticator) -> None:
    grant = await grant_for(auth, hs256(exp=int(time.time()) - 2))  # within 5 s of leeway
    assert grant.identity == "jwt:carol"


async def test_not_yet_valid(auth: Authenticator) -> None:
    await refused(auth, hs256(nbf=int(time.time()) + 600), "ImmatureSignature")


async def test_missing_exp(auth: Authenticator, tmp_path: Path) -> None:
    await refused(auth, hs256(exp=None), "exp")
    allowing = Authenticator.load(write(tmp_path, CONFIG + "require_exp = false\n"))
    grant = await grant_for(allowing, hs256(exp=None))
    assert grant.expires is None


async def test_alg_none(auth: Authenticator) -> None:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    unsigned = f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims())}."
    await refused(auth, unsigned, "InvalidAlgorithm|DecodeError")


async def test_wrong_audience(auth: Authenticator) -> None:
    await refused(auth, hs256(aud="someone-else"), "InvalidAudience")
    await refused(auth, hs256(aud=None), "aud")


async def test_wrong_issuer(auth: Authenticator) -> None:
    await refused(auth, hs256(iss="https://evil.example"), "InvalidIssuer")
    await refused(auth, hs256(iss=None), "iss")


async def test_wrong_signature(auth: Authenticator) -> None:
    forged = jwt.encode(claims(), "x" * 40, algorithm="HS256")
    await refused(auth, forged, "InvalidSignature")
    head, body, sig = hs256().split(".")
    tampered_body = base64.urlsafe_b64encode(
        json.dumps(claims(sub="admin")).encode()).rstrip(b"=").decode()
    await refused(auth, f"{head}.{tampered_body}.{sig}", "InvalidSignature")


async def test_garbage(auth: Authenticator) -> None:
    await refused(auth, "a.b.c", "JWT refused")
    await refused(auth, "not-a-jwt", "unknown token")


async def test_sub_required(auth: Authenticator) -> None:
    await refused(auth, hs256(sub=None), "sub")
    await refused(auth, hs256(sub=""), "sub")


async def test_sub_with_separator_cannot_fill_user(auth: Authenticator) -> None:
    await refused(auth, hs256(sub="carol.x"), "separator")


async def test_permissions_from_claim(auth: Authenticator) -> None:
    token = hs256(mq={"publish": ["orders.*"], "subscribe": ["orders.**"],
                      "subscribe_deny": ["orders.secret"]})
    grant = await grant_for(auth, token)
    assert grant.may_publish("orders.1")
    assert not grant.may_publish("jwt.carol.x")  # the claim replaces the section's rules
    assert grant.may_subscribe("orders.a.b")
    assert not grant.may_subscribe("orders.secret")
    empty = await grant_for(auth, hs256(mq={}))
    assert not empty.may_publish("orders.1") and not empty.may_subscribe("jwt.x")


@pytest.mark.parametrize(
    "claim",
    [
        "everything",
        ["orders.*"],
        {"publish": "orders.*"},
        {"publish": [1]},
        {"publish": ["orders.***"]},
        {"admin": True},
        {"publish": ["{user}.x"], "subscribe": None},
    ],
)
async def test_claim_with_bad_types(auth: Authenticator, claim: Any) -> None:
    await refused(auth, hs256(mq=claim), "JWT refused")


def pem_public(private: PrivateKeyTypes) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_config(tmp_path: Path, algorithm: str, public_pem: bytes) -> Authenticator:
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    (keys / "jwt.pub").write_bytes(public_pem)
    text = (
        f'[jwt]\nalgorithm = "{algorithm}"\npublic_key_file = "keys/jwt.pub"\n'
        'subscribe = ["**"]\n'
    )
    return Authenticator.load(write(tmp_path, text))


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA", "RS256"])
async def test_public_key_algorithms(
    tmp_path: Path, algorithm: str, rsa_key: rsa.RSAPrivateKey
) -> None:
    private: PrivateKeyTypes
    if algorithm == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        private = rsa_key
    auth = key_config(tmp_path, algorithm, pem_public(private))
    payload = {"sub": "dave", "exp": int(time.time()) + 60}
    grant = await grant_for(auth, jwt.encode(payload, private, algorithm=algorithm))
    assert grant.identity == "jwt:dave" and grant.may_subscribe("x.y")
    other = ed25519.Ed25519PrivateKey.generate() if algorithm != "EdDSA" else (
        ec.generate_private_key(ec.SECP256R1()))
    other_alg = "EdDSA" if algorithm != "EdDSA" else "ES256"
    await refused(auth, jwt.encode(payload, other, algorithm=other_alg), "InvalidAlgorithm")


async def test_hs256_token_against_rs256_config(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """The classic confusion: an HS256 token 'signed' with the server's public key."""
    public_pem = pem_public(rsa_key)
    auth = key_config(tmp_path, "RS256", public_pem)
    payload = {"sub": "eve", "exp": int(time.time()) + 60}
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=")
    import hashlib
    import hmac

    signature = base64.urlsafe_b64encode(
        hmac.new(public_pem, header + b"." + body, hashlib.sha256).digest()).rstrip(b"=")
    token = b".".join([header, body, signature]).decode()
    await refused(auth, token, "InvalidAlgorithm")


async def test_rs256_token_against_hs256_config(
    auth: Authenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    await refused(auth, jwt.encode(claims(), rsa_key, algorithm="RS256"), "InvalidAlgorithm")


@pytest.mark.parametrize(
    ("algorithm", "make", "message"),
    [
        ("RS256", lambda: ec.generate_private_key(ec.SECP256R1()), "RS256 needs an RSA key"),
        ("ES256", lambda: ec.generate_private_key(ec.SECP384R1()), "ES256 needs an EC key"),
        ("EdDSA", lambda: ec.generate_private_key(ec.SECP256R1()), "EdDSA needs an Ed25519"),
        ("RS256", lambda: rsa.generate_private_key(65537, 1024), "2048 bits"),
    ],
)
def test_wrong_key_type(tmp_path: Path, algorithm: str, make: Any, message: str) -> None:
    with pytest.raises(AuthConfigError, match=message):
        key_config(tmp_path, algorithm, pem_public(make()))


def test_not_a_public_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    private_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(AuthConfigError, match="not a PEM public key"):
        key_config(tmp_path, "RS256", private_pem)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[jwt]\nalgorithm = "HS256"\n', "one of secret and secret_file"),
        (f'[jwt]\nalgorithm = "HS256"\nsecret = "{SECRET}"\nsecret_file = "x"\n',
         "one of secret and secret_file"),
        ('[jwt]\nalgorithm = "HS256"\nsecret = "short"\n', "32 bytes or more"),
        ('[jwt]\nalgorithm = "HS256"\nsecret_file = "nope"\n', "secret_file: cannot read"),
        ('[jwt]\nalgorithm = "RS256"\n', "public_key_file: missing"),
        (f'[jwt]\nalgorithm = "HS256"\nsecret = "{SECRET}"\naudience = 3\n',
         "audience: must be a string or a list"),
        (f'[jwt]\nalgorithm = "HS256"\nsecret = "{SECRET}"\nleeway = -1\n', "leeway"),
        (f'[jwt]\nalgorithm = "HS256"\nsecret = "{SECRET}"\nleeway = "5"\n', "leeway"),
        (f'[jwt]\nalgorithm = "HS256"\nsecret = "{SECRET}"\nrequire_exp = "no"\n',
         "require_exp: must be true or false"),
        (f'[jwt]\nalgorithm = "HS256"\nsecret = "{SECRET}"\npublish = ["a***"]\n',
         r"\[jwt\] publish: bad glob"),
        (f'[jwt]\nalgorithm = "HS256"\nsecret = "{SECRET}"\nalgorithms = ["HS256"]\n',
         r"\[jwt\] algorithms: unknown key"),
    ],
)
def test_bad_sections(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(AuthConfigError, match=message):
        Authenticator.load(write(tmp_path, text))


async def test_audience_list(tmp_path: Path) -> None:
    text = f'[jwt]\nalgorithm = "HS256"\nsecret = "{SECRET}"\naudience = ["a", "b"]\n'
    auth = Authenticator.load(write(tmp_path, text))
    token = jwt.encode({"sub": "x", "aud": "b", "exp": time.time() + 60}, SECRET, "HS256")
    assert (await grant_for(auth, token)).identity == "jwt:x"
