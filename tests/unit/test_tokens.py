"""`vodcore.tokens`: EdDSA playback tokens. Every way a token can be wrong is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from vodcore.tokens import (
    LEEWAY_SECONDS,
    SigningKeys,
    TokenError,
    keys_from_jwks,
    verify,
)

NOW = 1_700_000_000
VID = "vid_ab12"


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    """A JWT built by hand, so the test controls every byte (PyJWT refuses some forgeries)."""
    h = b64u(json.dumps(header).encode())
    p = b64u(json.dumps(claims).encode())
    sig = sign(f"{h}.{p}".encode()) if sign else b""
    return f"{h}.{p}.{b64u(sig)}"


@pytest.fixture
def signing(tmp_path: Path) -> SigningKeys:
    return SigningKeys(tmp_path / "keys").load_or_create()


@pytest.fixture
def public(signing: SigningKeys) -> dict[str, Any]:
    return keys_from_jwks(signing.jwks())


def claims(**over: Any) -> dict[str, Any]:
    return {"vid": VID, "iat": NOW, "exp": NOW + 600, **over}


def test_valid_token(signing: SigningKeys, public: dict[str, Any]) -> None:
    tok = signing.mint(VID, NOW, 600, session_id="s1")
    c = verify(tok, public, VID, NOW + 10)
    assert (c.video_id, c.issued_at, c.expires_at, c.kid, c.session_id) == (
        VID,
        NOW,
        NOW + 600,
        signing.current_kid,
        "s1",
    )


def test_keys_survive_reload_and_rotation(tmp_path: Path, signing: SigningKeys) -> None:
    old = signing.mint(VID, NOW, 600)
    signing.rotate()
    new = signing.mint(VID, NOW, 600)
    reloaded = keys_from_jwks(SigningKeys(tmp_path / "keys").load_or_create().jwks())
    assert len(reloaded) == 2
    verify(old, reloaded, VID, NOW)
    verify(new, reloaded, VID, NOW)


def test_jwks_has_no_private_material(signing: SigningKeys) -> None:
    for jwk in signing.jwks()["keys"]:
        assert "d" not in jwk
        assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519"


def forged_with_other_key(tmp_path: Path, kid: str) -> str:
    other = SigningKeys(tmp_path / "other").load_or_create()
    return jwt.encode(
        claims(), other.keys[other.current_kid], algorithm="EdDSA", headers={"kid": kid}
    )


def hs256_with_public_key(signing: SigningKeys, pem: bool) -> str:
    pub = signing.keys[signing.current_kid].public_key()
    secret = (
        pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if pem
        else pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return craft(
        {"alg": "HS256", "typ": "JWT", "kid": signing.current_kid},
        claims(),
        lambda msg: hmac.new(secret, msg, hashlib.sha256).digest(),
    )


def tamper_payload(tok: str) -> str:
    h, _, s = tok.split(".")
    return f"{h}.{b64u(json.dumps(claims(vid='vid_other')).encode())}.{s}"


BAD_CASES = [
    "expired",
    "expired_exactly_now",
    "issued_in_future",
    "wrong_video",
    "tampered_payload",
    "tampered_signature",
    "forged_other_key",
    "unknown_kid",
    "missing_kid",
    "alg_none",
    "alg_none_with_sig",
    "hs256_raw_public_key",
    "hs256_pem_public_key",
    "truncated",
    "two_parts",
    "non_base64",
    "empty",
    "huge",
    "missing_exp",
    "string_exp",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_tokens_refused(
    case: str, signing: SigningKeys, public: dict[str, Any], tmp_path: Path
) -> None:
    kid = signing.current_kid
    priv = signing.keys[kid]
    good = signing.mint(VID, NOW, 600)

    def ed(extra: dict[str, Any]) -> str:
        return jwt.encode(extra, priv, algorithm="EdDSA", headers={"kid": kid})

    token, now = {
        "expired": (signing.mint(VID, NOW - 7200, 600), NOW),
        "expired_exactly_now": (good, NOW + 600),
        "issued_in_future": (signing.mint(VID, NOW + LEEWAY_SECONDS + 60, 600), NOW),
        "wrong_video": (signing.mint("vid_other", NOW, 600), NOW),
        "tampered_payload": (tamper_payload(good), NOW),
        "tampered_signature": (
            good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB"),
            NOW,
        ),
        "forged_other_key": (forged_with_other_key(tmp_path, kid), NOW),
        "unknown_kid": (
            jwt.encode(claims(), priv, algorithm="EdDSA", headers={"kid": "k-nope"}),
            NOW,
        ),
        "missing_kid": (jwt.encode(claims(), priv, algorithm="EdDSA"), NOW),
        "alg_none": (craft({"alg": "none", "kid": kid}, claims()), NOW),
        "alg_none_with_sig": (craft({"alg": "none", "kid": kid}, claims(), lambda m: b"x"), NOW),
        "hs256_raw_public_key": (hs256_with_public_key(signing, pem=False), NOW),
        "hs256_pem_public_key": (hs256_with_public_key(signing, pem=True), NOW),
        "truncated": (good[: len(good) // 2], NOW),
        "two_parts": (good.rsplit(".", 1)[0], NOW),
        "non_base64": ("!!!.@@@.###", NOW),
        "empty": ("", NOW),
        "huge": (good + "A" * 5000, NOW),
        "missing_exp": (ed({"vid": VID, "iat": NOW}), NOW),
        "string_exp": (ed({"vid": VID, "iat": NOW, "exp": str(NOW + 600)}), NOW),
    }[case]
    with pytest.raises(TokenError):
        verify(token, public, VID, now)


def test_leeway_allows_small_clock_skew(signing: SigningKeys, public: dict[str, Any]) -> None:
    tok = signing.mint(VID, NOW + LEEWAY_SECONDS - 1, 600)
    verify(tok, public, VID, NOW)


def test_keys_from_jwks_skips_foreign_keys(signing: SigningKeys) -> None:
    doc = signing.jwks()
    doc["keys"].append({"kty": "RSA", "kid": "rsa1", "n": "AQAB", "e": "AQAB"})
    doc["keys"].append({"kty": "OKP", "crv": "X25519", "kid": "x1", "x": "AAAA"})
    doc["keys"].append({"kty": "OKP", "crv": "Ed25519", "x": "AAAA"})  # no kid
    assert set(keys_from_jwks(doc)) == {signing.current_kid}
    assert keys_from_jwks({}) == {}
